"""Point estimates with percentile-bootstrap confidence intervals.

Every evaluation number that is a mean over items (pairs, prompts, sampled sequences) is
reported with an interval from the percentile bootstrap (Efron & Tibshirani 1993, ch. 13):
resample the n per-item values with replacement B times, take the mean of each resample,
and report the (1 - c)/2 and (1 + c)/2 quantiles of those B means for confidence level c.
The resampling is seeded, so the same values, B, c and seed give the same interval.

A statistic that is not a plain mean (a ratio of sums, a precision or an F1 score) gets its
interval the same way from `bootstrap_estimate`: the statistic of each resample of the
items, with the same resampled indices as `bootstrap_ci` for the same n, B and seed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Estimate:
    """A mean and its bootstrap interval (None when no interval was computed)."""

    value: float
    ci_low: float | None = None
    ci_high: float | None = None

    def to_dict(self) -> dict:
        return {"value": self.value, "ci_low": self.ci_low, "ci_high": self.ci_high}


def resample_indices(n: int, samples: int, seed: int) -> np.ndarray:
    """[B, n] item indices: row b is resample b of the n items, drawn with replacement."""
    return np.random.default_rng(seed).integers(0, n, size=(samples, n))


def bootstrap_ci(
    values: Sequence[float], samples: int, confidence: float, seed: int
) -> tuple[float, float]:
    """Percentile-bootstrap interval of the mean of `values`.

    values: n >= 1 numbers; samples: B >= 1 resamples; confidence: c in (0, 1).
    Returns (low, high), the (1 - c)/2 and (1 + c)/2 quantiles (linear interpolation) of
    the B resampled means. One value, or n equal values, give (value, value).
    """
    data = np.asarray(values, dtype=np.float64)
    if data.ndim != 1 or data.size == 0:
        raise ValueError("bootstrap_ci needs a non-empty 1-d sequence of values")
    if samples < 1 or not 0.0 < confidence < 1.0:
        raise ValueError(f"need samples >= 1 and 0 < confidence < 1, got {samples}, {confidence}")
    means = data[resample_indices(data.size, samples, seed)].mean(axis=1)
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    return float(low), float(high)


def mean_estimate(values: Sequence[float], samples: int, confidence: float, seed: int) -> Estimate:
    """The mean of `values` with its bootstrap interval; `samples=0` gives no interval."""
    data = np.asarray(values, dtype=np.float64)
    if data.size == 0:
        raise ValueError("mean_estimate needs at least one value")
    # The same reduction as the resampled means, so equal values give an interval that is
    # exactly (value, value) rather than one an ulp off.
    value = float(data[None, :].mean(axis=1)[0])
    if samples == 0:
        return Estimate(value)
    low, high = bootstrap_ci(data, samples, confidence, seed)
    return Estimate(value, low, high)


def bootstrap_estimate(
    statistic: Callable[[np.ndarray], np.ndarray],
    n: int,
    samples: int,
    confidence: float,
    seed: int,
) -> Estimate | None:
    """A statistic of n items with its percentile-bootstrap interval.

    statistic: maps item indices [R, n] (R resamples, rows of indices into the items) to
    its value on each resample, [R]; NaN where it is undefined on that resample (say, a
    precision when nothing was predicted). Its value is `statistic` of the items
    themselves (indices 0..n-1). The interval is the (1 - c)/2 and (1 + c)/2 quantiles
    of its B resampled values, those where it is undefined left out; `samples=0` gives no
    interval. Returns None when the statistic is undefined on the items themselves.
    """
    if n < 1:
        raise ValueError("bootstrap_estimate needs at least one item")
    value = float(statistic(np.arange(n)[None, :])[0])
    if not np.isfinite(value):
        return None
    if samples == 0:
        return Estimate(value)
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"need 0 < confidence < 1, got {confidence}")
    values = np.asarray(statistic(resample_indices(n, samples, seed)), dtype=np.float64)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return Estimate(value)
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(values, [alpha, 1.0 - alpha])
    return Estimate(value, float(low), float(high))


def ratio_estimate(
    numerators: Sequence[float],
    denominators: Sequence[float],
    samples: int,
    confidence: float,
    seed: int,
) -> Estimate:
    """sum(numerators) / sum(denominators) over paired items (e.g. nats per token: each
    sequence's KL over its token count) with a bootstrap interval over the items."""
    num = np.asarray(numerators, dtype=np.float64)
    den = np.asarray(denominators, dtype=np.float64)
    if num.shape != den.shape or num.ndim != 1 or num.size == 0:
        raise ValueError("ratio_estimate needs two non-empty 1-d sequences of one length")
    if not den.sum() > 0:
        raise ValueError("ratio_estimate needs a positive sum of denominators")

    def ratio(picks: np.ndarray) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return num[picks].sum(axis=1) / den[picks].sum(axis=1)

    return bootstrap_estimate(ratio, num.size, samples, confidence, seed)
