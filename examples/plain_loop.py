"""regopt in a plain PyTorch loop: DataLoader, LR scheduler, bf16 autocast, checkpoint and resume.

    python examples/plain_loop.py --steps 40                      # train 40 steps, save examples_out/plain.pt
    python examples/plain_loop.py --steps 20 && python examples/plain_loop.py --steps 40 --resume
                                                                  # the same 40 steps, interrupted at 20
    python examples/plain_loop.py --bf16                          # the closure under torch.autocast(bfloat16)
    python examples/plain_loop.py --base adamw                    # the same penalty around torch.optim.AdamW

The only change from torch.optim.SGD: ``optimizer.step(loss_fn, batch)`` instead of
``loss.backward(); optimizer.step()``. regopt splits the batch into micro-batches, calls ``loss_fn`` on each
and applies SGD's update with the gradient-norm penalty's gradient folded in. With ``--base adamw`` the
optimizer is ``regopt.GradNorm(torch.optim.AdamW(...), ...)``: the same gradient, AdamW's update; nothing
else in the loop changes (scheduler, checkpoint and resume included).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from _common import BASES, accuracy, fashion_mnist, gradnorm_optimizer, small_cnn


def batches(loader: DataLoader, start_step: int):
    """(step, batch) from ``start_step`` on, epoch after epoch (a resumed run sees the batches it would have)."""
    step, skip = start_step, start_step % len(loader)
    while True:
        for batch in itertools.islice(loader, skip, None):
            yield step, batch
            step += 1
        skip = 0


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=40, help="train until this optimizer step")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--micro-batch-size", type=int, default=64)
    p.add_argument("--penalty", type=float, default=0.01)
    p.add_argument("--bf16", action="store_true", help="run the closure under torch.autocast(bfloat16)")
    p.add_argument("--base", default="sgd", choices=BASES, help="the optimizer that applies the update")
    p.add_argument("--checkpoint", type=Path, default=Path("examples_out/plain.pt"))
    p.add_argument("--resume", action="store_true", help="continue from --checkpoint")
    args = p.parse_args(argv)
    torch.set_num_threads(1)

    train, test = fashion_mnist()
    loader = DataLoader(train, batch_size=args.batch_size, shuffle=False, drop_last=True)  # pre-shuffled
    model = small_cnn()
    optimizer = gradnorm_optimizer(model.parameters(), args.base, args.micro_batch_size, args.penalty)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=15, gamma=0.5)
    start = 0
    if args.resume:
        state = torch.load(args.checkpoint, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start = state["step"]

    def loss_fn(x, y):  # called once per micro-batch; returns its mean loss
        return F.cross_entropy(model(x), y)

    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if args.bf16 else contextlib.nullcontext()
    step = start
    for step, batch in batches(loader, start):
        if step >= args.steps:
            break
        with autocast:
            optimizer.step(loss_fn, batch)
        scheduler.step()
        if (step + 1) % 10 == 0:  # as_dict() syncs with the device once: log every few steps
            stats = optimizer.stats.as_dict()
            print(f"step {step + 1}: loss {stats['loss']:.4f}, micro_grad_sq_norm {stats['micro_grad_sq_norm']:.4f}, "
                  f"lr {scheduler.get_last_lr()[0]:.4f}")
    step = max(step, start)
    args.checkpoint.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "step": step}, args.checkpoint)
    result = {"step": step, "test_accuracy": accuracy(model, test)}
    print(f"final step {step}, test accuracy {result['test_accuracy']:.4f}, checkpoint {args.checkpoint}")
    return result


if __name__ == "__main__":
    main()
