"""regopt's methods by the short names the paper and this project use: one table for tests and benchmarks.

| name | SGD form (the wrapper: less "SGD") | the gradient handed to the update | reference.step |
|---|---|---|---|
| LB | MicroBatchSGD | G = Σ_j w_j g_j | (the defaults) |
| GN | GradNormSGD | G + λP, P = Σ_j w_j ∇R_j, R_j = ‖∇L_j‖² | regularizer="grad_norm" |
| FT | FisherTraceSGD | R_j = ‖∇ CE(f, ŷ)‖², ŷ ~ softmax(f), drawn | regularizer="fisher_trace" |
| AJ | JacobianRegSGD(kind="average") | R_j = ‖∇ Σ_c mean f_c‖² | regularizer="average_jacobian" |
| UJ | JacobianRegSGD(kind="unit") | R_j = ‖∇ uᵀ mean f‖², u on the sphere, drawn | regularizer="unit_jacobian" |
| GRAFT-iter | GraftedSGD(mode="iterative") | s·G/‖G‖, s = mean_j ‖g_j‖ | graft="iterative" |
| GRAFT-ext | GraftedSGD(mode="external") | s·G/‖G‖, s = norms[t] | graft="external" |
| NGD | GraftedSGD(mode="normalized") | G/‖G‖ | graft="normalized" |

The small-batch baseline SB is plain ``torch.optim.SGD`` and has no entry. ::

    from regopt import registry
    opt = registry.build("AJ", model.parameters(), lr=0.1, micro_batch_size=32, penalty=1e-3)
    opt = registry.wrap("AJ", torch.optim.AdamW(model.parameters()), micro_batch_size=32, penalty=1e-3)

A table that gives every method its own options passes them through :meth:`Method.keep`, which
leaves out the method-specific ones a method does not take (λ for LB, ``norms`` for GN, ...).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch

from .grafting import Grafted
from .optimizers import MicroBatch
from .penalized import FisherTrace, GradNorm, JacobianReg
from .sgd import FisherTraceSGD, GradNormSGD, GraftedSGD, JacobianRegSGD, MicroBatchSGD

# The options of the penalized methods beyond MicroBatchSGD's.
PENALTY_OPTIONS = ("penalty", "method", "fd_eps", "generator", "penalty_micro_batches", "rank_independent_draws",
                   "exact_grad_norm")


@dataclass(frozen=True)
class Method:
    """One method: the class and keyword arguments that make it, and what it corresponds to in regopt.reference."""

    name: str
    cls: type[MicroBatch]  # built from torch.optim.SGD's arguments: GradNormSGD
    wrapper: type[MicroBatch]  # built around a base optimizer: GradNorm
    options: Mapping[str, Any] = field(default_factory=dict)  # what makes ``cls`` this method: kind=, mode=
    regularizer: str = "none"  # reference.step's ``regularizer``
    graft: str | None = None  # reference.step's ``graft``
    random: bool = False  # draws from its generator every step (FT's labels, UJ's directions), not only subsets
    takes: tuple[str, ...] = ()  # its own options, beyond MicroBatchSGD's

    @property
    def penalized(self) -> bool:
        return self.regularizer != "none"

    @property
    def reference_options(self) -> dict[str, Any]:
        """The keyword arguments that make ``regopt.reference.step`` this method (GRAFT-ext also needs
        ``graft_norm``)."""
        if self.penalized:
            return {"regularizer": self.regularizer}
        return {} if self.graft is None else {"graft": self.graft}

    def build(self, params: Any, **options: Any) -> MicroBatch:
        """The SGD form: ``cls(params, **self.options, **options)`` with torch.optim.SGD's arguments in ``options``."""
        return self.cls(params, **self.options, **options)

    def wrap(self, base: torch.optim.Optimizer, **options: Any) -> MicroBatch:
        """The wrapper form around ``base``, which does the update: ``wrapper(base, **self.options, **options)``."""
        return self.wrapper(base, **self.options, **options)

    def keep(self, options: Mapping[str, Any]) -> dict[str, Any]:
        """``options`` less the method-specific ones (any method's :attr:`takes`) this method does not take."""
        return {k: v for k, v in options.items() if k in self.takes or k not in _METHOD_OPTIONS}


def _penalized(name: str, cls: type[MicroBatch], wrapper: type[MicroBatch], regularizer: str,
               **options: Any) -> Method:
    random = regularizer in ("fisher_trace", "unit_jacobian")
    return Method(name, cls, wrapper, options, regularizer=regularizer, random=random, takes=PENALTY_OPTIONS)


def _grafted(name: str, mode: str) -> Method:
    takes = ("norms",) if mode == "external" else ()
    return Method(name, GraftedSGD, Grafted, {"mode": mode}, graft=mode, takes=takes)


METHODS: Mapping[str, Method] = MappingProxyType({m.name: m for m in (
    Method("LB", MicroBatchSGD, MicroBatch),
    _penalized("GN", GradNormSGD, GradNorm, "grad_norm"),
    _penalized("FT", FisherTraceSGD, FisherTrace, "fisher_trace"),
    _penalized("AJ", JacobianRegSGD, JacobianReg, "average_jacobian", kind="average"),
    _penalized("UJ", JacobianRegSGD, JacobianReg, "unit_jacobian", kind="unit"),
    _grafted("GRAFT-iter", "iterative"),
    _grafted("GRAFT-ext", "external"),
    _grafted("NGD", "normalized"),
)})
NAMES = tuple(METHODS)
PENALIZED = tuple(name for name, m in METHODS.items() if m.penalized)
GRAFTS = tuple(name for name, m in METHODS.items() if m.graft is not None)
_METHOD_OPTIONS = frozenset(option for m in METHODS.values() for option in m.takes)


def method(name: str) -> Method:
    """The entry of ``name``; ValueError names the known ones."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}: expected one of {', '.join(NAMES)}")
    return METHODS[name]


def build(name: str, params: Any, **options: Any) -> MicroBatch:
    """The optimizer of method ``name`` on ``params``, e.g. ``build("GN", params, lr=0.1, micro_batch_size=32,
    penalty=0.01)``."""
    return method(name).build(params, **options)


def wrap(name: str, base: torch.optim.Optimizer, **options: Any) -> MicroBatch:
    """Method ``name`` around the base optimizer ``base``, e.g. ``wrap("GN", torch.optim.AdamW(params),
    micro_batch_size=32, penalty=0.01)``."""
    return method(name).wrap(base, **options)


__all__ = ["GRAFTS", "METHODS", "Method", "NAMES", "PENALIZED", "PENALTY_OPTIONS", "build", "method", "wrap"]
