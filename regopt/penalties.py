"""The regularizers, each as the scalar S_j whose parameter gradient v_j = ∇_θ S_j gives R_j = ‖v_j‖².

A penalty is two small functions: ``sample`` draws whatever randomness S_j needs
from the micro-batch's (detached) logits, once per micro-batch, and ``scalar``
evaluates S_j from the closure's output and that draw. Keeping the draw apart
lets the finite-difference path re-evaluate the *same* S_j at a shifted θ.

| penalty | S_j |
|---|---|
| ``GRAD_NORM`` (GN) | L_j, the closure's loss |
| ``FISHER_TRACE`` (FT) | mean_i CE(f(x_i), ŷ_i), ŷ_i ~ Categorical(softmax(f(x_i))) |
| ``AVERAGE_JACOBIAN`` (AJ) | Σ_c mean_i f_c(x_i) |
| ``UNIT_JACOBIAN`` (UJ) | uᵀ mean_i f(x_i), u = z/‖z‖, z ~ N(0, I_C) (drawn in float32 at least) |
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class Penalty:
    name: str
    needs_logits: bool
    sample: Callable[[Tensor | None, torch.Generator | None], Tensor | None]
    scalar: Callable[[Tensor, Tensor | None, Tensor | None], Tensor]


def _no_draw(logits: Tensor | None, generator: torch.Generator | None) -> None:
    return None


def _sample_labels(logits: Tensor, generator: torch.Generator | None) -> Tensor:
    """ŷ_i ~ Categorical(softmax(logits_i)), one label per example; not differentiated."""
    probs = torch.softmax(logits.detach().float(), dim=1)
    # Non-finite logits draw from a uniform row instead of failing inside multinomial: R_j is then
    # non-finite and the step's finiteness check names the micro-batch (no host sync here).
    probs = torch.where(probs.isfinite().all(dim=1, keepdim=True), probs, 1.0 / probs.shape[1])
    return sample_categorical(probs, generator)


def sample_categorical(probs: Tensor, generator: torch.Generator | None) -> Tensor:
    """One index per row, argmax_c p_c / q_c with q_c ~ Exp(1): torch.multinomial(probs, 1)'s own algorithm
    (the same draws from the same generator), without its two host-synchronizing validity checks."""
    return (probs / torch.empty_like(probs).exponential_(generator=generator)).argmax(dim=1)


def _sample_unit_direction(logits: Tensor, generator: torch.Generator | None) -> Tensor:
    """u = z / ‖z‖ with z ~ N(0, I_C), in float32 at least (not in the bfloat16/float16 of autocast logits)."""
    z = torch.randn(logits.shape[1], generator=generator, device=logits.device, dtype=_at_least_float32(logits))
    return z / torch.linalg.vector_norm(z)


def _at_least_float32(t: Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


def _projected_mean_logit(loss: Tensor, logits: Tensor, u: Tensor) -> Tensor:
    """uᵀ mean_i f(x_i), the mean taken in u's precision."""
    return logits.mean(dim=0, dtype=u.dtype) @ u


GRAD_NORM = Penalty("grad_norm", False, _no_draw, lambda loss, logits, draw: loss)
FISHER_TRACE = Penalty(
    "fisher_trace", True, _sample_labels, lambda loss, logits, labels: F.cross_entropy(logits, labels)
)
AVERAGE_JACOBIAN = Penalty(
    "average_jacobian", True, _no_draw, lambda loss, logits, draw: logits.mean(dim=0).sum()
)
UNIT_JACOBIAN = Penalty("unit_jacobian", True, _sample_unit_direction, _projected_mean_logit)
