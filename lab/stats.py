"""Means and their confidence intervals over a few seeds, as a paper's table gives them (standard library only).

With n values x_1..x_n, mean m and sample standard deviation s (n - 1 in the denominator), the two-sided interval
at confidence c is ``m ± t(c, n - 1) x s / sqrt(n)``, where ``t(c, df)`` is the (1 + c) / 2 quantile of Student's t
distribution with df degrees of freedom: for 3 seeds at 95%, t = 4.303, so the interval is 4.3 standard errors wide
each way. Student's t, not the normal 1.96, because s is itself estimated from the n values (the two agree to 2%
from n = 60). The quantile is computed here (:func:`t_quantile`: the t distribution's CDF through the regularized
incomplete beta function, inverted by bisection), so nothing beyond the standard library is needed.
"""
from __future__ import annotations

import math
import statistics
from collections.abc import Iterable
from dataclasses import dataclass

CONFIDENCE = 0.95


def _beta_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of the incomplete beta function (modified Lentz's method)."""
    tiny, eps = 1e-300, 1e-15
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return h


def incomplete_beta(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b), for a, b > 0 and 0 <= x <= 1."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_fraction(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` degrees of freedom."""
    tail = 0.5 * incomplete_beta(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (0 < p < 1), to about 1e-10."""
    if not 0.0 < p < 1.0 or df <= 0:
        raise ValueError(f"t_quantile needs 0 < p < 1 and df > 0, got p={p}, df={df}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    low, high = 0.0, 1.0
    while t_cdf(high, df) < p:
        low, high = high, high * 2.0
    for _ in range(200):
        mid = (low + high) / 2.0
        if t_cdf(mid, df) < p:
            low = mid
        else:
            high = mid
        if high - low < 1e-12 * max(1.0, high):
            break
    return (low + high) / 2.0


@dataclass(frozen=True)
class Estimate:
    """The mean of ``n`` values with its two-sided ``confidence`` interval [low, high] (n = 1: the value itself,
    low = high = mean: one value says nothing about its spread), and their sample standard deviation."""

    mean: float
    low: float
    high: float
    n: int
    std: float
    confidence: float = CONFIDENCE

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2.0


def numbers(values: Iterable[float | int | None]) -> list[float]:
    """The values that are numbers (None, NaN and booleans dropped)."""
    return [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v)]


def estimate(values: Iterable[float | int | None], confidence: float = CONFIDENCE) -> Estimate | None:
    """The mean of the values that are numbers and its Student-t interval (module docstring); None when none is."""
    xs = numbers(values)
    if not xs:
        return None
    mean = statistics.fmean(xs)
    if len(xs) == 1:
        return Estimate(mean, mean, mean, 1, 0.0, confidence)
    std = statistics.stdev(xs)
    half = t_quantile((1.0 + confidence) / 2.0, len(xs) - 1) * std / math.sqrt(len(xs))
    return Estimate(mean, mean - half, mean + half, len(xs), std, confidence)
