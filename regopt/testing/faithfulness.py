"""The micro-batch-averaged penalty gradient P = Σ_j w_j ∇R_j of one batch, exact or by finite differences,
and how close an estimate of it is to a reference: the cosine and ‖P̂ − P‖ / ‖P‖.

Both methods run regopt's own per-micro-batch code (:func:`regopt.engine.micro_batch_gradients`) on the
batch's micro-batches, from the same global RNG state (the same dropout masks), with frozen buffers
for the backward passes, exactly as a step would, but without any update.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .. import penalties
from ..batching import split_batch
from ..engine import StepSetup, micro_batch_gradients, weighted_add
from .reference_check import bind_model


def cosine_and_relative_error(estimated: Sequence[Tensor], reference: Sequence[Tensor]) -> tuple[float, float]:
    """(cos(P̂, P), ‖P̂ − P‖ / ‖P‖) over all tensors as one vector, in float64."""
    e = torch.cat([t.detach().reshape(-1).double().cpu() for t in estimated])
    r = torch.cat([t.detach().reshape(-1).double().cpu() for t in reference])
    tiny = torch.finfo(torch.float64).tiny
    cos = float(e @ r / (e.norm() * r.norm()).clamp_min(tiny))
    return cos, float((e - r).norm() / r.norm().clamp_min(tiny))


def penalty_gradient(model: nn.Module, loss_fn: Callable[..., Any], batch: Any, micro_batch_size: int, *,
                     method: str = "exact", fd_eps: float = 1e-2, penalty: penalties.Penalty = penalties.GRAD_NORM,
                     seed: int = 0) -> list[Tensor]:
    """P = Σ_j w_j ∇R_j over ``batch`` for the trainable parameters of ``model`` (``.grad`` is not touched).

    ``loss_fn(model, *parts)`` returns the micro-batch's mean loss or ``(loss, logits)``; FT/UJ draws come
    from a generator seeded with ``seed``, and the global RNG is seeded with ``seed`` before the first
    micro-batch (and restored afterwards), so that two calls see the same randomness.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    micro_batches = split_batch(batch, micro_batch_size)
    device = params[0].device
    generator = torch.Generator(device).manual_seed(seed)
    setup = StepSetup(bind_model(loss_fn, model), len(micro_batches), params, penalty, method,
                      generator, fd_eps)
    total = None
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for micro in micro_batches:
            _, grads = micro_batch_gradients(setup, micro, penalized=True)
            total = weighted_add(total, grads.penalty_grad, micro.weight)
    return total
