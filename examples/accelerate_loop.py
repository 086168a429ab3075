"""regopt with Hugging Face Accelerate: ``accelerator.prepare(model, optimizer, dataloader)``, bf16 on the CPU.

    python examples/accelerate_loop.py --steps 40        # the same steps as examples/plain_loop.py --bf16
    python examples/accelerate_loop.py --base adamw      # regopt.GradNorm(torch.optim.AdamW(...)), prepared alike

A prepared optimizer forwards only ``closure`` to the optimizer's ``step``, so the loss function and the
batch travel together in ``regopt.BatchClosure(loss_fn, batch)``; the step is then exactly
``optimizer.step(loss_fn, batch)``. Accelerate's ``mixed_precision="bf16"`` runs the model's forward under
autocast, which is all regopt needs. A regopt optimizer around any base (``--base adamw``) is prepared the
same way, and so is an LR scheduler built on it. Two things not to combine with a regopt optimizer:

- ``gradient_accumulation_steps`` > 1 / ``accelerator.accumulate``: regopt already accumulates, over the
  micro-batches of one large batch, inside one step (``micro_batch_size``); Accelerate's accumulation
  would skip whole steps and leave regopt nothing to add to. Pass the large batch to one step instead.
- ``mixed_precision="fp16"``: Accelerate's GradScaler would unscale gradients before the step computes
  them (from Accelerate's code; not run here). Use bf16, or float16 autocast yourself with regopt's
  ``loss_scale="dynamic"``.

Under several processes (``accelerate launch``), the prepared model is a DistributedDataParallel wrapper:
call ``accelerator.unwrap_model(model)`` inside ``loss_fn`` (regopt all-reduces once per step itself, and
refuses a forward through the wrapper, which would synchronize every micro-batch).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch.utils.data import DataLoader

from _common import BASES, accuracy, fashion_mnist, gradnorm_optimizer, small_cnn
from plain_loop import batches

import regopt


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--micro-batch-size", type=int, default=64)
    p.add_argument("--penalty", type=float, default=0.01)
    p.add_argument("--mixed-precision", default="bf16", choices=["no", "bf16"])
    p.add_argument("--base", default="sgd", choices=BASES, help="the optimizer that applies the update")
    p.add_argument("--checkpoint", type=Path, default=Path("examples_out/accelerate.pt"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)

    accelerator = Accelerator(mixed_precision=args.mixed_precision, cpu=True)
    train, test = fashion_mnist()
    loader = DataLoader(train, batch_size=args.batch_size, shuffle=False, drop_last=True)  # pre-shuffled
    model = small_cnn()
    optimizer = gradnorm_optimizer(model.parameters(), args.base, args.micro_batch_size, args.penalty)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=15, gamma=0.5)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)

    def loss_fn(x, y):  # called once per micro-batch; the prepared model's forward runs under bf16 autocast
        return F.cross_entropy(model(x), y)

    for step, batch in batches(loader, 0):
        if step >= args.steps:
            break
        optimizer.step(regopt.BatchClosure(loss_fn, batch))
        scheduler.step()
        if (step + 1) % 10 == 0:
            stats = optimizer.optimizer.stats.as_dict()  # the regopt optimizer inside the prepared one
            print(f"step {step + 1}: loss {stats['loss']:.4f}, micro_grad_sq_norm {stats['micro_grad_sq_norm']:.4f}")
    unwrapped = accelerator.unwrap_model(model)
    args.checkpoint.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": unwrapped.state_dict(), "step": args.steps}, args.checkpoint)
    result = {"step": args.steps, "test_accuracy": accuracy(unwrapped, test)}
    print(f"final step {args.steps}, test accuracy {result['test_accuracy']:.4f}, checkpoint {args.checkpoint}")
    return result


if __name__ == "__main__":
    main()
