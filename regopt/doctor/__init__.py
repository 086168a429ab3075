"""``python -m regopt.doctor``: does regopt work on *your* model, and what does it cost there?

    python -m regopt.doctor torchvision.models:resnet18 --input 3,32,32 --classes 10 --batch 256 --micro-batch 32
    report = regopt.doctor.run(model, loss_fn, (x, y), micro_batch_size=32)   # in a notebook

One report (terminal, and report.txt/.md/.json under ``--out``) in five parts, each with its own time
limit (a part that fails or overruns is reported as such; the others still run):

1. whether ``method='exact'`` runs (a double backward through every module), and if not, the module that
   stops it and the switch that fixes it;
2. float64 equality of each optimizer's step with the naive loop (:mod:`regopt.reference`);
3. finite-difference faithfulness: ‖P_fd − P‖/‖P‖ and cos(P_fd, P) for P = Σ_j w_j ∇R_j (GN) at two ε,
   with the recommendation (exact, or finite differences are safe here);
4. step time and peak memory, interleaved, as ratios to accumulated ``torch.optim.SGD``;
5. what the drop-in contract says about this model (BatchNorm micro-batches of one example, frozen
   parameters, parameters the loss never reaches, eval mode).

``loss_fn(model, *parts)`` returns the micro-batch's mean loss, or ``(loss, logits)`` (FT, AJ, UJ need the
logits). The model is never changed: every part works on copies.
"""

from __future__ import annotations

import copy
import platform
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import __version__
from ..batching import batch_size
from .checks import contract, exact_path, fd_faithfulness, reference_equality
from .parts import PartResult, Subject, run_part
from .report import Report
from .timing import step_costs

# name, title, function; the exact path first: the later parts read its verdict
PARTS = (
    ("exact", "exact penalty (double backward)", exact_path),
    ("reference", "float64 equality with regopt.reference", reference_equality),
    ("fd", "finite-difference faithfulness (GN)", fd_faithfulness),
    ("timing", "step time and peak memory", step_costs),
    ("contract", "drop-in contract", contract),
)
PART_NAMES = tuple(name for name, *_ in PARTS)


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {key: value.to(device) for key, value in batch.items()}
    return type(batch)(value.to(device) for value in batch)


def _setting(model: nn.Module, subject: Subject) -> dict[str, Any]:
    return {"model": type(model).__name__, "parameters": sum(p.numel() for p in model.parameters()),
            "batch_size": batch_size(subject.batch), "micro_batch_size": subject.micro_batch_size,
            "penalty": subject.penalty, "device": str(subject.device), "torch": torch.__version__,
            "regopt": __version__, "python": platform.python_version(), "rounds": subject.rounds}


def run(model: nn.Module, loss_fn: Callable[..., Any], batch: Any, *, micro_batch_size: int, penalty: float = 0.01,
        device: str | torch.device | None = None, lr: float = 1e-3, time_limit: float = 120.0, rounds: int = 3,
        parts: tuple[str, ...] = PART_NAMES, out: str | Path | None = None, seed: int = 0) -> Report:
    """Examine ``model`` on ``batch`` (see the module docstring); each part gets ``time_limit`` seconds.

    ``device`` defaults to the model's; ``parts`` chooses among :data:`PART_NAMES`; ``out`` writes
    report.txt/.md/.json there. Returns the :class:`Report` (``report.text()`` is the terminal text).
    """
    unknown = set(parts) - set(PART_NAMES)
    if unknown:
        raise ValueError(f"unknown parts {sorted(unknown)}: expected some of {', '.join(PART_NAMES)}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    subject = Subject(copy.deepcopy(model).to(device), loss_fn, _to_device(batch, device), micro_batch_size,
                      penalty, device, lr, rounds, seed)
    report = Report(_setting(model, subject))
    for name, title, part in PARTS:
        if name in parts:
            report.parts.append(run_part(name, title, part, subject, time_limit))
    if out is not None:
        report.write(out)
    return report


__all__ = ["PART_NAMES", "PartResult", "Report", "run"]
