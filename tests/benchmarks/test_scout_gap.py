"""benchmarks/scout_gap.sh --smoke: the scouting script runs SB and LB per setting, one reproduce.py folder each,
and resumes a folder when run again."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import make_fake_fashion_mnist

ROOT = Path(__file__).resolve().parents[2]


def scout(out: Path, data: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, "REGOPT_DATA": str(data), "JOBS_OVERRIDE": "1"}
    return subprocess.run(["bash", str(ROOT / "benchmarks" / "scout_gap.sh"), str(out), "--smoke", *args],
                          capture_output=True, text=True, env=env)


def test_each_setting_gets_its_folder_with_sb_and_lb_and_a_rerun_adds_seeds(tmp_path):
    data = tmp_path / "fmnist"
    make_fake_fashion_mnist(data, num_train=64, num_test=16)
    out = tmp_path / "scout"
    first = scout(out, data, "--seeds", "1", "--only", "base", "wide")
    assert first.returncode == 0, first.stdout + first.stderr
    for name, widths in (("base", [16, 32, 64]), ("wide", [32, 64, 128])):
        config = json.loads((out / name / "config.json").read_text())["config"]
        assert config["preset"] == "fmnist" and config["model_kwargs"]["widths"] == widths
        runs = json.loads((out / name / "runs.json").read_text())
        assert sorted((r["method"], r["seed"]) for r in runs) == [("LB", 0), ("SB", 0)]
    again = scout(out, data, "--seeds", "2", "--only", "base")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "--resume" in again.stdout
    runs = json.loads((out / "base" / "runs.json").read_text())
    assert sorted((r["method"], r["seed"]) for r in runs) == [("LB", 0), ("LB", 1), ("SB", 0), ("SB", 1)]


def test_an_unknown_setting_is_refused(tmp_path):
    proc = scout(tmp_path / "scout", tmp_path, "--only", "huge")
    assert proc.returncode == 2 and "unknown setting: huge" in proc.stderr
