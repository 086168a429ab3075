"""The multi-run driver: which (method, seed) runs, in what order, where (--jobs), for how long (--time-budget).

- **Order.** Seed-major: every method of the first seed (SB first), then every method of the next seed,
  and so on. A run that a budget or an interruption cuts off therefore leaves complete seeds (every
  method side by side, paired by seed) rather than many seeds of a few methods. GRAFT-ext and NGD wait
  for their seed's SB run; with --jobs the next ready run in that order starts on the first free worker.
- **Outputs after every run.** Each finished run is merged, in plan order (so --jobs N writes what a
  serial run writes), into runs.json, metrics.csv and summary.md, rewritten atomically; curves.png is
  redrawn when a seed is complete and at the end. A cut run therefore always leaves results.
- **--resume.** Runs whose final checkpoint exists are read back, not rerun; a run with a partial
  checkpoint continues from it (in whichever worker picks it up).
- **--jobs N.** N worker processes (start method "spawn": each its own CUDA context on a shared
  device), each with its own torch threads; one combined progress bar. Refused under torchrun.
- **--time-budget S.** A run starts only if the time since the driver started plus its estimated
  duration stays within S seconds (see :class:`TimeBudget`). Runs in flight always finish, so an outer
  timeout must leave room for one run at full sharing; a run it kills continues from its last
  checkpoint on --resume (checkpoints every ~5% of the steps).
"""

from __future__ import annotations

import multiprocessing as mp
import queue
import statistics
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from benchmarks import report

from .config import load_data, seeds
from .distributed import Dist, broadcast_object
from .methods import NEEDS_SB, MethodSpec, cost_kind, run_order
from .progress import CombinedProgress, QueueProgress, RunBar
from .training import CheckpointError, RunContext, RunOutput, load_finished, train_run, use_deterministic_kernels


@dataclass(frozen=True)
class PlannedRun:
    index: int  # position in the plan: the order of starts and of every output
    seed: int
    spec: MethodSpec

    @property
    def label(self) -> str:
        return f"{self.spec.name} seed {self.seed}"


def plan_runs(config: dict[str, Any]) -> list[PlannedRun]:
    """Every (method, seed) run, seed-major, SB first within a seed."""
    specs = run_order(config["methods"])
    pairs = [(seed, spec) for seed in seeds(config) for spec in specs]
    return [PlannedRun(i, seed, spec) for i, (seed, spec) in enumerate(pairs)]


# -- the time budget ------------------------------------------------------------------------------------
@dataclass
class TimeBudget:
    """Whether a run may still start within ``seconds`` of ``start`` (time.monotonic()); None: no budget.

    A run's duration is estimated, for its cost kind (methods.cost_kind: the kind of step and its sizes;
    λ variants share their base's kind), as the mean duration of the finished runs of that kind (this
    invocation's, measured around the run in its process, and on --resume the wall time earlier invocations
    recorded); else from the runs of that kind in flight, at the pace measured between their first and
    latest progress reports (× steps); else as the largest estimate of any kind. While the only run of a
    kind in flight has not reported its pace yet, the other runs of that kind wait (a first-run
    measurement) and runs of other kinds go first. With nothing measured at all a run starts: the first
    run (with --jobs N, the first run of each kind among the first N) starts even under a budget it will
    overrun. Runs in flight always finish.
    """

    seconds: float | None
    start: float = field(default_factory=time.monotonic)
    durations: dict[tuple, list[float]] = field(default_factory=dict)

    def record(self, kind: tuple, seconds: float) -> None:
        self.durations.setdefault(kind, []).append(float(seconds))

    def estimate(self, kind: tuple, in_flight: dict[tuple, list[float | None]]) -> float | None:
        """Seconds a run of ``kind`` will take; ``in_flight``: per kind, the runs in flight's projections
        (None where not measured yet). None: nothing to go by."""
        known = {k: statistics.fmean(v) for k, v in self.durations.items() if v}
        measured = {k: [p for p in v if p is not None] for k, v in in_flight.items()}
        if kind in known:
            return known[kind]
        if measured.get(kind):
            return statistics.fmean(measured[kind])
        others = list(known.values()) + [statistics.fmean(v) for v in measured.values() if v]
        return max(others) if others else None

    def decide(self, kind: tuple, in_flight: dict[tuple, list[float | None]], now: float) -> tuple[str, str]:
        """("start" | "wait" | "stop", why not)."""
        if self.seconds is None:
            return "start", ""
        if kind not in self.durations and in_flight.get(kind) and all(p is None for p in in_flight[kind]):
            return "wait", ""  # a run of its kind is being measured
        estimate = self.estimate(kind, in_flight)
        left = self.seconds - (now - self.start)
        if estimate is None or estimate <= left:
            return "start", ""
        return "stop", f"estimated {estimate:.0f} s, {max(left, 0.0):.0f} s left of the {self.seconds:.0f} s budget"


# -- executors: where runs run ----------------------------------------------------------------------------
class SerialExecutor:
    """Runs each run in this process when it is submitted (and, under torchrun, on every rank together)."""

    capacity = 1

    def __init__(self, ctx: RunContext) -> None:
        self.ctx = ctx
        self._events: list[tuple] = []

    def submit(self, run: PlannedRun, sb_norms: list[float] | None) -> None:
        self._events.append(("done", run.index, *_timed_run(self.ctx, run.spec, run.seed, sb_norms)))

    def poll(self, timeout: float) -> list[tuple]:
        events, self._events = self._events, []
        return events

    def close(self) -> None:
        pass


def _timed_run(ctx: RunContext, spec: MethodSpec, seed: int, sb_norms: list[float] | None) -> tuple[RunOutput, float]:
    """A run and its duration in seconds (model building, training, evaluation, checkpoints; not process start-up)."""
    t0 = time.monotonic()
    output = train_run(ctx, spec, seed, sb_norms)
    return output, time.monotonic() - t0


@dataclass
class WorkerSetup:
    """What a worker process needs to build its own RunContext (its data on its device, its threads)."""

    config: dict[str, Any]
    device: str
    threads: int | None
    out: Path | None


def _worker_context(setup: WorkerSetup) -> RunContext:
    if setup.threads:
        torch.set_num_threads(setup.threads)
    device = torch.device(setup.device)
    if device.type == "cuda":  # each worker its own CUDA context on the parent's device
        torch.cuda.set_device(device)
    use_deterministic_kernels(device, setup.config.get("deterministic", True))
    data = load_data(setup.config).to(device)
    return RunContext(setup.config, data, device, Dist(), setup.out)


def _worker_main(worker: int, setup: WorkerSetup, inbox: Any, outbox: Any) -> None:
    """A --jobs worker: build the context once, then run tasks until told to stop (None)."""
    try:
        ctx = _worker_context(setup)
    except BaseException:  # noqa: BLE001 - reported to the parent, which raises it
        outbox.put(("error", worker, None, traceback.format_exc()))
        return
    while (task := inbox.get()) is not None:
        index, spec, seed, sb_norms = task
        # Progress always reaches the parent: it projects run times from it (--time-budget) and may draw it.
        ctx.progress = lambda spec, seed, start, steps, index=index: QueueProgress(outbox, index, start)
        try:
            output, seconds = _timed_run(ctx, spec, seed, sb_norms)
        except CheckpointError as err:  # the parent raises it as it is: its message names the file and the fix
            outbox.put(("refused", worker, index, err))
            return
        except BaseException:  # noqa: BLE001
            outbox.put(("error", worker, index, traceback.format_exc()))
            return
        outbox.put(("done", index, output, seconds))


class ProcessExecutor:
    """``jobs`` worker processes (spawned), each running one run at a time; events come back on one queue."""

    def __init__(self, jobs: int, setup: WorkerSetup) -> None:
        context = mp.get_context("spawn")
        self.capacity = jobs
        self.events = context.Queue()
        self.inboxes = [context.Queue() for _ in range(jobs)]
        self.workers = [context.Process(target=_worker_main, args=(i, setup, self.inboxes[i], self.events),
                                        name=f"reproduce-worker-{i}", daemon=True) for i in range(jobs)]
        self.busy: dict[int, int] = {}  # worker -> run index
        for worker in self.workers:
            worker.start()

    def submit(self, run: PlannedRun, sb_norms: list[float] | None) -> None:
        worker = next(i for i in range(self.capacity) if i not in self.busy)
        self.busy[worker] = run.index
        self.inboxes[worker].put((run.index, run.spec, run.seed, sb_norms))

    def poll(self, timeout: float) -> list[tuple]:
        events = []
        try:
            events.append(self.events.get(timeout=timeout))
            while True:
                events.append(self.events.get_nowait())
        except queue.Empty:
            pass
        for event in events:
            if event[0] == "done":
                self.busy = {w: i for w, i in self.busy.items() if i != event[1]}
        dead = [w for w in self.busy if not self.workers[w].is_alive()]
        if not events and dead:
            code = self.workers[dead[0]].exitcode
            events.append(("error", dead[0], self.busy[dead[0]], f"worker process exited with code {code}"))
        return events

    def close(self) -> None:
        for worker, inbox in zip(self.workers, self.inboxes):
            if worker.is_alive():
                inbox.put(None)
        deadline = time.monotonic() + 10
        for worker in self.workers:
            worker.join(timeout=max(0.1, deadline - time.monotonic()))
            if worker.is_alive():  # still running a run (an error elsewhere): its checkpoint allows --resume
                worker.terminate()
                worker.join()


# -- outputs ------------------------------------------------------------------------------------------------
class Outputs:
    """The finished runs, merged in plan order into runs.json / metrics.csv / summary.md (and curves.png)."""

    def __init__(self, out: Path | None, config: dict[str, Any], plan: list[PlannedRun], writes: bool) -> None:
        self.out, self.config, self.plan, self.writes = out, config, plan, writes
        self.finished: dict[int, RunOutput] = {}
        self._plotted: set[int] = set()  # the runs the last curves.png shows

    def add(self, index: int, output: RunOutput) -> None:
        self.finished[index] = output

    def sb_norms(self, seed: int) -> list[float] | None:
        return next((self.finished[r.index].sb_norms for r in self.plan
                     if r.seed == seed and r.spec.name == "SB" and r.index in self.finished), None)

    def seed_complete(self, seed: int) -> bool:
        return all(r.index in self.finished for r in self.plan if r.seed == seed)

    def write(self, plot: bool) -> None:
        if not self.writes or self.out is None or not self.finished:
            return
        done = [self.finished[r.index] for r in self.plan if r.index in self.finished]
        rows = [row for output in done for row in output.rows]
        plot = plot and set(self.finished) != self._plotted
        report.write_all(self.out, rows, [output.result for output in done], self.config, plot=plot)
        if plot:
            self._plotted = set(self.finished)


# -- the schedule ---------------------------------------------------------------------------------------------
@dataclass
class _Running:
    run: PlannedRun
    kind: tuple
    first: tuple[float, int] | None = None  # (time, step) of its first progress report
    last: tuple[float, int] | None = None  # and of its latest

    def report(self, step: int, now: float) -> None:
        self.first = self.first or (now, step)
        self.last = (now, step)

    def projection(self, steps: int) -> float | None:
        """A whole run's duration at the pace measured between its first and latest progress reports
        (which leaves out process start-up); None before two reports a step apart."""
        if self.first is None or self.last is None or self.last[1] <= self.first[1]:
            return None
        return (self.last[0] - self.first[0]) / (self.last[1] - self.first[1]) * steps


def _ready_runs(outputs: Outputs, running: dict[int, _Running]) -> Iterator[PlannedRun]:
    """The runs not finished, not running and not waiting for their seed's SB run, in plan order."""
    for run in outputs.plan:
        if run.index in outputs.finished or run.index in running:
            continue
        if run.spec.base in NEEDS_SB and any(r.seed == run.seed and r.spec.name == "SB"
                                             and r.index not in outputs.finished for r in outputs.plan):
            continue
        yield run


def _finished_line(outputs: Outputs, run: PlannedRun, seconds: float) -> str:
    result = outputs.finished[run.index].result
    diverged = f", diverged at step {result['diverged_at']}" if result.get("diverged_at") is not None else ""
    return (f"[{len(outputs.finished)}/{len(outputs.plan)}] {run.label}: test {100 * result['test_acc']:.2f}%, "
            f"best held-out {100 * result['best_heldout_acc']:.2f}%, {seconds:.0f} s{diverged}")


@dataclass
class Scheduler:
    """Start runs in plan order on free executor slots while the budget allows; merge what comes back."""

    config: dict[str, Any]
    outputs: Outputs
    budget: TimeBudget
    display: CombinedProgress
    dist: Dist
    running: dict[int, _Running] = field(default_factory=dict)
    stopped: bool = False

    def _kind(self, run: PlannedRun) -> tuple:
        return cost_kind(run.spec, self.config["resolved"][run.spec.name])

    def _in_flight(self) -> dict[tuple, list[float | None]]:
        out: dict[tuple, list[float | None]] = {}
        for r in self.running.values():
            out.setdefault(r.kind, []).append(r.projection(int(self.config["steps"])))
        return out

    def start_ready(self, executor: Any) -> None:
        """Start ready runs in plan order on free slots: a run waits while its kind is being measured, and the
        first that would overrun the budget stops all further starts."""
        for run in _ready_runs(self.outputs, self.running):
            if self.stopped or len(self.running) >= executor.capacity:
                return
            now = time.monotonic()
            decision, why = broadcast_object(self.budget.decide(self._kind(run), self._in_flight(), now), self.dist)
            if decision == "wait":
                continue
            if decision == "stop":
                self.stopped = True
                self.display.write(f"time budget: not starting {run.label} ({why}); {len(self.outputs.finished)} of "
                                   f"{len(self.outputs.plan)} runs finished; rerun with --resume to continue")
                return
            self.running[run.index] = _Running(run, self._kind(run))
            self.display.started(run.index, f"{run.spec.name} s{run.seed}", 0, int(self.config["steps"]))
            executor.submit(run, self.outputs.sb_norms(run.seed) if run.spec.base in NEEDS_SB else None)

    def handle(self, event: tuple) -> None:
        if event[0] == "progress":
            _, index, step, _start = event
            if index in self.running:
                self.running[index].report(step, time.monotonic())
                self.display.advanced(index, step)
        elif event[0] == "message":
            self.display.write(event[1])
        elif event[0] == "done":
            _, index, output, seconds = event
            entry = self.running.pop(index)
            self.budget.record(entry.kind, seconds)
            self.outputs.add(index, output)
            self.outputs.write(plot=self.outputs.seed_complete(entry.run.seed))
            self.display.finished(index, _finished_line(self.outputs, entry.run, seconds))
        elif event[0] == "refused":
            raise event[3]
        elif event[0] == "error":
            _, worker, index, text = event
            what = self.outputs.plan[index].label if index is not None else "setting up"
            raise RuntimeError(f"--jobs worker {worker} failed ({what}):\n{text}")

    def run(self, executor: Any) -> None:
        self.start_ready(executor)
        while self.running:
            for event in executor.poll(0.2):
                self.handle(event)
            self.start_ready(executor)


def _restore_finished(outputs: Outputs, budget: TimeBudget, out: Path | None, dist: Dist) -> None:
    """--resume: the runs an earlier invocation finished (rank 0 reads them; every rank gets the same, or the same
    CheckpointError, so that under torchrun no rank waits for a rank 0 that has stopped)."""
    found, error = {}, None
    if dist.is_main:
        try:
            for run in outputs.plan:
                output = load_finished(out, run.seed, run.spec)
                if output is not None:
                    found[run.index] = output
        except CheckpointError as err:
            error = err
    found, error = broadcast_object((found, error), dist)
    if error is not None:
        raise error
    for index, output in found.items():
        run = outputs.plan[index]
        outputs.add(index, output)
        budget.record(cost_kind(run.spec, outputs.config["resolved"][run.spec.name]), output.result["wall_s"])


def run_all(config: dict[str, Any], data: Any, device: torch.device, dist: Dist, out: Path | None, *, jobs: int = 1,
            threads: int | None = None, progress: bool = True, time_budget: float | None = None,
            start: float | None = None, interrupt_after: int | None = None) -> Outputs:
    """Run every planned (method, seed) not finished yet, serially (also under torchrun) or on ``jobs`` workers."""
    plan = plan_runs(config)
    outputs = Outputs(out, config, plan, writes=dist.is_main)
    budget = TimeBudget(time_budget, start if start is not None else time.monotonic())
    _restore_finished(outputs, budget, out, dist)
    todo = [run for run in plan if run.index not in outputs.finished]
    display = CombinedProgress(len(todo) * int(config["steps"]), len(plan),
                               enabled=progress and jobs > 1 and dist.is_main)
    display.done = len(outputs.finished)
    scheduler = Scheduler(config, outputs, budget, display, dist)
    executor: Any = None
    try:
        if todo and jobs > 1:
            executor = ProcessExecutor(min(jobs, len(todo)), WorkerSetup(config, str(device), threads, out))
        elif todo:
            use_deterministic_kernels(device, config.get("deterministic", True))
            bars = (lambda spec, seed, start, steps: RunBar(f"{spec.name} seed {seed}", start, steps)) if progress else None
            executor = SerialExecutor(RunContext(config, data.to(device), device, dist, out, progress=bars,
                                                 interrupt_after=interrupt_after))
        if executor is not None:
            scheduler.run(executor)
    finally:
        if executor is not None:
            executor.close()
        display.close()
    outputs.write(plot=True)
    return outputs
