"""The penalized wrappers: the micro-batch step plus λ · Σ_j w_j R_j, R_j = ‖∇_θ S_j‖² for each class's S_j.

    θ ← base.step(θ, Σ_j w_j ∇_θ [L_j(θ) + λ R_j(θ)])

GN (S_j = L_j), FT (cross-entropy against labels drawn from the model), AJ and UJ (the logits' Jacobian,
averaged or along a random direction); see :mod:`regopt.penalties` for each S_j.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from . import distributed, hvp, penalties
from .batching import AutocastState
from .optimizers import _BASE_ARGS, _OPTIMIZER_ARGS, _STEP, MicroBatch, private_generator
from .settings import Checked, check_fd_eps, check_method, check_penalty, check_penalty_micro_batches
from .transforms import AddPenalty


_PENALTY_ARGS = """\
        penalty: λ ≥ 0, the weight of R_j.
        method: ``"exact"`` (double backprop) or ``"finite_difference"`` (a forward-difference
            Hessian-vector product: one extra forward+backward per micro-batch, no double backward;
            faithful on smooth models only, see docs/usage.md).
        fd_eps: ε, the finite-difference step along v̂_j: refused below eps(dtype)·‖θ‖ (where rounding
            θ + ε v̂_j loses the shift), warned about below 100 times that.
        generator: a torch.Generator on the parameters' device driving every random draw (FT labels,
            UJ directions, penalty subsets); None: a generator of the optimizer's own, seeded from
            ``torch.initial_seed()`` when built. Either one's state is saved in ``state_dict()``.
        penalty_micro_batches: m, or None. With m < k micro-batches in the step, the penalty runs on m
            of them, drawn without replacement each step and weighted by k/m (unbiased; G and the
            statistics stay exact); None or m ≥ k: on every micro-batch. Per rank when distributed.
        rank_independent_draws: distributed steps: True (default), each rank draws
            from its own stream derived from (``generator``'s state, rank); False, from ``generator``
            itself, to reproduce a single-process run draw for draw (docs/distributed.md).
        exact_grad_norm: distributed steps: True (default), the all-reduce carries G and P apart, so
            that ``stats.grad_norm`` = ‖G‖; False, G ± λP alone (half the volume, the same update,
            ``stats.grad_norm`` NaN)."""


def _penalized_doc(summary: str, extra_args: str = "") -> str:
    """A penalized wrapper's docstring: its R_j (``summary``), the update, every argument, the step."""
    return rf"""{summary}

    .. math::
        \theta \leftarrow \mathrm{{base.step}}\Big(\theta, \sum_j w_j \big[\nabla L_j + \lambda \nabla R_j\big]\Big)

    Where a group has ``maximize=True`` the loss is ascended and the penalty still minimized: the base
    receives G − λP there (P = Σ_j w_j ∇R_j), so that plain SGD moves θ ← θ + lr (G − λP).

    Args:
{_BASE_ARGS}
{_PENALTY_ARGS}{extra_args}
{_OPTIMIZER_ARGS}

{_STEP}
    """


def check_penalty_options(penalty: Any, penalty_micro_batches: Any, method: Any, fd_eps: Any, generator: Any) -> None:
    """The penalized optimizers' own options, checked before anything is built."""
    check_penalty(penalty)
    check_penalty_micro_batches(penalty_micro_batches)
    check_method(method)
    check_fd_eps(fd_eps)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")


class _Penalized(MicroBatch):
    r"""MicroBatch plus λ · Σ_j w_j R_j, R_j = ‖∇_θ S_j‖² for the class's penalty S_j.

    Args: see :class:`GradNorm`.
    """

    penalty = Checked(check_penalty)
    method = Checked(check_method)
    fd_eps = Checked(check_fd_eps)
    penalty_micro_batches = Checked(check_penalty_micro_batches)

    def __init__(self, base: torch.optim.Optimizer, *, micro_batch_size: int, penalty: float, method: str = "exact",
                 fd_eps: float = 1e-2, generator: torch.Generator | None = None,
                 penalty_micro_batches: int | None = None, rank_independent_draws: bool = True,
                 exact_grad_norm: bool = True, max_grad_norm: float | None = None, skip_nonfinite: bool = False,
                 loss_scale: float | str | None = None, process_group: Any = "default") -> None:
        check_penalty_options(penalty, penalty_micro_batches, method, fd_eps, generator)
        super().__init__(base, micro_batch_size=micro_batch_size, max_grad_norm=max_grad_norm,
                         skip_nonfinite=skip_nonfinite, loss_scale=loss_scale, process_group=process_group)
        device = self.param_groups[0]["params"][0].device
        if generator is not None and generator.device.type != device.type:
            raise ValueError(f"generator is on {generator.device}, expected the parameters' device {device}")
        self.penalty = penalty
        self.method = method
        self.fd_eps = fd_eps
        self.generator = generator
        # generator=None: the draws come from a generator of the optimizer's own, saved in state_dict(), so that
        # a resumed run draws what the uninterrupted one did and a failed step can put it back.
        self._private_generator = private_generator(device) if generator is None else None
        self.penalty_micro_batches = penalty_micro_batches
        self.rank_independent_draws = bool(rank_independent_draws)
        self.exact_grad_norm = bool(exact_grad_norm)
        self._transforms = (AddPenalty(self),)
        self._param_norm: float | None = None  # ‖θ‖ when first measured, the scale fd_eps is checked against
        self._param_norm_measured = False
        if method == "finite_difference":
            self._check_fd_eps([p for group in self.param_groups for p in group["params"] if p.requires_grad], None)

    def _settings_repr(self) -> str:
        return f"{super()._settings_repr()}, penalty={self.penalty}, method={self.method!r}"

    def _penalty_setup(self, params: list[Tensor], group: Any, closure_autocast: AutocastState) -> dict[str, Any]:
        """The penalty, how to differentiate it, its draws' generator and subsampling; fd_eps checked first."""
        if self.method == "finite_difference":
            self._check_fd_eps(params, closure_autocast.dtype if closure_autocast.enabled else None)
        return {"penalty": self._penalty, "method": self.method, "generator": self._draw_generator(group),
                "fd_eps": self.fd_eps, "penalty_micro_batches": self.penalty_micro_batches}

    def _draw_generator(self, group: Any) -> torch.Generator | None:
        """A per-rank stream (distributed step, ``rank_independent_draws``), else :meth:`_draw_source`."""
        source = self._draw_source()
        if group is None or not self.rank_independent_draws:
            return source
        return distributed.rank_draw_generator(source, torch.distributed.get_rank(group))

    def _check_fd_eps(self, params: list[Tensor], compute_dtype: torch.dtype | None) -> None:
        """fd_eps against the coarsest parameter dtype and ‖θ‖ (measured once: no host sync in a step)."""
        floating = [p for p in params if p.is_floating_point()]
        if not floating:
            return
        if not self._param_norm_measured:  # once (host syncs), when built or when finite differences start
            self._param_norm, self._param_norm_measured = hvp.parameter_norm(floating), True
        if self._param_norm is not None:
            dtype = max((p.dtype for p in floating), key=lambda d: torch.finfo(d).eps)
            hvp.check_fd_eps(self.fd_eps, dtype, self._param_norm, compute_dtype)

    def _wire_penalty_grad(self) -> bool:
        return self.exact_grad_norm


class GradNorm(_Penalized):
    __doc__ = _penalized_doc("""GN: large-batch steps plus λ times the squared micro-batch gradient norm,
    R_j = ‖∇_θ L_j‖², around a base optimizer.""")

    _penalty = penalties.GRAD_NORM


class FisherTrace(_Penalized):
    __doc__ = _penalized_doc("""FT: R_j = ‖∇_θ mean_i CE(f(x_i), ŷ_i)‖², one label per example
    ŷ_i ~ softmax(f(x_i)), drawn afresh per micro-batch; around a base optimizer.

    ``loss_fn`` must return ``(loss, logits)``.""")

    _penalty = penalties.FISHER_TRACE


JACOBIAN_KINDS = {"average": penalties.AVERAGE_JACOBIAN, "unit": penalties.UNIT_JACOBIAN}


def check_kind(kind: Any) -> None:
    if kind not in JACOBIAN_KINDS:
        raise ValueError(f"Invalid kind: {kind!r} (expected 'average' or 'unit')")


class JacobianReg(_Penalized):
    __doc__ = _penalized_doc("""AJ (``kind="average"``): R_j = ‖∇_θ Σ_c mean_i f_c(x_i)‖²;
    UJ (``kind="unit"``): R_j = ‖∇_θ uᵀ mean_i f(x_i)‖², u uniform on the unit sphere, drawn per micro-batch;
    around a base optimizer.

    ``loss_fn`` must return ``(loss, logits)``.""", """
        kind: ``"average"`` (AJ) or ``"unit"`` (UJ).""")

    def __init__(self, base: torch.optim.Optimizer, *, micro_batch_size: int, penalty: float, kind: str = "average",
                 method: str = "exact", fd_eps: float = 1e-2, generator: torch.Generator | None = None,
                 penalty_micro_batches: int | None = None, rank_independent_draws: bool = True,
                 exact_grad_norm: bool = True, max_grad_norm: float | None = None, skip_nonfinite: bool = False,
                 loss_scale: float | str | None = None, process_group: Any = "default") -> None:
        check_kind(kind)
        super().__init__(base, micro_batch_size=micro_batch_size, penalty=penalty, method=method, fd_eps=fd_eps,
                         generator=generator, penalty_micro_batches=penalty_micro_batches,
                         rank_independent_draws=rank_independent_draws, exact_grad_norm=exact_grad_norm,
                         max_grad_norm=max_grad_norm, skip_nonfinite=skip_nonfinite, loss_scale=loss_scale,
                         process_group=process_group)
        self.kind = kind
        self._penalty = JACOBIAN_KINDS[kind]
