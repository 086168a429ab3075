"""Which modules stop a double backward, found by differentiating each module twice on its own.

A module breaks ``method='exact'`` in one of two ways: its backward has no derivative (PyTorch
raises, e.g. fused attention kernels, ``hardsigmoid``, compiled graphs), or its backward is marked
``@once_differentiable`` (a custom ``autograd.Function``): then PyTorch cuts the second derivative
through it *silently* when differentiating with ``torch.autograd.grad`` with respect to the parameters,
leaving only an ``Error`` node (DelayedError) in the graph of the first gradient, which this module detects.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .. import hvp

# PyTorch's words for a missing double backward (hvp's, and a once_differentiable backward run twice).
NO_DOUBLE_BACKWARD_WORDS = (*hvp._NO_DOUBLE_BACKWARD, "once_differentiable", "differentiate twice")
graph_is_cut = hvp.graph_is_cut  # the exact path's own check, also run by the doctor on each module


def lacks_double_backward(error: BaseException) -> bool:
    return isinstance(error, RuntimeError) and any(word in str(error) for word in NO_DOUBLE_BACKWARD_WORDS)


def _floating(values: Any) -> list[Tensor]:
    """The floating-point tensors in a module's output (a tensor, a tuple/list or a dict of them)."""
    if isinstance(values, Tensor):
        return [values] if values.is_floating_point() else []
    if isinstance(values, dict):
        values = list(values.values())
    if isinstance(values, (tuple, list)):
        return [t for v in values for t in _floating(v)]
    return []


def _leaf_copy(value: Any) -> tuple[Any, list[Tensor]]:
    """``value`` with each floating tensor replaced by a fresh leaf requiring grad (used through a copy, so an
    in-place op in the module does not touch a leaf), and the leaves."""
    if isinstance(value, Tensor) and value.is_floating_point():
        leaf = value.detach().requires_grad_()
        return leaf * 1.0, [leaf]
    if isinstance(value, (tuple, list)):
        pairs = [_leaf_copy(v) for v in value]
        return type(value)(p[0] for p in pairs), [leaf for p in pairs for leaf in p[1]]
    return value, []


def breaks_double_backward(module: nn.Module, args: tuple, kwargs: dict) -> bool:
    """Whether ``module`` alone, on these inputs, stops a double backward: R = ‖∇(Σ out²)‖² over its inputs and
    parameters, then ∇R, raising for lack of a derivative or leaving a once_differentiable cut."""
    args, leaves = _leaf_copy(tuple(args))
    wrt = leaves + [p for p in module.parameters() if p.requires_grad]
    try:
        outputs = [o for o in _floating(module(*args, **kwargs)) if o.requires_grad]
        if not outputs or not wrt:
            return False
        scalar = sum((o.double() ** 2).sum() for o in outputs)
        v = [g for g in torch.autograd.grad(scalar, wrt, create_graph=True, allow_unused=True) if g is not None]
        if graph_is_cut(v):
            return True
        r = sum((g ** 2).sum() for g in v)
        if r.requires_grad:
            torch.autograd.grad(r, wrt, allow_unused=True)
    except RuntimeError as error:
        return lacks_double_backward(error)
    return False


def _cloned(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.clone()
    if isinstance(value, (tuple, list)):
        return type(value)(_cloned(v) for v in value)
    return value


def _inside(name: str, parent: str) -> bool:
    """Whether module ``name`` is a descendant of module ``parent`` ("" is the model itself)."""
    return name != parent and (parent == "" or name.startswith(f"{parent}."))


def record_inputs(model: nn.Module, run: Any) -> dict[str, tuple[tuple, dict]]:
    """The (args, kwargs) each submodule got on its first call during ``run()``."""
    inputs: dict[str, tuple[tuple, dict]] = {}

    def hook(name: str):
        def record(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if name not in inputs:  # copies: a later in-place op (ReLU(inplace=True)) would change them
                inputs[name] = (_cloned(args), kwargs)
        return record

    handles = [m.register_forward_pre_hook(hook(name), with_kwargs=True) for name, m in model.named_modules()]
    try:
        with torch.no_grad():
            run()
    finally:
        for handle in handles:
            handle.remove()
    return inputs


def modules_without_double_backward(model: nn.Module, run: Any) -> list[str]:
    """``"name (Class)"`` of the innermost modules that break a double backward on the inputs ``run()`` feeds them
    (their parents, which break it through them, are not listed)."""
    inputs = record_inputs(model, run)
    modules = dict(model.named_modules())
    failing = [name for name in inputs if breaks_double_backward(modules[name], *inputs[name])]
    innermost = [name for name in failing if not any(_inside(other, name) for other in failing)]
    return [f"{name or '(the model)'} ({type(modules[name]).__name__})" for name in innermost]
