"""Gradient grafting: the large-batch direction with a small-batch step length (global, not per layer).

    θ ← base.step(θ, s · G/‖G‖),   G = Σ_j w_j g_j

s is mean_j ‖g_j‖ of the step's own micro-batches (iterative), a norm recorded from a small-batch run by
:class:`GradNormRecorder` (external), or 1 (normalized GD).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from . import hvp
from .optimizers import _BASE_ARGS, _OPTIMIZER_ARGS, _STEP, MicroBatch
from .transforms import Graft

Norms = Sequence[float] | Callable[[int], float]
MODES = ("iterative", "external", "normalized")


def _schedule(norms: Any) -> Norms:
    """``norms`` as a callable or a sequence of floats; a tensor or numpy array becomes a list (one host copy)."""
    if callable(norms) or (isinstance(norms, Sequence) and not isinstance(norms, str)):
        return norms
    if isinstance(norms, Tensor) or (hasattr(norms, "ndim") and hasattr(norms, "tolist")):  # numpy, not imported
        if norms.ndim != 1:
            raise ValueError(f"norms must be one-dimensional (one norm per step), got shape {tuple(norms.shape)}")
        return [float(n) for n in norms.tolist()]
    raise TypeError(f"mode='external' needs norms: a sequence (list, 1-D tensor or array) or a callable t -> float, "
                    f"got {norms!r}")


def check_grafting_options(mode: Any, norms: Any) -> None:
    """Grafting's own options, checked before anything is built."""
    if mode not in MODES:
        raise ValueError(f"Invalid mode: {mode!r} (expected one of {', '.join(map(repr, MODES))})")
    if mode != "external" and norms is not None:
        raise ValueError(f"norms is only used with mode='external', got mode={mode!r}")


class Grafted(MicroBatch):
    __doc__ = f"""Grafting: the large-batch direction with a small-batch step length s (global, not per layer),
    around a base optimizer.

        θ ← base.step(θ, s · G/‖G‖),   G = Σ_j w_j g_j;   ‖G‖ = 0 gives a zero step.

    ``mode="iterative"``: s = mean_j ‖g_j‖ over this step's own micro-batches; ``"external"``: s = ``norms[t]``
    at step t, recorded from a small-batch run; ``"normalized"`` (NGD): s = 1. The base receives
    s · G/‖G‖ (s ≥ 0), so with ``maximize=True`` the step ascends along G with the same length. Around SGD
    without momentum the step length is lr · s; a base that rescales its gradient itself (the Adam family
    divides by a running RMS of it) renormalizes s away, and only the direction remains grafted.

    Args:
{_BASE_ARGS}
        mode: ``"iterative"``, ``"external"`` or ``"normalized"``.
        norms: for ``mode="external"`` only: a sequence indexed by step (a list, a 1-D tensor or
            numpy array), or a callable ``t -> float``; record one with :class:`GradNormRecorder`.
{_OPTIMIZER_ARGS}

{_STEP}
    """

    def __init__(self, base: torch.optim.Optimizer, *, micro_batch_size: int, mode: str = "iterative",
                 norms: Norms | None = None, max_grad_norm: float | None = None, skip_nonfinite: bool = False,
                 loss_scale: float | str | None = None, process_group: Any = "default") -> None:
        check_grafting_options(mode, norms)
        super().__init__(base, micro_batch_size=micro_batch_size, max_grad_norm=max_grad_norm,
                         skip_nonfinite=skip_nonfinite, loss_scale=loss_scale, process_group=process_group)
        self.mode = mode
        self.norms = _schedule(norms) if mode == "external" else None
        self._transforms = (Graft(self),)

    def _settings_repr(self) -> str:
        return f"{super()._settings_repr()}, mode={self.mode!r}"

    def _recorded_length(self) -> float:
        """s = norms[t] (or norms(t)) for the coming step t, checked."""
        t = self.step_count
        if callable(self.norms):
            length = self.norms(t)
        elif t < len(self.norms):
            length = self.norms[t]
        else:
            raise IndexError(f"norms has {len(self.norms)} entries but step {t} needs norms[{t}]: record a longer run")
        length = float(length)
        if not math.isfinite(length) or length < 0:
            raise ValueError(f"Invalid norms[{t}]: {length} (expected a finite number >= 0)")
        return length


class GradNormRecorder:
    """Record ‖.grad‖ after every step of ``optimizer`` (a step post-hook, no host sync).

    The norm is that of the gradient the step applied: after clipping (``max_grad_norm``, or the
    user's ``clip_grad_norm_`` before ``torch.optim.SGD.step``), so that lr times it is the
    small-batch step length (without momentum), which external grafting then reproduces.

    Run small-batch SGD (``torch.optim.SGD`` or ``MicroBatchSGD`` with
    ``micro_batch_size`` equal to the batch size) with a recorder attached, then feed
    ``recorder.norms()`` to ``GraftedSGD(mode="external", norms=...)`` (or ``Grafted``).
    """

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self._norms: list[Tensor] = []
        self._handle = optimizer.register_step_post_hook(self._record)

    def _record(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        self._norms.append(hvp.squared_norm(grads).sqrt().detach())

    def norms(self) -> list[float]:
        """The recorded norms, one per step, as floats (one host sync)."""
        return torch.stack(self._norms).tolist() if self._norms else []

    def remove(self) -> None:
        """Stop recording."""
        self._handle.remove()
