"""``python -m regopt.doctor MODULE:FACTORY --input C,H,W [options]``: build the model, draw a random batch, report.

    python -m regopt.doctor torchvision.models:resnet18 --model-kwargs '{"num_classes": 10}' \\
        --input 3,32,32 --batch 32 --micro-batch 8 --out doctor-report/

The batch is ``(x, y)``: x ~ N(0, 1) of shape (batch, *input), y uniform over ``--classes`` (default: the
width of the model's output). The loss is cross-entropy, returning ``(loss, logits)``, unless ``--loss
MODULE:FN`` names a ``fn(model, x, y)`` returning the mean loss or ``(loss, logits)``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import PART_NAMES, run


def classification_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy of ``model(x)`` against ``y``, and the logits (FT, AJ and UJ need them)."""
    logits = model(x)
    return F.cross_entropy(logits, y), logits


def load(spec: str, what: str) -> Callable[..., Any]:
    """The object ``module.path:name`` names; a one-line error when the module or the name is not there."""
    module_name, _, name = spec.partition(":")
    if not module_name or not name:
        raise SystemExit(f"regopt.doctor: {what} must be MODULE:NAME (e.g. torchvision.models:resnet18), got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise SystemExit(f"regopt.doctor: cannot import {module_name!r} for {what}: {error}") from error
    try:
        return getattr(module, name)
    except AttributeError as error:
        raise SystemExit(f"regopt.doctor: {module_name} has no {name!r} ({what})") from error


def shape(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated sizes such as 3,32,32, got {text!r}") from None
    if not dims or min(dims) < 1:
        raise argparse.ArgumentTypeError(f"expected positive sizes, got {text!r}")
    return dims


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m regopt.doctor", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("model", help="MODULE:FACTORY, called with --model-kwargs to build the model")
    p.add_argument("--input", type=shape, required=True, help="one example's shape, e.g. 3,32,32")
    p.add_argument("--classes", type=int, default=None, help="label range (default: the model's output width)")
    p.add_argument("--model-kwargs", type=json.loads, default={}, help="JSON keyword arguments for FACTORY")
    p.add_argument("--loss", default=None, help="MODULE:FN with fn(model, x, y) -> loss or (loss, logits)")
    p.add_argument("--batch", type=int, default=256, help="examples per step")
    p.add_argument("--micro-batch", type=int, default=32, help="micro_batch_size")
    p.add_argument("--penalty", type=float, default=0.01, help="λ")
    p.add_argument("--device", default="cpu", help="torch device for the timings and checks")
    p.add_argument("--time-limit", type=float, default=120.0, help="seconds per part")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds of the step-time part")
    p.add_argument("--parts", default=",".join(PART_NAMES), help="which parts, comma-separated")
    p.add_argument("--seed", type=int, default=0, help="seed of the model's initialization and the batch")
    p.add_argument("--out", default=None, help="folder for report.txt, report.md and report.json")
    return p


def random_batch(model: nn.Module, args: argparse.Namespace, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(args.seed)
    x = torch.randn(args.batch, *args.input, generator=generator)
    classes = args.classes
    if classes is None:
        with torch.no_grad():
            classes = model.to(device)(x[:2].to(device)).shape[-1]
    return x, torch.randint(0, classes, (args.batch,), generator=generator)


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    factory = load(args.model, "the model")
    loss_fn = load(args.loss, "--loss") if args.loss else classification_loss
    torch.manual_seed(args.seed)
    model = factory(**args.model_kwargs)
    device = torch.device(args.device)
    batch = random_batch(model, args, device)
    report = run(model, loss_fn, batch, micro_batch_size=args.micro_batch, penalty=args.penalty, device=device,
                 time_limit=args.time_limit, rounds=args.rounds, parts=tuple(args.parts.split(",")), out=args.out,
                 seed=args.seed)
    print(report.text())
    if args.out:
        print(f"(written: {args.out}/report.txt, report.md, report.json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
