"""Point estimates with percentile-bootstrap confidence intervals.

Every evaluation number that is a mean over items (pairs, prompts, sampled sequences) is
reported with an interval from the percentile bootstrap (Efron & Tibshirani 1993, ch. 13):
resample the n per-item values with replacement B times, take the mean of each resample,
and report the (1 - c)/2 and (1 + c)/2 quantiles of those B means for confidence level c.
The resampling is seeded, so the same values, B, c and seed give the same interval.
"""

from __future__ import annotations

from collections.abc import Sequence
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
    rng = np.random.default_rng(seed)
    # [B, n] indices: each row is one resample of the n items, with replacement.
    picks = rng.integers(0, data.size, size=(samples, data.size))
    means = data[picks].mean(axis=1)
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
