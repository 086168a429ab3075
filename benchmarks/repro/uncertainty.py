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
