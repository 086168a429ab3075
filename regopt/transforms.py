"""What turns the accumulated gradient into the one the base optimizer receives: small transforms, composed.

An optimizer holds a tuple of transforms, applied in order after the step's one host sync:

    AddPenalty:  G ← G + λP   (G − λP for parameters of groups with ``maximize=True``)
    Graft:       G ← s · G/‖G‖   (0 where ‖G‖ = 0)

Each may also ``prepare`` before the step does any work (reading what may refuse the step, so that a
refused step changes nothing), and says whether it ``accumulates``: whether the transformed gradients of
several ``backward`` calls add up to the transformed gradient of their batches together.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .engine import Accumulation


class AddPenalty:
    """G + λP, with P = Σ_j w_j ∇R_j; −λ where the group maximizes (it ascends L and still minimizes R)."""

    accumulates = True  # linear in the micro-batch sums: backward() calls add up

    def __init__(self, optimizer: Any) -> None:
        self.optimizer = optimizer  # λ (``penalty``) and ``maximize`` are read at each step: both may change

    def prepare(self) -> None:
        pass

    def __call__(self, grad: list[Tensor], acc: Accumulation, grad_norm: Tensor, params: list[Tensor]) -> list[Tensor]:
        return grad if acc.penalty_grad is None else self.add(grad, acc.penalty_grad, params)

    def add(self, grad: list[Tensor], penalty_grad: list[Tensor], params: list[Tensor]) -> list[Tensor]:
        """``grad`` += ±λ ``penalty_grad`` in place."""
        penalty, ascending = self.optimizer.penalty, self.optimizer._maximizing(params)
        if not any(ascending):
            torch._foreach_add_(grad, penalty_grad, alpha=penalty)
        elif all(ascending):
            torch._foreach_add_(grad, penalty_grad, alpha=-penalty)
        else:
            for sign in (1.0, -1.0):
                chosen = [i for i, up in enumerate(ascending) if up == (sign < 0)]
                torch._foreach_add_([grad[i] for i in chosen], [penalty_grad[i] for i in chosen], alpha=sign * penalty)
        return grad


class Graft:
    """s · G/‖G‖, 0 where ‖G‖ = 0, with the grafted optimizer's s: mean_j ‖g_j‖ (``mode="iterative"``), 1
    (``"normalized"``) or its recorded ``norms[t]`` (``"external"``)."""

    accumulates = False  # s · G/‖G‖ of a sum is not the sum of the rescaled parts

    def __init__(self, optimizer: Any) -> None:
        self.optimizer = optimizer
        self._external_length: float | None = None

    def prepare(self) -> None:
        # norms[t] is read before any work, so that a schedule that ran out changes nothing.
        self._external_length = self.optimizer._recorded_length() if self.optimizer.mode == "external" else None

    def __call__(self, grad: list[Tensor], acc: Accumulation, grad_norm: Tensor, params: list[Tensor]) -> list[Tensor]:
        mode = self.optimizer.mode
        length = acc.mean_micro_grad_norm if mode == "iterative" else 1.0 if mode == "normalized" \
            else self._external_length
        scale = torch.where(grad_norm > 0, length / grad_norm, torch.zeros_like(grad_norm))
        torch._foreach_mul_(grad, scale)
        return grad
