"""benchmarks/report.py: the CSV, summary and plot writers."""

from __future__ import annotations

import json
import math

import pytest

from benchmarks import report


def _rows():
    rows = []
    for method, acc, norm in (("SB", 0.90, 2.0), ("LB", 0.80, 4.0), ("GN", 0.88, 2.2)):
        for seed in (0, 1):
            for step in (10, 20, 30, 40, 50, 60, 70, 80, 90, 100):
                rows.append({"method": method, "seed": seed, "step": step, "epoch": step / 10,
                             "train_loss": 1.0 / step, "heldout_acc": acc - 0.01 * seed - 0.1 / step,
                             "micro_grad_sq_norm": norm * (1 + step / 100), "penalty": 0.0, "lr": 0.1,
                             "wall_s": float(step)})
    return rows


def _results():
    out = []
    for method, acc in (("SB", 0.90), ("LB", 0.80), ("GN", 0.88)):
        for seed in (0, 1):
            out.append({"method": method, "seed": seed, "best_heldout_acc": acc - 0.01 * seed, "best_step": 100,
                        "final_heldout_acc": acc - 0.01 * seed - 0.001, "test_acc": acc - 0.01 * seed,
                        "steps": 100, "epochs": 10.0, "wall_s": 12.0, "diverged_at": None, "lr": 0.1})
    return out


CONFIG = {"preset": "unit", "dataset": "synthetic", "model": "small-cnn", "batch_size": 64, "micro_batch_size": 8,
          "steps": 100, "eval_every": 10, "momentum": 0.0, "weight_decay": 0.0, "grad_method": "exact",
          "methods": ["SB", "LB", "GN"], "resolved": {"GN": {"lr": 0.1, "penalty": 0.01}},
          "paper_test_acc": {"SB": 92.64, "LB": 89.83}}


def test_metrics_csv_round_trip(tmp_path):
    rows = _rows()
    rows[0]["heldout_acc"] = math.nan
    report.write_metrics_csv(tmp_path / "m.csv", rows)
    header = (tmp_path / "m.csv").read_text().splitlines()[0]
    assert header == ",".join(report.METRIC_FIELDS)
    back = report.read_metrics_csv(tmp_path / "m.csv")
    assert len(back) == len(rows) and math.isnan(back[0]["heldout_acc"])
    assert back[1]["step"] == rows[1]["step"] and back[1]["train_loss"] == pytest.approx(rows[1]["train_loss"], rel=1e-5)


def test_mean_std():
    assert report.fmt_mean_std([0.9, 0.8], 100) == "85.00 ± 7.07"
    assert report.fmt_mean_std([0.9], 100) == "90.00"
    assert report.fmt_mean_std([math.nan, None]) == "—"


def test_grad_norm_phases():
    phases = report.grad_norm_phases(_rows(), steps=100)
    early, late = phases[("LB", 0)]
    assert early == pytest.approx(4.0 * 1.1) and late == pytest.approx(4.0 * 2.0)


def test_summary_table_and_gap(tmp_path):
    text = report.summary_markdown(_rows(), _results(), CONFIG)
    lines = text.splitlines()
    header = next(line for line in lines if line.startswith("| method | lr"))
    assert "paper test" in header and "‖g‖² early" in header and "wall s" in header
    sb = next(line for line in lines if line.startswith("| `SB`"))
    assert "89.50 ± 0.71" in sb and "92.64" in sb
    assert "| `GN` | 0.1 | 0.01 |" in text
    assert "SB − LB test accuracy: +10.00 points" in text
    gn = next(line for line in lines if line.startswith("| `GN` | +8.00"))
    assert gn.endswith("| 0.80 | closes part of the gap (over these seeds, within evaluation noise) |")


def test_no_gap_is_said_plainly_and_no_fraction_of_it_is_claimed():
    results = [dict(r, test_acc=0.8) for r in _results()]
    text = report.summary_markdown(_rows(), results, CONFIG)
    assert "**Not distinguishable: these 2 seeds do not establish a large-batch gap.**" in text
    gn = next(line for line in text.splitlines() if line.startswith("| `GN` | +0.00"))
    assert "| — | not distinguishable from LB |" in gn


def test_plot_and_cli(tmp_path):
    report.write_all(tmp_path, _rows(), _results(), CONFIG)
    png = (tmp_path / "curves.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) < 300_000
    (tmp_path / "config.json").write_text(json.dumps({"config": CONFIG}))
    (tmp_path / "summary.md").unlink()
    assert report.main([str(tmp_path)]) == 0
    summary = (tmp_path / "summary.md").read_text()
    assert "Large-batch gap" in summary and "preset `unit`" in summary


def test_the_lead_says_what_a_short_run_shows_and_where_the_accuracy_verdict_is():
    results = [dict(r, test_acc=0.8) for r in _results()]  # no accuracy gap, as in a one-minute run
    text = report.summary_markdown(_rows(), results, CONFIG)
    lead = text.split("## What this run shows", 1)[1].split("\n\n")[1]  # steps 20 (second evaluation) to 25
    assert "LB's average micro-batch ‖g‖² is 4.8, 2.00× SB's 2.4: higher on 2 of 2 seeds (on every seed: the " \
           "premise of the paper's penalties)." in lead
    assert "The penalties move it: `GN` (λ = 0.01) 2.64, -45% against LB, lower on 2 of 2 seeds." in lead
    assert "this run does not establish a large-batch gap (2 seeds, 100 steps)" in lead
    assert "`--preset fmnist-5k`" in lead and "benchmarks/RESULTS_fmnist.md" in lead
    established = report.summary_markdown(_rows(), [dict(r, test_acc=r["test_acc"] + 0.002 * r["seed"])
                                                     for r in _results()], dict(CONFIG, dataset="fashion-mnist"))
    assert "- Accuracy: SB beats LB in test accuracy beyond seed and evaluation noise (below)." in established


def test_figure_groups_methods_and_names_lambda():
    config = dict(CONFIG, resolved={"GN": {"penalty": 0.01}, "GN@λ=0.03": {"penalty": 0.03}, "SB": {"penalty": None}})
    assert report.method_label("GN", config) == "GN (λ=0.01)"
    assert report.method_label("GN@λ=0.03", config) == "GN@λ=0.03" and report.method_label("SB", config) == "SB"
    colours = report.method_colours(["SB", "LB", "GN", "GN@λ=0.03", "FT"])
    assert colours["GN"] != colours["GN@λ=0.03"]
    assert all(colours[m][2] > colours[m][0] for m in ("GN", "GN@λ=0.03"))  # both blue
    assert colours["FT"][1] > colours["FT"][0] and colours["LB"][0] > colours["LB"][2]  # green, red
    xs, means, band = report._mean_band(_rows(), "LB", "micro_grad_sq_norm", 1.0, log=True)
    assert xs[0] == 10 and means[0] == pytest.approx(4.4) and band is None  # both seeds equal: no band
    xs, means, band = report._mean_band(_rows(), "SB", "heldout_acc", 100.0)
    assert means[-1] == pytest.approx(100 * (0.895 - 0.001)) and band[1][-1] - band[0][-1] == pytest.approx(2 * 0.7071, rel=1e-3)


def test_a_run_without_sb_and_lb_claims_no_gap():
    rows = [r for r in _rows() if r["method"] == "GN"]
    results = [r for r in _results() if r["method"] == "GN"]
    text = report.summary_markdown(rows, results, dict(CONFIG, methods=["GN"]))
    assert "this run has no SB and LB pair, so it measures no large-batch gap" in text
    assert "| `GN` | 0.01 | 2.64 | — | — |" in text and "nan" not in text
