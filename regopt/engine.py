"""One step's gradient work: split → per micro-batch (closure, g_j, R_j, ∇R_j) → weighted sums.

    G = Σ_j w_j g_j,   P = Σ_j w_j ∇R_j,
    loss = Σ_j w_j L_j,   penalty = Σ_j w_j R_j,   micro_grad_sq_norm = Σ_j w_j ‖g_j‖²

Every micro-batch is forwarded once in train mode (the finite-difference pass
runs with buffers frozen), its graph is freed before the next one starts, and
``accumulate`` never synchronizes with the host; ``first_nonfinite`` makes the
step's one synchronization. The optimizers turn G and P into the applied gradient
and hand it to torch.optim.SGD's update.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from . import hvp
from .batching import AutocastState, MicroBatch, call_closure
from .penalties import Penalty


@dataclass(frozen=True)
class Accumulation:
    """Weighted sums over one step's micro-batches (this process's share, before any all-reduce).

    ``terms[j] = (L_j, R_j, ‖g_j‖², ‖∇R_j‖²)`` per micro-batch, kept for the finiteness check;
    ``sums = (Σ w L, Σ w R, Σ w ‖g‖², Σ_j ‖g_j‖, k)`` as one float tensor.
    """

    grad: list[Tensor]
    penalty_grad: list[Tensor] | None
    terms: Tensor
    sums: Tensor

    @property
    def loss(self) -> Tensor:
        return self.sums[0]

    @property
    def penalty(self) -> Tensor:
        return self.sums[1]

    @property
    def micro_grad_sq_norm(self) -> Tensor:
        return self.sums[2]

    @property
    def mean_micro_grad_norm(self) -> Tensor:
        """mean_j ‖g_j‖, the small-batch step length s of iterative grafting."""
        return self.sums[3] / self.sums[4]

    def reduced(self, grad: list[Tensor], penalty_grad: list[Tensor] | None, sums: Tensor) -> "Accumulation":
        return replace(self, grad=grad, penalty_grad=penalty_grad, sums=sums)


def _weighted_add(total: list[Tensor] | None, term: list[Tensor], weight: float) -> list[Tensor]:
    if total is None:
        return torch._foreach_mul(term, weight)
    torch._foreach_add_(total, term, alpha=weight)
    return total


def _rng_state(device: torch.device) -> tuple[Tensor, Tensor | None]:
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _set_rng_state(state: tuple[Tensor, Tensor | None], device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def accumulate(
    closure: Callable[..., object],
    micro_batches: Sequence[MicroBatch],
    params: Sequence[Tensor],
    penalty: Penalty | None = None,
    method: str = "exact",
    generator: torch.Generator | None = None,
    fd_eps: float = 1e-2,
    closure_autocast: AutocastState | None = None,
    loss_scale: float = 1.0,
) -> Accumulation:
    """Run the closure on each micro-batch and sum the weighted gradients and statistics.

    ``closure_autocast`` is the autocast state to run the closure under (the caller runs
    everything else with autocast off, so that norms and penalties stay in full precision);
    every backward runs on ``loss_scale`` times its scalar and is unscaled at once (float16).
    """
    count = len(micro_batches)
    differentiate = hvp.METHODS[method]
    device = params[0].device
    # The finite-difference pass replays the closure's random draws (dropout masks) exactly.
    replays_closure = penalty is not None and method == "finite_difference"
    grad_sum = penalty_grad_sum = None
    rows = []  # (L_j, R_j, ‖g_j‖², ‖∇R_j‖²) as one 4-vector per micro-batch
    for micro in micro_batches:
        rng_before = _rng_state(device) if replays_closure else None
        out = call_closure(closure, micro, count, closure_autocast)
        if penalty is None:
            loss_grad = hvp.gradient(out.loss, params, loss_scale)
            penalty_value = penalty_grad_sq_norm = out.loss.new_zeros(())
        else:
            if penalty.needs_logits and out.logits is None:
                raise TypeError(
                    f"the {penalty.name} penalty needs the logits: the closure must return (loss, logits), "
                    "e.g. `def closure(x, y): logits = model(x); return F.cross_entropy(logits, y), logits`"
                )
            draw = penalty.sample(out.logits, generator)

            def gradient_at_shift() -> list[Tensor]:
                # fork_rng leaves the RNG as the first pass left it, whatever the replay draws;
                # buffers are restored only after the backward, which may have saved them.
                with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), hvp.frozen_buffers():
                    _set_rng_state(rng_before, device)
                    shifted = call_closure(closure, micro, count, closure_autocast)
                    return hvp.gradient(penalty.scalar(shifted.loss, shifted.logits, draw), params, loss_scale)

            grads = differentiate(out.loss, penalty.scalar(out.loss, out.logits, draw), params, gradient_at_shift, fd_eps,
                                  loss_scale)
            loss_grad = grads.loss_grad
            penalty_value, penalty_grad_sq_norm = grads.penalty, hvp.squared_norm(grads.penalty_grad)
            penalty_grad_sum = _weighted_add(penalty_grad_sum, grads.penalty_grad, micro.weight)
        rows.append(torch.stack([out.loss.detach(), penalty_value, hvp.squared_norm(loss_grad), penalty_grad_sq_norm]))
        grad_sum = _weighted_add(grad_sum, loss_grad, micro.weight)
        del out, loss_grad  # free this micro-batch's graph before the next forward
    terms = torch.stack(rows)
    weights = torch.tensor([m.weight for m in micro_batches], dtype=terms.dtype).to(terms.device, non_blocking=True)
    sums = torch.cat([weights @ terms[:, :3], terms[:, 2].sqrt().sum().unsqueeze(0), terms.new_tensor([count])])
    return Accumulation(grad_sum, penalty_grad_sum, terms, sums)


def first_nonfinite(acc: Accumulation, micro_batches: Sequence[MicroBatch], **step_terms: Tensor) -> str | None:
    """Describe the first non-finite term (one host sync for all of them), or None when all are finite.

    Checks this process's per-micro-batch terms, then the (possibly all-reduced) sums and
    the 0-dim ``step_terms`` given by name (the large-batch gradient norm ‖G‖).
    """
    finite = torch.isfinite(acc.terms)
    named = torch.stack([acc.sums.isfinite().all()] + [t.isfinite() for t in step_terms.values()])
    if bool(finite.all() & named.all()):
        return None
    if not bool(finite.all()):
        j, column = (int(i) for i in (~finite).nonzero()[0])
        term = ("loss L_j", "penalty R_j", "loss gradient squared norm ‖g_j‖²",
                "penalty gradient squared norm ‖∇R_j‖²")[column]
        value = acc.terms[j, column].item()
        return f"non-finite {term} ({value}) on {micro_batches[j].describe(len(micro_batches))}"
    if not bool(named[0]):
        return "non-finite loss, penalty or gradient norm on another rank's micro-batch"
    name = next(name for name, t in step_terms.items() if not bool(t.isfinite()))
    return f"non-finite {name} ({step_terms[name].item()}) over the step's micro-batches"
