"""Compare a regopt optimizer's step with :mod:`regopt.reference`'s naive loop, on any model.

Two deep copies of the model are cast to ``dtype`` (float64 by default, where the two computations
agree to round-off). One is stepped by ``make_optimizer(params)``, the other by
``regopt.reference.step`` around the base optimizer of a second ``make_optimizer`` call (so the update
rule and parameter groups are the same: SGD, AdamW, ...), clipped to the same
``max_grad_norm``, with the same penalty, subset size, grafting mode and the same generator state. Both
see the same batch and, before each step, the same global RNG state (so dropout masks agree).

After every step the two are compared: ``.grad`` (the applied gradient, and which parameters have
none), parameters, module buffers (BatchNorm statistics), ``stats`` against ``ReferenceStats``; at
the end, per-parameter optimizer state present in both (momentum buffers, Adam moments) and the
generator's state. A tensor matches when, elementwise, |a − b| ≤ atol + rtol·|b|. With
``method="finite_difference"`` the fast path estimates ∇R_j with an O(ε) error, so each kind of
tensor is compared as one vector instead: ‖a − b‖ ≤ atol + rtol·‖b‖.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .. import reference, registry

# Elementwise tolerances in float64 (summation order differs between the two loops) and, for finite
# differences, the relative error of whole vectors (the forward difference's O(ε) error, ε ≈ 1e-7 to 1e-8).
EXACT_RTOL, EXACT_ATOL = 1e-7, 1e-10
FD_RTOL, FD_ATOL = 1e-4, 1e-10
_TABLE_ROWS = 20
_STAT_NAMES = ("loss", "penalty", "micro_grad_sq_norm", "grad_norm")


@dataclass(frozen=True)
class Row:
    """One compared quantity at one step: its largest absolute error and its error relative to max|reference|."""

    step: int
    quantity: str
    abs_err: float
    rel_err: float
    ok: bool
    note: str = ""


@dataclass
class ReferenceComparison:
    """The rows of one comparison, and the fast side's model and optimizer after their last step."""

    rows: list[Row]
    dtype: torch.dtype
    steps: int
    rtol: float
    atol: float
    norm_wise: bool
    model: nn.Module | None = field(default=None, repr=False)
    optimizer: torch.optim.Optimizer | None = field(default=None, repr=False)
    # ‖a − b‖ / ‖b‖ over all parameters (all .grad), the largest over the steps: one number per kind,
    # unlike a row's max relative error, not dominated by a tensor that is zero up to round-off
    relative_errors: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(row.ok for row in self.rows)

    @property
    def failures(self) -> list[Row]:
        return [row for row in self.rows if not row.ok]

    @property
    def max_rel_err(self) -> float:
        """The largest of :attr:`relative_errors` (0.0 when nothing was compared)."""
        return max(self.relative_errors.values(), default=0.0)

    def table(self) -> str:
        """The failing rows (all rows when none fails), as a fixed-width table with a one-line header."""
        shown = self.failures or self.rows
        how = "as vectors, ‖a−b‖ ≤ atol + rtol·‖b‖" if self.norm_wise else "elementwise, |a−b| ≤ atol + rtol·|b|"
        verdict = (f"{len(self.failures)} of {len(self.rows)} comparisons differ" if self.failures
                   else f"all {len(self.rows)} comparisons match")
        lines = [f"regopt step vs regopt.reference ({_dtype_name(self.dtype)}, {self.steps} step(s), "
                 f"rtol={self.rtol:g}, atol={self.atol:g}, {how}): {verdict}",
                 f"{'step':>4}  {'quantity':<44} {'max abs err':>11} {'max rel err':>11}"]
        for row in shown[:_TABLE_ROWS]:
            mark = "ok" if row.ok else "DIFFERS"
            lines.append(f"{row.step:>4}  {row.quantity[:44]:<44} {_fmt(row.abs_err):>11} {_fmt(row.rel_err):>11}  "
                         f"{mark}{' ' + row.note if row.note else ''}")
        if len(shown) > _TABLE_ROWS:
            lines.append(f"      ... and {len(shown) - _TABLE_ROWS} more")
        return "\n".join(lines)


def _fmt(x: float) -> str:
    return "-" if math.isnan(x) else f"{x:.3g}"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# -- what the reference needs to know about the optimizer under test ------------------------------------
def method_of(optimizer: Any) -> registry.Method:
    """The registry's entry for ``optimizer``: the method whose wrapper class it is an instance of, with the same
    ``kind``/``mode`` (a subclass of ``regopt.GradNorm`` is GN); TypeError for anything else."""
    matches = [method for method in registry.METHODS.values()
               if isinstance(optimizer, method.wrapper)
               and all(getattr(optimizer, key, None) == value for key, value in method.options.items())]
    if matches:  # the most derived wrapper: GradNorm is also a MicroBatch
        return max(matches, key=lambda method: len(method.wrapper.__mro__))
    raise TypeError(f"make_optimizer returned {type(optimizer).__name__}, which is not a regopt optimizer (expected "
                    "e.g. regopt.GradNorm(torch.optim.AdamW(params), ...) or regopt.GradNormSGD(params, ...))")


def _graft_norm(optimizer: Any, step: int) -> float | None:
    """s of external grafting at ``step``: ``norms[step]`` or ``norms(step)``."""
    norms = getattr(optimizer, "norms", None)
    if norms is None:
        return None
    return float(norms(step) if callable(norms) else norms[step])


def _generator_state(optimizer: Any) -> Tensor | None:
    """The state of the generator the optimizer's penalties draw from (None if it draws nothing)."""
    return optimizer.state_dict()["state"].get("regopt", {}).get("generator_state")


class _ReferenceUpdate:
    """What ``reference.step`` calls (``param_groups``, ``zero_grad``, ``step``): a plain torch.optim optimizer,
    after clipping ``.grad`` to ``max_grad_norm`` as regopt does (after grafting, before the update)."""

    def __init__(self, base: torch.optim.Optimizer, max_grad_norm: float | None) -> None:
        self.base, self.max_grad_norm = base, max_grad_norm
        self.param_groups, self.state = base.param_groups, base.state

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        if self.max_grad_norm is not None:
            params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
        self.base.step()


# -- running the two sides ---------------------------------------------------------------------------------
def cast_batch(batch: Any, dtype: torch.dtype) -> Any:
    """``batch`` with its floating-point leaves in ``dtype`` (labels and masks unchanged)."""
    def cast(t: Any) -> Any:
        return t.to(dtype) if isinstance(t, Tensor) and t.is_floating_point() else t
    if isinstance(batch, Mapping):
        return {key: cast(value) for key, value in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(cast(value) for value in batch)
    return cast(batch)


def bind_model(loss_fn: Callable[..., Any], model: nn.Module) -> Callable[..., Any]:
    """``loss_fn(model, *parts)`` / ``loss_fn(model, **parts)`` as the closure a step calls with the parts."""
    return lambda *args, **kwargs: loss_fn(model, *args, **kwargs)


@contextmanager
def _same_randomness(seed: int, device: torch.device) -> Iterator[None]:
    """The global RNG seeded with ``seed`` inside, and as it was outside."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.default_generator.manual_seed(seed)  # (torch.manual_seed also seeds every lazy backend: slower)
        if device.type == "cuda":
            index = device.index if device.index is not None else torch.cuda.current_device()
            torch.cuda.default_generators[index].manual_seed(seed)
        yield


@dataclass
class _Sides:
    fast_model: nn.Module
    fast: torch.optim.Optimizer
    slow_model: nn.Module
    slow: _ReferenceUpdate
    generator: torch.Generator | None
    options: dict[str, Any]


def _build_sides(make_optimizer: Callable[[list[Tensor]], Any], model: nn.Module, dtype: torch.dtype) -> _Sides:
    """Two copies of ``model`` in ``dtype``, the optimizer under test on one and the reference update on the other."""
    fast_model, slow_model = (copy.deepcopy(model).to(dtype) for _ in range(2))
    fast = make_optimizer(list(fast_model.parameters()))
    method = method_of(fast)
    slow = _ReferenceUpdate(make_optimizer(list(slow_model.parameters())).base, fast.max_grad_norm)
    state = _generator_state(fast)
    generator = None
    if state is not None:
        generator = torch.Generator(next(fast_model.parameters()).device).manual_seed(0)
        generator.set_state(state.clone())
    options = {"micro_batch_size": fast.micro_batch_size, "regularizer": method.regularizer, "graft": method.graft,
               "penalty": fast.penalty if method.penalized else 0.0,
               "penalty_micro_batches": fast.penalty_micro_batches if method.penalized else None}
    return _Sides(fast_model, fast, slow_model, slow, generator, options)


def _take_steps(sides: _Sides, loss_fn: Callable[..., Any], batch: Any, t: int, seed: int) -> tuple[Any, Any]:
    """Step ``t`` of both sides on the same batch and RNG state: (the fast step's return, ReferenceStats)."""
    device = next(sides.fast_model.parameters()).device
    with _same_randomness(seed + t, device):
        fast_loss = sides.fast.step(bind_model(loss_fn, sides.fast_model), batch)
    with _same_randomness(seed + t, device):
        expected = reference.step(sides.slow, bind_model(loss_fn, sides.slow_model), batch, generator=sides.generator,
                                  graft_norm=_graft_norm(sides.fast, t), **sides.options)
    return fast_loss, expected


# -- comparing ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Tolerance:
    rtol: float
    atol: float
    norm_wise: bool


def _errors(a: Tensor, b: Tensor) -> tuple[float, float]:
    """(max |a − b|, max |a − b| / max |b|), in float64."""
    if a.numel() == 0:
        return 0.0, 0.0
    a, b = a.detach().double(), b.detach().double()
    diff, scale = torch.stack([(a - b).abs().max(), b.abs().max()]).tolist()
    return diff, diff / scale if scale > 0 else (0.0 if diff == 0 else math.inf)


def _within(a: Tensor, b: Tensor, tol: _Tolerance) -> bool:
    """|a − b| ≤ atol + rtol·|b| everywhere (NaN only where both are NaN), or ‖a − b‖ ≤ atol + rtol·‖b‖ (norm-wise)."""
    a, b = a.detach().double(), b.detach().double()
    if tol.norm_wise:
        return bool((a - b).norm() <= tol.atol + tol.rtol * b.norm())
    close = ((a - b).abs() <= tol.atol + tol.rtol * b.abs()) | (a.isnan() & b.isnan())
    return bool(close.all())


def _tensor_row(step: int, name: str, a: Tensor, b: Tensor, tol: _Tolerance) -> Row:
    if a.shape != b.shape:
        return Row(step, name, math.nan, math.nan, False, f"shapes {tuple(a.shape)} vs {tuple(b.shape)}")
    abs_err, rel_err = _errors(a, b)
    return Row(step, name, abs_err, rel_err, _within(a, b, tol))


def _vector_rows(step: int, kind: str, pairs: list[tuple[str, Tensor, Tensor]], tol: _Tolerance) -> list[Row]:
    """One row per tensor (elementwise), or one row for the whole kind with a note of its worst tensor (norm-wise)."""
    if not pairs:
        return []
    if not tol.norm_wise:
        return [_tensor_row(step, f"{kind} {name}", a, b, tol) for name, a, b in pairs]
    a = torch.cat([x.detach().double().reshape(-1).cpu() for _, x, _ in pairs])
    b = torch.cat([y.detach().double().reshape(-1).cpu() for _, _, y in pairs])
    row = _tensor_row(step, f"{kind} (all {len(pairs)}, as one vector)", a, b, tol)
    worst = max(pairs, key=lambda pair: _errors(pair[1], pair[2])[0])[0]
    return [Row(row.step, row.quantity, row.abs_err, row.rel_err, row.ok, f"worst: {worst}")]


def _relative_errors(sides: _Sides) -> dict[str, float]:
    """‖a − b‖ / ‖b‖ of all parameters, and of all .grad present on both sides, each as one float64 vector."""
    pairs = list(zip(sides.fast_model.parameters(), sides.slow_model.parameters()))
    vectors = {"param": [(p.detach(), q.detach()) for p, q in pairs],
               "grad": [(p.grad, q.grad) for p, q in pairs if p.grad is not None and q.grad is not None]}
    errors = {}
    for kind, tensors in vectors.items():
        if tensors:
            a = torch.cat([x.double().reshape(-1).cpu() for x, _ in tensors])
            b = torch.cat([y.double().reshape(-1).cpu() for _, y in tensors])
            errors[kind] = float((a - b).norm() / b.norm()) if b.norm() > 0 else float((a - b).norm())
    return errors


def _grad_rows(step: int, sides: _Sides, tol: _Tolerance) -> list[Row]:
    """``.grad`` after the step: None on the same parameters, and the same values elsewhere."""
    rows, pairs = [], []
    for (name, p), q in zip(sides.fast_model.named_parameters(), sides.slow_model.parameters()):
        if (p.grad is None) != (q.grad is None):
            which = "regopt" if p.grad is None else "the reference"
            rows.append(Row(step, f"grad {name}", math.nan, math.nan, False, f"None in {which} only"))
        elif p.grad is not None:
            pairs.append((name, p.grad, q.grad))
    return rows + _vector_rows(step, "grad", pairs, tol)


def _model_rows(step: int, sides: _Sides, tol: _Tolerance) -> list[Row]:
    params = [(name, p, q) for (name, p), q in zip(sides.fast_model.named_parameters(), sides.slow_model.parameters())]
    buffers = [(name, a, b) for (name, a), b in zip(sides.fast_model.named_buffers(), sides.slow_model.buffers())
               if a.is_floating_point()]
    counters = [(name, a, b) for (name, a), b in zip(sides.fast_model.named_buffers(), sides.slow_model.buffers())
                if not a.is_floating_point()]
    rows = _vector_rows(step, "param", params, tol) + _vector_rows(step, "buffer", buffers, tol)
    exact = _Tolerance(0.0, 0.0, False)  # integer buffers (num_batches_tracked) match exactly
    return rows + [_tensor_row(step, f"buffer {name}", a, b, exact) for name, a, b in counters]


def _stats_rows(step: int, fast: Any, fast_loss: Any, expected: reference.ReferenceStats, tol: _Tolerance) -> list[Row]:
    stats = fast.stats
    rows = [Row(step, "stats.skipped", math.nan, math.nan, not bool(stats.skipped), "the step was skipped")
            if stats.skipped else Row(step, "stats.skipped", 0.0, 0.0, True)]
    count_ok = int(stats.num_micro_batches) == expected.num_micro_batches
    rows.append(Row(step, "stats.num_micro_batches", float(not count_ok), float(not count_ok), count_ok,
                    "" if count_ok else f"{int(stats.num_micro_batches)} vs {expected.num_micro_batches}"))
    values = [("step's return (mean loss)", fast_loss, expected.loss)]
    values += [(f"stats.{name}", getattr(stats, name), getattr(expected, name)) for name in _STAT_NAMES]
    scalar = _Tolerance(tol.rtol, tol.atol, False)
    for name, got, want in values:
        if not torch.is_tensor(got) or not torch.isnan(got).all():  # a distributed step's NaN grad_norm: not measured
            rows.append(_tensor_row(step, name, torch.as_tensor(got, dtype=torch.float64).reshape(()),
                                    torch.tensor(float(want), dtype=torch.float64), scalar))
    return rows


def _state_rows(step: int, sides: _Sides, tol: _Tolerance) -> list[Row]:
    """Per-parameter optimizer state held by both (tensors compared; None on one side only is a mismatch)."""
    rows, pairs = [], []
    for (name, p), q in zip(sides.fast_model.named_parameters(), sides.slow_model.parameters()):
        mine, theirs = sides.fast.state.get(p, {}), sides.slow.state.get(q, {})
        for key in sorted(set(mine) & set(theirs)):
            a, b = mine[key], theirs[key]
            if (a is None) != (b is None):
                rows.append(Row(step, f"state {name}.{key}", math.nan, math.nan, False, "None on one side only"))
            elif isinstance(a, Tensor) and isinstance(b, Tensor):
                pairs.append((f"{name}.{key}", a, b))
    return rows + _vector_rows(step, "state", pairs, tol)


def _generator_rows(step: int, sides: _Sides) -> list[Row]:
    """The same draws in the same order leave the two generators in the same state."""
    if sides.generator is None:
        return []
    same = torch.equal(_generator_state(sides.fast), sides.generator.get_state())
    return [Row(step, "generator state", float(not same), float(not same), same,
                "" if same else "a different number or order of random draws")]


def compare_with_reference(make_optimizer: Callable[[list[Tensor]], Any], model: nn.Module,
                           loss_fn: Callable[..., Any], batch: Any, *, steps: int = 2,
                           dtype: torch.dtype = torch.float64, rtol: float | None = None, atol: float | None = None,
                           seed: int = 0) -> ReferenceComparison:
    """Run ``steps`` steps of ``make_optimizer``'s optimizer and of the naive loop; return every comparison.

    ``batch`` is one batch (used at every step), or a callable ``t -> batch`` for a new batch at step t.
    ``rtol``/``atol`` default to 1e-7/1e-10 (elementwise), or 1e-4/1e-10 (as vectors) for an optimizer with
    ``method="finite_difference"``. The model itself is not changed. See :func:`assert_matches_reference`.
    """
    sides = _build_sides(make_optimizer, model, dtype)
    norm_wise = getattr(sides.fast, "method", "exact") == "finite_difference" and sides.options["regularizer"] != "none"
    default_rtol, default_atol = (FD_RTOL, FD_ATOL) if norm_wise else (EXACT_RTOL, EXACT_ATOL)
    tol = _Tolerance(default_rtol if rtol is None else rtol, default_atol if atol is None else atol, norm_wise)
    rows: list[Row] = []
    relative_errors: dict[str, float] = {}
    for t in range(steps):
        step_batch = cast_batch(batch(t) if callable(batch) else batch, dtype)
        fast_loss, expected = _take_steps(sides, loss_fn, step_batch, t, seed)
        rows += _stats_rows(t + 1, sides.fast, fast_loss, expected, tol)
        rows += _grad_rows(t + 1, sides, tol) + _model_rows(t + 1, sides, tol)
        for kind, error in _relative_errors(sides).items():
            relative_errors[kind] = max(error, relative_errors.get(kind, 0.0))
    rows += _state_rows(steps, sides, tol) + _generator_rows(steps, sides)
    return ReferenceComparison(rows, dtype, steps, tol.rtol, tol.atol, norm_wise, sides.fast_model, sides.fast,
                               relative_errors)


def assert_matches_reference(make_optimizer: Callable[[list[Tensor]], Any], model: nn.Module,
                             loss_fn: Callable[..., Any], batch: Any, *, steps: int = 2,
                             dtype: torch.dtype = torch.float64, rtol: float | None = None,
                             atol: float | None = None, seed: int = 0) -> ReferenceComparison:
    """Assert that ``make_optimizer(params)``'s step equals :func:`regopt.reference.step` on ``model``.

    ``make_optimizer(params)`` builds the optimizer under test from a list of parameters (a copy's); ``loss_fn(model,
    *parts)`` (``loss_fn(model, **parts)`` for a dict batch, ``loss_fn(model, t)`` for a tensor) returns the
    micro-batch's mean loss or ``(loss, logits)`` for whichever copy of the model it is given. Both sides run on deep
    copies cast to ``dtype``, from the same global RNG state, for ``steps`` steps; parameters, buffers, ``.grad``,
    ``stats``, shared optimizer state and the generator's state are compared (tolerances: module docstring).
    Raises AssertionError with a table of the quantities that differ (step, name, max abs/rel error); returns the
    :class:`ReferenceComparison` otherwise.
    """
    comparison = compare_with_reference(make_optimizer, model, loss_fn, batch, steps=steps, dtype=dtype, rtol=rtol,
                                        atol=atol, seed=seed)
    if not comparison.ok:
        raise AssertionError(comparison.table())
    return comparison
