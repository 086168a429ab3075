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

import math
import re
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class MicroGradients:
    """g_j (the loss gradient), R_j and ∇R_j of one micro-batch, all detached.

    ``used[i]``: whether the micro-batch's graph (L_j or S_j) reaches parameter i at all, as autograd
    says (a None gradient), not whether its gradient is zero; None means every parameter.
    ``penalty_grad`` is None on the first-order path (no penalty).
    """

    loss_grad: list[Tensor]
    penalty: Tensor
    penalty_grad: list[Tensor] | None
    used: list[bool] | None = None


def gradient_and_usage(output: Tensor, params: Sequence[Tensor], loss_scale: float = 1.0, sparse: bool = False,
                       **kwargs) -> tuple[list[Tensor], list[bool]]:
    """∇_θ output with zeros where ``output`` does not depend on a parameter, and which parameters it depends on.

    Which parameters are reached is read from autograd's None gradients, so it costs no host sync.
    With ``loss_scale`` s ≠ 1 the backward runs on s · output (so that float16 activation
    gradients do not underflow) and the result is unscaled: ∇(s · output) / s.
    """
    grads, used = _grad(_times(output, loss_scale), params, sparse, **kwargs)
    return (grads if loss_scale == 1.0 else torch._foreach_div(grads, loss_scale)), used


def gradient(output: Tensor, params: Sequence[Tensor], loss_scale: float = 1.0, **kwargs) -> list[Tensor]:
    """∇_θ output, with zeros for parameters that ``output`` does not depend on (see :func:`gradient_and_usage`)."""
    return gradient_and_usage(output, params, loss_scale, **kwargs)[0]


def first_order(loss: Tensor, params: Sequence[Tensor], loss_scale: float = 1.0,
                sparse: bool = False) -> MicroGradients:
    """g_j alone, for a micro-batch without penalty: R_j = 0 and no ∇R_j (``sparse``: sparse g_j allowed)."""
    loss_grad, used = gradient_and_usage(loss, params, loss_scale, sparse)
    return MicroGradients(loss_grad, loss.new_zeros(()).detach(), None, used)


def _grad(output: Tensor, params: Sequence[Tensor], sparse: bool = False,
          **kwargs) -> tuple[list[Tensor], list[bool]]:
    """``torch.autograd.grad`` with zeros for the unreached parameters, and which were reached; a sparse
    gradient (nn.Embedding(sparse=True)) is refused unless ``sparse``."""
    grads = torch.autograd.grad(output, params, allow_unused=True, **kwargs)
    used = [g is not None for g in grads]
    if not all(used) and _reaches_reentrant_checkpoint(output):
        raise RuntimeError(REENTRANT_CHECKPOINT.format(unused=used.count(False)))
    dense = list(grads) if all(used) else [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]
    if not sparse:
        _check_dense(dense)
    return dense, used


REENTRANT_CHECKPOINT = (
    "{unused} trainable parameter(s) are not reached by torch.autograd.grad, and the graph holds a "
    "torch.utils.checkpoint block with use_reentrant=True, which hides the parameters inside it from "
    "torch.autograd.grad (PyTorch supports only .backward() through it): those parameters would silently never "
    "be updated. Checkpoint with use_reentrant=False, e.g. torch.utils.checkpoint.checkpoint(block, x, "
    "use_reentrant=False), or for a Hugging Face model "
    "model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={{'use_reentrant': False}})"
)


def _reaches_reentrant_checkpoint(output: Tensor) -> bool:
    """Whether ``output``'s graph holds a reentrant checkpoint's node (a walk over the graph, no host sync)."""
    pending, seen = [output.grad_fn], set()
    while pending:
        node = pending.pop()
        if node is None or node in seen:
            continue
        if type(node).__name__ == "CheckpointFunctionBackward":
            return True
        seen.add(node)
        pending.extend(next_node for next_node, _ in node.next_functions)
    return False


def merge_usage(a: list[bool], b: list[bool]) -> list[bool]:
    """Which parameters either graph reaches (elementwise or of two ``used`` lists)."""
    return a if a is b else [x or y for x, y in zip(a, b)]


def _check_dense(grads: Sequence[Tensor]) -> None:
    if any(g.layout != torch.strided for g in grads):
        raise TypeError(
            "sparse gradients are not supported here (e.g. nn.Embedding(sparse=True)): MicroBatchSGD alone takes "
            "them, on one process and with weight_decay=0, since a penalty adds dense terms to the gradient, "
            "grafting rescales it, a distributed step all-reduces one dense buffer, and torch.optim.SGD cannot add "
            "weight decay to a sparse gradient. Use sparse=False here"
        )


def _times(tensor: Tensor, factor: float) -> Tensor:
    return tensor if factor == 1.0 else tensor * factor


_CUT_NODES = ("Error", "DelayedError")  # the nodes a @once_differentiable backward leaves where it cut the graph
ONCE_DIFFERENTIABLE = (
    "derivative for once_differentiable_function is not implemented: a custom torch.autograd.Function with a "
    "@once_differentiable backward cuts the graph of ∇_θ S_j, and double backprop would leave out every term "
    "through it"
)


def graph_is_cut(tensors: Sequence[Tensor]) -> bool:
    """Whether the autograd graph of ``tensors`` holds a once_differentiable cut (a walk, no computation)."""
    pending, seen = [t.grad_fn for t in tensors if t is not None], set()
    while pending:
        node = pending.pop()
        if node is None or node in seen:
            continue
        if type(node).__name__ in _CUT_NODES:
            return True
        seen.add(node)
        pending.extend(next_node for next_node, _ in node.next_functions)
    return False


def squared_norm(tensors: Sequence[Tensor]) -> Tensor:
    """Σ_i ‖t_i‖² as one fused reduction (differentiable)."""
    return torch.stack(torch._foreach_norm(tensors)).square().sum()


# PyTorch's words for "this graph has no double backward": a kernel without one, aot_autograd's compiled
# functions, and a compiled backward that was first built for single use ("donated buffers").
_NO_DOUBLE_BACKWARD = ("double backward", "derivative for", "donated buffers")
EXACT_UNSUPPORTED = (
    "method='exact' needs a double backward, which this model does not support ({error}). Fused attention "
    "kernels and torch.compile'd modules have none: use method='finite_difference'. (Fused attention can also "
    "be switched off: timm models take fused_attn=False or the environment variable TIMM_FUSED_ATTN=0, and "
    "F.scaled_dot_product_attention runs its math kernel, which has a double backward, under "
    "`with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):` around the step.)"
)
OP_UNSUPPORTED = (
    "method='exact' needs a double backward, which {op} does not have ({error}){where}. Use "
    "method='finite_difference' (one more forward and backward per micro-batch, no double backward), or replace "
    "the module by one whose backward is differentiable"
)
_OP_WITHOUT_DERIVATIVE = re.compile(r"derivative for (?:aten::)?(\w+) is not implemented")


class NoDoubleBackwardError(RuntimeError):
    """``method='exact'`` met a kernel without a double backward; the message names the op and the fix.

    :meth:`naming_modules` adds the modules that run the op, when the caller knows which modules ran."""

    def __init__(self, error: str, where: str = "") -> None:
        match = _OP_WITHOUT_DERIVATIVE.search(error)
        self.op = match.group(1).removesuffix("_backward") if match else None
        self.error = error
        if self.op is None or "attention" in self.op:
            super().__init__(EXACT_UNSUPPORTED.format(error=error))
        else:
            super().__init__(OP_UNSUPPORTED.format(op=f"the op {self.op}", error=error, where=where))

    def naming_modules(self, modules: Sequence[torch.nn.Module]) -> NoDoubleBackwardError:
        """This error, naming the submodules of ``modules[0]`` (the outermost module called) whose class is the op's
        (``hardsigmoid`` → ``nn.Hardsigmoid``); itself when there are none."""
        if self.op is None or not modules:
            return self
        op = _alphanumeric(self.op)
        found = [f"{name} ({type(module).__name__})" for name, module in modules[0].named_modules()
                 if _runs_op(module, op)]
        if not found:
            return self
        listed = ", ".join(found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")
        return NoDoubleBackwardError(self.error, f", run by the module {listed}")


@contextmanager
def naming_modules(modules: Callable[[], Sequence[torch.nn.Module]]) -> Iterator[None]:
    """Re-raise a :class:`NoDoubleBackwardError` of the block naming the modules that run its op, among
    ``modules()`` (the modules called in the block, the outermost first)."""
    try:
        yield
    except NoDoubleBackwardError as error:
        raise error.naming_modules(modules()) from error.__cause__


def _runs_op(module: torch.nn.Module, op: str) -> bool:
    """Whether the module's class is named after ``op`` (alphanumerics, lower case): Hardsigmoid, hardsigmoid."""
    name = _alphanumeric(type(module).__name__)
    return len(name) >= 3 and op.startswith(name)


def _alphanumeric(name: str) -> str:
    return "".join(c for c in name.lower() if c.isalnum())
DONATED_BUFFERS = (
    "this penalty differentiates each micro-batch's graph twice (g_j and v_j, with retain_graph=True), which a "
    "torch.compile'd module refuses once its backward was compiled for a single use, by an earlier plain "
    "backward() through it ({error}). Set `torch._functorch.config.donated_buffer = False` before the model is "
    "compiled and first run (setting it later would let a compiled backward reuse memory it still needs)."
)


def exact(loss: Tensor, scalar: Tensor, params: Sequence[Tensor], gradient_at_shift: Callable[[], list[Tensor]],
          fd_eps: float, loss_scale: float = 1.0) -> MicroGradients:
    """∇R_j = ∇_θ ‖∇_θ S_j‖² by double backprop (``gradient_at_shift`` and ``fd_eps`` are unused).

    With a loss scale s both passes run scaled: v^s = ∇(s S_j), R_j = ‖v^s‖²/s², and
    ∇R_j = ∇(‖v^s‖²/s)/s, so the micro-batch gradient is unscaled before it is squared.
    A model without a double backward gets an error that points to ``finite_difference``.
    """
    try:
        return _exact(loss, scalar, params, loss_scale)
    except NoDoubleBackwardError:
        raise
    except RuntimeError as error:
        if not any(text in str(error) for text in _NO_DOUBLE_BACKWARD):
            raise
        raise NoDoubleBackwardError(str(error)) from error


def _exact(loss: Tensor, scalar: Tensor, params: Sequence[Tensor], loss_scale: float) -> MicroGradients:
    shares_graph = scalar is loss
    scaled_v, used = _grad(_times(scalar, loss_scale), params, create_graph=True)
    if graph_is_cut(scaled_v):  # autograd would differentiate around the cut without a word
        raise NoDoubleBackwardError(ONCE_DIFFERENTIABLE)
    penalty = _times(squared_norm(scaled_v), loss_scale**-2)
    # For GN, v_j is g_j itself; otherwise g_j needs its own first-order pass.
    if shares_graph:  # (out of place: scaled_v is still needed by the double backward)
        loss_grad = [t.detach() for t in scaled_v]
        loss_grad = loss_grad if loss_scale == 1.0 else torch._foreach_div(loss_grad, loss_scale)
    else:
        loss_grad, loss_used = gradient_and_usage(loss, params, loss_scale, retain_graph=True)
        used = merge_usage(loss_used, used)
    if penalty.requires_grad:
        penalty_grad = gradient(penalty, params, loss_scale)
    else:  # v_j does not depend on θ (a model linear in its parameters): H_j = 0
        penalty_grad = [torch.zeros_like(p) for p in params]
    return MicroGradients(loss_grad, penalty.detach(), penalty_grad, used)


def finite_difference(loss: Tensor, scalar: Tensor, params: Sequence[Tensor],
                      gradient_at_shift: Callable[[], list[Tensor]], fd_eps: float,
                      loss_scale: float = 1.0) -> MicroGradients:
    """∇R_j ≈ 2 (∇S_j(θ + ε v̂_j) − v_j) · ‖v_j‖/ε; ``gradient_at_shift()`` recomputes ∇S_j at the shifted θ.

    Every gradient is taken of the ``loss_scale``-scaled scalar and unscaled at once.
    """
    shares_graph = scalar is loss
    try:
        loss_grad, used = gradient_and_usage(loss, params, loss_scale, retain_graph=not shares_graph)
    except RuntimeError as error:
        if shares_graph or "donated buffers" not in str(error):
            raise
        raise RuntimeError(DONATED_BUFFERS.format(error=error)) from error
    if not shares_graph:
        v, scalar_used = gradient_and_usage(scalar, params, loss_scale)
        used = merge_usage(used, scalar_used)
    else:
        v = loss_grad
    penalty = squared_norm(v)
    v_norm = penalty.sqrt()
    with torch.no_grad():
        # A zero v gives a zero shift and a zero difference, hence a zero ∇R_j, not NaN.
        shift = torch._foreach_mul(v, fd_eps / v_norm.clamp_min(torch.finfo(v_norm.dtype).tiny))
        saved = torch._foreach_mul(params, 1.0)  # bit-exact copy to restore from
        torch._foreach_add_(params, shift)
    # autocast caches its low-precision copy of each parameter until the outermost autocast block ends, which
    # may enclose the whole step: without clearing it, the shifted pass would reuse the unshifted copies
    # (a zero difference), and the next micro-batch the shifted ones.
    torch.clear_autocast_cache()
    try:
        shifted_v = gradient_at_shift()
    finally:
        with torch.no_grad():
            torch._foreach_copy_(params, saved)
        torch.clear_autocast_cache()
    penalty_grad = torch._foreach_sub(shifted_v, v)
    torch._foreach_mul_(penalty_grad, 2.0 * v_norm / fd_eps)
    return MicroGradients(loss_grad, penalty.detach(), penalty_grad, used)


METHODS = {"exact": exact, "finite_difference": finite_difference}

# ε below eps(dtype)·‖θ‖ is lost when θ + ε v̂ is rounded: the shift vanishes (or is mostly rounding).
# Below _FD_EPS_WARN_FACTOR times that, rounding is more than 1 % of the shift.
_FD_EPS_WARN_FACTOR = 100.0


def check_fd_eps(fd_eps: float, dtype: torch.dtype, param_norm: float,
                 compute_dtype: torch.dtype | None = None) -> None:
    """Refuse an ε that parameters of ``dtype`` cannot resolve, and warn about one they resolve poorly.

    The shifted point θ + ε v̂ (‖v̂‖ = 1) is rounded with an error of about eps·‖θ‖, so ε below
    eps(dtype)·max(‖θ‖, 1) raises ValueError (the shift is lost), and ε below 100 times that warns
    (rounding is more than 1 % of the shift), with the eps of the coarser of ``dtype`` and
    ``compute_dtype`` (the autocast dtype the closure runs in, which rounds the shifted parameters again).
    """
    scale = max(param_norm, 1.0)
    floor = torch.finfo(dtype).eps * scale
    if fd_eps < floor:
        raise ValueError(
            f"Invalid fd_eps value: {fd_eps:g} is below what {_name(dtype)} parameters can resolve: with "
            f"‖θ‖ = {param_norm:.3g}, rounding θ + ε v̂ errs by up to eps·‖θ‖ = {floor:.2g}, more than the shift, "
            f"and the penalty gradient would be mostly rounding. Use fd_eps ≥ {_FD_EPS_WARN_FACTOR * floor:.2g} "
            "(in float32, 1e-3 to 1e-2; the default is 1e-2)"
        )
    coarsest = dtype
    if compute_dtype is not None and torch.finfo(compute_dtype).eps > torch.finfo(dtype).eps:
        coarsest = compute_dtype
    rounding = torch.finfo(coarsest).eps * scale
    if fd_eps < _FD_EPS_WARN_FACTOR * rounding:
        warnings.warn(
            f"fd_eps={fd_eps:g} is small for {_name(coarsest)}: with ‖θ‖ = {param_norm:.3g}, rounding θ + ε v̂ errs by "
            f"up to eps·‖θ‖/ε = {rounding / fd_eps:.2g} of the shift, and the penalty gradient by about as much. "
            f"Use fd_eps ≥ {_FD_EPS_WARN_FACTOR * rounding:.2g} for 1 %, or method='exact'",
            stacklevel=3,
        )


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def parameter_norm(params: Sequence[Tensor]) -> float | None:
    """‖θ‖ over the floating-point ``params`` (host syncs: for setup, not for a step), or None without data."""
    params = [p for p in params if p.is_floating_point()]
    if not params or any(p.is_meta or isinstance(p, torch.nn.parameter.UninitializedParameter) for p in params):
        return None
    total = 0.0
    for p in params:  # in float32 at least, so that a float16 norm does not overflow
        accumulate = torch.float64 if p.dtype == torch.float64 else torch.float32
        total += float(torch.linalg.vector_norm(p.detach(), dtype=accumulate)) ** 2
    return math.sqrt(total) if math.isfinite(total) else None
