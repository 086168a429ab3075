"""The settings of a regopt optimizer: each checked when built and on every later assignment.

Error messages follow torch.optim's ("Invalid <name>: <value> (expected ...)").
"""

from __future__ import annotations

import math
from collections.abc import Callable
from numbers import Real
from typing import Any

from torch import Tensor

from . import hvp
from .batching import as_integer


def check_hyperparameter(value: Any, name: str) -> None:
    """Reject a negative or non-finite ``value`` as torch.optim.SGD words it: "Invalid <name>: <value>"."""
    number = value.item() if isinstance(value, Tensor) and value.numel() == 1 else value
    if isinstance(number, bool) or not isinstance(number, Real):
        raise TypeError(f"Invalid {name}: {value!r} (expected a finite number >= 0)")
    if not math.isfinite(number) or number < 0:
        raise ValueError(f"Invalid {name}: {value} (expected a finite number >= 0)")


def check_penalty_micro_batches(value: Any) -> int | None:
    """None or an integral number ≥ 1 (bool refused), as an int; else ValueError "Invalid penalty_micro_batches"."""
    count = as_integer(value)
    if value is not None and (count is None or count < 1):
        raise ValueError(f"Invalid penalty_micro_batches: {value!r} (expected None or an int >= 1)")
    return count


def check_max_grad_norm(value: Any) -> Any:
    """None or a finite number ≥ 0."""
    if value is not None:
        check_hyperparameter(value, "max_grad_norm value")
    return value


def check_loss_scale(value: Any) -> Any:
    """None, ``"dynamic"`` or a finite number > 0."""
    if value is not None and value != "dynamic":
        check_hyperparameter(value, "loss_scale value")
        if value == 0:
            raise ValueError("Invalid loss_scale value: 0 (expected 'dynamic', None or a finite number > 0)")
    return value


def check_penalty(value: Any) -> float:
    """λ: a finite number ≥ 0, as a float."""
    check_hyperparameter(value, "penalty value")
    return float(value)


def check_method(value: Any) -> str:
    """One of :data:`regopt.hvp.METHODS`."""
    if value not in hvp.METHODS:
        raise ValueError(f"Invalid method: {value!r} (expected one of {', '.join(map(repr, hvp.METHODS))})")
    return value


def check_fd_eps(value: Any) -> float:
    """ε: a finite number > 0, as a float (its size against ‖θ‖ is checked when a step starts)."""
    check_hyperparameter(value, "fd_eps value")
    if value == 0:
        raise ValueError("Invalid fd_eps value: 0 (expected a finite number > 0)")
    return float(value)


class Checked:
    """An attribute whose every assignment goes through ``check`` (which returns the value to keep), so that
    ``optimizer.penalty_micro_batches = 0`` after construction is refused with the constructor's message.

    A trainer's proxy whose class derives from the optimizer's (Lightning's ``LightningOptimizer``, which
    holds the optimizer as ``_optimizer``) reads and writes the optimizer's own value, never a copy of its own.
    """

    def __init__(self, check: Callable[[Any], Any]) -> None:
        self.check = check

    def __set_name__(self, owner: type, name: str) -> None:
        self.name, self.slot = name, f"_{name}_value"

    def __get__(self, optimizer: Any, owner: type | None = None) -> Any:
        if optimizer is None:
            return self
        try:
            return vars(optimizer)[self.slot]
        except KeyError:  # a proxy: its __getattr__ forwards the read to the optimizer it wraps
            raise AttributeError(self.name) from None

    def __set__(self, optimizer: Any, value: Any) -> None:
        target = vars(optimizer).get("_optimizer", optimizer) if self.slot not in vars(optimizer) else optimizer
        vars(target)[self.slot] = self.check(value)
