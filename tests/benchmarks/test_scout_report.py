"""benchmarks/scout_report.py: the scouting table and the setting its rule chooses, from reproduce.py folders."""

from __future__ import annotations

import json

import pytest

from benchmarks import report, scout_report


def _config(widths=(8, 16, 32)):
    return {"dataset": "fashion-mnist", "model": "small-cnn", "model_kwargs": {"widths": list(widths)},
            "batch_size": 64, "micro_batch_size": 8, "steps": 100, "eval_every": 10, "bn_recalibrate": 2,
            "eval_size": None, "test_size": None, "resolved": {"SB": {"batch_size": 8}, "LB": {"batch_size": 64}}}


def _folder(tmp_path, name, gaps, widths=(8, 16, 32)):
    """A reproduce.py folder whose SB beats LB by ``gaps[s]`` (fraction) on seed s, in every measure."""
    folder = tmp_path / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"config": _config(widths), "environment": {"git_commit": "abc"}}))
    runs, rows = [], []
    for seed, gap in enumerate(gaps):
        for method, acc in (("SB", 0.85 + gap), ("LB", 0.85)):
            runs.append({"method": method, "seed": seed, "best_heldout_acc": acc + 0.01, "test_acc": acc,
                         "wall_s": 10.0 if method == "SB" else 30.0})
            rows += [{"method": method, "seed": seed, "step": step, "heldout_acc": acc - (0.05 if step < 50 else 0)}
                     for step in range(10, 101, 10)]
    (folder / "runs.json").write_text(json.dumps(runs))
    report.write_metrics_csv(folder / "metrics.csv", rows)
    return folder


def test_run_flops_counts_training_and_every_evaluation():
    config = _config()
    flops = scout_report.run_flops(config, "LB", forward=1.0)
    assert flops == 3 * 100 * 64 + 10 * (2 * 8 + 10_000) + 10_000
    assert scout_report.run_flops(config, "SB", forward=1.0) == flops - 3 * 100 * (64 - 8)
    narrow = scout_report.forward_flops_per_image(config)
    assert scout_report.forward_flops_per_image(_config((16, 32, 64))) > 3 * narrow  # conv FLOPs grow as width²


def test_the_rule_picks_the_largest_held_out_gap_per_flop_among_settings_with_enough_seeds(tmp_path):
    cheap = scout_report.load_setting(_folder(tmp_path, "cheap", [0.004, 0.006, 0.005, 0.005]))
    wide = scout_report.load_setting(_folder(tmp_path, "wide", [0.008, 0.010, 0.009, 0.009], widths=(16, 32, 64)))
    few = scout_report.load_setting(_folder(tmp_path, "few", [0.05, 0.05]))
    assert wide.gap("best_heldout").mean > cheap.gap("best_heldout").mean and wide.pflop_per_pair > 3 * cheap.pflop_per_pair
    assert scout_report.choose([cheap, wide, few], min_seeds=4) is cheap
    assert scout_report.choose([cheap, wide, few], min_seeds=2) is few
    assert cheap.gap("last_heldout").mean == pytest.approx(0.005) and cheap.positive_seeds() == 4
    table = scout_report.scouting_table([cheap, wide, few])
    assert "| `cheap` | 4 | +0.50 [" in table and "4 of 4" in table
    assert table.rstrip().endswith("at least 4 seeds): `cheap`.")


def test_cli_writes_the_table_and_refuses_a_seed_minimum_below_two(tmp_path, capsys):
    folder = _folder(tmp_path, "base", [0.004, 0.006])
    assert scout_report.main([str(folder), "--out", str(tmp_path / "t.md"), "--min-seeds", "2"]) == 0
    assert "`base`" in (tmp_path / "t.md").read_text() and "`base`" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        scout_report.main([str(folder), "--min-seeds", "1"])
    assert "--min-seeds must be at least 2" in capsys.readouterr().err
