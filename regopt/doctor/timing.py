"""Step time and peak memory of regopt's steps against accumulated ``torch.optim.SGD``, on the chosen device.

Every row steps its own copy of the model on the same batch. Rows run interleaved, round by round
(so that drift in the machine's load hits them alike), one untimed warm-up round first; a row reports
the median of its timed steps and its ratio to ``SGD-accum``'s median (torch.optim.SGD with the
gradient accumulated over the same micro-batches: the cost of the plain large-batch step).

Peak memory (CUDA only) of a row is its own resident tensors (parameters, buffers, ``.grad``, optimizer
state) plus the most its step allocated above what was allocated when the step began
(``torch.cuda.max_memory_allocated``): what the row would need alone. On the CPU it is not measured.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..batching import split_batch
from ..sgd import GradNormSGD, MicroBatchSGD
from ..testing.reference_check import bind_model
from .checks import call_on, loss_of
from .parts import PartResult, Subject, first_line

BASELINE = "SGD-accum"
MIB = 2**20


@dataclass
class Row:
    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    step: Callable[[], Any] | None
    times: list[float] = field(default_factory=list)
    peak_bytes: int | None = None
    error: str | None = None


def _accumulated_sgd(subject: Subject, model: nn.Module) -> tuple[torch.optim.Optimizer, Callable[[], Any]]:
    optimizer = torch.optim.SGD(model.parameters(), lr=subject.lr)
    micro_batches = split_batch(subject.batch, subject.micro_batch_size)

    def step() -> None:
        optimizer.zero_grad()
        for micro in micro_batches:
            (loss_of(call_on(subject.loss_fn, model, micro.data)) * micro.weight).backward()
        optimizer.step()
    return optimizer, step


def _regopt(make: Callable[..., torch.optim.Optimizer]):
    def build(subject: Subject, model: nn.Module) -> tuple[torch.optim.Optimizer, Callable[[], Any]]:
        optimizer = make(model.parameters(), subject)
        closure = bind_model(subject.loss_fn, model)
        return optimizer, lambda: optimizer.step(closure, subject.batch)
    return build


def _gn(method: str, subset: int | None = None):
    make = _regopt(lambda params, s: GradNormSGD(params, s.lr, micro_batch_size=s.micro_batch_size, penalty=s.penalty,
                                                 method=method, penalty_micro_batches=subset))
    if method != "exact":
        return make

    def build(subject: Subject, model: nn.Module) -> tuple[torch.optim.Optimizer, Callable[[], Any]]:
        optimizer, step = make(subject, model)

        def exact_step() -> Any:
            with subject.exact_kernels():
                return step()
        return optimizer, exact_step
    return build


def row_builders(exact_available: bool | None) -> dict[str, Callable]:
    """name -> build(subject, model) -> (optimizer, step); GN's exact rows only where the exact path runs."""
    builders = {BASELINE: _accumulated_sgd,
                "LB": _regopt(lambda params, s: MicroBatchSGD(params, s.lr, micro_batch_size=s.micro_batch_size))}
    if exact_available is not False:
        builders["GN-exact"] = _gn("exact")
    builders["GN-finite_difference"] = _gn("finite_difference")
    if exact_available is not False:
        builders["GN-exact-sub=1"] = _gn("exact", 1)
    builders["GN-finite_difference-sub=1"] = _gn("finite_difference", 1)
    return builders


def _make_rows(subject: Subject) -> list[Row]:
    rows = []
    for name, build in row_builders(subject.exact_available).items():
        model = copy.deepcopy(subject.model)
        optimizer, step = build(subject, model)
        rows.append(Row(name, model, optimizer, step))
    return rows


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _resident_bytes(row: Row, device: torch.device) -> int:
    """Bytes of the row's own tensors on ``device``: parameters, buffers, .grad and optimizer state."""
    tensors = [*row.model.parameters(), *row.model.buffers()]
    tensors += [p.grad for p in row.model.parameters() if p.grad is not None]
    for state in row.optimizer.state.values():
        tensors += [v for v in (state.values() if isinstance(state, dict) else []) if isinstance(v, torch.Tensor)]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors
                if t.device.type == device.type}
    return sum(storages.values())


def _timed_step(row: Row, device: torch.device) -> float:
    """One step of ``row``: its seconds; on CUDA its peak memory is updated too."""
    _synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    start = time.perf_counter()
    row.step()
    _synchronize(device)
    elapsed = time.perf_counter() - start
    if device.type == "cuda":
        peak = _resident_bytes(row, device) + torch.cuda.max_memory_allocated(device) - before
        row.peak_bytes = max(row.peak_bytes or 0, peak)
    return elapsed


def _round(rows: list[Row], device: torch.device, timed: bool) -> None:
    for row in rows:
        if row.step is None:
            continue
        try:
            elapsed = _timed_step(row, device)
        except Exception as error:  # one failing row (out of memory, ...) must not end the table
            row.step, row.error = None, first_line(error)
            continue
        if timed:
            row.times.append(elapsed)


def _results(rows: list[Row], device: torch.device) -> list[dict[str, Any]]:
    baseline = next(row for row in rows if row.name == BASELINE)
    base_s = statistics.median(baseline.times) if baseline.times else None
    base_peak = baseline.peak_bytes
    results = []
    for row in rows:
        median = statistics.median(row.times) if row.times else None
        results.append({
            "row": row.name, "median_s": median, "steps": len(row.times),
            "ratio": median / base_s if median is not None and base_s else None,
            "peak_mib": None if row.peak_bytes is None else row.peak_bytes / MIB,
            "peak_ratio": row.peak_bytes / base_peak if row.peak_bytes is not None and base_peak else None,
            "error": row.error})
    return results


def _describe(result: dict[str, Any]) -> str:
    if result["median_s"] is None:
        return f"{result['row']}: not timed ({result['error'] or 'no timed step within the time limit'})"
    text = f"{result['row']}: {result['median_s'] * 1e3:.1f} ms, ×{result['ratio']:.2f}"
    if result["peak_mib"] is not None:
        text += f", peak {result['peak_mib']:.0f} MiB (×{result['peak_ratio']:.2f})"
    return text + (f", then failed: {result['error']}" if result["error"] else "")


def step_costs(subject: Subject, deadline: float) -> PartResult:
    """Interleaved rounds (one warm-up, then up to ``subject.rounds`` timed while the deadline allows)."""
    rows = _make_rows(subject)
    _round(rows, subject.device, timed=False)
    for _ in range(subject.rounds):
        if time.perf_counter() > deadline:
            break
        _round(rows, subject.device, timed=True)
    results = _results(rows, subject.device)
    notes = ["the GN-exact rows ran with SDPA's math attention kernel"] if subject.attention_math else []
    memory = ("peak memory: torch.cuda.max_memory_allocated above the step's start, plus the row's resident tensors"
              if subject.device.type == "cuda" else "peak memory: n/a on the CPU (measured on CUDA only)")
    timed = [r for r in results if r["ratio"] is not None and r["row"] != BASELINE]
    verdict = ("times relative to accumulated torch.optim.SGD: "
               + ", ".join(f"{r['row']} ×{r['ratio']:.2f}" for r in timed)) if timed else "nothing was timed"
    status = "ok" if all(r["error"] is None for r in results) and timed else "warn"
    return PartResult("timing", f"step time and peak memory ({subject.device.type})", status, verdict,
                      [_describe(r) for r in results] + notes + [memory, "graphed (CUDA graph) variants: none in this version"],
                      {"rows": results, "device": str(subject.device), "rounds": max(r["steps"] for r in results)})
