"""benchmarks/repro/driver.py: run order, --jobs (worker processes), --time-budget, --resume, torchrun refusal."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import reproduce
from benchmarks.repro import driver, methods

TINY = ["--dataset", "synthetic", "--widths", "4", "8", "--batch-size", "16", "--micro-batch-size", "4",
        "--eval-every", "2", "--eval-size", "0", "--test-size", "0", "--bn-recalibrate", "2", "--no-progress",
        "--threads", "1", "--steps", "4"]
SWEEP = ["--methods", "SB", "LB", "GN@λ=0.1", "FT", "GRAFT-ext", "--seeds", "2"]
PLAN = [(seed, m) for seed in (0, 1) for m in ("SB", "LB", "GN@λ=0.1", "FT", "GRAFT-ext")]


def _run(out, *extra):
    return reproduce.main([*TINY, "--out", str(out), *extra])


def _finished(out):
    """Every finished run's full-precision output (from its final checkpoint), wall times left out."""
    runs = {}
    for seed, method in PLAN:
        path = out / "checkpoints" / f"seed{seed}_{methods.safe_name(method)}.pt"
        if not path.exists():
            continue
        ck = torch.load(path, weights_only=True)
        if ck.get("done"):
            rows = [{k: v for k, v in r.items() if k != "wall_s"} for r in ck["rows"]]
            result = {k: v for k, v in ck["result"].items() if k != "wall_s"}
            runs[(seed, method)] = (rows, result, ck["sb_norms"])
    return runs


def _strip_wall(path):
    return [{k: v for k, v in r.items() if k != "wall_s"} for r in json.loads(path.read_text())]


def test_plan_is_seed_major_with_sb_first():
    config = reproduce.build_config(reproduce.make_parser().parse_args([*TINY, *SWEEP]))
    assert [(r.seed, r.spec.name) for r in driver.plan_runs(config)] == PLAN


def test_time_budget_estimates_from_the_same_kind_then_in_flight_then_any():
    budget = driver.TimeBudget(100.0, start=0.0)
    gn, lb, sb = ("GN", 64, 8), ("first-order", 64, 8), ("SB", 8, 8)
    assert budget.decide(gn, {}, now=99.0) == ("start", "")  # nothing measured: the run starts (a first run)
    assert budget.decide(gn, {gn: [None]}, now=1.0) == ("wait", "")  # its kind is being measured
    assert budget.estimate(gn, {gn: [40.0, None, 60.0]}) == 50.0  # projected from runs in flight
    assert budget.decide(gn, {gn: [40.0, None]}, now=70.0)[0] == "stop"
    budget.record(lb, 10.0)
    budget.record(lb, 20.0)
    assert budget.estimate(lb, {}) == 15.0
    assert budget.estimate(gn, {sb: [18.0]}) == 18.0  # an unknown kind: the largest known estimate
    budget.record(gn, 30.0)
    assert budget.estimate(gn, {gn: [90.0]}) == 30.0  # finished runs of its kind come first
    assert budget.decide(gn, {gn: [None]}, now=70.0) == ("start", "")  # ... and need no waiting
    assert budget.decide(gn, {}, now=70.5)[0] == "stop"
    assert "estimated 30 s, 29 s left of the 100 s budget" in budget.decide(gn, {}, now=71.0)[1]
    assert driver.TimeBudget(None).decide(gn, {gn: [None]}, now=1e9) == ("start", "")


def test_a_run_in_flight_is_projected_from_its_pace_not_its_start_up():
    running = driver._Running(run=None, kind=("GN", 64, 8))
    assert running.projection(100) is None
    running.report(step=1, now=50.0)  # 50 s of process start-up before the first step: left out
    assert running.projection(100) is None
    running.report(step=11, now=52.0)
    assert running.projection(100) == pytest.approx(20.0)  # 0.2 s a step × 100 steps


def test_jobs_give_the_same_runs_as_serial_bit_for_bit(tmp_path):
    """--jobs 2: every run's rows, result and SB norms equal the serial run's exactly; the outputs match too."""
    _run(tmp_path / "one", *SWEEP)
    _run(tmp_path / "two", *SWEEP, "--jobs", "2")
    one, two = _finished(tmp_path / "one"), _finished(tmp_path / "two")
    assert sorted(one) == sorted(PLAN) and one == two
    for name in ("runs.json",):
        assert _strip_wall(tmp_path / "one" / name) == _strip_wall(tmp_path / "two" / name)
    strip = lambda text: [line.rsplit(",", 1)[0] for line in text.splitlines()]  # noqa: E731 - wall_s is last
    assert strip((tmp_path / "one" / "metrics.csv").read_text()) == strip((tmp_path / "two" / "metrics.csv").read_text())
    config = json.loads((tmp_path / "two" / "config.json").read_text())
    assert config["environment"]["jobs"] == 2 and "2 runs at a time" in config["config"]["device_name"]


def test_time_budget_stop_then_resume_completes_the_rest(tmp_path, capsys):
    """A budget shorter than one run: the first run starts (nothing is measured yet), nothing after it; its
    results are written at once. On --resume the earlier runs' times count, so the same budget starts
    nothing; --resume --jobs 2 runs exactly the rest, and the whole equals an uncut run."""
    cut = tmp_path / "cut"
    _run(cut, *SWEEP, "--time-budget", "0.001")
    results = json.loads((cut / "runs.json").read_text())
    assert [(r["seed"], r["method"]) for r in results] == [(0, "SB")]
    assert "time budget: not starting LB seed 0" in capsys.readouterr().err
    assert "**Partial results:** 1 of the 10 planned runs" in (cut / "summary.md").read_text()
    assert (cut / "curves.png").exists() and (cut / "metrics.csv").exists()

    reproduce.main(["--resume", "--out", str(cut), "--no-progress", "--time-budget", "0.001"])
    assert len(json.loads((cut / "runs.json").read_text())) == 1
    assert "time budget: not starting LB seed 0" in capsys.readouterr().err
    reproduce.main(["--resume", "--out", str(cut), "--no-progress", "--jobs", "2"])
    err = capsys.readouterr().err
    assert "SB seed 0:" not in err and "[10/10]" in err  # the finished run is read back, not rerun
    full = tmp_path / "full"
    _run(full, *SWEEP)
    assert _finished(cut) == _finished(full)
    assert _strip_wall(cut / "runs.json") == _strip_wall(full / "runs.json")
    assert "Partial" not in (cut / "summary.md").read_text()


class _FakeExecutor:
    """Finishes one submitted run per poll, instantly (the scheduler's logic without processes)."""

    def __init__(self, capacity):
        self.capacity, self.submitted, self.in_flight = capacity, [], []

    def submit(self, run, sb_norms):
        self.submitted.append((run.seed, run.spec.name, sb_norms))
        self.in_flight.append(run)

    def poll(self, timeout):
        run = self.in_flight.pop(0)
        norms = [1.0, 2.0] if run.spec.name == "SB" else None
        return [("done", run.index, driver.RunOutput([], {"test_acc": 0.5, "best_heldout_acc": 0.5}, norms), 0.01)]


def _scheduler(config, budget):
    plan = driver.plan_runs(config)
    outputs = driver.Outputs(None, config, plan, writes=False)
    display = driver.CombinedProgress(0, len(plan), enabled=False)
    return driver.Scheduler(config, outputs, budget, display, driver.Dist())


def test_scheduler_first_wave_and_dependencies():
    config = reproduce.build_config(reproduce.make_parser().parse_args([*TINY, "--methods", "LB", "GRAFT-ext", "GN"]))
    executor = _FakeExecutor(capacity=3)
    _scheduler(config, driver.TimeBudget(None)).run(executor)
    # GRAFT-ext waits for SB (added for it) although a slot is free; it gets SB's norms.
    assert [name for _, name, _ in executor.submitted] == ["SB", "LB", "GN", "GRAFT-ext"]
    assert executor.submitted[-1][2] == [1.0, 2.0]

    # Under a budget a second run of a kind waits for the first one's measurement; other kinds go first.
    sweep = reproduce.build_config(reproduce.make_parser().parse_args([*TINY, "--methods", "GN@λ=0.1", "GN@λ=0.2",
                                                                       "LB"]))
    executor = _FakeExecutor(capacity=3)
    scheduler = _scheduler(sweep, driver.TimeBudget(1e6))
    scheduler.start_ready(executor)
    assert [name for _, name, _ in executor.submitted] == ["GN@λ=0.1", "LB"]
    scheduler.run(executor)
    assert [name for _, name, _ in executor.submitted] == ["GN@λ=0.1", "LB", "GN@λ=0.2"]

    over = driver.TimeBudget(1.0, start=driver.time.monotonic() - 10)  # already past the budget
    executor = _FakeExecutor(capacity=2)
    scheduler = _scheduler(config, over)
    scheduler.run(executor)
    assert [name for _, name, _ in executor.submitted] == ["SB", "LB"]  # the first wave only
    assert scheduler.stopped and len(scheduler.outputs.finished) == 2


def test_jobs_are_refused_under_torchrun(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(SystemExit, match="--jobs 2 cannot be used under torchrun"):
        _run(tmp_path / "x", "--jobs", "2")
    assert not (tmp_path / "x").exists()


def test_bad_runtime_options_exit_clearly(tmp_path, capsys):
    """Argument errors: exit status 2 and one line naming the option, the rule and the value."""
    with pytest.raises(SystemExit) as refused:
        _run(tmp_path / "a", "--jobs", "0")
    assert refused.value.code == 2 and "argument --jobs: expected an integer >= 1, got '0'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as refused:
        _run(tmp_path / "b", "--time-budget", "0")
    assert refused.value.code == 2
    assert "argument --time-budget: expected a finite number > 0, got '0'" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_resume_adds_the_methods_and_seeds_it_is_given_and_keeps_the_finished_runs(tmp_path, capsys):
    """--resume --methods/--seeds grow the saved plan (as the GPU kit's second call does); finished runs are
    read back, only the new ones train, and the result equals one run of the grown plan."""
    grown = tmp_path / "grown"
    _run(grown, "--methods", "SB", "LB", "--seeds", "1")
    capsys.readouterr()
    reproduce.main(["--resume", "--out", str(grown), "--no-progress", "--methods", "LB", "GN@lambda=0.1",
                    "--seeds", "2"])
    err = capsys.readouterr().err
    assert "SB seed 0:" not in err and "LB seed 0:" not in err and "GN@λ=0.1 seed 1:" in err
    saved = json.loads((grown / "config.json").read_text())["config"]
    assert saved["methods"] == ["SB", "LB", "GN@λ=0.1"] and saved["seeds"] == 2
    whole = tmp_path / "whole"
    _run(whole, "--methods", "SB", "LB", "GN@λ=0.1", "--seeds", "2")
    assert _strip_wall(grown / "runs.json") == _strip_wall(whole / "runs.json")


@pytest.mark.parametrize("option, named", [(["--steps", "6"], "steps (saved 4, given 6)"),
                                           (["--lr", "LB=0.5"], "lr"), (["--seeds", "1"], "can add seeds"),
                                           (["--preset", "fmnist"], "holds preset")])
def test_resume_refuses_options_that_would_change_the_saved_runs(tmp_path, option, named):
    out = tmp_path / "run"
    _run(out, "--methods", "LB", "--seeds", "2", "--time-budget", "0.001")
    before = (out / "config.json").read_text()
    with pytest.raises(SystemExit, match="--resume") as raised:
        reproduce.main(["--resume", "--out", str(out), "--no-progress", *option])
    assert named in str(raised.value)
    assert (out / "config.json").read_text() == before
