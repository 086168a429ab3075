"""The wrappers: regopt's micro-batch step around a base optimizer, which takes the update.

Every optimizer here takes one step per batch B, split into micro-batches M_j of
``micro_batch_size`` examples with weights w_j = |M_j| / |B|:

    θ ← base.step(θ, Σ_j w_j ∇_θ [L_j(θ) + λ R_j(θ)])

where ``base.step`` is the wrapped torch.optim optimizer's own update, run on that gradient in
``.grad``, and R_j = ‖∇_θ S_j‖² for the optimizer's scalar S_j (see :mod:`regopt.penalties`).
:class:`MicroBatch` holds the step; the penalized wrappers (:mod:`regopt.penalized`) and grafting
(:mod:`regopt.grafting`) add a transform of G; the ``*SGD`` classes (:mod:`regopt.sgd`) are all of these
around ``torch.optim.SGD``.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, replace
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from . import distributed, engine, hvp
from .base_optimizer import RegoptOptimizer
from .batching import AutocastState, Batch, MicroBatch, autocast_state, check_micro_batch_size, split_batch
from .closures import StepArguments, check_trainer_accumulation, step_arguments
from .engine import Accumulation, Settled, StepSetup, accumulate, settle
from .penalties import Penalty
from .settings import Checked, check_hyperparameter, check_loss_scale, check_max_grad_norm
from .stats import StepStats
from .transaction import CLOSURE_CALLED_BACKWARD, StepTransaction

_STATE_KEY = "regopt"  # optimizer.state entry for what is not per parameter: step count, loss scale, generator
_INITIAL_DYNAMIC_SCALE = 2.0**16
_DYNAMIC_SCALE_GROWTH_INTERVAL = 2000
_DEFAULT_GROUP = "default"
def private_generator(device: torch.device) -> torch.Generator:
    """A generator on ``device`` seeded by a hash of ``torch.initial_seed()``: ``torch.manual_seed(s)`` before
    construction fixes its draws, without drawing from (or correlating with) the global RNG's stream."""
    digest = hashlib.blake2b(f"regopt penalty draws {torch.initial_seed()}".encode(), digest_size=8).digest()
    generator = torch.Generator(device=device if device.type != "meta" else "cpu")
    return generator.manual_seed(int.from_bytes(digest, "little") >> 1)


def check_autograd_available(params: list[Tensor]) -> None:
    """Refuse a step that autograd cannot differentiate: inside torch.inference_mode(), or of inference tensors."""
    if torch.is_inference_mode_enabled():
        raise RuntimeError(
            "step was called inside torch.inference_mode(), where autograd cannot run: a regopt step "
            "differentiates its loss function (as torch.optim.LBFGS does its closure). Call step outside "
            "inference_mode (inside torch.no_grad() is fine: the step enables grad itself)"
        )
    if any(p.is_inference() for p in params):
        raise RuntimeError(
            "some parameters are inference tensors (created or loaded under torch.inference_mode()), which "
            "autograd cannot differentiate: create the model outside inference_mode, or replace each such "
            "parameter by a clone made outside it"
        )


# Argument and step text shared by the public classes' docstrings (interpolated, as torch.optim does).
_BASE_ARGS = """\
        base: the torch.optim optimizer whose update the step applies (SGD, AdamW, RMSprop, LAMB, ...);
            its ``param_groups``, ``state`` and ``defaults`` are this optimizer's.
        micro_batch_size: |M|, examples per micro-batch (the last may be smaller)."""
_OPTIMIZER_ARGS = """\
        max_grad_norm: if given, the applied gradient (penalty included) is clipped to this
            total norm, as by :func:`torch.nn.utils.clip_grad_norm_`, before the base's update.
        skip_nonfinite: on a non-finite loss, penalty or gradient, skip the step (nothing
            changes; ``stats.skipped`` is True) instead of raising FloatingPointError.
        loss_scale: for float16 autocast: ``"dynamic"`` (torch.amp.GradScaler's rule: start at
            2¹⁶, halve on a non-finite step, double after 2000 finite steps) or a fixed float; a
            non-finite step is then skipped (``stats.skipped``) rather than raised. The current
            scale is ``optimizer.current_loss_scale`` (in ``state_dict()``).
        process_group: the torch.distributed group whose ranks share each step (each passes
            its own shard of the batch); ``"default"``: the world group *at each step* when
            torch.distributed is initialized then (with more than one rank), so the optimizer may be
            built before ``dist.init_process_group``; None: no communication."""
_STEP = """\
    ``step(loss_fn, batch)`` calls ``loss_fn(*parts)`` (tuple/list batch), ``loss_fn(**parts)`` (dict) or
    ``loss_fn(t)`` (tensor) once per micro-batch; it returns the mean loss over the micro-batch, or
    ``(loss, logits)``, and must not call ``backward()``. ``step`` returns Σ_j w_j L_j (detached), leaves the
    applied gradient in ``.grad`` (None for a frozen or unused parameter, which is not updated) and its
    measurements in ``self.stats`` (:class:`~regopt.StepStats`). A step that raises or is skipped changes
    nothing. See docs/usage.md."""


@dataclass(frozen=True)
class Verdict:
    """What the step's check stage decided."""

    grad_norm: Tensor  # ‖G‖ (‖G ± λP‖ when the all-reduce carried them together)
    settled: Settled  # finite or not, which parameters are updated, Σk (engine.settle)
    hooks: bool  # whether a trainer's hook is called (on any rank)


@dataclass(frozen=True)
class Pending:
    """The update that ``step()`` owes since the last :meth:`MicroBatch.backward` (or ``step(loss_fn, batch)``)."""

    skipped: bool  # a non-finite backward: step() then updates nothing (and the loss scale shrinks)


@dataclass(frozen=True)
class Written:
    """What the write stage left: the parameters, whether a trainer's hook is due, and how to undo the write."""

    params: list[Tensor]
    hooks: bool
    undo: Callable[[], None]

    def call_hook(self, call: Callable[[], None]) -> None:
        """Call the trainer's hook; if it raises, undo the write (the step then changes nothing) and re-raise."""
        try:
            call()
        except BaseException:
            self.undo()
            raise


def check_nothing_accumulated(transaction: StepTransaction, owner: str) -> None:
    """Refuse a second :meth:`MicroBatch.backward` before ``step()`` where a transform does not add up."""
    if any(grad is not None for grad in transaction.grads_before):
        raise RuntimeError(
            f"{owner}.backward: .grad already holds a gradient, and grafting rescales a whole step's gradient "
            "(s · G/‖G‖ of a sum is not the sum of the rescaled parts), so it cannot accumulate over calls. Call "
            "zero_grad() first, or pass the whole batch to one backward call"
        )


def check_optimizer_options(max_grad_norm: Any, loss_scale: Any) -> None:
    """The options every regopt optimizer takes, checked before anything is built."""
    check_max_grad_norm(max_grad_norm)
    check_loss_scale(loss_scale)


class MicroBatch(RegoptOptimizer):
    __doc__ = rf"""Large-batch steps over micro-batches ("LB", the paper's baseline), around a base optimizer.

    .. math::
        G = \sum_j w_j \nabla_\theta L_j(\theta), \qquad \theta \leftarrow \mathrm{{base.step}}(\theta, G)

    Each micro-batch is forwarded once in train mode (so BatchNorm statistics are
    per micro-batch, "ghost" batch norm) and its graph is freed before the next.

    Args:
{_BASE_ARGS}
{_OPTIMIZER_ARGS}

{_STEP}
    """

    _penalty: Penalty | None = None
    _transforms: tuple = ()  # what turns G into the applied gradient, in order (regopt.transforms)
    _pending_update: Pending | None = None
    _distributed_calls = 0  # step calls under a process group: the ranks compare them (distributed.Agreement)
    generator: torch.Generator | None = None  # the penalized optimizers' random draws (none here)
    _private_generator: torch.Generator | None = None  # theirs when generator is None
    micro_batch_size = Checked(check_micro_batch_size)
    max_grad_norm = Checked(check_max_grad_norm)
    loss_scale = Checked(check_loss_scale)

    def __init__(self, base: torch.optim.Optimizer, *, micro_batch_size: int, max_grad_norm: float | None = None,
                 skip_nonfinite: bool = False, loss_scale: float | str | None = None,
                 process_group: Any = "default") -> None:
        check_optimizer_options(max_grad_norm, loss_scale)
        self.micro_batch_size = check_micro_batch_size(micro_batch_size)
        self._adopt(base)
        self.max_grad_norm = max_grad_norm
        self.skip_nonfinite = bool(skip_nonfinite)
        self.loss_scale = loss_scale
        self.process_group = process_group
        self.stats: StepStats | None = None
        self._pending_update: Pending | None = None  # what step() owes since the last backward

    def _settings_repr(self) -> str:
        return f"micro_batch_size={self.micro_batch_size}"

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

    def _save_own_state(self, state_dict: dict[str, Any]) -> None:
        """``state["regopt"]``: step count, loss scale, and the state of the generator the penalties draw from."""
        extra = {"step": 0, **self._extra_state}
        source = self._draw_source()
        if source is not None:
            extra["generator_state"] = source.get_state()
        state_dict["state"][_STATE_KEY] = extra

    def _load_own_state(self) -> None:
        extra = dict(self._extra_state)
        generator_state = extra.pop("generator_state", None)
        source = self._draw_source()
        if generator_state is not None and source is not None:  # a CPU ByteTensor, also for a CUDA generator
            source.set_state(generator_state.cpu())  # (a trainer may have moved the loaded state to the device)
        self.state[_STATE_KEY] = extra

    def __getstate__(self) -> dict[str, Any]:
        """What copy.deepcopy, pickle and torch.save keep: the base (its defaults, state and param_groups), and
        regopt's settings and generators (copied by state); hooks are dropped, as torch.optim drops them."""
        return {name: value for name, value in self.__dict__.items() if not name.startswith("_optimizer_")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)  # torch.optim's: empty hooks, defaults of newer versions

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
             loss_fn: Callable[..., Any] | None = None) -> Tensor | None:
        """One step on ``batch``: ``loss_fn(*micro_batch)`` returns the mean loss over a micro-batch.

        ``step(loss_fn, batch)``, ``step(batch=batch, loss_fn=loss_fn)`` (a trainer's zero-argument closure, if
        given, is then called once after ``.grad`` is written and before the update) and
        ``step(regopt.BatchClosure(loss_fn, batch))`` are the same step; see :mod:`regopt.closures`.
        Returns the mean loss over the batch (a 0-dim tensor, no host sync). It is ``zero_grad()``,
        ``backward(loss_fn, batch)`` and ``step()``, bit for bit.

        ``step()`` with no argument is the base's update from ``.grad`` (clipped by ``max_grad_norm``), as
        ``torch.optim``'s: after :meth:`backward`, or after any other backward; it does nothing when the last
        :meth:`backward` was skipped (non-finite, ``stats.skipped``), and returns None.
        """
        if closure is None and batch is None and loss_fn is None:
            self._take_pending_update(self._trainable_params())
            return None
        group = self._step_group()
        try:
            arguments = step_arguments(type(self).__name__, closure, batch, loss_fn)
        except TypeError:
            self._join_refused_call(group)
            raise
        check_trainer_accumulation(type(self).__name__)
        with torch.enable_grad():
            loss, written = self._gradient(arguments, group, add_to_grad=False)
            if written.hooks:  # a trainer's closure: sees .grad and stats as the update will
                written.call_hook(lambda: self._call_hook(arguments.hook, group, written.params))
            self._take_pending_update(written.params)
        return loss

    def backward(self, loss_fn: Callable[..., Any], batch: Batch, *, weight: float = 1.0) -> Tensor:
        """Add ``weight`` · Σ_j w_j ∇_θ[L_j + λ R_j] (the gradient ``step(loss_fn, batch)`` applies) to ``.grad``,
        as ``loss.backward()`` accumulates, and update nothing: the next ``step()`` does.

        Everything ``step`` computes comes with it: the micro-batches, the penalty and its options, loss
        scaling, the distributed all-reduce, ``stats``, the non-finite checks. Over several calls before one
        ``step()`` (gradient accumulation), give call i the weight |B_i|/Σ|B| to get the gradient of one call on
        the concatenated batches (1/n for n equal batches; grafting, which rescales a whole step's gradient,
        refuses a second call). A failed call changes nothing; a skipped one (non-finite, ``skip_nonfinite`` or
        ``loss_scale``) leaves ``.grad`` as it was and makes the next ``step()`` a no-op. Returns Σ_j w_j L_j.
        """
        if not callable(loss_fn):
            raise TypeError(f"{type(self).__name__}.backward: loss_fn must be callable, got {type(loss_fn).__name__}")
        if batch is None:
            raise TypeError(f"{type(self).__name__}.backward needs a batch: backward(loss_fn, batch)")
        check_hyperparameter(weight, "weight")
        group = self._step_group()
        with torch.enable_grad():
            loss, _ = self._gradient(StepArguments(loss_fn, batch, None), group, add_to_grad=True, weight=weight)
        return loss

    def _step_group(self) -> Any:
        """The group this call shares (the world group now, for ``"default"``), counted for the ranks' agreement."""
        group = self.process_group
        if group is not None:  # this call's number in the group's sequence of steps (distributed.Agreement)
            self._distributed_calls += 1
        return group

    def _gradient(self, arguments: StepArguments, group: Any, add_to_grad: bool,
                  weight: float = 1.0) -> tuple[Tensor, Written]:
        """The step's work up to ``.grad``: check the parameters, open the transaction, run the pipeline."""
        params = self._trainable_params()
        check_autograd_available(params)
        device = params[0].device
        closure_autocast = autocast_state(device)
        transaction = StepTransaction(params, self._draw_source(device))
        # Only the closure runs under the caller's autocast: norms, penalties and the update use full precision.
        # Grad mode is on whatever the caller's (as torch.optim.LBFGS does for its closure): the penalties'
        # double backward needs it, and under torch.no_grad() it would silently build no graph.
        with torch.autocast(device.type, enabled=False):
            return self._step(arguments, params, group, transaction, closure_autocast, add_to_grad, weight)

    def _step(self, arguments: StepArguments, params: list[Tensor], group: Any, transaction: StepTransaction,
              closure_autocast: AutocastState, add_to_grad: bool, weight: float) -> tuple[Tensor, Written]:
        """split → accumulate → reduce (the one all-reduce) → check (the one host sync) → write: transform, then
        ``.grad``. Until the check passes, a failure rolls the step back (``transaction``) and tells the other
        ranks (``guard``)."""
        guard = distributed.StepGuard(group, params, self._wire_penalty_grad(), self._distributed_calls)
        with transaction.rolled_back_on_failure(guard.join_if_failed_early):
            # Distributed steps weight by |M_j| here and divide by the global size after the all-reduce.
            micro_batches = split_batch(arguments.batch, self.micro_batch_size,
                                        total_size=1 if group is not None else None)
            guard.split_done()
            if add_to_grad and not all(transform.accumulates for transform in self._transforms):
                check_nothing_accumulated(transaction, type(self).__name__)
            acc = self._accumulate(arguments.loss_fn, micro_batches, params, group, transaction, closure_autocast)
            acc = guard.reduce(acc, micro_batches[-1].stop, hook=arguments.hook is not None)
            verdict = self._check(acc, micro_batches, guard, hook=arguments.hook is not None)
        return acc.loss, self._write(acc, verdict, params, transaction, add_to_grad, weight)

    def _accumulate(self, loss_fn: Callable[..., Any], micro_batches: list[MicroBatch], params: list[Tensor],
                    group: Any, transaction: StepTransaction, closure_autocast: AutocastState) -> Accumulation:
        """G (and P) and the step's sums over this process's micro-batches; G ± λP when P does not travel apart."""
        for transform in self._transforms:
            transform.prepare()
        setup = StepSetup(loss_fn, len(micro_batches), params, closure_autocast=closure_autocast,
                          loss_scale=self.current_loss_scale, sparse_grads=self._sparse_grads_allowed(group),
                          **self._penalty_setup(params, group, closure_autocast))
        # the closure must call ddp_model.module, not ddp_model; every buffer a forward touches is recorded
        with distributed.ddp_forward_guard(), transaction.buffers.recording(), \
                hvp.naming_modules(transaction.buffers.modules):
            acc = accumulate(setup, micro_batches)
        if transaction.grads_were_written():
            raise TypeError(CLOSURE_CALLED_BACKWARD)
        if group is not None and acc.penalty_grad is not None and not self._wire_penalty_grad():
            # G ± λP travels alone: ‖G‖ is not measured (see _Penalized's exact_grad_norm)
            acc = replace(acc, grad=self._transforms[0].add(acc.grad, acc.penalty_grad, params), penalty_grad=None,
                          penalty_added=True)
        return acc

    def _check(self, acc: Accumulation, micro_batches: list[MicroBatch], guard: distributed.StepGuard,
               hook: bool) -> Verdict:
        """The step's one host sync: whether every term is finite, which parameters it updates, and (distributed)
        whether the ranks agree; raise on a non-finite term unless the step may be skipped."""
        grad_norm = hvp.squared_norm(acc.grad).sqrt()
        norm_name = "applied gradient norm ‖G ± λP‖" if acc.penalty_added else "large-batch gradient norm ‖G‖"
        settled = settle(acc, micro_batches, **{norm_name: grad_norm})
        hooks = guard.hooks_present(settled, acc, hook)
        if settled.problem is not None and not (self.skip_nonfinite or self.loss_scale is not None):
            raise FloatingPointError(f"{settled.problem}; the step was not taken")
        return Verdict(grad_norm, settled, hooks)

    def _write(self, acc: Accumulation, verdict: Verdict, params: list[Tensor], transaction: StepTransaction,
               add_to_grad: bool, weight: float) -> Written:
        """Record ``stats``; write ``weight`` times the applied gradient to ``.grad`` (replacing it, or added to it
        for :meth:`backward`), or roll a skipped step back; leave the update pending for ``step()``."""
        skipped = verdict.settled.problem is not None
        previous_stats, previous_pending = self.stats, self._pending_update
        self.stats = StepStats(
            loss=acc.loss,
            penalty=acc.penalty,
            micro_grad_sq_norm=acc.micro_grad_sq_norm,
            grad_norm=torch.full_like(verdict.grad_norm, math.nan) if acc.penalty_added else verdict.grad_norm,
            num_micro_batches=verdict.settled.num_micro_batches,
            skipped=skipped,
        )
        if skipped:  # skip_nonfinite or loss scaling: like a step never taken
            transaction.rollback()
        else:
            applied = self._applied_gradient(acc, verdict.grad_norm, params)
            if weight != 1.0:
                torch._foreach_mul_(applied, weight)
            self._write_grads(params, applied, verdict.settled.used,
                              transaction.grads_before if add_to_grad else None)
        carried = add_to_grad and previous_pending is not None and previous_pending.skipped  # an earlier skipped part
        self._pending_update = Pending(skipped=skipped or carried)

        def undo() -> None:
            transaction.rollback()
            self.stats, self._pending_update = previous_stats, previous_pending

        return Written(params, verdict.hooks, undo)

    def _take_pending_update(self, params: list[Tensor]) -> None:
        """``step()``: the base's update from ``.grad`` (none after a skipped :meth:`backward`), and the loss
        scale's bookkeeping for the backward it follows."""
        pending, self._pending_update = self._pending_update, None
        if pending is not None:
            self._update_loss_scale(found_nonfinite=pending.skipped)
        if pending is None or not pending.skipped:
            self._update(params)

    def _call_hook(self, hook: Callable[[], Any] | None, group: Any, params: list[Tensor]) -> None:
        """Call a trainer's closure, if this step got one. Under a process group every rank then learns whether
        any rank's raised (:func:`regopt.distributed.agree_on_hook`, when any rank's step got one), and raises
        if so, so that every rank commits or none does."""
        error = None
        if hook is not None:
            try:
                hook()
            except BaseException as raised:  # the others must hear of it before this rank re-raises
                error = raised
        if group is not None:
            count, rank_sum = distributed.agree_on_hook(error is not None, params, group)
            if error is None and count > 0:
                raise RuntimeError(distributed.hook_failure_message(count, rank_sum))
        if error is not None:
            raise error

    def _join_refused_call(self, group: Any) -> None:
        """After a malformed step call, join the step's all-reduce (poisoned) so that the other ranks raise too
        instead of waiting for this one; without trainable parameters there is no buffer layout to join with."""
        if group is None:
            return
        try:
            params = self._trainable_params()
        except (TypeError, ValueError):
            return
        distributed.StepGuard(group, params, self._wire_penalty_grad(), self._distributed_calls).join_refused_call()

    def _write_grads(self, params: list[Tensor], applied: list[Tensor], used: list[bool],
                     previous: list[Tensor | None] | None = None) -> None:
        """Write ``.grad``: the applied gradient, None for an unused parameter (the base then skips it); with
        ``previous`` (what ``.grad`` held), the sum, and ``previous`` itself where the step did not reach."""
        if previous is None:
            previous = [None] * len(params)
        applied = list(applied)
        added = [i for i, (is_used, grad) in enumerate(zip(used, previous)) if is_used and grad is not None]
        if added:
            sums = torch._foreach_add([previous[i] for i in added], [applied[i] for i in added])
            for i, total in zip(added, sums):
                applied[i] = total
        for param, grad, is_used, before in zip(params, applied, used, previous):
            param.grad = grad if is_used else before

    def _update(self, params: list[Tensor]) -> None:
        """Clear a frozen parameter's ``.grad`` (the base then skips it), clip (``max_grad_norm``), take the
        base's update."""
        for group in self.param_groups:
            for p in group["params"]:
                if not p.requires_grad:
                    p.grad = None
        if self.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm, foreach=self.defaults.get("foreach"))
        self._base_step()
        torch.clear_autocast_cache()  # its low-precision copies of the parameters are stale now
        self._update_state(step=self.step_count + 1)

    def _penalty_setup(self, params: list[Tensor], group: Any, closure_autocast: AutocastState) -> dict[str, Any]:
        """The penalty's part of the step's :class:`~regopt.engine.StepSetup` (none here), checked before any work."""
        return {}

    def _draw_source(self, device: torch.device | None = None) -> torch.Generator | None:
        """The generator the penalties draw from: ``generator``, else the optimizer's own (None: no draws).

        The optimizer's own follows the parameters to ``device`` (reseeded from its state: deterministic)."""
        if self.generator is not None:
            return self.generator
        own = self._private_generator
        if own is not None and device is not None and own.device.type != device.type:
            own = self._private_generator = torch.Generator(device).manual_seed(engine.state_seed(own.get_state()))
        return own

    def _sparse_grads_allowed(self, group: Any) -> bool:
        """Whether G may be sparse, as torch.optim.SGD takes a sparse .grad: around SGD, when nothing transforms
        it (no penalty, no grafting), on one process (the all-reduce packs one dense buffer), without weight
        decay (SGD cannot add it to a sparse gradient)."""
        return (isinstance(self.base, torch.optim.SGD) and not self._transforms and group is None
                and all(g["weight_decay"] == 0 for g in self.param_groups))

    def _wire_penalty_grad(self) -> bool:
        """Whether a distributed step all-reduces P = Σ_j w_j ∇R_j apart from G (penalized: by default)."""
        return self._penalty is not None

    def _applied_gradient(self, acc: Accumulation, grad_norm: Tensor, params: list[Tensor]) -> list[Tensor]:
        """The gradient handed to the base's update: G through the optimizer's transforms, in order."""
        grad = acc.grad
        for transform in self._transforms:
            grad = transform(grad, acc, grad_norm, params)
        return grad

    def _maximizing(self, params: list[Tensor]) -> list[bool]:
        """Per parameter of ``params``: whether its group has ``maximize=True``."""
        ascending = {id(p) for group in self.param_groups if group.get("maximize") for p in group["params"]}
        return [id(p) in ascending for p in params]
