"""regopt in a LightningModule: manual optimization, so that Lightning keeps counting steps, stepping the
scheduler you ask it to, logging, checkpointing and running its precision plugin.

    python examples/lightning_module.py --max-steps 5                   # prints "global_step 5"
    python examples/lightning_module.py --max-steps 10 --resume         # continues from the last checkpoint
    python examples/lightning_module.py --precision bf16-mixed
    python examples/lightning_module.py --base adamw                    # regopt.GradNorm(torch.optim.AdamW(...))

Why manual optimization: in automatic optimization Lightning calls ``optimizer.step(closure)`` with a
closure that runs ``training_step`` and ``backward()`` on the whole batch, while a regopt step must call the
loss once per micro-batch itself (a regopt optimizer refuses that call and shows the recipe below). With
``self.automatic_optimization = False`` the training step is two lines:

    opt = self.optimizers()                                   # Lightning's wrapper: counts global_step
    opt.step(batch=batch, loss_fn=self.micro_batch_loss)      # regopt splits the batch, calls the loss per part

``LightningOptimizer.step`` and the precision plugin pass ``batch=`` and ``loss_fn=`` through and add a
zero-argument closure of their own, which regopt calls once, after it has written ``.grad`` and before the
update, so ``on_before_optimizer_step`` hooks see the gradient the update applies. Use ``precision="32"``
or ``"bf16-mixed"``; on a GPU, ``"16-mixed"``'s GradScaler would unscale gradients before the step has
computed them (from Lightning's code; on the CPU Lightning runs ``16-mixed`` as bfloat16): for float16,
use regopt's own ``loss_scale="dynamic"``. Lightning's ``gradient_clip_val`` applies to
automatic optimization only: pass ``max_grad_norm=`` to the regopt optimizer instead.

Around any base optimizer (``--base adamw``: ``regopt.GradNorm(torch.optim.AdamW(...), ...)``) the module is
the same. Build the LR scheduler on the regopt optimizer that ``configure_optimizers`` returns, not on its
base: they share ``param_groups``, so either would move the learning rate, but Lightning refuses a scheduler
whose optimizer is not one it was given.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from _common import BASES, fashion_mnist, gradnorm_optimizer, small_cnn


class RegoptModule(L.LightningModule):
    def __init__(self, penalty: float = 0.01, micro_batch_size: int = 64, base: str = "sgd") -> None:
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.model = small_cnn()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def micro_batch_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The mean loss over one micro-batch (regopt calls it once per micro-batch)."""
        return F.cross_entropy(self(x), y)

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        loss = opt.step(batch=batch, loss_fn=self.micro_batch_loss)
        self.lr_schedulers().step()
        # the wrapper reads the regopt optimizer's attributes; as_dict() syncs with the device once per call
        self.log_dict(opt.stats.as_dict(prefix="train/"))
        self.log("micro_grad_sq_norm", opt.stats.micro_grad_sq_norm, prog_bar=True)
        return loss

    def configure_optimizers(self):
        optimizer = gradnorm_optimizer(self.parameters(), self.hparams.base, self.hparams.micro_batch_size,
                                       self.hparams.penalty)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.5)  # on it, not on its base
        return {"optimizer": optimizer, "lr_scheduler": scheduler}


def train(max_steps: int, root: Path, precision: str = "32-true", resume: bool = False,
          batch_size: int = 256, base: str = "sgd") -> tuple[L.Trainer, RegoptModule]:
    """Train to ``max_steps``; save ``root/last.ckpt``; with ``resume``, continue from it."""
    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)
    train_set, _ = fashion_mnist(train_size=5 * batch_size)  # 5 batches an epoch, pre-shuffled: reproducible
    loader = DataLoader(train_set, batch_size=batch_size, shuffle=False, drop_last=True)
    module = RegoptModule(base=base)
    if not resume:  # a fresh run: an earlier run's last.ckpt in ROOT must not be taken for this one's
        (root / "last.ckpt").unlink(missing_ok=True)
    # Lightning's own checkpointing: last.ckpt after every step, with the optimizer and scheduler states
    checkpoints = L.pytorch.callbacks.ModelCheckpoint(dirpath=root, save_last=True, save_top_k=0,
                                                      every_n_train_steps=1)
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, precision=precision,
                        default_root_dir=root, logger=L.pytorch.loggers.CSVLogger(root, name="logs"),
                        callbacks=[checkpoints], enable_progress_bar=False, enable_model_summary=False,
                        log_every_n_steps=1)
    trainer.fit(module, loader, ckpt_path=root / "last.ckpt" if resume else None, weights_only=True)
    return trainer, module


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--max-steps", type=int, default=5)
    p.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed"])
    p.add_argument("--resume", action="store_true", help="continue from ROOT/last.ckpt")
    p.add_argument("--base", default="sgd", choices=BASES, help="the optimizer that applies the update")
    p.add_argument("--root", type=Path, default=Path("examples_out/lightning"))
    args = p.parse_args(argv)
    trainer, _ = train(args.max_steps, args.root, args.precision, args.resume, base=args.base)
    logged = {k: float(v) for k, v in trainer.logged_metrics.items()}
    if "micro_grad_sq_norm" in logged:  # nothing is logged when the checkpoint was already at --max-steps
        print(f"logged: micro_grad_sq_norm {logged['micro_grad_sq_norm']:.4f}, loss {logged['train/loss']:.4f}")
    optimizer = trainer.optimizers[0]
    print(f"optimizer: {type(optimizer).__name__} around {type(optimizer.base).__name__}")
    print(f"global_step {trainer.global_step}")


if __name__ == "__main__":
    main()
