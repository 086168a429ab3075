"""Uncertainty over seeds: paired differences between methods and their Student-t intervals.

Every method of one seed starts from the same initialization and sees the same batches, so two
methods are compared seed by seed: d_s = acc_a(s) − acc_b(s) over the n seeds both have, and the
interval is the usual one for a mean of n paired differences,

    mean(d) ± t_{(1+c)/2, n−1} · s_d / √n        (c = 0.95 by default; s_d the sample std of d)

It says how well these seeds pin down the mean difference; it assumes the per-seed differences are
independent draws from one (roughly normal) distribution. With n = 2 the t factor is 12.7: two seeds
settle little. The fraction of the SB − LB gap a method closes is (acc_m − acc_LB)/(acc_SB − acc_LB)
on the means over seeds; its uncertainty is read from the two paired intervals (method − LB, SB − method).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass


def _two_sided_t_probability(t: float, df: int) -> float:
    """P(|T| <= t) for Student's t with integer ``df`` >= 1 (Abramowitz & Stegun 26.7.3 / 26.7.4, exact)."""
    theta = math.atan(t / math.sqrt(df))
    c2, s = math.cos(theta) ** 2, math.sin(theta)
    if df % 2 == 0:
        term, total = 1.0, 1.0
        for k in range(2, df, 2):  # 1 + (1/2)c² + (1·3)/(2·4)c⁴ + ... up to c^(df−2)
            term *= c2 * (k - 1) / k
            total += term
        return s * total
    if df == 1:
        return 2 * theta / math.pi
    term, total = 1.0, 1.0
    for k in range(3, df, 2):  # 1 + (2/3)c² + (2·4)/(3·5)c⁴ + ... up to c^(df−3)
        term *= c2 * (k - 1) / k
        total += term
    return 2 / math.pi * (theta + s * math.cos(theta) * total)


def t_quantile(confidence: float, df: int) -> float:
    """t such that P(|T| <= t) = ``confidence`` for Student's t with ``df`` degrees of freedom (bisection)."""
    if not 0 < confidence < 1 or df < 1:
        raise ValueError(f"need 0 < confidence < 1 and df >= 1, got {confidence}, {df}")
    lo, hi = 0.0, 1.0
    while _two_sided_t_probability(hi, df) < confidence:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        if _two_sided_t_probability(mid, df) < confidence:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-12 * hi:
            break
    return (lo + hi) / 2


@dataclass(frozen=True)
class Interval:
    """Mean of n paired differences and its two-sided ``confidence`` interval mean ± half_width."""

    mean: float
    std: float
    n: int
    half_width: float
    confidence: float = 0.95

    @property
    def low(self) -> float:
        return self.mean - self.half_width

    @property
    def high(self) -> float:
        return self.mean + self.half_width

    @property
    def includes_zero(self) -> bool:
        return self.low <= 0 <= self.high


def _finite(value: object) -> bool:
    return value is not None and math.isfinite(float(value))  # type: ignore[arg-type]


def paired_differences(a: Mapping[int, float | None], b: Mapping[int, float | None]) -> list[float]:
    """a(s) − b(s) for every seed s where both are finite, in seed order."""
    return [float(a[s]) - float(b[s]) for s in sorted(set(a) & set(b)) if _finite(a[s]) and _finite(b[s])]


def mean_interval(differences: Iterable[float], confidence: float = 0.95) -> Interval | None:
    """The t interval of the mean of ``differences``; None with fewer than two."""
    d = list(differences)
    if len(d) < 2:
        return None
    std = statistics.stdev(d)
    return Interval(statistics.fmean(d), std, len(d), t_quantile(confidence, len(d) - 1) * std / math.sqrt(len(d)),
                    confidence)


def closed_fraction(acc: float, lb: float, sb: float) -> float:
    """(acc − LB) / (SB − LB): 0 at LB, 1 at SB; NaN when there is no gap (SB <= LB) or a value is missing."""
    gap = sb - lb
    if not all(map(math.isfinite, (acc, lb, sb))) or gap <= 0:
        return math.nan
    return (acc - lb) / gap


def evaluation_se(acc_a: float, acc_b: float, images: int) -> float:
    """Binomial standard error of the difference of two accuracies each measured on ``images`` images:

        sqrt((a(1 − a) + b(1 − b)) / N)

    It is the bound for independent errors; two models scored on the same images err together more often than
    that, so it overstates the noise of a paired difference (a conservative choice: per-image predictions, which a
    McNemar standard error would need, are not recorded)."""
    if images <= 0:
        raise ValueError(f"images must be positive, got {images}")
    return math.sqrt((acc_a * (1 - acc_a) + acc_b * (1 - acc_b)) / images)


def seed_and_evaluation_interval(differences: Iterable[float], eval_se: float,
                                 confidence: float = 0.95) -> Interval | None:
    """The paired interval over seeds widened by the evaluation set's sampling error:

        mean(d) ± t_{(1+c)/2, ν} · sqrt(v_s + v_e),   v_s = s_d² / n,  v_e = eval_se²,
        ν = (v_s + v_e)² (n − 1) / v_s²               (Welch–Satterthwaite; v_e is known, not estimated)

    Every seed is scored on the same images, so their sampling error does not average out over seeds: it enters
    once, in full (``eval_se`` from :func:`evaluation_se`). ν is rounded down and capped at 1000 (t then differs
    from the normal quantile in the third decimal). None with fewer than two differences."""
    d = list(differences)
    if len(d) < 2:
        return None
    std = statistics.stdev(d)
    v_seeds, v_eval = std * std / len(d), eval_se * eval_se
    df = 1000 if v_seeds == 0 else min(1000, int((v_seeds + v_eval) ** 2 * (len(d) - 1) / v_seeds ** 2))
    half = t_quantile(confidence, df) * math.sqrt(v_seeds + v_eval)
    half = max(half, t_quantile(confidence, len(d) - 1) * math.sqrt(v_seeds))  # never narrower than seeds alone
    return Interval(statistics.fmean(d), std, len(d), half, confidence)


def _normal_cdf(x: float) -> float:
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


def paired_t_power(effect: float, sd: float, seeds: int, confidence: float = 0.95) -> float:
    """Approximate power of the two-sided paired t test at level 1 − ``confidence`` to detect a mean difference
    ``effect`` when per-seed differences have standard deviation ``sd``: Φ(effect·√n/sd − t_{(1+c)/2, n−1})."""
    if seeds < 2 or sd <= 0:
        raise ValueError(f"need seeds >= 2 and sd > 0, got {seeds}, {sd}")
    return _normal_cdf(abs(effect) * math.sqrt(seeds) / sd - t_quantile(confidence, seeds - 1))


def seeds_needed(effect: float, sd: float, power: float = 0.8, confidence: float = 0.95, limit: int = 1000) -> int:
    """The fewest seeds (>= 2) whose paired t test reaches ``power`` for ``effect`` (see :func:`paired_t_power`)."""
    for seeds in range(2, limit + 1):
        if paired_t_power(effect, sd, seeds, confidence) >= power:
            return seeds
    raise ValueError(f"more than {limit} seeds needed for effect {effect} at sd {sd}")


@dataclass(frozen=True)
class Comparison:
    """a − b paired by seed: the interval over seeds alone, and (when the number of evaluation images is known)
    the same widened by their sampling error (:func:`seed_and_evaluation_interval`)."""

    seeds: Interval
    with_evaluation: Interval | None

    @property
    def level(self) -> int:
        """+2: above zero beyond seed and evaluation noise; +1: above zero over these seeds only (the widened
        interval includes it, or is unknown); 0: the seeds' interval includes zero; −1, −2: the same below zero."""
        wide = self.with_evaluation
        if self.seeds.includes_zero:
            return 0
        sign = 1 if self.seeds.low > 0 else -1
        return 2 * sign if wide is not None and not wide.includes_zero else sign


def compare(a: Mapping[int, float | None], b: Mapping[int, float | None], images: int | None,
            confidence: float = 0.95) -> Comparison | None:
    """a − b over the seeds both have (accuracies as fractions); None with fewer than two such seeds."""
    d = paired_differences(a, b)
    seeds = mean_interval(d, confidence)
    if seeds is None:
        return None
    if not images:
        return Comparison(seeds, None)
    common = [s for s in sorted(set(a) & set(b)) if _finite(a[s]) and _finite(b[s])]
    mean_a, mean_b = (statistics.fmean(float(x[s]) for s in common) for x in (a, b))  # type: ignore[arg-type]
    return Comparison(seeds, seed_and_evaluation_interval(d, evaluation_se(mean_a, mean_b, images), confidence))
