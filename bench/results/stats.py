"""Summary statistics of timing samples: robust centre, tails, spread and a bootstrap interval.

Latency samples are skewed (a few slow outliers from the scheduler, page faults, frequency
changes), so the centre we report and compare is the median, and its uncertainty is a
percentile bootstrap interval: resample the samples with replacement ``n_boot`` times, take
each resample's median, and read the interval off those medians' percentiles. The bootstrap
is seeded, so the same samples always give the same interval, and vectorised with numpy.

Timing samples are not independent of each other, and resampling them as if they were gives
intervals far too narrow. The harness's samples nest: a cell runs in several *launches*
(fresh processes, spread over the sweep's rounds), each launch repeats whole *generations*,
and each generation has several decode *steps*. Steps of one generation move together (the
same cache state, the same moment of the machine), and generations of one launch move
together (where the process's pages and threads landed). So the interval of a cell comes from
``nested_median_ci``: resample launches, then whole generations within each drawn launch, and
take the median of the pooled steps of the draw -- the hierarchical bootstrap (Davison and
Hinkley, *Bootstrap Methods and their Application*, 1997, section 3.8; Saravanan et al.,
"Application of the hierarchical bootstrap to multi-level data in neuroscience", 2020).
Single decode steps are never resampled on their own.

A percentile bootstrap over few units (three launches, say) is too narrow: the resampled
units vary less than the units do (by (n - 1) / n), and a normal quantile stands where
Student's t with n - 1 degrees of freedom belongs. Hesterberg's correction of the percentile
interval for small samples widens it by ``small_sample_factor(n)`` = t(n-1) / z *
sqrt(n / (n - 1)) ("What teachers should know about the bootstrap", The American Statistician
69(4), 2015, section 4.6): x2.7 for three units, x1.2 for ten. The nested intervals apply it
to each level's share of the spread: a second bootstrap that keeps the launches fixed and
resamples only generations measures the within-launch share, the rest is between launches,
and each share is widened by the factor for its own count (launches; generations per launch).
So a cell whose launches agree keeps a tight interval, and one whose launches disagree gets
the wide interval three launches honestly allow; more launches narrow it.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from bench.results.schema import STAT_KEYS


def finite(x) -> bool:
    """A real, finite number (not a bool, None, NaN or infinity)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


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


def summarize(samples: Sequence[float], *, confidence: float = 0.95, n_boot: int = 2000,
              seed: int = 0) -> dict:
    """The statistics dict of ``samples``, with exactly the keys of ``bench.results.schema.STAT_KEYS``.

    Percentiles interpolate linearly between order statistics (numpy's default). ``stdev``
    is the sample standard deviation (n - 1); ``cv`` is stdev / mean. ``ci95_low`` and
    ``ci95_high`` bound the median at ``confidence`` (the key names assume the default 0.95).
    Samples taken in launches and generations get their interval from ``summarize_nested``.
    """
    x = _as_array(samples)
    n = int(x.size)
    mean = float(x.mean())
    stdev = float(x.std(ddof=1)) if n > 1 else 0.0
    if mean != 0.0:
        cv = stdev / abs(mean)
    else:  # only possible with zero or signed samples, never with latencies
        cv = 0.0 if stdev == 0.0 else math.inf
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


# -- nested samples: launches > generations > steps ------------------------------------------


def nest(samples) -> list[list[list[float]]]:
    """Samples as launches > generations > values, whatever depth they were stored at.

    A flat list is one launch of one-value generations; a list of lists is one launch whose
    generations are those lists (or, for per-generation kinds such as the time to first token
    stored per launch, launches of one-value generations: see ``per_generation``).
    """
    levels = depth(samples)
    if levels == 1:
        return [[[float(v)] for v in samples]]
    if levels == 2:
        return [[list(map(float, g)) for g in samples]]
    if levels == 3:
        return [[list(map(float, g)) for g in launch] for launch in samples]
    raise ValueError(f"samples nest {levels} levels deep; expected at most launches > generations > values")


def per_generation(launches: Sequence[Sequence[float]]) -> list[list[list[float]]]:
    """Launches of one value per generation (ttft, e2e) as launches > generations > [value]."""
    return [[[float(v)] for v in launch] for launch in launches]


def depth(x) -> int:
    """How many list levels ``x`` nests (a flat list: 1)."""
    d = 0
    while isinstance(x, (list, tuple, np.ndarray)):
        if len(x) == 0:
            raise ValueError("samples contain an empty list: every launch and generation needs a value")
        x = x[0]
        d += 1
    return d


def _pack(nested: list[list[list[float]]], name: str) -> tuple[np.ndarray, np.ndarray]:
    """(values (L, Gmax, Smax) padded with NaN, generations per launch (L,))."""
    if not nested or any(not launch for launch in nested):
        raise ValueError(f"{name} is empty: at least one launch with one generation is needed")
    L = len(nested)
    G = np.array([len(launch) for launch in nested])
    S = max(len(g) for launch in nested for g in launch)
    values = np.full((L, int(G.max()), S), np.nan)
    for i, launch in enumerate(nested):
        for j, g in enumerate(launch):
            values[i, j, :len(g)] = _as_array(g, name)
    return values, G


def _nested_boot_medians(values: np.ndarray, G: np.ndarray, n_boot: int, rng: np.random.Generator,
                         resample_launches: bool = True) -> np.ndarray:
    """Medians of ``n_boot`` two-level resamples: launches, then generations within each."""
    L, Gmax, S = values.shape
    out = np.empty(n_boot)
    rows = max(1, 2_000_000 // (L * Gmax * S))  # bound memory: about 16 MB of draws at a time
    for start in range(0, n_boot, rows):
        b = min(rows, n_boot - start)
        launch = rng.integers(0, L, size=(b, L)) if resample_launches and L > 1 \
            else np.broadcast_to(np.arange(L), (b, L))
        n_gen = G[launch]  # (b, L) generations in each drawn launch
        gen = (rng.random((b, L, Gmax)) * n_gen[..., None]).astype(np.int64)  # (b, L, Gmax)
        draw = values[launch[..., None], gen]  # (b, L, Gmax, S)
        draw[np.arange(Gmax)[None, None, :] >= n_gen[..., None]] = np.nan  # a launch draws its own count
        out[start:start + b] = np.nanmedian(draw.reshape(b, -1), axis=1)
    return out


def small_sample_factor(n: int, confidence: float = 0.95) -> float:
    """How much to widen a bootstrap percentile interval resampled from ``n`` top-level units."""
    if n < 2:
        return 1.0
    from scipy.stats import norm, t

    q = 0.5 + confidence / 2
    return float(t.ppf(q, n - 1) / norm.ppf(q) * math.sqrt(n / (n - 1)))


def _widen(lo: float, hi: float, estimate: float, factor: float) -> tuple[float, float]:
    """The interval stretched about ``estimate`` by ``factor``; on the log scale for positive values."""
    if factor == 1.0:
        return lo, hi
    if lo > 0 and estimate > 0:
        return estimate * (lo / estimate) ** factor, estimate * (hi / estimate) ** factor
    return estimate - factor * (estimate - lo), estimate + factor * (hi - estimate)


def _components(values: np.ndarray, G: np.ndarray, n_boot: int, rng: np.random.Generator,
                confidence: float) -> tuple[np.ndarray, float, float]:
    """(bootstrap medians, widened variance, raw variance) of one cell's nested samples, on the log scale.

    The raw variance is that of the two-level bootstrap; the within-launch share is measured
    by a bootstrap that keeps every launch and resamples generations only; the between-launch
    share is the rest. Each share is widened by the small-sample factor of its own count.
    """
    full = _nested_boot_medians(values, G, n_boot, rng)
    v_total = float(np.var(np.log(full))) if np.all(full > 0) else float(np.var(full))
    within = _nested_boot_medians(values, G, n_boot, rng, resample_launches=False)
    v_within = min(v_total, float(np.var(np.log(within))) if np.all(within > 0) else float(np.var(within)))
    v_between = v_total - v_within
    f_launch = small_sample_factor(int(G.size), confidence) if G.size > 1 else 1.0
    f_gen = small_sample_factor(int(G.min()), confidence)
    return full, f_launch**2 * v_between + f_gen**2 * v_within, v_total


def _widening(widened: float, raw: float) -> float:
    return math.sqrt(widened / raw) if raw > 0 else 1.0


def nested_median(samples) -> float:
    """The median of every value, pooled over launches and generations."""
    values = np.concatenate([np.asarray(g, dtype=np.float64) for launch in nest(samples) for g in launch])
    return float(np.median(values))


def nested_boot_medians(samples, *, n_boot: int = 2000, seed: int = 0) -> np.ndarray:
    """The bootstrap distribution of ``nested_median`` (launches, then generations)."""
    values, G = _pack(nest(samples), "samples")
    return _nested_boot_medians(values, G, n_boot, np.random.default_rng(seed))


def nested_median_ci(samples, *, confidence: float = 0.95, n_boot: int = 2000,
                     seed: int = 0) -> tuple[float, float]:
    """Hierarchical bootstrap interval of the pooled median of nested samples.

    ``samples``: launches > generations > values (see ``nest``). Each resample draws the
    launches with replacement, then within each drawn launch as many whole generations as it
    has, with replacement; its median is the median of every value drawn. The percentile
    interval is then widened for the counts at each level (see the module's docstring). With
    one launch the interval is that launch's spread between generations alone, which says
    nothing of how a fresh process would land: run several launches.
    """
    _check_confidence(confidence)
    values, G = _pack(nest(samples), "samples")
    if values.shape[0] == 1 and G[0] == 1 and values.shape[2] == 1:
        v = float(values[0, 0, 0])
        return v, v
    boot, widened, raw = _components(values, G, n_boot, np.random.default_rng(seed), confidence)
    lo, hi = _interval(boot, confidence)
    return _widen(lo, hi, nested_median(samples), _widening(widened, raw))


def summarize_nested(samples, *, confidence: float = 0.95, n_boot: int = 2000, seed: int = 0) -> dict:
    """``summarize`` of the pooled values, with the hierarchical interval of ``nested_median_ci``."""
    nested = nest(samples)
    flat = [v for launch in nested for g in launch for v in g]
    stats = summarize(flat, confidence=confidence, n_boot=1, seed=seed)
    stats["ci95_low"], stats["ci95_high"] = nested_median_ci(nested, confidence=confidence, n_boot=n_boot,
                                                             seed=seed)
    return stats


def nested_relative_ci_width(samples, *, confidence: float = 0.95, n_boot: int = 1000, seed: int = 0) -> float:
    """(high - low) / median of ``nested_median_ci``: the stopping rule inside one launch.

    Fewer than two generations: the spread between generations is unknown, so infinite.
    """
    nested = nest(samples)
    if sum(len(launch) for launch in nested) < 2:
        return math.inf
    lo, hi = nested_median_ci(nested, confidence=confidence, n_boot=n_boot, seed=seed)
    median = nested_median(nested)
    if median == 0.0:
        return 0.0 if hi == lo else math.inf
    return (hi - lo) / abs(median)


def nested_ratio_ci(base, new, *, confidence: float = 0.95, n_boot: int = 2000,
                    seed: int = 0) -> tuple[float, float, float]:
    """median(new) / median(base) of nested samples, and its hierarchical bootstrap interval.

    The two runs are resampled independently, each at its own levels (launches, then whole
    generations); each draw gives one ratio of medians and the interval is read off those,
    widened for each run's counts as ``nested_median_ci`` is. For latencies a ratio below 1
    means ``new`` is faster.
    """
    _check_confidence(confidence)
    b_vals, b_G = _pack(nest(base), "base samples")
    n_vals, n_G = _pack(nest(new), "new samples")
    base_median = nested_median(base)
    if base_median == 0.0:
        raise ValueError("base samples have a median of 0: the ratio is undefined")
    ratio = nested_median(new) / base_median
    rng = np.random.default_rng(seed)
    b_meds, b_wide, b_raw = _components(b_vals, b_G, n_boot, rng, confidence)
    n_meds, n_wide, n_raw = _components(n_vals, n_G, n_boot, rng, confidence)
    if np.any(b_meds == 0.0):
        raise ValueError("a bootstrap median of the base samples is 0: the ratio is undefined")
    lo, hi = _interval(n_meds / b_meds, confidence)
    lo, hi = _widen(lo, hi, ratio, _widening(b_wide + n_wide, b_raw + n_raw))  # the two runs are independent
    return ratio, lo, hi
