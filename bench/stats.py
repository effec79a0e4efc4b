"""Summary statistics of timing samples: robust centre, tails, spread and a bootstrap interval.

Latency samples are skewed (a few slow outliers from the scheduler, page faults, frequency
changes), so the centre we report and compare is the median, and its uncertainty is a
percentile bootstrap interval: resample the samples with replacement ``n_boot`` times, take
each resample's median, and read the interval off those medians' percentiles. The bootstrap
is seeded, so the same samples always give the same interval, and vectorised with numpy.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from bench.schema import STAT_KEYS


def _as_array(samples: Sequence[float], name: str = "samples") -> np.ndarray:
    x = np.asarray(samples, dtype=np.float64).ravel()
    if x.size == 0:
        raise ValueError(f"{name} is empty: at least one sample is needed")
    if not np.isfinite(x).all():
        bad = x[~np.isfinite(x)][0]
        raise ValueError(f"{name} contains a non-finite value ({bad}); every sample must be a finite number")
    return x


def _check_confidence(confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence={confidence!r} must be between 0 and 1")


def _bootstrap_medians(x: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """The medians of ``n_boot`` resamples of ``x`` (with replacement), shape (n_boot,)."""
    if n_boot < 1:
        raise ValueError(f"n_boot={n_boot} must be at least 1")
    # Resample in blocks of at most ~4M values so long sample lists do not exhaust memory.
    rows = max(1, 4_000_000 // x.size)
    medians = []
    for start in range(0, n_boot, rows):
        idx = rng.integers(0, x.size, size=(min(rows, n_boot - start), x.size))  # (rows, n)
        medians.append(np.median(x[idx], axis=1))
    return np.concatenate(medians)


def _interval(values: np.ndarray, confidence: float) -> tuple[float, float]:
    alpha = (1.0 - confidence) / 2
    lo, hi = np.percentile(values, [100 * alpha, 100 * (1 - alpha)])
    return float(lo), float(hi)


def median_ci(samples: Sequence[float], *, confidence: float = 0.95, n_boot: int = 2000,
              seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the median. One sample: the interval is that sample."""
    _check_confidence(confidence)
    x = _as_array(samples)
    if x.size == 1:
        return float(x[0]), float(x[0])
    return _interval(_bootstrap_medians(x, n_boot, np.random.default_rng(seed)), confidence)


def grouped_median_ci(groups: Sequence[Sequence[float]], *, confidence: float = 0.95, n_boot: int = 2000,
                      seed: int = 0) -> tuple[float, float]:
    """Two-level bootstrap interval of the median of samples that come in groups (launches).

    Samples of one process are not independent of each other: where the process landed
    (its pages, its cores) shifts all of them together. So each resample first draws the
    groups with replacement, then samples within each drawn group, and takes the median of
    the pooled draw. With one group this is the ordinary bootstrap.
    """
    _check_confidence(confidence)
    arrays = [_as_array(g) for g in groups]
    if len(arrays) == 1:
        return median_ci(arrays[0], confidence=confidence, n_boot=n_boot, seed=seed)
    rng = np.random.default_rng(seed)
    medians = np.empty(n_boot)
    for b in range(n_boot):
        picks = rng.integers(0, len(arrays), size=len(arrays))
        draw = [arrays[i][rng.integers(0, arrays[i].size, size=arrays[i].size)] for i in picks]
        medians[b] = np.median(np.concatenate(draw))
    return _interval(medians, confidence)


def summarize(samples: Sequence[float], *, confidence: float = 0.95, n_boot: int = 2000,
              seed: int = 0, groups: Sequence[Sequence[float]] | None = None) -> dict:
    """The statistics dict of ``samples``, with exactly the keys of ``bench.schema.STAT_KEYS``.

    Percentiles interpolate linearly between order statistics (numpy's default). ``stdev``
    is the sample standard deviation (n - 1); ``cv`` is stdev / mean. ``ci95_low`` and
    ``ci95_high`` bound the median at ``confidence`` (the key names assume the default 0.95).
    With ``groups`` (the same samples split by the process that took them), the interval is
    the two-level bootstrap of ``grouped_median_ci``.
    """
    x = _as_array(samples)
    n = int(x.size)
    mean = float(x.mean())
    stdev = float(x.std(ddof=1)) if n > 1 else 0.0
    if mean != 0.0:
        cv = stdev / abs(mean)
    else:  # only possible with zero or signed samples, never with latencies
        cv = 0.0 if stdev == 0.0 else math.inf
    if groups is not None and len(groups) > 1:
        lo, hi = grouped_median_ci(groups, confidence=confidence, n_boot=n_boot, seed=seed)
    else:
        lo, hi = median_ci(x, confidence=confidence, n_boot=n_boot, seed=seed)
    median, p90, p99 = (float(v) for v in np.percentile(x, [50, 90, 99]))
    stats = dict(median=median, p90=p90, p99=p99, mean=mean, stdev=stdev, cv=cv,
                 ci95_low=lo, ci95_high=hi, n=n)
    assert tuple(stats) == STAT_KEYS, "summarize must produce the schema's statistics keys in order"
    return stats


def relative_ci_width(samples: Sequence[float], *, confidence: float = 0.95, n_boot: int = 2000,
                      seed: int = 0) -> float:
    """(high - low) / median of the median's bootstrap interval: the harness's stopping rule.

    With fewer than two samples the spread is unknown, so the width is infinite: a rule
    "stop when the width is below x" never stops on a single sample.
    """
    x = _as_array(samples)
    if x.size < 2:
        return math.inf
    lo, hi = median_ci(x, confidence=confidence, n_boot=n_boot, seed=seed)
    median = float(np.median(x))
    if median == 0.0:
        return 0.0 if hi == lo else math.inf
    return (hi - lo) / abs(median)


def settled(samples: Sequence[float], window: int = 3, tol: float = 0.05) -> bool:
    """Warm-up detection: have the samples stopped drifting?

    The rule: take the median of the last ``window`` samples and the median of the
    ``window`` samples before them; the series has settled when they differ by less than
    ``tol`` relative to the earlier one. Medians, not means, so one outlier in either window
    does not hold warm-up open. With fewer than ``2 * window`` samples it has not settled.
    """
    if window < 1:
        raise ValueError(f"window={window} must be at least 1")
    if tol <= 0:
        raise ValueError(f"tol={tol!r} must be positive")
    x = np.asarray(samples, dtype=np.float64).ravel()
    if x.size < 2 * window:
        return False
    last = float(np.median(x[-window:]))
    previous = float(np.median(x[-2 * window:-window]))
    if previous == 0.0:
        return last == 0.0
    return abs(last - previous) / abs(previous) < tol


def ratio_ci(base_samples: Sequence[float], new_samples: Sequence[float], *, confidence: float = 0.95,
             n_boot: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """median(new) / median(base) and its bootstrap interval: (ratio, low, high).

    The two sets are resampled independently (they come from different runs); each
    bootstrap draw gives one ratio of medians, and the interval is read off those ratios.
    For latencies a ratio below 1 means ``new`` is faster; an interval that excludes 1 is a
    change the samples can tell apart from noise.
    """
    _check_confidence(confidence)
    base = _as_array(base_samples, "base_samples")
    new = _as_array(new_samples, "new_samples")
    base_median = float(np.median(base))
    if base_median == 0.0:
        raise ValueError("base_samples have a median of 0: the ratio is undefined")
    ratio = float(np.median(new)) / base_median
    rng = np.random.default_rng(seed)
    base_meds = _bootstrap_medians(base, n_boot, rng)
    new_meds = _bootstrap_medians(new, n_boot, rng)
    if np.any(base_meds == 0.0):
        raise ValueError("a bootstrap median of base_samples is 0: the ratio is undefined")
    lo, hi = _interval(new_meds / base_meds, confidence)
    return ratio, lo, hi
