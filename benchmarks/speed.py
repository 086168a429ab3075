"""Step time and peak memory of every regopt optimizer against accumulated SGD and regopt.reference.

    python benchmarks/speed.py                      # small BN CNN on CPU, B=256, |M|=32 (< 3 minutes)
    python benchmarks/speed.py --device cuda --model resnet18 --batch 5120 --micro 128
    python benchmarks/speed.py --suite gpu --json speed.json --markdown speed.md --budget 155   # the GPU kit's part

All methods run in one process, interleaved round by round (so drift in machine load hits
them alike), from the same initialization; each reports the median of ``--steps`` timed
steps after ``--warmup`` untimed ones. Prints a markdown table and writes JSON.

Rows: ``SGD-accum`` (torch.optim.SGD with gradient accumulation over the micro-batches, the
baseline), ``LB`` (MicroBatchSGD), ``GN/FT/AJ/UJ-exact`` and ``-finite_difference``, the
paper's loop ``GN/FT/AJ/UJ-reference`` (regopt.reference), ``GN/FT-<method>-sub=m`` (the
penalty on m = 1 and m = k/4 of the k micro-batches, ``penalty_micro_batches=m``) and the
grafting modes. Any row can
be repeated under bfloat16 autocast (``--bf16-rows``, suffix ``-bf16``) or through a
``torch.compile``'d copy of the model (``--compile-rows``, suffix ``-compiled``; the first
warm-up step, which compiles, is reported apart as ``compile_s``).

Peak memory (CUDA) of a row is its own resident tensors (parameters, buffers, ``.grad``,
optimizer state, the batch) plus the most its step allocated above what was resident when
the step began, i.e. what the row would need alone in a process. A row that raises is
reported with its error and dropped; a row whose step takes longer than ``--row-limit``
seconds is dropped after that round; ``--budget`` stops the timed rounds (after at least
one) when the wall-clock budget is spent. The JSON is rewritten after every round, so a run
killed from outside keeps what it measured.

``--suite gpu`` runs the tables of the GPU kit (benchmarks/gpu_check.sh) in one process:
CIFAR ResNet-18 at B=5120, |M|=128 (float32 and bfloat16 rows, checked against the
targets), the ``fmnist`` preset's CNN at B=1024, |M|=128 (where kernel-launch overhead
dominates), and ``GN-finite_difference`` through ``torch.compile`` on both models while the
budget lasts. ``--smoke`` shrinks every table to seconds on a CPU (same code paths).
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.models import build_model  # noqa: E402
from regopt import reference, registry  # noqa: E402

SUBSAMPLED = ("GN", "FT")  # also timed with the penalty on m = 1 and m = k/4 of the k micro-batches (-sub=m)
BASELINE = "SGD-accum"
MIB = 2**20

# The performance targets, stated for an H100, CIFAR ResNet-18, B=5120, |M|=128, float32 rows:
# (row, measured quantity, bound).
TARGETS = (("GN-exact", "ratio_to_sgd_accum", 3.0), ("GN-finite_difference", "ratio_to_sgd_accum", 2.0),
           ("LB", "ratio_to_sgd_accum", 1.05), ("GN-exact", "peak_mib", 4096.0))
TARGET_SETTING = "H100, CIFAR ResNet-18, B=5120, |M|=128, float32"


# -- the rows ---------------------------------------------------------------------------------------
@dataclass
class Row:
    """One timed method: its own model copy, its optimizer and a ``step(batch)``."""

    name: str
    model: nn.Module | None
    optimizer: torch.optim.Optimizer | None
    step: Callable[[Any], None] | None
    autocast: torch.dtype | None = None
    compiled: bool = False
    first_step_s: float | None = None
    times: list[float] = field(default_factory=list)
    peak_bytes: int | None = None
    resident_bytes: int | None = None
    status: str = "ok"

    def release(self, status: str) -> None:
        """Stop timing this row and free its model, optimizer state and gradients."""
        self.status, self.model, self.optimizer, self.step = status, None, None, None


def closure_for(forward: nn.Module):
    def closure(x, y):
        logits = forward(x)
        return F.cross_entropy(logits, y), logits
    return closure


def _accumulated_sgd(args, model: nn.Module, forward: nn.Module):
    opt = torch.optim.SGD(model.parameters(), lr=args.lr)

    def step(batch):
        x, y = batch
        opt.zero_grad(set_to_none=False)
        for xb, yb in zip(x.split(args.micro), y.split(args.micro)):
            (F.cross_entropy(forward(xb), yb) * (len(xb) / len(x))).backward()
        opt.step()
    return opt, step


def _reference(args, regularizer: str):
    def build(model: nn.Module, forward: nn.Module):
        opt = torch.optim.SGD(model.parameters(), lr=args.lr)
        return opt, lambda batch: reference.step(opt, closure_for(forward), batch, micro_batch_size=args.micro,
                                                 regularizer=regularizer, penalty=args.penalty)
    return build


def _regopt(make: Callable[[Any], torch.optim.Optimizer]):
    def build(model: nn.Module, forward: nn.Module):
        opt = make(model.parameters())
        closure = closure_for(forward)
        return opt, lambda batch: opt.step(closure, batch)
    return build


def row_builders(args) -> dict[str, Callable[[nn.Module, nn.Module], tuple]]:
    """name -> build(model, forward) -> (optimizer, step), for every base row, in table order."""
    common = dict(lr=args.lr, micro_batch_size=args.micro)
    builders = {BASELINE: lambda m, f: _accumulated_sgd(args, m, f),
                "LB": _regopt(lambda p: registry.build("LB", p, **common))}
    for name in registry.PENALIZED:
        for method in args.methods:
            builders[f"{name}-{method}"] = _regopt(
                lambda p, name=name, method=method: registry.build(name, p, penalty=args.penalty, method=method,
                                                                   **common))
        if not args.no_reference:
            builders[f"{name}-reference"] = _reference(args, registry.METHODS[name].regularizer)
    for name in SUBSAMPLED:
        for method, m in itertools.product(args.methods, subsample_sizes(args)):
            builders[f"{name}-{method}-sub={m}"] = _regopt(
                lambda p, name=name, method=method, m=m: registry.build(name, p, penalty=args.penalty, method=method,
                                                                        penalty_micro_batches=m, **common))
    for name in registry.GRAFTS:
        grafting = registry.METHODS[name].keep(dict(norms=lambda t: 1.0, **common))  # GRAFT-ext: s = 1
        builders[name] = _regopt(lambda p, name=name, grafting=grafting: registry.build(name, p, **grafting))
    return builders


def subsample_sizes(args) -> list[int]:
    """The m of the -sub=m rows: 1 and k/4 (k = ceil(batch / micro)), those below k."""
    k = -(-args.batch // args.micro)
    return sorted({m for m in (1, k // 4) if 1 <= m < k})


def _check_names(kind: str, names: list[str] | None, known: dict) -> None:
    unknown = [n for n in names or [] if n not in known]
    if unknown:
        raise SystemExit(f"{kind}: unknown row(s) {', '.join(unknown)} (known: {', '.join(known)})")


def make_rows(args, model: nn.Module) -> list[Row]:
    """Every requested row, each with a deep copy of ``model`` (same initialization)."""
    builders = row_builders(args)
    for kind, names in (("--only", args.only), ("--bf16-rows", args.bf16_rows), ("--compile-rows", args.compile_rows)):
        _check_names(kind, names, builders)
    names = [n for n in builders if not args.only or n in args.only or n in (BASELINE, "LB")]
    default_autocast = torch.bfloat16 if args.bf16 else None
    plan = [(n, "", default_autocast, False) for n in names]
    plan += [(n, "-bf16", torch.bfloat16, False) for n in builders if n in (args.bf16_rows or [])]
    plan += [(n, "-compiled", default_autocast, True) for n in builders if n in (args.compile_rows or [])]
    rows = []
    for name, suffix, autocast, compiled in plan:
        clone = copy.deepcopy(model)
        forward = torch.compile(clone, backend=args.compile_backend) if compiled else clone
        optimizer, step = builders[name](clone, forward)
        rows.append(Row(name + suffix, clone, optimizer, step, autocast, compiled))
    return rows


# -- timing -----------------------------------------------------------------------------------------
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def resident_bytes(row: Row, batch, device: torch.device) -> int:
    """Bytes of the row's own tensors on ``device``: parameters, buffers, .grad, optimizer state, batch."""
    tensors = list(row.model.parameters()) + list(row.model.buffers()) + list(batch)
    tensors += [p.grad for p in row.model.parameters() if p.grad is not None]
    for state in row.optimizer.state.values():
        values = state.values() if isinstance(state, dict) else [state]
        tensors += [v for v in values if isinstance(v, torch.Tensor)]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors
                if t.device.type == device.type}
    return sum(storages.values())


def timed_step(row: Row, batch, device: torch.device) -> tuple[float, int | None]:
    """(seconds, bytes allocated above the resident set at the step's peak, on CUDA)."""
    synchronize(device)
    base = None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    start = time.perf_counter()
    with torch.autocast(device.type, dtype=row.autocast or torch.bfloat16, enabled=row.autocast is not None):
        row.step(batch)
    synchronize(device)
    elapsed = time.perf_counter() - start
    extra = torch.cuda.max_memory_allocated(device) - base if base is not None else None
    return elapsed, extra


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:200] if text else ''}"


def _run_row(row: Row, batch, device: torch.device, round_: int, args) -> None:
    try:
        elapsed, extra = timed_step(row, batch, device)
    except Exception as error:  # one failing row (OOM, no double backward, compile error) must not end the table
        row.release(f"error: {_first_line(error)}")
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return
    if round_ == 0:
        row.first_step_s = elapsed
    if round_ >= args.warmup:
        row.times.append(elapsed)
    if extra is not None:
        row.resident_bytes = resident_bytes(row, batch, device)
        row.peak_bytes = max(row.peak_bytes or 0, row.resident_bytes + extra)
    if args.row_limit and elapsed > args.row_limit and row.name != BASELINE and not (row.compiled and round_ == 0):
        row.release(f"dropped after round {round_ + 1}: a step took {elapsed:.1f} s > --row-limit {args.row_limit:g} s")


def time_rows(rows: list[Row], batch, device: torch.device, args,
              on_round: Callable[[int], None] | None = None, deadline: float | None = None) -> int:
    """Interleaved rounds over the rows; returns the number of timed rounds run."""
    timed = 0
    for round_ in range(args.warmup + args.steps):
        for row in rows:
            if row.step is not None:
                _run_row(row, batch, device, round_, args)
        timed += round_ >= args.warmup
        if on_round is not None:
            on_round(timed)
        if deadline is not None and timed >= 1 and time.perf_counter() > deadline:
            break
    return timed


# -- one table --------------------------------------------------------------------------------------
def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def row_results(rows: list[Row]) -> list[dict]:
    median = {row.name: statistics.median(row.times) if row.times else None for row in rows}
    results = []
    for row in rows:
        ms = median[row.name]
        ref_name = f"{row.name.split('-')[0]}-reference"
        compile_s = row.first_step_s - ms if row.compiled and row.first_step_s is not None and ms else None
        results.append({
            "method": row.name,
            "ms_per_step": 1e3 * ms if ms is not None else None,
            "ratio_to_sgd_accum": _ratio(ms, median.get(BASELINE)),
            "ratio_to_lb": _ratio(ms, median.get("LB")),
            "ratio_to_reference": _ratio(ms, median.get(ref_name)),
            "peak_mib": row.peak_bytes / MIB if row.peak_bytes is not None else None,
            "resident_mib": row.resident_bytes / MIB if row.resident_bytes is not None else None,
            "times_ms": [1e3 * t for t in row.times],
            "first_step_ms": 1e3 * row.first_step_s if row.first_step_s is not None else None,
            "compile_s": compile_s,
            "autocast": str(row.autocast).removeprefix("torch.") if row.autocast is not None else None,
            "compiled": row.compiled,
            "status": row.status,
        })
    return results


def _setting(read: Callable[[], Any]) -> Any:
    """A backend flag for the record; flags move between torch versions, and a missing one must not cost the table."""
    try:
        return read()
    except Exception as error:
        return f"unreadable ({_first_line(error)})"


def environment(device: torch.device) -> dict[str, Any]:
    env = {"torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads(),
           "device_name": platform.processor() or platform.machine()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(device_name=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                   cuda=torch.version.cuda, cudnn=_setting(torch.backends.cudnn.version),
                   cudnn_benchmark=torch.backends.cudnn.benchmark,
                   cudnn_allow_tf32=_setting(lambda: torch.backends.cudnn.allow_tf32),
                   matmul_allow_tf32=_setting(lambda: torch.backends.cuda.matmul.allow_tf32))
    return env


def _input_shape(args) -> tuple[int, int]:
    return (1, 28) if args.model == "small-cnn" else (3, 32)


def build_table_model(args, device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    in_channels, _ = _input_shape(args)
    model = build_model(args.model, num_classes=10, in_channels=in_channels, **(args.model_kwargs or {})).to(device)
    return model.to(memory_format=torch.channels_last) if args.channels_last else model


def random_batch(args, device: torch.device):
    in_channels, size = _input_shape(args)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, in_channels, size, size, generator=g).to(device)
    y = torch.randint(0, 10, (args.batch,), generator=g).to(device)
    return (x.to(memory_format=torch.channels_last) if args.channels_last else x), y


def run(args, on_update: Callable[[dict], None] | None = None, deadline: float | None = None) -> dict:
    """One table: every row on ``args.model`` at B=``args.batch``, |M|=``args.micro``."""
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cudnn_benchmark:
        torch.backends.cudnn.benchmark = True
    rows = make_rows(args, build_table_model(args, device))
    batch = random_batch(args, device)
    if args.budget:
        own = time.perf_counter() + args.budget
        deadline = own if deadline is None else min(deadline, own)
    config = {k: v for k, v in vars(args).items() if k not in ("json", "markdown")}
    result = {"config": config | environment(device), "rows": [], "timed_rounds": 0, "complete": False}

    def publish(timed: int) -> None:
        result.update(rows=row_results(rows), timed_rounds=timed)
        if on_update is not None:
            on_update(result)
    timed = time_rows(rows, batch, device, args, publish, deadline)
    result["complete"] = True
    if any(row.compiled for row in rows):
        result["dynamo"] = dynamo_counters()
    publish(timed)
    return result


def dynamo_counters() -> dict[str, Any]:
    """Graphs compiled and graph breaks so far (how many times torch.compile traced), best effort."""
    try:
        from torch._dynamo.utils import counters
        return {"unique_graphs": counters["stats"].get("unique_graphs", 0),
                "graph_breaks": sum(counters["graph_break"].values())}
    except Exception as error:  # a private API: its absence must not lose the table
        return {"error": _first_line(error)}


# -- the GPU kit's suite ----------------------------------------------------------------------------
PENALIZED_ROWS = ["GN-exact", "GN-finite_difference", "GN-reference", "FT-exact", "FT-finite_difference"]
BF16_ROWS = [BASELINE, "LB", "GN-exact", "GN-finite_difference"]
COMPILED = dict(only=["GN-finite_difference"], compile_rows=[BASELINE, "GN-finite_difference"], bf16_rows=None)
# name, what it shows, settings, seconds it may take (share of --budget), seconds it needs left to start.
SUITES: dict[str, list[dict[str, Any]]] = {"gpu": [
    dict(table="resnet18", title="CIFAR ResNet-18, B=5120, |M|=128", targets=True, budget=0.45, needs=0,
         settings=dict(model="resnet18", batch=5120, micro=128, warmup=1, steps=5, row_limit=30,
                       only=PENALIZED_ROWS, bf16_rows=BF16_ROWS)),
    dict(table="fmnist-cnn", title="fmnist preset CNN (16-32-64, 1x28x28), B=1024, |M|=128: launch-bound",
         budget=0.12, needs=0,
         settings=dict(model="small-cnn", model_kwargs={"widths": [16, 32, 64]}, batch=1024, micro=128,
                       warmup=3, steps=20, row_limit=10, only=PENALIZED_ROWS, bf16_rows=BF16_ROWS)),
    dict(table="fmnist-cnn-compiled", title="fmnist preset CNN through torch.compile (finite differences)",
         budget=0.25, needs=0.2,
         settings=dict(model="small-cnn", model_kwargs={"widths": [16, 32, 64]}, batch=1024, micro=128,
                       warmup=2, steps=20, row_limit=10, **COMPILED)),
    dict(table="resnet18-compiled", title="CIFAR ResNet-18 through torch.compile (finite differences)",
         budget=1.0, needs=0.55,  # an inductor compile of ResNet-18 takes about a minute
         settings=dict(model="resnet18", batch=5120, micro=128, warmup=2, steps=3, row_limit=30, **COMPILED)),
]}
SUITE_DEFAULTS = dict(device="cuda", cudnn_benchmark=True)  # what every table of a suite runs with
SMOKE = dict(device="cpu", batch=8, micro=4, warmup=1, steps=2, compile_backend="aot_eager", cudnn_benchmark=False)
SMOKE_MODEL_KWARGS = {"resnet18": {"width": 4}, "small-cnn": {"widths": [4, 8, 16]}}


def table_args(args, entry: dict[str, Any]) -> argparse.Namespace:
    """The command line's options, overridden by the suite entry's settings (and by --smoke)."""
    table = copy.copy(args)
    for key, value in SUITE_DEFAULTS.items():
        setattr(table, key, value)
    for key, value in entry["settings"].items():
        setattr(table, key, copy.deepcopy(value))
    if args.smoke:
        for key, value in SMOKE.items():
            setattr(table, key, value)
        table.model_kwargs = SMOKE_MODEL_KWARGS[table.model]
    table.budget = None
    return table


def check_targets(table: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target of TARGETS: the measured value and whether it was reached (None: not measured)."""
    rows = {row["method"]: row for row in table["rows"]}
    checks = []
    for method, quantity, bound in TARGETS:
        value = rows.get(method, {}).get(quantity)
        checks.append({"row": method, "quantity": quantity, "bound": bound, "value": value,
                       "reached": None if value is None else value <= bound})
    return checks


def run_suite(args, write: Callable[[dict], None]) -> dict:
    """Every table of ``args.suite``, in order, while ``args.budget`` lasts; ``write`` after every round."""
    start = time.perf_counter()
    total = args.budget or math.inf
    deadline = start + total if args.budget else None
    suite = {"suite": args.suite, "smoke": args.smoke, "budget_s": args.budget, "tables": [], "complete": False,
             "target_setting": TARGET_SETTING}
    for entry in SUITES[args.suite]:
        left = total - (time.perf_counter() - start)
        table = {"table": entry["table"], "title": entry["title"], "rows": []}
        suite["tables"].append(table)
        if not args.smoke and left < entry["needs"] * total:
            table["skipped"] = f"{left:.0f} s of the budget left, this table needs {entry['needs'] * total:.0f} s"
            write(suite)
            continue
        table_deadline = min(time.perf_counter() + entry["budget"] * total, deadline) if args.budget else None

        def update(result: dict, table=table, entry=entry) -> None:
            table.update(result)
            if entry.get("targets"):
                table["targets"] = check_targets(table)
            write(suite)
        run(table_args(args, entry), update, table_deadline)
    suite["complete"] = True
    suite["wall_s"] = time.perf_counter() - start
    write(suite)
    return suite


# -- output -----------------------------------------------------------------------------------------
def _fmt(value: float | None, digits: int = 2) -> str:
    return f"{value:.{digits}f}" if value is not None else ""


def _note(row: dict) -> str:
    notes = [] if row.get("status", "ok") == "ok" else [row["status"]]
    if row.get("compile_s") is not None:  # compiled code is shared between copies of one model class
        notes.append(f"compile {row['compile_s']:.1f} s" if row["compile_s"] >= 0.1 else "compiled code reused")
    return "; ".join(notes)


def markdown(result: dict) -> str:
    lines = ["| method | ms/step | × SGD-accum | × LB | × reference | peak MiB | note |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for row in result["rows"]:
        peak = f"{row['peak_mib']:.0f}" if row.get("peak_mib") is not None else "n/a"
        lines.append(f"| {row['method']} | {_fmt(row['ms_per_step'], 1)} | {_fmt(row['ratio_to_sgd_accum'])} | "
                     f"{_fmt(row['ratio_to_lb'])} | {_fmt(row['ratio_to_reference'])} | {peak} | {_note(row)} |")
    return "\n".join(lines)


def targets_markdown(checks: list[dict], device_name: str, smoke: bool) -> str:
    lines = [f"Targets ({TARGET_SETTING}; measured on {device_name}"
             + ("; smoke run, not the target setting" if smoke else "") + "):", ""]
    for check in checks:
        unit, value = ("MiB", _fmt(check["value"], 0)) if check["quantity"] == "peak_mib" else ("×", _fmt(check["value"]))
        what = "peak memory" if check["quantity"] == "peak_mib" else "time / SGD-accum"
        verdict = {True: "**reached**", False: "**not reached**", None: "not measured"}[check["reached"]]
        lines.append(f"- {check['row']} {what}: {value or 'n/a'} {unit} (target ≤ {check['bound']:g} {unit}): {verdict}")
    return "\n".join(lines)


def suite_markdown(suite: dict) -> str:
    parts = [f"# Speed: suite `{suite['suite']}`" + (" (smoke)" if suite["smoke"] else "")]
    for table in suite["tables"]:
        config = table.get("config", {})
        parts.append(f"## {table['title']}")
        if table.get("skipped"):
            parts.append(f"Skipped: {table['skipped']}.")
            continue
        parts.append(f"{config.get('device_name', '?')} ({config.get('device', '?')}), torch {config.get('torch', '?')}, "
                     f"{config.get('model', '?')} B={config.get('batch', '?')} |M|={config.get('micro', '?')}, "
                     f"median of {table.get('timed_rounds', 0)} timed rounds after {config.get('warmup', '?')} "
                     f"warm-up" + ("" if table.get("complete") else " (interrupted)"))
        parts.append(markdown(table))
        if table.get("targets"):
            parts.append(targets_markdown(table["targets"], config.get("device_name", "?"), suite["smoke"]))
        if table.get("dynamo"):
            parts.append(f"torch.compile: {json.dumps(table['dynamo'])}")
    return "\n\n".join(parts) + "\n"


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="small-cnn", choices=["small-cnn", "resnet18", "vgg11", "vgg16"])
    parser.add_argument("--model-kwargs", type=json.loads, default=None, help='JSON, e.g. \'{"widths": [16, 32, 64]}\'')
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--micro", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per method (median reported)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--penalty", type=float, default=0.01)
    parser.add_argument("--methods", nargs="+", default=["exact", "finite_difference"],
                        choices=["exact", "finite_difference"])
    parser.add_argument("--only", nargs="+", help="time only these rows (and SGD-accum, LB)")
    parser.add_argument("--no-reference", action="store_true", help="skip the slow regopt.reference rows")
    parser.add_argument("--bf16", action="store_true", help="run every step under torch.autocast(bfloat16)")
    parser.add_argument("--bf16-rows", nargs="+", help="also time these rows under bfloat16 autocast (NAME-bf16)")
    parser.add_argument("--compile-rows", nargs="+", help="also time these rows through torch.compile(model)")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend of --compile-rows")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--cudnn-benchmark", action="store_true", help="torch.backends.cudnn.benchmark = True")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--budget", type=float, help="wall-clock seconds: stop timed rounds (after one) when spent")
    parser.add_argument("--row-limit", type=float, help="drop a row after a step slower than this many seconds")
    parser.add_argument("--suite", choices=sorted(SUITES), help="run a predefined set of tables (the GPU kit's)")
    parser.add_argument("--smoke", action="store_true", help="with --suite: tiny sizes on the CPU, seconds")
    parser.add_argument("--json", type=Path, help="where to write the JSON (default results/speed/<time>.json)")
    parser.add_argument("--markdown", type=Path, help="also write the markdown table(s) here")
    args = parser.parse_args(argv)
    if args.smoke and not args.suite:
        parser.error("--smoke needs --suite")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    path = args.json or Path("results/speed") / f"{time.strftime('%Y%m%d-%H%M%S')}.json"
    render = suite_markdown if args.suite else (lambda result: markdown(result) + "\n")

    def write(result: dict) -> None:  # after every round: a run killed from outside keeps what it measured
        write_atomic(path, json.dumps(result | {"json": str(path)}, indent=2, default=str))
        if args.markdown:
            write_atomic(args.markdown, render(result))
    if args.suite:
        print(suite_markdown(run_suite(args, write)))
    else:
        result = run(args, write)
        print(f"{args.model} on {result['config']['device_name']} ({args.device}), B={args.batch}, |M|={args.micro}, "
              f"median of {result['timed_rounds']} steps, torch {torch.__version__}")
        print(markdown(result))
    print(f"wrote {path}" + (f" and {args.markdown}" if args.markdown else ""))


if __name__ == "__main__":
    main()
