"""When is regopt's finite-difference ∇R_j faithful? Measured against the exact one along a real LB trajectory.

    python benchmarks/fd_faithfulness.py                      # the table of benchmarks/RESULTS_fd.md
    python benchmarks/fd_faithfulness.py --steps-at 0 --penalties GN --dtypes float64   # a quick look

Protocol. On the ``fmnist`` preset of benchmarks/reproduce.py (small BatchNorm ReLU CNN 16-32-64, the
first 10,000 Fashion-MNIST training images, |B| = 1024, |M| = 128, lr 0.1, momentum 0, seed 0's
initialization and batch order) train regopt.MicroBatchSGD in float32 and keep the model at the steps
``--steps-at``. At each, for GN, FT, AJ and UJ and for ``--batches`` fixed batches of the training set,
compute the micro-batch-averaged penalty gradient

    P = Σ_j w_j ∇R_j,   R_j = ‖v_j‖²,  v_j = ∇_θ S_j,  ∇R_j = 2 H_{S_j} v_j,

exactly (regopt.hvp.exact, double backprop, in float64: the reference) and by finite differences in
each of ``--dtypes`` (the model cast from the float32 checkpoint), with v̂ = v/‖v‖:

| variant | ∇R_j estimate | step h | extra fwd+bwd per micro-batch |
|---|---|---|---|
| ``forward`` | 2‖v‖ (∇S(θ + h v̂) − v) / h  (regopt.hvp.finite_difference) | ε | 1 |
| ``central`` | 2‖v‖ (∇S(θ + h v̂) − ∇S(θ − h v̂)) / (2h) | ε | 2 |
| ``forward-rel`` | as ``forward`` | ε · ‖θ‖ | 1 |
| ``central-rel`` | as ``central`` | ε · ‖θ‖ | 2 |

(Per-layer step sizes are not measured: shifting each layer by its own multiple of v̂_l moves θ along
D v, so the difference estimates H D v, not the H v that ∇R_j needs.)

Reported per (step, penalty, dtype, variant, ε), over the batches: the relative error
‖P_fd − P_exact‖ / ‖P_exact‖ (mean and max) and the cosine similarity (mean and min), both against the
float64 exact P, and the fractions of ReLU inputs whose sign and of max-pool windows whose argmax differ
between θ and θ ± h v̂ (a window switches too when a ReLU flip inside it breaks a tie of zeros). These
kinks are why a ReLU network's difference quotient is not its Hessian product: double backprop
differentiates the piece θ sits on, a difference quotient also sees every kink crossed, divided by h.
``--activation silu --pool avg`` swaps them out of the same model (a smooth control). Rows
``variant = "exact"`` give the exact P in each dtype against float64: the floor of that dtype.

FT's labels and UJ's direction are drawn once per micro-batch from the float64 logits with a seeded
torch.Generator (regopt's own ``Penalty.sample``) and shared by every method and dtype. The forward
difference is computed here so that all step sizes share one ∇S(θ) pass, with the same operations as
regopt.hvp.finite_difference; on the first micro-batch of each (step, penalty, dtype) it is checked
against that function itself (``regopt_check`` in the JSON: 0 when bit-identical). ``--cache FILE``
keeps the trained checkpoints for the next run.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import regopt
from benchmarks import data as data_lib
from benchmarks import models as models_lib
from regopt import hvp, penalties
from regopt.engine import weighted_add
from regopt.testing import cosine_and_relative_error

# The `fmnist` preset (benchmarks/repro/presets.py; tests/benchmarks/test_bench_fd.py holds them equal).
FMNIST = dict(train_size=10_000, widths=[16, 32, 64], batch_size=1024, micro_batch_size=128, lr=0.1, momentum=0.0)
PENALTIES = {"GN": penalties.GRAD_NORM, "FT": penalties.FISHER_TRACE, "AJ": penalties.AVERAGE_JACOBIAN,
             "UJ": penalties.UNIT_JACOBIAN}
VARIANTS = ("forward", "central", "forward-rel", "central-rel")
DTYPES = {"float32": torch.float32, "float64": torch.float64}
DEFAULT_EPS = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5)
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "fd_faithfulness.json"

Micro = tuple[Tensor, Tensor, float]  # (inputs, labels, weight w_j = |M_j| / |B|)
Estimates = dict[tuple[str, float], list[Tensor]]  # (variant, ε) -> one tensor per parameter


# -- the measurement of one micro-batch -----------------------------------------------------------------
def penalty_scalar(model: nn.Module, x: Tensor, y: Tensor, penalty: penalties.Penalty,
                   draw: Any) -> tuple[Tensor, Tensor]:
    """(L_j, S_j) from one train-mode forward, with the penalty's randomness ``draw`` given."""
    logits = model(x)
    loss = F.cross_entropy(logits, y)
    return loss, penalty.scalar(loss, logits, draw)


@contextmanager
def kink_patterns(model: nn.Module) -> Iterator[dict[str, list[Tensor]]]:
    """Collect, per forward and in call order, where ``model`` sits on its kinks.

    ``"relu"``: the sign pattern (input > 0) of every nn.ReLU; ``"maxpool"``: the argmax index of
    every nn.MaxPool2d window. The network is piecewise smooth; these name the piece.
    """
    patterns: dict[str, list[Tensor]] = {"relu": [], "maxpool": []}

    def relu(module: nn.Module, args: tuple[Tensor, ...]) -> None:
        patterns["relu"].append(args[0].detach() > 0)  # a pre-hook: sees the input before an in-place ReLU

    def maxpool(module: nn.MaxPool2d, args: tuple[Tensor, ...], output: Tensor) -> None:
        _, index = F.max_pool2d(args[0].detach(), module.kernel_size, module.stride, module.padding,
                                module.dilation, module.ceil_mode, return_indices=True)
        patterns["maxpool"].append(index)

    handles = [m.register_forward_pre_hook(relu) for m in model.modules() if isinstance(m, nn.ReLU)]
    handles += [m.register_forward_hook(maxpool) for m in model.modules() if isinstance(m, nn.MaxPool2d)]
    try:
        yield patterns
    finally:
        for handle in handles:
            handle.remove()


def changed_fraction(base: Sequence[Tensor], shifted: Sequence[Tensor]) -> float:
    """The fraction of entries that differ between two forwards' patterns (NaN when there are none)."""
    total = sum(b.numel() for b in base)
    return sum(int((b != s).sum()) for b, s in zip(base, shifted)) / total if total else math.nan


@dataclasses.dataclass
class MicroMeasurement:
    """∇R_j exact, v_j = ∇S_j(θ), ∇S_j(θ + h v̂_j) per signed step h, kink changes per h, timings (s)."""

    exact: list[Tensor]
    v: list[Tensor]
    shifted: dict[float, list[Tensor]]
    flips: dict[float, float]  # fraction of ReLU inputs whose sign differs from θ's
    switches: dict[float, float]  # fraction of max-pool windows whose argmax differs from θ's
    seconds: dict[str, float] = dataclasses.field(default_factory=dict)


def measure_micro(model: nn.Module, params: list[Tensor], x: Tensor, y: Tensor, penalty: penalties.Penalty,
                  draw: Any, steps: Sequence[float]) -> MicroMeasurement:
    """Exact ∇R_j (regopt.hvp.exact), then v_j and the gradient of S_j at θ + h v̂_j for every h in ``steps``."""
    t0 = time.perf_counter()
    loss, scalar = penalty_scalar(model, x, y, penalty, draw)
    exact = hvp.exact(loss, scalar, params, None, 0.0).penalty_grad
    t1 = time.perf_counter()
    with kink_patterns(model) as base:
        v = hvp.gradient(penalty_scalar(model, x, y, penalty, draw)[1], params)
    t2 = time.perf_counter()
    with torch.no_grad():
        v_norm = hvp.squared_norm(v).sqrt().clamp_min(torch.finfo(v[0].dtype).tiny)
        saved = torch._foreach_mul(params, 1.0)  # bit-exact copy to restore from
    shifted, flips, switches = {}, {}, {}
    for h in steps:
        with torch.no_grad():  # θ + h v̂, rounded exactly as regopt's finite_difference shifts θ
            torch._foreach_add_(params, torch._foreach_mul(v, h / v_norm))
        try:
            with kink_patterns(model) as kinks:
                shifted[h] = hvp.gradient(penalty_scalar(model, x, y, penalty, draw)[1], params)
        finally:
            with torch.no_grad():
                torch._foreach_copy_(params, saved)
        flips[h] = changed_fraction(base["relu"], kinks["relu"])
        switches[h] = changed_fraction(base["maxpool"], kinks["maxpool"])
    t3 = time.perf_counter()
    seconds = {"exact": t1 - t0, "gradient": t2 - t1, "shifted": (t3 - t2) / max(1, len(steps))}
    return MicroMeasurement(exact, v, shifted, flips, switches, seconds)


def step_size(variant: str, eps: float, theta_norm: float) -> float:
    """h: ε itself, or ε · ‖θ‖ for the ``-rel`` variants."""
    return eps * theta_norm if variant.endswith("-rel") else eps


def shifts_needed(variants: Sequence[str], eps: Sequence[float], theta_norm: float) -> list[float]:
    """Every signed step h at which ∇S must be evaluated (+h for forward, ±h for central)."""
    steps = set()
    for variant in variants:
        for e in eps:
            h = step_size(variant, e, theta_norm)
            steps.update((h, -h) if variant.startswith("central") else (h,))
    return sorted(steps)


def estimate(m: MicroMeasurement, variant: str, h: float) -> list[Tensor]:
    """∇R_j ≈ 2‖v‖(∇S(θ+hv̂) − v)/h (forward), or 2‖v‖(∇S(θ+hv̂) − ∇S(θ−hv̂))/(2h) (central)."""
    v_norm = hvp.squared_norm(m.v).sqrt()
    if variant.startswith("central"):
        return torch._foreach_mul(torch._foreach_sub(m.shifted[h], m.shifted[-h]), v_norm / h)
    # The same operations, in the same order, as regopt.hvp.finite_difference.
    difference = torch._foreach_sub(m.shifted[h], m.v)
    torch._foreach_mul_(difference, 2.0 * v_norm / h)
    return difference


def regopt_forward_difference(model: nn.Module, params: list[Tensor], x: Tensor, y: Tensor,
                              penalty: penalties.Penalty, draw: Any, eps: float) -> list[Tensor]:
    """∇R_j by regopt.hvp.finite_difference itself (to check :func:`estimate` against)."""
    loss, scalar = penalty_scalar(model, x, y, penalty, draw)

    def gradient_at_shift() -> list[Tensor]:
        return hvp.gradient(penalty_scalar(model, x, y, penalty, draw)[1], params)

    return hvp.finite_difference(loss, scalar, params, gradient_at_shift, eps).penalty_grad


# -- one batch: P = Σ_j w_j ∇R_j, exact and estimated -----------------------------------------------------
def flatten(tensors: Sequence[Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1).double() for t in tensors])


def compare(estimated: Sequence[Tensor], reference: Sequence[Tensor]) -> tuple[float, float]:
    """(cosine similarity, ‖estimated − reference‖ / ‖reference‖), computed in float64 (regopt's own measure,
    the one ``python -m regopt.doctor`` reports)."""
    return cosine_and_relative_error(estimated, reference)


@dataclasses.dataclass
class BatchMeasurement:
    exact: list[Tensor]
    estimates: Estimates
    flips: dict[tuple[str, float], float]  # mean over micro-batches (central: over ±h)
    switches: dict[tuple[str, float], float]  # the same for max-pool argmax switches
    seconds: dict[str, float]  # mean per micro-batch
    theta_norm: float
    regopt_check: float | None  # ‖forward − regopt.hvp.finite_difference‖ / ‖·‖ on the first micro-batch


def measure_batch(model: nn.Module, micros: Sequence[Micro], penalty: penalties.Penalty, draws: Sequence[Any],
                  eps: Sequence[float], variants: Sequence[str], check_eps: float | None = None) -> BatchMeasurement:
    """P exact and every (variant, ε) estimate of it over one batch's micro-batches, with the same draws."""
    params = [p for p in model.parameters() if p.requires_grad]
    with torch.no_grad():
        theta_norm = float(hvp.squared_norm(params).sqrt())
    steps = sorted(set(shifts_needed(variants, eps, theta_norm)) | ({check_eps} if check_eps else set()))
    exact_sum, sums, check = None, {}, None
    flips, switches, seconds = defaultdict(list), defaultdict(list), defaultdict(list)
    for j, ((x, y, weight), draw) in enumerate(zip(micros, draws)):
        m = measure_micro(model, params, x, y, penalty, draw, steps)
        exact_sum = weighted_add(exact_sum, m.exact, weight)
        for variant in variants:
            for e in eps:
                h = step_size(variant, e, theta_norm)
                sums[variant, e] = weighted_add(sums.get((variant, e)), estimate(m, variant, h), weight)
                hs = (h, -h) if variant.startswith("central") else (h,)
                flips[variant, e].append(statistics.fmean(m.flips[s] for s in hs))
                switches[variant, e].append(statistics.fmean(m.switches[s] for s in hs))
        for name, value in m.seconds.items():
            seconds[name].append(value)
        if j == 0 and check_eps:
            theirs = regopt_forward_difference(model, params, x, y, penalty, draw, check_eps)
            check = compare(estimate(m, "forward", check_eps), theirs)[1]
    means = [{k: statistics.fmean(v) for k, v in d.items()} for d in (flips, switches, seconds)]
    return BatchMeasurement(exact_sum, sums, *means, theta_norm, check)


def split_micro_batches(x: Tensor, y: Tensor, size: int) -> list[Micro]:
    """Consecutive micro-batches of ``size`` examples with w_j = |M_j| / |B|, as regopt splits a batch."""
    return [(xs, ys, len(xs) / len(x)) for xs, ys in zip(x.split(size), y.split(size))]


def draw_randomness(model: nn.Module, micros: Sequence[Micro], penalty: penalties.Penalty, seed: int) -> list[Any]:
    """One draw per micro-batch (FT labels, UJ direction, or None) by regopt's own sampler, from a seeded generator."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        return [penalty.sample(model(x), generator) for x, _, _ in micros]


def cast_draw(draw: Any, dtype: torch.dtype) -> Any:
    return draw.to(dtype) if isinstance(draw, Tensor) and draw.is_floating_point() else draw


# -- one checkpoint: every penalty, batch and dtype against float64 exact ------------------------------------
def batch_records(bm: BatchMeasurement, reference: Sequence[Tensor], **where: Any) -> list[dict[str, Any]]:
    """One record per (variant, ε) of one batch, plus the exact P of this dtype (variant "exact")."""
    cos, rel = compare(bm.exact, reference)
    records = [dict(where, variant="exact", eps=None, h=None, cos=cos, rel_err=rel, flip=None, pool_switch=None)]
    for (variant, e), p in bm.estimates.items():
        cos, rel = compare(p, reference)
        records.append(dict(where, variant=variant, eps=e, h=step_size(variant, e, bm.theta_norm), cos=cos,
                            rel_err=rel, flip=bm.flips[variant, e], pool_switch=bm.switches[variant, e]))
    return records


def measure_checkpoint(model: nn.Module, step: int, batches: Sequence[tuple[Tensor, Tensor]],
                       args: argparse.Namespace, log: Callable[[str], None]) -> dict[str, list[dict]]:
    """Per-batch records, regopt checks, timings and norms at one checkpoint (``model`` in float32)."""
    models = {name: copy.deepcopy(model).to(DTYPES[name]).train() for name in {"float64", *args.dtypes}}
    out: dict[str, list[dict]] = defaultdict(list)
    for name in args.penalties:
        penalty = PENALTIES[name]
        for b, (x, y) in enumerate(batches):
            where = dict(step=step, penalty=name, batch=b)
            micros = {d: split_micro_batches(x.to(DTYPES[d]), y, args.micro_batch_size) for d in models}
            draws = draw_randomness(models["float64"], micros["float64"], penalty, args.seed * 1_000_003 + step + b)
            reference = None
            for dtype in sorted(models, key=lambda d: d != "float64"):  # float64 first: it is the reference
                measured = dtype in args.dtypes
                bm = measure_batch(models[dtype], micros[dtype], penalty, [cast_draw(d, DTYPES[dtype]) for d in draws],
                                   args.eps if measured else (), args.variants if measured else (),
                                   check_eps=args.check_eps if measured and b == 0 else None)
                reference = bm.exact if reference is None else reference
                if not measured:
                    continue
                out["batches"] += batch_records(bm, reference, dtype=dtype, **where)
                out["timing"].append(dict(where, dtype=dtype, **{f"{k}_s": v for k, v in bm.seconds.items()}))
                if bm.regopt_check is not None:
                    out["regopt_check"].append(dict(where, dtype=dtype, eps=args.check_eps, rel_diff=bm.regopt_check))
            out["norms"].append(dict(where, theta_norm=bm.theta_norm, exact_p_norm=float(flatten(reference).norm())))
            log(f"step {step} {name} batch {b}: done")
    return out


# -- the trajectory ---------------------------------------------------------------------------------
SMOOTH_ACTIVATIONS = {"silu": nn.SiLU, "tanh": nn.Tanh}


def swap_nonsmooth(model: nn.Module, activation: str = "relu", pool: str = "max") -> nn.Module:
    """Replace every nn.ReLU by ``activation`` and every nn.MaxPool2d by nn.AvgPool2d (``pool="avg"``), in place.

    The swaps keep every parameter (shapes and initial values), so the smooth twin of the model
    starts from the same θ: a control that separates the kinks from everything else.
    """
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if activation != "relu" and isinstance(child, nn.ReLU):
                setattr(parent, name, SMOOTH_ACTIVATIONS[activation]())
            elif pool == "avg" and isinstance(child, nn.MaxPool2d):
                setattr(parent, name, nn.AvgPool2d(child.kernel_size, child.stride, child.padding))
    return model


def build_model(args: argparse.Namespace, data: data_lib.DataSplits) -> nn.Module:
    torch.manual_seed(args.seed)  # the initialization reproduce.py gives this seed
    model = models_lib.build_model("small-cnn", data.num_classes, data.input_shape[0], widths=list(args.widths))
    return swap_nonsmooth(model, args.activation, args.pool)


def train_checkpoints(args: argparse.Namespace, data: data_lib.DataSplits,
                      log: Callable[[str], None]) -> list[dict[str, Any]]:
    """Train regopt.MicroBatchSGD (float32) to max(--steps-at), keeping the model at each requested step."""
    model = build_model(args, data).train()
    optimizer = regopt.MicroBatchSGD(model.parameters(), lr=args.lr, momentum=args.momentum,
                                     micro_batch_size=args.micro_batch_size)
    sampler = data_lib.EpochSampler(len(data.train), args.batch_size, args.seed)

    def closure(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        logits = model(x)
        return F.cross_entropy(logits, y), logits

    checkpoints, losses, t0 = [], [], time.perf_counter()
    for step in range(max(args.steps_at) + 1):
        if step in args.steps_at:
            recent = losses[-50:]
            checkpoints.append(dict(step=step, state=copy.deepcopy(model.state_dict()),
                                    train_loss=statistics.fmean(recent) if recent else None,
                                    train_s=time.perf_counter() - t0))
            log(f"checkpoint at step {step} (train loss over the last {len(recent)} steps: "
                f"{checkpoints[-1]['train_loss']}, {checkpoints[-1]['train_s']:.0f} s)")
        if step == max(args.steps_at):
            break
        optimizer.step(closure, data.train_batch(sampler.next()))
        losses.append(float(optimizer.stats.loss))
    return checkpoints


def checkpoints_cached(args: argparse.Namespace, data: data_lib.DataSplits,
                       log: Callable[[str], None]) -> list[dict[str, Any]]:
    """The trajectory's checkpoints, from ``--cache`` when it holds this exact configuration."""
    key = dict(source=data.source, train=len(data.train), steps_at=list(args.steps_at), seed=args.seed,
               widths=list(args.widths), activation=args.activation, pool=args.pool, lr=args.lr,
               momentum=args.momentum, batch_size=args.batch_size,
               micro_batch_size=args.micro_batch_size, torch=str(torch.__version__))  # a str: the cache loads weights_only
    if args.cache and Path(args.cache).is_file():
        cached = torch.load(args.cache, weights_only=True)  # state dicts, numbers and strings only
        if cached.get("key") == key:
            log(f"checkpoints from {args.cache}")
            return cached["checkpoints"]
    checkpoints = train_checkpoints(args, data, log)
    if args.cache:
        torch.save({"key": key, "checkpoints": checkpoints}, args.cache)
    return checkpoints


def evaluation_batches(data: data_lib.DataSplits, count: int, batch_size: int,
                       seed: int) -> list[tuple[Tensor, Tensor]]:
    """``count`` fixed, disjoint batches of the training set (the same at every checkpoint)."""
    perm = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(seed + 99_991))
    if count * batch_size > len(perm):
        raise ValueError(f"{count} batches of {batch_size} exceed the {len(perm)} training examples")
    return [data.train_batch(perm[i * batch_size:(i + 1) * batch_size]) for i in range(count)]


def load_data(args: argparse.Namespace) -> data_lib.DataSplits:
    """Full Fashion-MNIST (first --train-size images), else the embedded subset, else synthetic (``auto``)."""
    order = ["fashion-mnist", "fashion-mnist-subset", "synthetic"] if args.dataset == "auto" else [args.dataset]
    errors = []
    for name in order:
        try:
            if name == "synthetic":
                return data_lib.load("synthetic", num_train=args.train_size, num_heldout=16, num_test=16,
                                     seed=args.seed)
            if name == "fashion-mnist":
                return data_lib.load(name, args.data_root, train_size=args.train_size)
            splits = data_lib.load(name, args.data_root)
            train = data_lib.Split(splits.train.images[:args.train_size], splits.train.labels[:args.train_size])
            return dataclasses.replace(splits, train=train)
        except (data_lib.DatasetNotFoundError, ValueError) as error:
            if args.dataset != "auto":
                raise
            errors.append(f"{name}: {str(error).splitlines()[0]}")
    raise SystemExit("error: no data set found:\n  " + "\n  ".join(errors))


# -- summaries and tables ---------------------------------------------------------------------------
def _mean_of(records: Sequence[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in records if r.get(key) is not None and not math.isnan(r[key])]
    return statistics.fmean(values) if values else None


def aggregate(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (step, penalty, dtype, variant, ε), over the batches: mean/max relative error, mean/min cosine,
    mean ReLU flip and max-pool switch fractions."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in records:
        groups[r["step"], r["penalty"], r["dtype"], r["variant"], r["eps"]].append(r)
    rows = []
    for (step, penalty, dtype, variant, eps), rs in groups.items():
        rows.append(dict(step=step, penalty=penalty, dtype=dtype, variant=variant, eps=eps, h=rs[0]["h"],
                         rel_err_mean=statistics.fmean(r["rel_err"] for r in rs),
                         rel_err_max=max(r["rel_err"] for r in rs),
                         cos_mean=statistics.fmean(r["cos"] for r in rs), cos_min=min(r["cos"] for r in rs),
                         flip_mean=_mean_of(rs, "flip"), pool_switch_mean=_mean_of(rs, "pool_switch"),
                         batches=len(rs)))
    return rows


def headline(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (dtype, variant, ε): the worst and the median over (penalty, step) of the mean relative error."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[r["dtype"], r["variant"], r["eps"]].append(r)
    return [dict(dtype=d, variant=v, eps=e, worst_rel_err=max(r["rel_err_mean"] for r in rs),
                 median_rel_err=statistics.median(r["rel_err_mean"] for r in rs),
                 worst_cos=min(r["cos_min"] for r in rs), cases=len(rs))
            for (d, v, e), rs in groups.items()]


def _fmt(x: float | None) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    return f"{x:.0f}" if abs(x) >= 100 else f"{x:.2g}"


def _table(header: Sequence[str], lines: Sequence[Sequence[str]]) -> str:
    rows = [header, ["---"] * len(header), *lines]
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


def headline_table(summary: Sequence[dict[str, Any]], eps: Sequence[float]) -> str:
    by = {(r["dtype"], r["variant"], r["eps"]): r for r in summary}
    keys = sorted({(r["dtype"], r["variant"]) for r in summary if r["variant"] != "exact"},
                  key=lambda k: (k[0], VARIANTS.index(k[1])))
    lines = [[f"{d} {v}"] + [f"{_fmt(by[d, v, e]['worst_rel_err'])} ({_fmt(by[d, v, e]['median_rel_err'])})"
                             for e in eps] for d, v in keys]
    floors = [[f"{d} exact", f"{_fmt(by[d, 'exact', None]['worst_rel_err'])} at every ε"] + [""] * (len(eps) - 1)
              for d in sorted({k[0] for k in keys}) if (d, "exact", None) in by]
    return _table(["dtype, variant"] + [f"ε = {e:g}" for e in eps], lines + floors)


def detail_table(rows: Sequence[dict[str, Any]], dtype: str, variant: str, eps: Sequence[float]) -> str:
    by = {(r["penalty"], r["step"], r["eps"]): r for r in rows if r["dtype"] == dtype and r["variant"] == variant}
    keys = sorted({k[:2] for k in by}, key=lambda k: (list(PENALTIES).index(k[0]), k[1]))
    lines = [[f"{p} @ {s}"] + [f"{_fmt(by[p, s, e]['rel_err_mean'])} ({by[p, s, e]['cos_mean']:.4f})" for e in eps]
             for p, s in keys]
    return _table(["penalty @ step"] + [f"ε = {e:g}" for e in eps], lines)


def flip_table(rows: Sequence[dict[str, Any]], dtype: str, variant: str, eps: Sequence[float],
               key: str = "flip_mean") -> str:
    """Mean fraction of ReLU inputs that change sign (``key="pool_switch_mean"``: max-pool windows that change
    argmax) along the shift, averaged over the penalties."""
    groups: dict[tuple, list[float]] = defaultdict(list)
    for r in rows:
        if r["dtype"] == dtype and r["variant"] == variant and r.get(key) is not None:
            groups[r["step"], r["eps"]].append(r[key])
    steps = sorted({k[0] for k in groups})
    return _table(["step"] + [f"ε = {e:g}" for e in eps],
                  [[str(s)] + [_fmt(statistics.fmean(groups[s, e])) if groups[s, e] else "—" for e in eps]
                   for s in steps])


def timing_table(timing: Sequence[dict[str, Any]]) -> str:
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for t in timing:
        groups[t["dtype"], t["penalty"]].append(t)
    keys = ("exact_s", "gradient_s", "shifted_s")
    lines = [[d, p] + [f"{1e3 * statistics.fmean(t[k] for t in ts):.0f}" for k in keys]
             for (d, p), ts in sorted(groups.items(), key=lambda kv: (kv[0][0], list(PENALTIES).index(kv[0][1])))]
    return _table(["dtype", "penalty", "exact ∇R_j (ms)", "∇S_j at θ (ms)", "one shifted ∇S_j (ms)"], lines)


def checkpoint_table(checkpoints: Sequence[dict[str, Any]], norms: Sequence[dict[str, Any]]) -> str:
    """Per checkpoint: the LB run's recent training loss, ‖θ‖ and ‖P_exact‖ per penalty (mean over batches)."""
    names = list(dict.fromkeys(n["penalty"] for n in norms))
    lines = []
    for c in checkpoints:
        at = [n for n in norms if n["step"] == c["step"]]
        p_norms = [_fmt(statistics.fmean(n["exact_p_norm"] for n in at if n["penalty"] == name)) for name in names]
        lines.append([str(c["step"]), _fmt(c["train_loss"]), _fmt(at[0]["theta_norm"]) if at else "—", *p_norms])
    return _table(["step", "train loss (last 50 steps)", "‖θ‖", *[f"‖P_exact‖ {n}" for n in names]], lines)


def markdown(result: dict[str, Any]) -> str:
    rows, eps, cfg = result["rows"], result["config"]["eps"], result["config"]
    parts = ["### The checkpoints of the LB run", checkpoint_table(result["checkpoints"], result["norms"]),
             "### Worst (median) over penalties × checkpoints of the relative error "
             "‖P_fd − P_exact‖/‖P_exact‖",
             headline_table(result["headline"], eps)]
    for dtype in cfg["dtypes"]:
        for variant in cfg["variants"]:
            parts += [f"### {dtype}, {variant}: relative error (cosine), mean over {cfg['batches']} batches",
                      detail_table(rows, dtype, variant, eps)]
    for dtype in cfg["dtypes"]:
        for variant in [v for v in ("forward", "forward-rel") if v in cfg["variants"]]:
            for key, what in (("flip_mean", "ReLU inputs whose sign flips"),
                              ("pool_switch_mean", "max-pool windows whose argmax switches")):
                if any(r.get(key) is not None for r in rows):
                    parts += [f"### {dtype}, {variant}: fraction of {what} at θ + h v̂",
                              flip_table(rows, dtype, variant, eps, key)]
    parts += ["### Time per micro-batch (mean)", timing_table(result["timing"])]
    return "\n\n".join(parts) + "\n"


# -- the script -------------------------------------------------------------------------------------
def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps-at", type=int, nargs="+", default=[0, 200, 1000], help="checkpoints of the LB run")
    p.add_argument("--eps", type=float, nargs="+", default=list(DEFAULT_EPS), help="ε of every variant")
    p.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES),
                   help="dtypes the differences are taken in (the reference is always exact float64)")
    p.add_argument("--penalties", nargs="+", choices=list(PENALTIES), default=list(PENALTIES))
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--batches", type=int, default=1, help="fixed batches of |B| averaged over at each checkpoint")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0, help="initialization, batch order and draws")
    p.add_argument("--dataset", default="auto", choices=["auto", "fashion-mnist", "fashion-mnist-subset", "synthetic"],
                   help="auto: full Fashion-MNIST if found, else the embedded subset, else synthetic")
    p.add_argument("--data-root", default=None)
    p.add_argument("--train-size", type=int, default=FMNIST["train_size"])
    p.add_argument("--widths", type=int, nargs="+", default=FMNIST["widths"], help="small-cnn widths")
    p.add_argument("--activation", default="relu", choices=["relu", *SMOOTH_ACTIVATIONS],
                   help="swap the model's ReLUs for a smooth activation (a control: same θ, no kinks)")
    p.add_argument("--pool", default="max", choices=["max", "avg"], help="avg: swap max-pooling for average pooling")
    p.add_argument("--batch-size", type=int, default=FMNIST["batch_size"])
    p.add_argument("--micro-batch-size", type=int, default=FMNIST["micro_batch_size"])
    p.add_argument("--lr", type=float, default=FMNIST["lr"])
    p.add_argument("--momentum", type=float, default=FMNIST["momentum"])
    p.add_argument("--check-eps", type=float, default=1e-2,
                   help="ε at which the forward difference is checked against regopt.hvp.finite_difference")
    p.add_argument("--cache", default=None, help="file to keep the trained checkpoints in (reused when it matches)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON output")
    p.add_argument("--markdown", type=Path, default=None, help="also write the tables to this file")
    return p


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = make_parser()
    args = parser.parse_args(argv)
    args.steps_at = sorted(set(args.steps_at))
    if args.steps_at[0] < 0 or any(e <= 0 for e in args.eps) or args.batches < 1 or args.threads < 1:
        parser.error("--steps-at must be >= 0, --eps > 0, --batches and --threads >= 1")
    return args


def environment(args: argparse.Namespace, data: data_lib.DataSplits) -> dict[str, Any]:
    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return dict(command="python benchmarks/fd_faithfulness.py " + " ".join(sys.argv[1:]) if sys.argv else "",
                torch=torch.__version__, python=platform.python_version(), platform=platform.platform(), cpu=cpu,
                threads=torch.get_num_threads(), data=data.name, data_source=data.source,
                train_examples=len(data.train),
                date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"))


def check_regopt(checks: Sequence[dict[str, Any]], log: Callable[[str], None]) -> None:
    """Warn when this script's forward difference is not regopt.hvp.finite_difference's (it should be to rounding)."""
    tolerance = {"float32": 1e-6, "float64": 1e-12}
    for c in checks:
        if not c["rel_diff"] <= tolerance[c["dtype"]]:
            log(f"WARNING: forward difference differs from regopt.hvp.finite_difference by {c['rel_diff']:.3g} "
                f"({c['penalty']}, step {c['step']}, {c['dtype']}): the measured 'forward' rows may not be regopt's")


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    t0, cpu0 = time.perf_counter(), time.process_time()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - t0:6.0f} s] {message}", file=sys.stderr, flush=True)

    data = load_data(args)
    log(f"data {data.name} from {data.source}: {len(data.train)} training examples")
    checkpoints = checkpoints_cached(args, data, log)
    batches = evaluation_batches(data, args.batches, args.batch_size, args.seed)
    collected: dict[str, list[dict]] = defaultdict(list)
    for ck in checkpoints:
        model = build_model(args, data)
        model.load_state_dict(ck["state"])
        for key, values in measure_checkpoint(model, ck["step"], batches, args, log).items():
            collected[key] += values
    check_regopt(collected["regopt_check"], log)
    rows = aggregate(collected["batches"])
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    result = dict(config=config, environment=environment(args, data),
                  checkpoints=[dict(step=c["step"], train_loss=c["train_loss"], train_s=c["train_s"])
                               for c in checkpoints],
                  headline=headline(rows), rows=rows, batches=collected["batches"], norms=collected["norms"],
                  regopt_check=collected["regopt_check"], timing=collected["timing"])
    result["environment"].update(wall_s=time.perf_counter() - t0, cpu_s=time.process_time() - cpu0,
                                 load_average=list(os.getloadavg()) if hasattr(os, "getloadavg") else None)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    tables = markdown(result)
    if args.markdown:
        args.markdown.write_text(tables)
    print(tables)
    log(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
