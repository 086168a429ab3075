"""benchmarks/gpu_check.sh --smoke: every part of the GPU kit runs on the CPU and leaves well-formed files.

A GPU run of the kit is expensive and often the only one a change gets, so this keeps every code path it
takes (the scripts, the options, the output files) exercised on every CI run.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from conftest import make_fake_fashion_mnist

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
pytestmark = pytest.mark.slow  # about a minute on 2 idle cores: three parts, each its own processes

FILES = {"gpu_check.log", "tests.md", "tests.json", "speed.md", "speed.json", "repro.md", "repro.json", "repro.tar.gz"}


def run_kit(out: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    environ = {**os.environ, "PYTHON": sys.executable, **env}
    environ.pop("REGOPT_TEST_DEVICE", None)
    environ.pop("REGOPT_TEST_DEVICES", None)
    return subprocess.run(["bash", str(SCRIPT), str(out), *args], capture_output=True, text=True, env=environ,
                          timeout=600)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("gpu_check")
    return out, run_kit(out, "all", "--smoke")


def test_smoke_run_passes_and_leaves_exactly_the_eight_flat_files(smoke):
    out, proc = smoke
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert {p.name for p in out.iterdir()} == FILES  # a flat folder of at most 8 files: easy to copy back from a remote machine
    assert all(p.is_file() and p.stat().st_size > 0 for p in out.iterdir())
    log = (out / "gpu_check.log").read_text()
    assert log == proc.stdout  # everything printed is in the log
    assert "overall: PASSED" in log and log.count("(exit 0,") == 3
    for part in ("tests", "speed", "repro"):
        info = json.loads((out / f"{part}.json").read_text())["part"]
        assert info["status"] == "passed" and info["exit_code"] == 0 and info["seconds"] >= 0, part
        assert (out / f"{part}.md").read_text().startswith(f"<!-- gpu_check part {part}: passed")


def test_smoke_tests_part_counts_as_passed_only_the_checks_that_compare_two_devices(smoke):
    """On the CPU the kit runs test_cuda.py's code (its two-device comparisons, CPU against CPU here) and
    collects test_device_paths.py on CUDA alone (the default suite runs it on the CPU), which skips."""
    out, _ = smoke
    result = json.loads((out / "tests.json").read_text())
    outcomes = {t["name"]: t["outcome"] for t in result["tests"]}
    passed = sorted(n for n, outcome in outcomes.items() if outcome == "passed")
    two_devices = sorted(n for n in outcomes if n.startswith("test_cuda::test_float64_step_on_device_equals_the_cpu_step"))
    assert result["device"] == "cpu" and result["counts"]["failed"] == result["counts"]["error"] == 0
    assert two_devices and passed == two_devices and result["counts"]["passed"] == len(passed)
    device_paths = [n for n in outcomes if n.startswith("test_device_paths::")]
    assert device_paths and all(outcomes[n] == "skipped" and "[cuda" in n for n in device_paths)
    assert any("no_host_sync" in n for n in outcomes)  # the older CUDA test runs too (it skips on the CPU)
    assert f"{len(passed)} passed" in (out / "tests.md").read_text()


def test_the_tests_part_ends_a_stall_not_a_slow_run(tmp_path):
    """run_watched ends a command whose output stops growing (exit 124), and lets one that keeps printing
    run past the same stall limit to its own exit status."""
    function = re.search(r"^run_watched\(\) \{.*?^\}", SCRIPT.read_text(), re.MULTILINE | re.DOTALL).group(0)
    script = (f"WORK={tmp_path}\n{function}\n"
              "run_watched 2 600 bash -c 'echo started; exec sleep 600'; echo \"stalled: $?\"\n"
              "run_watched 2 600 bash -c 'for i in 1 2 3 4 5 6; do echo $i; sleep 1; done; exit 3'; echo \"slow: $?\"\n")
    proc = subprocess.run(["bash", "-c", script], capture_output=True, text=True)
    lines = proc.stdout.splitlines()
    assert "no output for 2 s: a hang; ended" in lines and "stalled: 124" in lines
    assert lines[-7:] == ["1", "2", "3", "4", "5", "6", "slow: 3"]


def test_smoke_speed_part_has_every_table_row_and_target(smoke):
    out, _ = smoke
    suite = json.loads((out / "speed.json").read_text())
    assert suite["complete"] and suite["smoke"]
    tables = {t["table"]: t for t in suite["tables"]}
    assert list(tables) == ["resnet18", "fmnist-cnn", "fmnist-cnn-compiled", "resnet18-compiled"]
    expected = {"SGD-accum", "LB", "GN-exact", "GN-finite_difference", "GN-reference", "FT-exact",
                "FT-finite_difference", "SGD-accum-bf16", "LB-bf16", "GN-exact-bf16", "GN-finite_difference-bf16"}
    for name in ("resnet18", "fmnist-cnn"):
        rows = {r["method"]: r for r in tables[name]["rows"]}
        assert set(rows) == expected, name
        assert all(r["status"] == "ok" and r["ms_per_step"] > 0 and len(r["times_ms"]) == 2 for r in rows.values())
        assert rows["SGD-accum"]["ratio_to_sgd_accum"] == 1.0 and rows["GN-exact-bf16"]["autocast"] == "bfloat16"
    assert tables["resnet18"]["config"]["model"] == "resnet18" and tables["fmnist-cnn"]["config"]["model"] == "small-cnn"
    for name in ("fmnist-cnn-compiled", "resnet18-compiled"):
        rows = {r["method"]: r for r in tables[name]["rows"]}
        compiled = rows["GN-finite_difference-compiled"]
        assert compiled["status"] == "ok" and compiled["compiled"] and compiled["compile_s"] is not None
        assert tables[name]["dynamo"]["unique_graphs"] >= 1
    targets = tables["resnet18"]["targets"]
    assert [(t["row"], t["quantity"]) for t in targets] == [
        ("GN-exact", "ratio_to_sgd_accum"), ("GN-finite_difference", "ratio_to_sgd_accum"),
        ("LB", "ratio_to_sgd_accum"), ("GN-exact", "peak_mib")]
    assert all(t["reached"] in (True, False) for t in targets[:3]) and targets[3]["reached"] is None  # no CUDA
    text = (out / "speed.md").read_text()
    assert "## CIFAR ResNet-18" in text and "Targets (H100" in text and "| GN-finite_difference-compiled |" in text


def test_smoke_repro_part_keeps_the_runs_and_the_whole_folder(smoke):
    out, _ = smoke
    result = json.loads((out / "repro.json").read_text())
    methods = {r["method"] for r in result["runs"]}
    assert methods == {"SB", "GN", "GRAFT-ext", "GN@λ=0.03-|M|=8"}
    assert result["config"]["config"]["preset"] == "fmnist" and "--time-budget" in result["command"]
    assert result["part"]["mps"] == "not tried (--smoke)"
    with tarfile.open(out / "repro.tar.gz") as tar:
        names = set(tar.getnames())
    assert {"repro/summary.md", "repro/runs.json", "repro/config.json", "repro/metrics.csv"} <= names
    assert "GN@λ=0.03-|M|=8" in (out / "repro.md").read_text()


def test_a_failing_part_is_reported_and_fails_the_run(tmp_path):
    proc = run_kit(tmp_path, "repro", "--smoke", REPRO_ARGS="--steps 0")  # reproduce.py refuses 0 steps
    assert proc.returncode == 1
    info = json.loads((tmp_path / "repro.json").read_text())["part"]
    assert info["status"] == "failed" and info["exit_code"] != 0
    assert (tmp_path / "repro.md").read_text().startswith("<!-- gpu_check part repro: failed")
    assert "overall: FAILED" in (tmp_path / "gpu_check.log").read_text()
    assert not any(p.is_dir() for p in tmp_path.iterdir())


def test_bad_usage_exits_2(tmp_path):
    assert run_kit(tmp_path, "everything").returncode == 2
    assert subprocess.run(["bash", str(SCRIPT)], capture_output=True).returncode == 2


def test_mps_daemon_is_started_probed_and_stopped(tmp_path):
    """The real (not --smoke) repro part with a stand-in nvidia-cuda-mps-control that records its calls.

    Without a GPU the probe fails, so the daemon must be stopped again and the part goes on (and then
    fails: reproduce.py finds no CUDA); on a GPU the same path leaves MPS running for the workers.
    """
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls.txt"
    bin_dir.mkdir()
    fake = bin_dir / "nvidia-cuda-mps-control"
    fake.write_text("#!/usr/bin/env bash\n"  # records "-d", or what it is told on stdin ("quit")
                    f'if [ $# -gt 0 ]; then echo "$*" >> {calls}; else read -r line; echo "stdin:$line" >> {calls}; fi\n')
    fake.chmod(0o755)
    data = tmp_path / "data"
    make_fake_fashion_mnist(data)  # found through $REGOPT_DATA when .fmnist/ is absent
    out = tmp_path / "out"
    proc = run_kit(out, "repro", PATH=f"{bin_dir}:{os.environ['PATH']}", REPRO_OUT=str(tmp_path / "work" / "repro"),
                   REGOPT_DATA=str(data), CUDA_VISIBLE_DEVICES="")
    mps = json.loads((out / "repro.json").read_text())["part"]["mps"]
    assert mps == "started, but a CUDA client failed under it: stopped, workers run without MPS", proc.stdout[-3000:]
    assert calls.read_text().splitlines() == ["-d", "stdin:quit"]
    assert proc.returncode == 1 and "--device cuda" in json.loads((out / "repro.json").read_text())["command"]
