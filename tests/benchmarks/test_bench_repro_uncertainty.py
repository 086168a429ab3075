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
    assert f"SB − LB, test accuracy at the best-held-out checkpoint: +1.33 points, over 3 seeds {expected}." in text
    assert "**Not distinguishable: these 3 seeds do not establish a large-batch gap.**" in text
    gn = [line for line in lines if line.startswith("| `GN` |")][-1]  # the gap table (after the main table)
    gn_vs_lb = uncertainty.mean_interval([0.01, 0.0, 0.02])  # GN − LB per seed
    sb_vs_gn = uncertainty.mean_interval([0.01, -0.01, 0.01])
    cells = [c.strip() for c in gn.strip("|").split("|")]
    assert cells == ["`GN`", f"+1.00 [{100 * gn_vs_lb.low:+.2f}, {100 * gn_vs_lb.high:+.2f}]",
                     f"+0.33 [{100 * sb_vs_gn.low:+.2f}, {100 * sb_vs_gn.high:+.2f}]", "3", "—",
                     "not distinguishable from LB"]
    assert gn_vs_lb.includes_zero and sb_vs_gn.includes_zero


def test_summary_says_when_intervals_exclude_zero():
    results = _results({"SB": [0.90, 0.91], "LB": [0.80, 0.805], "GN": [0.88, 0.89]})
    config = dict(CONFIG, methods=["SB", "LB", "GN"], seeds=2)
    unknown_images = report.summary_markdown([], results, config)
    assert "**SB is better than LB over these seeds**, but not beyond the evaluation images' sampling error" in \
        unknown_images
    text = report.summary_markdown([], results, dict(config, dataset="fashion-mnist"))  # 10,000 test images
    assert "**SB is better than LB: the gap is established** (both intervals lie above zero)." in text
    gn = [line for line in text.splitlines() if line.startswith("| `GN` |")][-1]
    assert gn.endswith("| 2 | 0.80 | closes part of the gap |")


def test_evaluation_noise_can_undo_a_gap_the_seeds_alone_would_establish():
    # Four seeds agree to within 0.1 point on a 0.3-point gap; 10,000 test images cannot resolve 0.3 points.
    results = _results({"SB": [0.883, 0.884, 0.882, 0.883], "LB": [0.880, 0.881, 0.879, 0.880]})
    text = report.summary_markdown([], results, dict(CONFIG, methods=["SB", "LB"], seeds=4, dataset="fashion-mnist"))
    assert "**SB is better than LB over these seeds**, but not beyond" in text
    assert "the gap is established" not in text


def test_single_seed_claims_nothing():
    results = _results({"SB": [0.90], "LB": [0.80], "GN": [0.88]})
    text = report.summary_markdown([], results, dict(CONFIG, methods=["SB", "LB", "GN"], seeds=1))
    assert "one seed, no interval: **a single seed cannot establish a large-batch gap**" in text
    assert "| `GN` | +8.00 | +2.00 | 1 | — | one seed: no verdict |" in text


def test_verdict_words_follow_the_interval_levels():
    def comp(low, high, wide_half=None):
        seeds = uncertainty.Interval((low + high) / 2, 0.01, 4, (high - low) / 2)
        wider = uncertainty.Interval((low + high) / 2, 0.01, 4, wide_half or 2 * (high - low))
        return uncertainty.Comparison(seeds, wider)

    above, level, below = comp(0.01, 0.03), comp(-0.01, 0.01), comp(-0.03, -0.01)
    assert above.level == 1 and level.level == 0 and below.level == -1 and comp(0.02, 0.04, 0.015).level == 2
    assert report.method_verdict(above, level, gap_level=1) == "closes the gap (over these seeds, within evaluation noise)"
    assert report.method_verdict(above, above, gap_level=1).startswith("closes part of the gap")
    assert report.method_verdict(above, level, gap_level=0) == "above LB, but no established gap to close"
    assert report.method_verdict(level, above, gap_level=1) == "not distinguishable from LB, below SB"
    assert report.method_verdict(below, above, gap_level=2) == "below LB"
    assert report.method_verdict(above, below, gap_level=1).startswith("above SB")


def test_lambda_is_selected_on_held_out_accuracy_not_test():
    results = _results({"SB": [0.90, 0.91], "LB": [0.80, 0.805], "GN@λ=0.1": [0.89, 0.90], "GN@λ=0.01": [0.85, 0.86]})
    for r in results:  # the higher test accuracy has the lower held-out accuracy
        r["best_heldout_acc"] = 0.95 - r["test_acc"] if r["method"].startswith("GN") else r["test_acc"]
    text = report.summary_markdown([], results, dict(CONFIG, methods=list({r["method"]: 0 for r in results})))
    assert "the best mean best-held-out accuracy picks `GN@λ=0.01` (9.50%)" in text


def test_partial_runs_are_announced():
    results = _results({"SB": [0.90, 0.91], "LB": [0.80]})
    text = report.summary_markdown([], results, dict(CONFIG, methods=["SB", "LB"], seeds=2))
    assert "**Partial results:** 3 of the 4 planned runs" in text and "--resume" in text


def test_evaluation_se_is_the_binomial_bound():
    assert uncertainty.evaluation_se(0.88, 0.88, 10_000) == pytest.approx(math.sqrt(2 * 0.88 * 0.12 / 10_000))
    with pytest.raises(ValueError, match="images must be positive"):
        uncertainty.evaluation_se(0.9, 0.9, 0)


def test_seed_and_evaluation_interval_known_numbers():
    d, eval_se = [0.01, 0.02, 0.03] * 2, 0.005
    v_seeds, v_eval = statistics.variance(d) / 6, eval_se ** 2
    df = int((v_seeds + v_eval) ** 2 * 5 / v_seeds ** 2)  # Welch–Satterthwaite: 41.3 -> 41
    got = uncertainty.seed_and_evaluation_interval(d, eval_se)
    assert df == 41 and got.mean == pytest.approx(0.02)
    assert got.half_width == pytest.approx(uncertainty.t_quantile(0.95, 41) * math.sqrt(v_seeds + v_eval))
    assert got.half_width > uncertainty.mean_interval(d).half_width
    # With two seeds the seeds' own t (12.7) dominates: the widened interval is never narrower than it.
    two = uncertainty.seed_and_evaluation_interval([0.0, 0.02], 0.004)
    assert two.half_width >= uncertainty.mean_interval([0.0, 0.02]).half_width
    # Identical differences: only the evaluation noise is left, at (almost) the normal quantile.
    flat = uncertainty.seed_and_evaluation_interval([0.01] * 4, 0.004)
    assert flat.half_width == pytest.approx(1.96 * 0.004, rel=2e-3)
    assert uncertainty.seed_and_evaluation_interval([0.01], 0.004) is None


def test_compare_widens_only_when_the_image_count_is_known():
    a, b = {0: 0.90, 1: 0.91, 2: None}, {0: 0.88, 1: 0.885, 2: 0.87}
    plain = uncertainty.compare(a, b, None)
    assert plain.with_evaluation is None and plain.seeds.n == 2 and plain.seeds.mean == pytest.approx(0.0225)
    wide = uncertainty.compare(a, b, 10_000)
    assert wide.with_evaluation.half_width > wide.seeds.half_width * 0.99
    assert uncertainty.compare({0: 0.9}, {0: 0.8}, 10_000) is None


def test_power_and_seed_count():
    n = uncertainty.seeds_needed(0.5, 0.43)
    assert uncertainty.paired_t_power(0.5, 0.43, n) >= 0.8 > uncertainty.paired_t_power(0.5, 0.43, n - 1)
    assert n == 8
    # Large n: the normal formula ((z_0.975 + z_0.8) σ/δ)² = 784.9 for δ/σ = 0.1, plus a t correction of ~2.
    assert 785 <= uncertainty.seeds_needed(0.1, 1.0) <= 789
    assert uncertainty.paired_t_power(0.2, 0.3, 10) < uncertainty.paired_t_power(0.2, 0.3, 20)
    with pytest.raises(ValueError, match="seeds >= 2"):
        uncertainty.paired_t_power(0.2, 0.3, 1)
