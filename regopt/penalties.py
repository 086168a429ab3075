"""The regularizers, each as the scalar S_j whose parameter gradient v_j = ∇_θ S_j gives R_j = ‖v_j‖².

A penalty is two small functions: ``sample`` draws whatever randomness S_j needs
from the micro-batch's (detached) logits, once per micro-batch, and ``scalar``
evaluates S_j from the closure's output and that draw. Keeping the draw apart
lets the finite-difference path re-evaluate the *same* S_j at a shifted θ.

Logits have shape [n, …, C]: every position i of the leading dimensions (one per example for
[n, C], one per token for a language model's [n, T, C]) is an example, f_i its C logits. An
optional bool ``mask`` of shape [n, …] keeps the positions where it is True (K of the N positions);
without it every position is kept. The means run over the kept positions:

| penalty | S_j |
|---|---|
| ``GRAD_NORM`` (GN) | L_j, the closure's loss |
| ``FISHER_TRACE`` (FT) | mean_i CE(f_i, ŷ_i), ŷ_i ~ Categorical(softmax(f_i)) |
| ``AVERAGE_JACOBIAN`` (AJ) | Σ_c mean_i f_{i,c} |
| ``UNIT_JACOBIAN`` (UJ) | uᵀ mean_i f_i, u = z/‖z‖, z ~ N(0, I_C) (drawn in float32 at least) |

FT draws a label for every position, kept or not (one draw over all N rows, so the generator moves
the same whatever the mask, and nothing waits on the host to count K); the labels of left-out
positions are never used. With K = 0 the masked mean is 0 (Σ over nothing, divided by max(K, 1)),
so S_j is constant and R_j = 0: a micro-batch without a kept position is not regularized.
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
    scalar: Callable[[Tensor, Tensor | None, Tensor | None, Tensor | None], Tensor]  # (loss, logits, draw, mask)


def _no_draw(logits: Tensor | None, generator: torch.Generator | None) -> None:
    return None


def positions(logits: Tensor) -> Tensor:
    """The logits [n, …, C] as rows [N, C], one per position (a view; [n, C] itself unchanged)."""
    return logits.reshape(-1, logits.shape[-1])


def _masked_mean(rows: Tensor, mask: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """Σ_{i kept} rows_i / max(K, 1) over dim 0, ``mask`` [n, …] flattened to the N rows.

    ``torch.where`` rather than a product, so that a left-out row that is not finite stays out;
    the count is a device tensor (boolean indexing would wait on the host for K)."""
    kept = mask.reshape(-1)
    total = torch.where(kept.view(-1, *[1] * (rows.dim() - 1)), rows, 0).sum(dim=0, dtype=dtype)
    return total / kept.sum().clamp(min=1)


def _sample_labels(logits: Tensor, generator: torch.Generator | None) -> Tensor:
    """ŷ_i ~ Categorical(softmax(f_i)), one label per position (N of them); not differentiated."""
    probs = torch.softmax(positions(logits).detach().float(), dim=1)
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
    z = torch.randn(logits.shape[-1], generator=generator, device=logits.device, dtype=_at_least_float32(logits))
    return z / torch.linalg.vector_norm(z)


def _at_least_float32(t: Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


def _loss_itself(loss: Tensor, logits: Tensor | None, draw: None, mask: Tensor | None = None) -> Tensor:
    """L_j."""
    return loss


def _mean_cross_entropy(loss: Tensor, logits: Tensor, labels: Tensor, mask: Tensor | None = None) -> Tensor:
    """mean_i CE(f_i, ŷ_i) over the kept positions."""
    if mask is None:
        return F.cross_entropy(positions(logits), labels)
    # Left-out rows enter as zeros: their CE's backward would turn non-finite logits into NaN gradients.
    rows = torch.where(mask.reshape(-1, 1), positions(logits), 0)
    return _masked_mean(F.cross_entropy(rows, labels, reduction="none"), mask)


def _summed_mean_logit(loss: Tensor, logits: Tensor, draw: None, mask: Tensor | None = None) -> Tensor:
    """Σ_c mean_i f_{i,c} over the kept positions."""
    rows = positions(logits)
    return (rows.mean(dim=0) if mask is None else _masked_mean(rows, mask)).sum()


def _projected_mean_logit(loss: Tensor, logits: Tensor, u: Tensor, mask: Tensor | None = None) -> Tensor:
    """uᵀ mean_i f_i over the kept positions, the mean taken in u's precision."""
    rows = positions(logits)
    return (rows.mean(dim=0, dtype=u.dtype) if mask is None else _masked_mean(rows, mask, u.dtype)) @ u


GRAD_NORM = Penalty("grad_norm", False, _no_draw, _loss_itself)
FISHER_TRACE = Penalty("fisher_trace", True, _sample_labels, _mean_cross_entropy)
AVERAGE_JACOBIAN = Penalty("average_jacobian", True, _no_draw, _summed_mean_logit)
UNIT_JACOBIAN = Penalty("unit_jacobian", True, _sample_unit_direction, _projected_mean_logit)
