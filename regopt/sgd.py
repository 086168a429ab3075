"""The ``*SGD`` classes: regopt's wrappers around ``torch.optim.SGD``, built from SGD's own arguments.

``GradNormSGD(params, lr, momentum, ..., micro_batch_size=m, penalty=λ)`` is
``GradNorm(torch.optim.SGD(params, lr, momentum, ...), micro_batch_size=m, penalty=λ)``, step for step and
bit for bit; so for MicroBatchSGD, FisherTraceSGD, JacobianRegSGD and GraftedSGD.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import ParamsT

from .batching import check_micro_batch_size
from .grafting import Grafted, Norms, check_grafting_options
from .optimizers import _BASE_ARGS, MicroBatch, check_optimizer_options
from .penalized import FisherTrace, GradNorm, JacobianReg, check_kind, check_penalty_options
from .settings import check_hyperparameter

_SGD_ARGS = """\
        params, lr, momentum, dampening, weight_decay, nesterov, maximize, foreach, fused:
            as in :class:`torch.optim.SGD` (the same defaults, per-group behaviour and validation).
        micro_batch_size: |M|, examples per micro-batch (the last may be smaller)."""
_SGD_OPTIONS = ("lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize", "foreach", "fused")


def _sgd_doc(wrapper: type) -> str:
    """``wrapper``'s docstring with SGD's arguments in place of ``base`` and SGD's update in place of base.step."""
    return wrapper.__doc__.replace(_BASE_ARGS, _SGD_ARGS).replace(r"\mathrm{base.step}", r"\mathrm{SGD\_update}") \
        .replace("base.step(", "SGD_update(").replace("around a base optimizer", "with torch.optim.SGD's update")


def _wrap_sgd(optimizer: MicroBatch, wrapper: type, arguments: dict[str, Any]) -> None:
    """Build ``torch.optim.SGD`` from the SGD options among ``arguments`` (a ``*SGD.__init__``'s locals) and
    initialize ``optimizer`` as ``wrapper`` around it with the rest, checking them in the order of old:
    the wrapper's own options, then SGD's (as torch.optim.SGD words them), then the micro-batch size."""
    options = {name: value for name, value in arguments.items() if name not in ("self", "params")}
    sgd_options = {name: options.pop(name) for name in _SGD_OPTIONS}
    check_optimizer_options(options["max_grad_norm"], options["loss_scale"])
    lr = sgd_options["lr"]
    if not (isinstance(lr, Tensor) and lr.numel() != 1):  # SGD words that case itself
        check_hyperparameter(lr, "learning rate")
    check_hyperparameter(sgd_options["momentum"], "momentum value")
    check_hyperparameter(sgd_options["weight_decay"], "weight_decay value")
    check_micro_batch_size(options["micro_batch_size"])
    wrapper.__init__(optimizer, torch.optim.SGD(arguments["params"], **sgd_options), **options)


class MicroBatchSGD(MicroBatch):
    __doc__ = _sgd_doc(MicroBatch)

    def __init__(self, params: ParamsT, lr: float | Tensor = 1e-3, momentum: float = 0, dampening: float = 0,
                 weight_decay: float | Tensor = 0, nesterov: bool = False, *, micro_batch_size: int,
                 maximize: bool = False, foreach: bool | None = None, fused: bool | None = None,
                 max_grad_norm: float | None = None, skip_nonfinite: bool = False,
                 loss_scale: float | str | None = None, process_group: Any = "default") -> None:
        _wrap_sgd(self, MicroBatch, locals())


class _PenalizedSGD:
    """The shared ``__init__`` of GradNormSGD and FisherTraceSGD (mixed in before their wrapper)."""

    def __init__(self, params: ParamsT, lr: float | Tensor = 1e-3, momentum: float = 0, dampening: float = 0,
                 weight_decay: float | Tensor = 0, nesterov: bool = False, *, micro_batch_size: int,
                 penalty: float, method: str = "exact", fd_eps: float = 1e-2,
                 generator: torch.Generator | None = None, penalty_micro_batches: int | None = None,
                 rank_independent_draws: bool = True, exact_grad_norm: bool = True, maximize: bool = False,
                 foreach: bool | None = None, fused: bool | None = None, max_grad_norm: float | None = None,
                 skip_nonfinite: bool = False, loss_scale: float | str | None = None,
                 process_group: Any = "default") -> None:
        check_penalty_options(penalty, penalty_micro_batches, method, fd_eps, generator)
        _wrap_sgd(self, type(self).__mro__[2], locals())  # the wrapper after this mixin: GradNorm, FisherTrace


class GradNormSGD(_PenalizedSGD, GradNorm):
    __doc__ = _sgd_doc(GradNorm)


class FisherTraceSGD(_PenalizedSGD, FisherTrace):
    __doc__ = _sgd_doc(FisherTrace)


class JacobianRegSGD(JacobianReg):
    __doc__ = _sgd_doc(JacobianReg)

    def __init__(self, params: ParamsT, lr: float | Tensor = 1e-3, momentum: float = 0, dampening: float = 0,
                 weight_decay: float | Tensor = 0, nesterov: bool = False, *, micro_batch_size: int,
                 penalty: float, kind: str = "average", method: str = "exact", fd_eps: float = 1e-2,
                 generator: torch.Generator | None = None, penalty_micro_batches: int | None = None,
                 rank_independent_draws: bool = True, exact_grad_norm: bool = True, maximize: bool = False,
                 foreach: bool | None = None, fused: bool | None = None, max_grad_norm: float | None = None,
                 skip_nonfinite: bool = False, loss_scale: float | str | None = None,
                 process_group: Any = "default") -> None:
        check_kind(kind)
        check_penalty_options(penalty, penalty_micro_batches, method, fd_eps, generator)
        _wrap_sgd(self, JacobianReg, locals())


class GraftedSGD(Grafted):
    __doc__ = _sgd_doc(Grafted)

    def __init__(self, params: ParamsT, lr: float | Tensor = 1e-3, momentum: float = 0, dampening: float = 0,
                 weight_decay: float | Tensor = 0, nesterov: bool = False, *, micro_batch_size: int,
                 mode: str = "iterative", norms: Norms | None = None, maximize: bool = False,
                 foreach: bool | None = None, fused: bool | None = None, max_grad_norm: float | None = None,
                 skip_nonfinite: bool = False, loss_scale: float | str | None = None,
                 process_group: Any = "default") -> None:
        check_grafting_options(mode, norms)
        _wrap_sgd(self, Grafted, locals())
