"""The optimizers: thin compositions of the batching, penalty, differentiation and update parts.

Every optimizer here takes one step per batch B, split into micro-batches M_j of
``micro_batch_size`` examples with weights w_j = |M_j| / |B|:

    θ ← SGD_update(θ, Σ_j w_j ∇_θ [L_j(θ) + λ R_j(θ)])

where SGD_update is exactly torch.optim.SGD's rule and R_j = ‖∇_θ S_j‖² for the
optimizer's scalar S_j (see :mod:`regopt.penalties`).
"""

from __future__ import annotations

import math
from dataclasses import replace
from collections.abc import Callable
from numbers import Real
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import ParamsT

from . import distributed, engine, hvp, penalties
from .batching import Batch, autocast_state, check_micro_batch_size, split_batch
from .closures import step_arguments
from .engine import Accumulation, accumulate, settle
from .penalties import Penalty
from .stats import StepStats
from .transaction import StepTransaction
from .update import sgd_update

_STATE_KEY = "regopt"  # optimizer.state entry for what is not per parameter: step count, loss scale, generator
_INITIAL_DYNAMIC_SCALE = 2.0**16
_DYNAMIC_SCALE_GROWTH_INTERVAL = 2000
_DEFAULT_GROUP = "default"
CLOSURE_CALLED_BACKWARD = (
    "the closure wrote .grad (it called backward()): regopt's closure must return the mean loss over its "
    "micro-batch (or (loss, logits)) and must not call backward() or zero_grad(); regopt differentiates it "
    "itself, once per micro-batch. For example:\n"
    "    def closure(x, y): return F.cross_entropy(model(x), y)\n"
    "    optimizer.step(closure, (x, y))\n"
    "The step was not taken, and .grad is as it was before it."
)


def check_hyperparameter(value: Any, name: str) -> None:
    """Reject a negative or non-finite ``value`` as torch.optim.SGD words it: "Invalid <name>: <value>"."""
    number = value.item() if isinstance(value, Tensor) and value.numel() == 1 else value
    if isinstance(number, bool) or not isinstance(number, Real):
        raise TypeError(f"Invalid {name}: {value!r} (expected a finite number >= 0)")
    if not math.isfinite(number) or number < 0:
        raise ValueError(f"Invalid {name}: {value} (expected a finite number >= 0)")


def check_penalty_micro_batches(value: Any) -> None:
    """None or an int ≥ 1 (bool refused), else ValueError "Invalid penalty_micro_batches: <value>"."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"Invalid penalty_micro_batches: {value!r} (expected None or an int >= 1)")


class MicroBatchSGD(torch.optim.SGD):
    r"""Large-batch SGD over micro-batches ("LB SGD", the paper's baseline).

    .. math::
        G = \sum_j w_j \nabla_\theta L_j(\theta), \qquad \theta \leftarrow \mathrm{SGD\_update}(\theta, G)

    Each micro-batch is forwarded once in train mode (so BatchNorm statistics are
    per micro-batch, "ghost" batch norm) and its graph is freed before the next.

    Args:
        params, lr, momentum, dampening, weight_decay, nesterov, maximize, foreach, fused:
            as in :class:`torch.optim.SGD`.
        micro_batch_size: |M|, examples per micro-batch (the last may be smaller).
        max_grad_norm: if given, the applied gradient (penalty included) is clipped to this
            total norm, as by :func:`torch.nn.utils.clip_grad_norm_`, before momentum.
        skip_nonfinite: on a non-finite loss, penalty or gradient, skip the step (nothing
            changes; ``stats.skipped`` is True) instead of raising FloatingPointError.
        loss_scale: for float16 autocast: ``"dynamic"`` (torch.amp.GradScaler's rule: start at
            2¹⁶, halve on a non-finite step, double after 2000 finite steps) or a fixed float.
            Every backward runs on the scaled scalar, each micro-batch gradient is unscaled
            before it is squared, and a non-finite step is skipped (``stats.skipped``) rather
            than raised. The current scale is ``optimizer.current_loss_scale`` (in ``state_dict()``).
        process_group: the torch.distributed group whose ranks share each step (each passes
            its own shard of the batch); ``"default"``: the world group *at each step* when
            torch.distributed is initialized then (with more than one rank), so the optimizer may be
            built before ``dist.init_process_group``; None: no communication.

    ``step(closure, batch)`` calls ``closure(*parts)`` (tuple/list batch), ``closure(**parts)``
    (dict) or ``closure(t)`` (tensor) once per micro-batch; the closure returns the mean
    loss over it, or ``(loss, logits)``, and must not call ``backward()``. ``step`` returns
    Σ_j w_j L_j (detached) and its measurements in ``self.stats`` (:class:`~regopt.StepStats`).
    Only the parameters that require grad at step time are stepped, and of those only the ones
    some micro-batch's graph reaches; ``.grad`` then holds the applied gradient for the stepped
    parameters and None for the others (frozen or unused: no weight decay, no momentum), as after
    ``zero_grad(); loss.backward()`` with torch.optim.SGD. A step that raises or is skipped
    changes nothing: parameters, ``.grad``, optimizer state, generator, module buffers.
    """

    _penalty: Penalty | None = None

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        momentum: float = 0,
        dampening: float = 0,
        weight_decay: float | Tensor = 0,
        nesterov: bool = False,
        *,
        micro_batch_size: int,
        maximize: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
        max_grad_norm: float | None = None,
        skip_nonfinite: bool = False,
        loss_scale: float | str | None = None,
        process_group: Any = "default",
    ) -> None:
        if max_grad_norm is not None:
            check_hyperparameter(max_grad_norm, "max_grad_norm value")
        if loss_scale is not None and loss_scale != "dynamic":
            check_hyperparameter(loss_scale, "loss_scale value")
            if loss_scale == 0:
                raise ValueError("Invalid loss_scale value: 0 (expected 'dynamic', None or a finite number > 0)")
        if not (isinstance(lr, Tensor) and lr.numel() != 1):  # SGD words that case itself
            check_hyperparameter(lr, "learning rate")
        check_hyperparameter(momentum, "momentum value")
        check_hyperparameter(weight_decay, "weight_decay value")
        self.micro_batch_size = check_micro_batch_size(micro_batch_size)
        super().__init__(params, lr, momentum, dampening, weight_decay, nesterov,
                         maximize=maximize, foreach=foreach, fused=fused)
        self.max_grad_norm = max_grad_norm
        self.skip_nonfinite = bool(skip_nonfinite)
        self.loss_scale = loss_scale
        self.process_group = process_group
        self.method = "exact"
        self.fd_eps = 1e-2
        self.generator: torch.Generator | None = None
        self.penalty_micro_batches: int | None = None
        self.stats: StepStats | None = None

    @property
    def process_group(self) -> Any:
        """The group this step would share; ``"default"`` resolves to the world group at each step."""
        if isinstance(self._process_group, str):
            return distributed.default_process_group()
        return self._process_group

    @process_group.setter
    def process_group(self, group: Any) -> None:
        if isinstance(group, str) and group != _DEFAULT_GROUP:
            raise ValueError(f"Invalid process_group: {group!r} (expected 'default', None or a ProcessGroup)")
        self._process_group = group

    # -- state ------------------------------------------------------------------------
    @property
    def _extra_state(self) -> dict[str, Any]:
        """``optimizer.state["regopt"]``: what is not per parameter (read-only view; see _update_state)."""
        return self.state.get(_STATE_KEY, {})

    @property
    def step_count(self) -> int:
        """Optimizer steps taken so far (part of ``state_dict()``)."""
        return self._extra_state.get("step", 0)

    @property
    def current_loss_scale(self) -> float:
        """The loss scale s the next step uses (1.0 without loss scaling)."""
        if self.loss_scale is None:
            return 1.0
        initial = _INITIAL_DYNAMIC_SCALE if self.loss_scale == "dynamic" else float(self.loss_scale)
        return self._extra_state.get("loss_scale", initial)

    def _update_state(self, **updates: Any) -> None:
        # Replaced, never mutated: load_state_dict shares this dict with the loaded state_dict.
        self.state[_STATE_KEY] = {**self._extra_state, **updates}

    def _update_loss_scale(self, found_nonfinite: bool) -> None:
        """torch.amp.GradScaler's rule: ×0.5 on a non-finite step, ×2 after 2000 finite ones in a row."""
        if self.loss_scale != "dynamic":
            return
        scale, streak = self.current_loss_scale, self._extra_state.get("loss_scale_streak", 0)
        if found_nonfinite:
            scale, streak = scale * 0.5, 0
        elif streak + 1 == _DYNAMIC_SCALE_GROWTH_INTERVAL:
            scale, streak = scale * 2.0, 0
        else:
            streak += 1
        self._update_state(loss_scale=scale, loss_scale_streak=streak)

    def state_dict(self) -> dict[str, Any]:
        state_dict = super().state_dict()
        extra = {"step": 0, **self._extra_state}
        if self.generator is not None:
            extra["generator_state"] = self.generator.get_state()
        state_dict["state"][_STATE_KEY] = extra
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        extra = dict(self._extra_state)
        generator_state = extra.pop("generator_state", None)
        if generator_state is not None and self.generator is not None:
            self.generator.set_state(generator_state)
        self.state[_STATE_KEY] = extra

    def _trainable_params(self) -> list[Tensor]:
        """The parameters stepped now: those of the optimizer that require grad at step time."""
        params = [p for group in self.param_groups for p in group["params"] if p.requires_grad]
        if not params:
            raise ValueError("no parameter requires grad: nothing to optimize")
        if any(p.is_complex() for p in params):
            raise TypeError("complex parameters are not supported: R_j = ‖v_j‖² and the step lengths assume real ones")
        if params[0].is_meta:
            raise ValueError(
                "the parameters are on the meta device (shapes without data): materialize them before the first "
                "step, e.g. model.to_empty(device=...) and initialize them"
            )
        return params

    # -- the step -----------------------------------------------------------------------
    def step(self, closure: Callable[..., Any] | None = None, batch: Batch | None = None, *,  # type: ignore[override]
             loss_fn: Callable[..., Any] | None = None) -> Tensor:
        """One step on ``batch``: ``closure(*micro_batch)`` (or ``loss_fn``) returns the mean loss over a micro-batch.

        ``step(closure, batch)``, ``step(batch=batch, loss_fn=fn)`` (a trainer's zero-argument closure, if
        given, is then called once after ``.grad`` is written and before the update) and
        ``step(regopt.BatchClosure(fn, batch))`` are the same step; see :mod:`regopt.closures`.
        Returns the mean loss over the batch (a 0-dim tensor, no host sync).
        """
        arguments = step_arguments(type(self).__name__, closure, batch, loss_fn)
        group = self.process_group  # resolved now: the world group at step time
        params = self._trainable_params()
        device = params[0].device
        closure_autocast = autocast_state(device)
        transaction = StepTransaction(params, self.generator)
        # Only the closure runs under the caller's autocast: norms, penalties and the update use full precision.
        with torch.autocast(device.type, enabled=False):
            return self._step(arguments, params, group, transaction, closure_autocast)

    def _step(self, arguments, params, group, transaction, closure_autocast) -> Tensor:
        closure, batch = arguments.loss_fn, arguments.batch
        reduced = False  # whether this rank has taken part in the step's all-reduce
        failure = engine.FAILURE_SHARD  # what this rank tells the others if it fails before the all-reduce
        try:
            # Distributed steps weight by |M_j| here and divide by the global size after the all-reduce.
            micro_batches = split_batch(batch, self.micro_batch_size, total_size=1 if group is not None else None)
            failure = engine.FAILURE_EXCEPTION
            self._prepare_step(params, closure_autocast)
            generator = self._draw_generator(group)
            # the closure must call ddp_model.module, not ddp_model; every buffer a forward touches is recorded
            with distributed.ddp_forward_guard(), transaction.buffers.recording():
                acc = accumulate(closure, micro_batches, params, self._penalty, self.method, generator,
                                 self.fd_eps, closure_autocast, self.current_loss_scale,
                                 self.penalty_micro_batches)
            if transaction.grads_were_written():
                raise TypeError(CLOSURE_CALLED_BACKWARD)
            combined = group is not None and self._penalty is not None and not self._wire_penalty_grad()
            if combined:  # G ± λP travels alone: ‖G‖ is not measured (see _PenalizedSGD's exact_grad_norm)
                acc = replace(acc, grad=self._add_penalty(acc.grad, acc.penalty_grad, params), penalty_grad=None)
            if group is not None:
                reduced = True
                acc = distributed.all_reduce_accumulation(acc, micro_batches[-1].stop, group)
            grad_norm = hvp.squared_norm(acc.grad).sqrt()
            norm_name = "applied gradient norm ‖G ± λP‖" if combined else "large-batch gradient norm ‖G‖"
            problem, used = settle(acc, micro_batches, **{norm_name: grad_norm})
            if problem is not None and not (self.skip_nonfinite or self.loss_scale is not None):
                raise FloatingPointError(f"{problem}; the step was not taken")
        except BaseException as error:
            called_backward = transaction.grads_were_written()
            transaction.rollback()  # a failed step changes nothing
            if group is not None and not reduced:  # don't leave the other ranks waiting in the all-reduce
                distributed.join_failed_step(params, self._wire_penalty_grad(), group, failure)
            if called_backward and isinstance(error, Exception) and not isinstance(error, TypeError):
                raise TypeError(CLOSURE_CALLED_BACKWARD) from error
            raise
        stats = StepStats(
            loss=acc.loss,
            penalty=acc.penalty,
            micro_grad_sq_norm=acc.micro_grad_sq_norm,
            grad_norm=torch.full_like(grad_norm, math.nan) if combined else grad_norm,
            num_micro_batches=int(acc.sums[4]) if group is not None else len(micro_batches),
            skipped=problem is not None,
        )
        if problem is not None:  # skip_nonfinite or loss scaling: like a step never taken
            transaction.rollback()
        else:
            self._write_grads(params, self._applied_gradient(acc, grad_norm, params), used)
        previous_stats, self.stats = self.stats, stats
        if arguments.hook is not None:  # a trainer's closure: sees .grad and stats as the update will
            try:
                arguments.hook()
            except BaseException:
                transaction.rollback()
                self.stats = previous_stats
                raise
        self._update_loss_scale(found_nonfinite=problem is not None)
        if problem is None:
            self._update(params)
        return acc.loss

    def _write_grads(self, params: list[Tensor], applied: list[Tensor], used: list[bool]) -> None:
        """Write ``.grad``: the applied gradient, None for an unused parameter (SGD then skips it)."""
        for param, grad, is_used in zip(params, applied, used):
            param.grad = grad if is_used else None

    def _update(self, params: list[Tensor]) -> None:
        """Clear a frozen parameter's ``.grad`` (SGD then skips it), clip (``max_grad_norm``), take SGD's update."""
        for group in self.param_groups:
            for p in group["params"]:
                if not p.requires_grad:
                    p.grad = None
        if self.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm, foreach=self.defaults["foreach"])
        sgd_update(self)
        self._update_state(step=self.step_count + 1)

    def _prepare_step(self, params: list[Tensor], closure_autocast: tuple[str, torch.dtype, bool]) -> None:
        """Check, before any work, what the step will need besides its batch (nothing here)."""

    def _draw_generator(self, group: Any) -> torch.Generator | None:
        """The generator this step's random draws come from: ``self.generator`` here (see _PenalizedSGD)."""
        return self.generator

    def _wire_penalty_grad(self) -> bool:
        """Whether a distributed step all-reduces P = Σ_j w_j ∇R_j apart from G (penalized: by default)."""
        return self._penalty is not None

    def _applied_gradient(self, acc: Accumulation, grad_norm: Tensor, params: list[Tensor]) -> list[Tensor]:
        """The gradient handed to SGD's update: G here."""
        return acc.grad

    def _maximizing(self, params: list[Tensor]) -> list[bool]:
        """Per parameter of ``params``: whether its group has ``maximize=True``."""
        ascending = {id(p) for group in self.param_groups if group["maximize"] for p in group["params"]}
        return [id(p) in ascending for p in params]


class _PenalizedSGD(MicroBatchSGD):
    r"""MicroBatchSGD plus λ · Σ_j w_j R_j, R_j = ‖∇_θ S_j‖² for the class's penalty S_j.

    .. math::
        \theta \leftarrow \mathrm{SGD\_update}\Big(\theta, \sum_j w_j \big[\nabla L_j + \lambda \nabla R_j\big]\Big)

    Args (besides MicroBatchSGD's):
        penalty: λ ≥ 0.
        method: ``"exact"`` (double backprop) or ``"finite_difference"`` (forward-difference
            Hessian-vector product, one extra forward+backward per micro-batch).
        fd_eps: ε, the finite-difference step length along v̂_j: refused below eps(dtype)·‖θ‖, where
            rounding θ + ε v̂_j loses the shift, and warned about below 100 times that (in the coarser
            of the parameters' and the closure's autocast dtype).
        generator: a torch.Generator on the parameters' device driving every random draw
            (None: the global RNG); its state is saved in ``state_dict()``.
        penalty_micro_batches: m, or None. With k micro-batches in the step and m < k, only m of
            them, drawn uniformly without replacement once per step (from ``generator``, else the
            global CPU RNG), get the penalty, each weighted by k/m:
            P̂ = Σ_{j∈S} (k/m) w_j ∇R_j, so E[P̂] = Σ_j w_j ∇R_j (``stats.penalty`` likewise; G and
            ``stats.micro_grad_sq_norm`` stay exact). The others take the first-order path, so a step
            costs about (1 + c·m/k) large-batch steps, c the penalty's extra cost. m ≥ k or None: every
            micro-batch (bit-identical to the full penalty). Distributed: m is per rank (each rank
            samples min(m, k_r) of its own k_r micro-batches with weight k_r / min(m, k_r)).
        rank_independent_draws: distributed steps with a ``generator`` only. True (default): each
            step, rank r draws from a generator seeded by a hash of (``generator``'s state, r), and
            ``generator`` advances by one draw (:func:`regopt.distributed.rank_draw_generator`), so
            ranks whose generators share a state (same seed) still draw independently, and a resumed
            run (``state_dict()`` holds the state) draws the same numbers. False: each rank draws from
            ``generator`` itself, so rank r reproduces a single-process run draw for draw when its
            generator starts in the state that run reaches at rank r's first micro-batch. With
            ``generator=None`` the global RNG is used as is, on every rank: seed it per rank
            (``torch.manual_seed(seed + rank)``) for independent draws.
        exact_grad_norm: distributed steps only. True (default): the all-reduce carries G and P apart,
            2N values for N parameters, since ``stats.grad_norm`` = ‖G‖ = ‖Σ_r G_r‖ needs the global G.
            False: each rank adds λP_r to G_r first and the all-reduce carries G ± λP alone (N values,
            half the volume); the update is the same up to rounding, and ``stats.grad_norm`` is NaN
            (not measured; the non-finite check uses ‖G ± λP‖). Single-process steps ignore it.

    With ``maximize=True`` the loss is ascended and the penalty still minimized: SGD(maximize=True)
    receives G − λP, so that without momentum θ ← θ + lr (G − λP).
    """

    def __init__(self, params: ParamsT, lr: float | Tensor = 1e-3, momentum: float = 0, dampening: float = 0,
                 weight_decay: float | Tensor = 0, nesterov: bool = False, *, micro_batch_size: int,
                 penalty: float, method: str = "exact", fd_eps: float = 1e-2,
                 generator: torch.Generator | None = None, penalty_micro_batches: int | None = None,
                 rank_independent_draws: bool = True, exact_grad_norm: bool = True, **kwargs: Any) -> None:
        check_hyperparameter(penalty, "penalty value")
        check_penalty_micro_batches(penalty_micro_batches)
        if method not in hvp.METHODS:
            raise ValueError(f"Invalid method: {method!r} (expected one of {', '.join(map(repr, hvp.METHODS))})")
        check_hyperparameter(fd_eps, "fd_eps value")
        if fd_eps == 0:
            raise ValueError("Invalid fd_eps value: 0 (expected a finite number > 0)")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        super().__init__(params, lr, momentum, dampening, weight_decay, nesterov, micro_batch_size=micro_batch_size,
                         **kwargs)
        device = self.param_groups[0]["params"][0].device
        if generator is not None and generator.device.type != device.type:
            raise ValueError(f"generator is on {generator.device}, expected the parameters' device {device}")
        self.penalty = float(penalty)
        self.method = method
        self.fd_eps = float(fd_eps)
        self.generator = generator
        self.penalty_micro_batches = penalty_micro_batches
        self.rank_independent_draws = bool(rank_independent_draws)
        self.exact_grad_norm = bool(exact_grad_norm)
        self._param_norm: float | None = None  # ‖θ‖ when first measured, the scale fd_eps is checked against
        self._param_norm_measured = False
        if method == "finite_difference":
            self._check_fd_eps([p for group in self.param_groups for p in group["params"] if p.requires_grad], None)

    def _prepare_step(self, params: list[Tensor], closure_autocast: tuple[str, torch.dtype, bool]) -> None:
        if self.method == "finite_difference":
            self._check_fd_eps(params, closure_autocast[1] if closure_autocast[2] else None)

    def _draw_generator(self, group: Any) -> torch.Generator | None:
        """A per-rank stream (distributed step, ``rank_independent_draws``, a generator), else ``self.generator``."""
        if group is None or self.generator is None or not self.rank_independent_draws:
            return self.generator
        return distributed.rank_draw_generator(self.generator, torch.distributed.get_rank(group))

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

    def _applied_gradient(self, acc: Accumulation, grad_norm: Tensor, params: list[Tensor]) -> list[Tensor]:
        """G + λP, with P = Σ_j w_j ∇R_j (already added when P did not travel apart: ``acc.penalty_grad`` None)."""
        return acc.grad if acc.penalty_grad is None else self._add_penalty(acc.grad, acc.penalty_grad, params)

    def _add_penalty(self, grad: list[Tensor], penalty_grad: list[Tensor], params: list[Tensor]) -> list[Tensor]:
        """``grad`` += λ ``penalty_grad`` in place; −λ where the group maximizes (ascends L, still minimizes R)."""
        ascending = self._maximizing(params)
        if not any(ascending):
            torch._foreach_add_(grad, penalty_grad, alpha=self.penalty)
        elif all(ascending):
            torch._foreach_add_(grad, penalty_grad, alpha=-self.penalty)
        else:
            for sign in (1.0, -1.0):
                chosen = [i for i, up in enumerate(ascending) if up == (sign < 0)]
                torch._foreach_add_([grad[i] for i in chosen], [penalty_grad[i] for i in chosen],
                                    alpha=sign * self.penalty)
        return grad


class GradNormSGD(_PenalizedSGD):
    """GN: R_j = ‖∇_θ L_j‖², the squared micro-batch gradient norm."""

    _penalty = penalties.GRAD_NORM


class FisherTraceSGD(_PenalizedSGD):
    """FT: R_j = ‖∇_θ mean_i CE(f(x_i), ŷ_i)‖², ŷ_i ~ softmax(f(x_i)), drawn per micro-batch.

    The closure must return ``(loss, logits)``.
    """

    _penalty = penalties.FISHER_TRACE


class JacobianRegSGD(_PenalizedSGD):
    """AJ (``kind="average"``): R_j = ‖∇_θ Σ_c mean_i f_c(x_i)‖²;
    UJ (``kind="unit"``): R_j = ‖∇_θ uᵀ mean_i f(x_i)‖², u uniform on the unit sphere, drawn per micro-batch.

    The closure must return ``(loss, logits)``.
    """

    _KINDS = {"average": penalties.AVERAGE_JACOBIAN, "unit": penalties.UNIT_JACOBIAN}

    def __init__(self, params: ParamsT, lr: float | Tensor = 1e-3, *args: Any, kind: str = "average",
                 **kwargs: Any) -> None:
        if kind not in self._KINDS:
            raise ValueError(f"Invalid kind: {kind!r} (expected 'average' or 'unit')")
        super().__init__(params, lr, *args, **kwargs)
        self.kind = kind
        self._penalty = self._KINDS[kind]
