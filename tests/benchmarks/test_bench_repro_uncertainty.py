"""benchmarks/repro/uncertainty.py and the summary's uncertainty table: known inputs give known numbers."""

from __future__ import annotations

import math
import statistics

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from benchmarks import report
from benchmarks.repro import uncertainty


def test_t_quantile_matches_closed_forms_and_tables():
    # df = 1: Cauchy, t = tan(c·π/2); df = 2: P(|T| <= t) = t/√(t²+2), so t = √(2c²/(1−c²)).
    for c in (0.9, 0.95, 0.99):
        assert uncertainty.t_quantile(c, 1) == pytest.approx(math.tan(c * math.pi / 2), rel=1e-9)
        assert uncertainty.t_quantile(c, 2) == pytest.approx(math.sqrt(2 * c * c / (1 - c * c)), rel=1e-9)
    # Printed tables (two-sided 95%): df 3, 4, 10, 30; and the normal limit.
    for df, t in ((3, 3.182), (4, 2.776), (10, 2.228), (30, 2.042)):
        assert uncertainty.t_quantile(0.95, df) == pytest.approx(t, abs=5e-4)
    assert uncertainty.t_quantile(0.95, 2000) == pytest.approx(1.95996, abs=2e-3)
    assert uncertainty.t_quantile(0.99, 5) == pytest.approx(4.032, abs=5e-4)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 60), st.floats(0.5, 0.999))
def test_t_quantile_inverts_the_distribution(df, c):
    t = uncertainty.t_quantile(c, df)
    assert uncertainty._two_sided_t_probability(t, df) == pytest.approx(c, abs=1e-9)
    assert t > uncertainty.t_quantile(c, df + 1)  # heavier tails with fewer degrees of freedom


def test_paired_interval_known_numbers():
    sb = {0: 0.90, 1: 0.88, 2: 0.89, 3: math.nan}
    lb = {0: 0.88, 1: 0.89, 2: 0.86, 4: 0.80}
    d = uncertainty.paired_differences(sb, lb)
    assert d == pytest.approx([0.02, -0.01, 0.03])  # seeds 0-2: the only ones finite in both
    interval = uncertainty.mean_interval(d)
    t2 = math.sqrt(2 * 0.95 ** 2 / (1 - 0.95 ** 2))
    half = t2 * statistics.stdev([0.02, -0.01, 0.03]) / math.sqrt(3)
    assert interval.mean == pytest.approx(0.04 / 3) and interval.n == 3
    assert interval.half_width == pytest.approx(half) and interval.low == pytest.approx(0.04 / 3 - half)
    assert interval.includes_zero
    assert not uncertainty.mean_interval([0.02, 0.021, 0.019]).includes_zero
    assert uncertainty.mean_interval([0.02]) is None


def test_closed_fraction():
    assert uncertainty.closed_fraction(0.88, 0.80, 0.90) == pytest.approx(0.8)
    assert uncertainty.closed_fraction(0.78, 0.80, 0.90) == pytest.approx(-0.2)
    assert math.isnan(uncertainty.closed_fraction(0.88, 0.90, 0.90))  # no gap
    assert math.isnan(uncertainty.closed_fraction(math.nan, 0.80, 0.90))


def _results(table):
    return [{"method": m, "seed": s, "best_heldout_acc": acc, "best_step": 10, "final_heldout_acc": acc,
             "test_acc": acc, "steps": 10, "epochs": 1.0, "wall_s": 1.0, "diverged_at": None, "lr": 0.1}
            for m, accs in table.items() for s, acc in enumerate(accs)]


CONFIG = {"preset": "unit", "steps": 10, "methods": ["SB", "LB", "GN", "FT"], "seeds": 3, "grad_method": "exact",
          "resolved": {}}


def test_summary_states_an_interval_including_zero_plainly():
    results = _results({"SB": [0.90, 0.88, 0.89], "LB": [0.88, 0.89, 0.86], "GN": [0.89, 0.89, 0.88],
                        "FT": [0.87, 0.885, 0.865]})
    text = report.summary_markdown([], results, CONFIG)
    lines = text.splitlines()
    half = uncertainty.mean_interval([0.02, -0.01, 0.03]).half_width
    expected = f"[{100 * (0.04 / 3 - half):+.2f}, {100 * (0.04 / 3 + half):+.2f}]"
    assert "SB − LB test accuracy: +1.33 points" in text
    assert f"SB − LB is +1.33 points, 95% interval {expected}" in text
    assert "**The interval includes zero: these 3 seeds do not establish a large-batch gap**" in text
    gn = [line for line in lines if line.startswith("| `GN` |")][-1]  # the gap table (after the main table)
    gn_vs_lb = uncertainty.mean_interval([0.01, 0.0, 0.02])  # GN − LB per seed
    sb_vs_gn = uncertainty.mean_interval([0.01, -0.01, 0.01])
    cells = [c.strip() for c in gn.strip("|").split("|")]
    assert cells == ["`GN`", "+1.00", f"[{100 * gn_vs_lb.low:+.2f}, {100 * gn_vs_lb.high:+.2f}]", "+0.33",
                     f"[{100 * sb_vs_gn.low:+.2f}, {100 * sb_vs_gn.high:+.2f}]", "3", "0.75"]
    assert gn_vs_lb.includes_zero and sb_vs_gn.includes_zero
    assert ("- `GN`: its difference to LB includes zero (these seeds do not show it better than LB); its difference "
            "to SB includes zero (these seeds do not show it worse than SB).") in lines


def test_summary_says_when_intervals_exclude_zero():
    results = _results({"SB": [0.90, 0.91], "LB": [0.80, 0.805], "GN": [0.88, 0.89]})
    text = report.summary_markdown([], results, dict(CONFIG, methods=["SB", "LB", "GN"], seeds=2))
    assert "The interval excludes zero: these seeds establish the gap." in text
    assert "No method's interval includes zero." in text


def test_single_seed_keeps_the_plain_table():
    results = _results({"SB": [0.90], "LB": [0.80], "GN": [0.88]})
    text = report.summary_markdown([], results, dict(CONFIG, methods=["SB", "LB", "GN"], seeds=1))
    assert "| method | test − LB (points) | fraction of the gap closed |" in text and "interval" not in text
    assert "| `GN` | +8.00 | 0.80 |" in text


def test_partial_runs_are_announced():
    results = _results({"SB": [0.90, 0.91], "LB": [0.80]})
    text = report.summary_markdown([], results, dict(CONFIG, methods=["SB", "LB"], seeds=2))
    assert "**Partial results:** 3 of the 4 planned runs" in text and "--resume" in text
