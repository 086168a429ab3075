"""The two ways to get one micro-batch's gradients: g_j = ∇L_j, R_j = ‖v_j‖² and ∇R_j, v_j = ∇S_j.

* ``exact``: double backprop, ∇R_j = ∇_θ ‖v_j‖² through ``create_graph=True``.
* ``finite_difference``: ∇R_j = 2 H_{S_j} v_j ≈ 2 (∇S_j(θ + ε v̂_j) − ∇S_j(θ)) · ‖v_j‖ / ε,
  v̂_j = v_j / ‖v_j‖ (a forward difference, after Geiping et al. 2022). One extra
  forward and backward, no double backward, so it also runs through kernels that
  have none. Through ReLU networks it measures a penalty smoothed over a ball of
  radius ε (the kinks), not the exact Hessian product; on smooth models it
  converges to ``exact`` as ε → 0.

A new way to differentiate is a new function here with the same signature.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class MicroGradients:
    """g_j (the loss gradient), R_j and ∇R_j of one micro-batch, all detached."""

    loss_grad: list[Tensor]
    penalty: Tensor
    penalty_grad: list[Tensor]


def gradient(output: Tensor, params: Sequence[Tensor], loss_scale: float = 1.0, **kwargs) -> list[Tensor]:
    """∇_θ output, with zeros for parameters that ``output`` does not depend on.

    With ``loss_scale`` s ≠ 1 the backward runs on s · output (so that float16 activation
    gradients do not underflow) and the result is unscaled: ∇(s · output) / s.
    """
    grads = torch.autograd.grad(_times(output, loss_scale), params, allow_unused=True, materialize_grads=True,
                                **kwargs)
    _check_dense(grads)
    return list(grads) if loss_scale == 1.0 else torch._foreach_div(grads, loss_scale)


def _check_dense(grads: Sequence[Tensor]) -> None:
    if any(g.layout != torch.strided for g in grads):
        raise TypeError("sparse gradients are not supported (e.g. nn.Embedding(sparse=True)): "
                        "regopt's norms and updates need dense gradients")


def _times(tensor: Tensor, factor: float) -> Tensor:
    return tensor if factor == 1.0 else tensor * factor


def squared_norm(tensors: Sequence[Tensor]) -> Tensor:
    """Σ_i ‖t_i‖² as one fused reduction (differentiable)."""
    return torch.stack(torch._foreach_norm(tensors)).square().sum()


_NO_DOUBLE_BACKWARD = ("double backward", "derivative for")


def exact(loss: Tensor, scalar: Tensor, params: Sequence[Tensor], gradient_at_shift: Callable[[], list[Tensor]],
          fd_eps: float, loss_scale: float = 1.0) -> MicroGradients:
    """∇R_j = ∇_θ ‖∇_θ S_j‖² by double backprop (``gradient_at_shift`` and ``fd_eps`` are unused).

    With a loss scale s both passes run scaled: v^s = ∇(s S_j), R_j = ‖v^s‖²/s², and
    ∇R_j = ∇(‖v^s‖²/s)/s, so the micro-batch gradient is unscaled before it is squared.
    A model without a double backward gets an error that points to ``finite_difference``.
    """
    try:
        return _exact(loss, scalar, params, loss_scale)
    except RuntimeError as error:
        if not any(text in str(error) for text in _NO_DOUBLE_BACKWARD):
            raise
        raise RuntimeError(
            f"method='exact' needs a double backward, which this model does not support ({error}). Fused "
            "attention kernels and torch.compile'd modules have none: use method='finite_difference'."
        ) from error


def _exact(loss: Tensor, scalar: Tensor, params: Sequence[Tensor], loss_scale: float) -> MicroGradients:
    shares_graph = scalar is loss
    scaled_v = torch.autograd.grad(_times(scalar, loss_scale), params, create_graph=True, allow_unused=True,
                                   materialize_grads=True)
    _check_dense(scaled_v)
    penalty = _times(squared_norm(scaled_v), loss_scale**-2)
    # For GN, v_j is g_j itself; otherwise g_j needs its own first-order pass.
    if shares_graph:  # (out of place: scaled_v is still needed by the double backward)
        loss_grad = [t.detach() for t in scaled_v]
        loss_grad = loss_grad if loss_scale == 1.0 else torch._foreach_div(loss_grad, loss_scale)
    else:
        loss_grad = gradient(loss, params, loss_scale, retain_graph=True)
    if penalty.requires_grad:
        penalty_grad = gradient(penalty, params, loss_scale)
    else:  # v_j does not depend on θ (a model linear in its parameters): H_j = 0
        penalty_grad = [torch.zeros_like(p) for p in params]
    return MicroGradients(loss_grad, penalty.detach(), penalty_grad)


def finite_difference(loss: Tensor, scalar: Tensor, params: Sequence[Tensor],
                      gradient_at_shift: Callable[[], list[Tensor]], fd_eps: float,
                      loss_scale: float = 1.0) -> MicroGradients:
    """∇R_j ≈ 2 (∇S_j(θ + ε v̂_j) − v_j) · ‖v_j‖/ε; ``gradient_at_shift()`` recomputes ∇S_j at the shifted θ.

    Every gradient is taken of the ``loss_scale``-scaled scalar and unscaled at once.
    """
    shares_graph = scalar is loss
    loss_grad = gradient(loss, params, loss_scale, retain_graph=not shares_graph)
    v = loss_grad if shares_graph else gradient(scalar, params, loss_scale)
    penalty = squared_norm(v)
    v_norm = penalty.sqrt()
    with torch.no_grad():
        # A zero v gives a zero shift and a zero difference, hence a zero ∇R_j, not NaN.
        shift = torch._foreach_mul(v, fd_eps / v_norm.clamp_min(torch.finfo(v_norm.dtype).tiny))
        saved = torch._foreach_mul(params, 1.0)  # bit-exact copy to restore from
        torch._foreach_add_(params, shift)
    try:
        shifted_v = gradient_at_shift()
    finally:
        with torch.no_grad():
            torch._foreach_copy_(params, saved)
    penalty_grad = torch._foreach_sub(shifted_v, v)
    torch._foreach_mul_(penalty_grad, 2.0 * v_norm / fd_eps)
    return MicroGradients(loss_grad, penalty.detach(), penalty_grad)


METHODS = {"exact": exact, "finite_difference": finite_difference}


@contextmanager
def frozen_buffers() -> Iterator[None]:
    """Run forward passes that leave every module buffer (BatchNorm running stats, ...) as it was."""
    saved: dict[int, tuple[list[Tensor], list[Tensor]]] = {}

    def remember(module: nn.Module, args: object) -> None:
        if id(module) not in saved:  # only the state before its first call counts
            buffers = list(module.buffers(recurse=False))
            if buffers:
                saved[id(module)] = (buffers, [b.clone() for b in buffers])

    handle = nn.modules.module.register_module_forward_pre_hook(remember)
    try:
        yield
    finally:
        handle.remove()
        with torch.no_grad():
            for buffers, copies in saved.values():
                torch._foreach_copy_(buffers, copies)
