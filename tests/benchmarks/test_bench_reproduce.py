"""benchmarks/reproduce.py: method parsing, presets, tiny end-to-end runs on synthetic data, resume."""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from benchmarks import report, reproduce

TINY = ["--dataset", "synthetic", "--widths", "4", "8", "--batch-size", "16", "--micro-batch-size", "4",
        "--eval-every", "2", "--eval-size", "0", "--test-size", "0", "--bn-recalibrate", "2", "--no-progress",
        "--threads", "1"]


def _run(tmp_path, name, *extra):
    out = tmp_path / name
    reproduce.main([*TINY, "--out", str(out), *extra])
    return out


def _rows(out):
    with open(out / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_parse_method():
    assert reproduce.parse_method("GN") == reproduce.MethodSpec("GN", "GN", None)
    assert reproduce.parse_method("GN-|M|=2560") == reproduce.MethodSpec("GN-|M|=2560", "GN", 2560)
    assert reproduce.parse_method("GRAFT-ext").base == "GRAFT-ext"
    for bad in ("XX", "GN-|M|=", "gn", "GN-|M|=0"):
        with pytest.raises(ValueError):
            reproduce.parse_method(bad)


def test_run_order_puts_sb_first_and_adds_it_when_needed():
    assert [s.name for s in reproduce.run_order(["GN", "GRAFT-ext"])] == ["SB", "GN", "GRAFT-ext"]
    assert [s.name for s in reproduce.run_order(["LB", "SB"])] == ["SB", "LB"]
    assert [s.name for s in reproduce.run_order(["LB", "GN"])] == ["LB", "GN"]


def test_paper_hyperparameters():
    config = reproduce.build_config(reproduce.make_parser().parse_args(["--preset", "cifar100-resnet18"]))
    resolved = config["resolved"]
    assert (config["batch_size"], config["micro_batch_size"], config["eval_every"]) == (5120, 128, 20)
    assert resolved["LB"]["lr"] == 0.5 and resolved["SB"]["lr"] == 0.1 and resolved["SB"]["batch_size"] == 128
    assert resolved["AJ"]["penalty"] == 5e-5 and resolved["UJ"]["penalty"] == 1e-3 and resolved["GN"]["penalty"] == 0.01
    assert resolved["GRAFT-iter"]["lr"] == 0.1 and resolved["NGD"]["lr"] is None  # NGD: from SB's run
    assert resolved["FT-|M|=2560"]["micro_batch_size"] == 2560 and resolved["FT-|M|=2560"]["batch_size"] == 5120
    vgg = reproduce.build_config(reproduce.make_parser().parse_args(["--preset", "cifar10-vgg11"]))["resolved"]
    assert vgg["SB"]["lr"] == 0.15 and vgg["LB"]["lr"] == 0.01 and vgg["GN"]["penalty"] == 0.5 and "UJ" not in vgg
    for name, preset in reproduce.PRESETS.items():
        assert preset.get("paper_test_acc") is None or set(preset["paper_test_acc"]) <= set(preset["methods"]), name
    args = reproduce.make_parser().parse_args(["--lr", "0.05", "GN=0.2", "--penalty", "GN=0", "--method",
                                               "finite_difference", "--momentum", "0.9"])
    config = reproduce.build_config(args)
    assert config["resolved"]["LB"]["lr"] == 0.05 and config["resolved"]["GN"]["lr"] == 0.2
    assert config["resolved"]["GN"]["penalty"] == 0.0 and config["grad_method"] == "finite_difference"
    assert config["momentum"] == 0.9


def test_every_method_end_to_end(tmp_path):
    """One tiny run of every method: the outputs exist and say what they should."""
    methods = list(reproduce.BASE_METHODS) + ["GN-|M|=8"]
    out = _run(tmp_path, "all", "--steps", "4", "--methods", *methods)
    for name in ("summary.md", "curves.png", "metrics.csv", "config.json", "runs.json"):
        assert (out / name).stat().st_size > 0, name
    rows = _rows(out)
    assert tuple(rows[0]) == report.METRIC_FIELDS
    assert sorted({r["method"] for r in rows}) == sorted(methods)
    assert len(rows) == 2 * len(methods)  # evaluations at steps 2 and 4
    for r in rows:
        assert 0 <= float(r["heldout_acc"]) <= 1 and math.isfinite(float(r["train_loss"]))
        assert float(r["micro_grad_sq_norm"]) > 0
        assert (float(r["penalty"]) > 0) == (r["method"] in ("GN", "FT", "AJ", "UJ", "GN-|M|=8"))
    by_method = {r["method"]: r for r in json.loads((out / "runs.json").read_text())}
    assert by_method["SB"]["epochs"] * 4 == pytest.approx(by_method["LB"]["epochs"])  # |B| = 4 |M|
    assert by_method["GRAFT-iter"]["lr"] == by_method["SB"]["lr"]
    assert 0 < by_method["NGD"]["lr"] != by_method["SB"]["lr"]  # lr · mean ‖g‖ of SB
    assert all(r["steps"] == 4 and 0 <= r["test_acc"] <= 1 for r in by_method.values())
    config = json.loads((out / "config.json").read_text())
    assert config["config"]["steps"] == 4 and "torch" in config["environment"]["versions"]
    assert config["environment"]["device_name"].startswith("cpu")
    summary = (out / "summary.md").read_text()
    assert all(f"`{m}`" in summary for m in methods) and "Large-batch gap" in summary


def test_same_initialization_and_data_for_every_method(tmp_path):
    """GN with λ = 0 is LB: same init, same batches, same trajectory; seeds differ."""
    out = _run(tmp_path, "same", "--steps", "4", "--methods", "LB", "GN", "--penalty", "GN=0", "--seeds", "2")
    rows = _rows(out)
    for seed in ("0", "1"):
        lb = [r for r in rows if r["method"] == "LB" and r["seed"] == seed]
        gn = [r for r in rows if r["method"] == "GN" and r["seed"] == seed]
        assert [r["train_loss"] for r in lb] == [r["train_loss"] for r in gn]
    assert [r["train_loss"] for r in rows if r["seed"] == "0"] != [r["train_loss"] for r in rows if r["seed"] == "1"]


def test_resume_after_interruption_gives_the_same_run(tmp_path):
    args = ["--steps", "6", "--checkpoint-every", "2", "--methods", "SB", "FT", "GRAFT-ext"]
    full = _run(tmp_path, "full", *args)
    with pytest.raises(reproduce.Interrupted):
        _run(tmp_path, "cut", *args, "--interrupt-after", "9")  # SB done, FT stopped at step 3
    cut = tmp_path / "cut"
    assert (cut / "checkpoints" / "seed0_FT.pt").exists() and not (cut / "summary.md").read_text().count("`FT`")
    reproduce.main(["--resume", "--out", str(cut), "--no-progress"])
    columns = ("method", "seed", "step", "train_loss", "heldout_acc", "micro_grad_sq_norm", "penalty")
    strip = lambda rows: [tuple(r[c] for c in columns) for r in rows]  # noqa: E731
    assert strip(_rows(cut)) == strip(_rows(full))
    assert json.loads((cut / "config.json").read_text())["config"]["methods"] == ["SB", "FT", "GRAFT-ext"]


def test_divergence_is_recorded_not_fatal(tmp_path):
    out = _run(tmp_path, "nan", "--steps", "4", "--methods", "SB", "LB", "--lr", "1e30")
    results = {r["method"]: r for r in json.loads((out / "runs.json").read_text())}
    assert results["LB"]["diverged_at"] is not None and results["SB"]["diverged_at"] is not None
    assert "diverged" in (out / "summary.md").read_text()


def test_bn_recalibration_reproduces_population_statistics():
    from benchmarks import data as data_lib

    data = data_lib.load("synthetic", num_train=64, num_heldout=8, num_test=8, shape=(1, 6, 6))
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.BatchNorm1d(36))
    model[1].running_mean.fill_(100.0)
    reproduce.recalibrate_batchnorm(model, data, num_batches=4, batch_size=16, seed=0)
    x = data.normalize(data.train.images).flatten(1)
    torch.testing.assert_close(model[1].running_mean, x.mean(0))  # 4 × 16 = every training example
    assert model[1].momentum == 0.1 and model.training


def test_cifar_resnet18_end_to_end_on_fake_files(tmp_path, monkeypatch):
    """The CIFAR path: torchvision-format pickles, on-device crop+flip, ResNet-18, paper-preset plumbing."""
    from conftest import make_fake_cifar, trust_fake_cifar

    monkeypatch.delenv("REGOPT_DATA", raising=False)
    make_fake_cifar(tmp_path / "data", "cifar10", per_batch=6)
    trust_fake_cifar(monkeypatch, tmp_path / "data")
    out = tmp_path / "cifar"
    reproduce.main(["--preset", "cifar10-resnet18", "--data-root", str(tmp_path / "data"), "--train-size", "16",
                    "--heldout-size", "8", "--batch-size", "8", "--micro-batch-size", "4", "--steps", "1",
                    "--eval-every", "1", "--methods", "SB", "GN", "--out", str(out), "--no-progress"])
    results = json.loads((out / "runs.json").read_text())
    assert [r["method"] for r in results] == ["SB", "GN"] and all(r["steps"] == 1 for r in results)
    summary = (out / "summary.md").read_text()
    assert "paper test" in summary and "92.64" in summary and "91.75" in summary


def test_missing_data_is_a_clear_exit(tmp_path, monkeypatch):
    """A preset that needs the full Fashion-MNIST (quick runs on the embedded subset) says how to get it."""
    from benchmarks import data as data_lib

    monkeypatch.delenv("REGOPT_DATA", raising=False)
    monkeypatch.setattr(data_lib, "DEBIAN_FASHION_MNIST", tmp_path / "none")
    with pytest.raises(SystemExit, match="apt-get install dataset-fashion-mnist"):
        reproduce.main(["--preset", "fmnist", "--data-root", str(tmp_path / "root"), "--out", str(tmp_path / "out"),
                        "--no-progress"])
    assert not (tmp_path / "out" / "runs.json").exists()


def test_unknown_inputs_fail_clearly(tmp_path):
    with pytest.raises(SystemExit):
        reproduce.main(["--preset", "nope", "--out", str(tmp_path / "x")])
    with pytest.raises(SystemExit):
        reproduce.main([*TINY, "--methods", "GN-|M|=x", "--out", str(tmp_path / "y")])
    with pytest.raises(SystemExit):
        reproduce.main(["--resume", "--out", str(tmp_path / "missing")])


STALL_S = 300  # no new output and no file written for this long: a hang (a loaded machine is slow, not silent)


def _progress_signature(paths) -> tuple:
    """The sizes and modification times of every file under ``paths``: it changes whenever anything is written."""
    files = [f for p in paths if p.exists() for f in ([p] if p.is_file() else sorted(p.rglob("*"))) if f.is_file()]
    return tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files)


def _wait_while_progressing(proc, paths, stall_s: float = STALL_S) -> None:
    """Wait for ``proc``; end its session and fail when nothing under ``paths`` changed for ``stall_s`` seconds."""
    signature, changed = None, time.monotonic()
    while True:
        try:
            proc.wait(timeout=1.0)
            return
        except subprocess.TimeoutExpired:
            pass
        now, current = time.monotonic(), _progress_signature(paths)
        if current != signature:
            signature, changed = current, now
        elif now - changed > stall_s:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            pytest.fail(f"torchrun wrote nothing for {stall_s} s (a hang); its output:\n"
                        f"{paths[0].read_text()[-3000:]}")


def test_the_torchrun_wait_ends_a_stall_not_a_slow_run(tmp_path):
    log = tmp_path / "out.log"
    with open(log, "w") as out:  # prints for 7 s or more, never silent for 5 s: runs to its end
        slow = subprocess.Popen([sys.executable, "-c", "import time\nfor i in range(14): print(i, flush=True); "
                                 "time.sleep(0.5)"], stdout=out, start_new_session=True)
        _wait_while_progressing(slow, [log], stall_s=5.0)
    assert slow.returncode == 0 and log.read_text().split() == [str(i) for i in range(14)]
    silent = subprocess.Popen(["sleep", "600"], start_new_session=True)
    with pytest.raises(pytest.fail.Exception, match="wrote nothing for 1.0 s"):
        _wait_while_progressing(silent, [log], stall_s=1.0)
    assert silent.returncode == -signal.SIGKILL


@pytest.mark.slow
def test_torchrun_two_ranks_match_one_process(tmp_path):
    """Under torchrun (gloo, 2 CPU ranks) LB and GN take the same steps as one process."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(reproduce.__file__)
    args = [*TINY, "--steps", "4", "--methods", "LB", "GN"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
    # A new session, so that a stall can end the launcher and its two workers together.
    log = tmp_path / "torchrun.log"
    with open(log, "w") as output_file:
        proc = subprocess.Popen([*cmd, *args, "--out", str(tmp_path / "two")], env=env, start_new_session=True,
                                stdout=output_file, stderr=subprocess.STDOUT, text=True)
        _wait_while_progressing(proc, [log, tmp_path / "two"])
    output = log.read_text()
    assert proc.returncode == 0, output[-3000:]
    _run(tmp_path, "one", "--steps", "4", "--methods", "LB", "GN")
    columns = ("method", "step", "train_loss", "micro_grad_sq_norm", "penalty")
    one = [[float(r[c]) if c != "method" else r[c] for c in columns] for r in _rows(tmp_path / "one")]
    two = [[float(r[c]) if c != "method" else r[c] for c in columns] for r in _rows(tmp_path / "two")]
    assert [r[:2] for r in one] == [r[:2] for r in two]
    for a, b in zip(one, two):
        assert a[2:] == pytest.approx(b[2:], rel=1e-4)
