import math

import numpy as np
import pytest

from bench.results.schema import STAT_KEYS
from bench.results.stats import median_ci, ratio_ci, relative_ci_width, settled, summarize


def test_summary_of_known_samples():
    s = summarize([1, 2, 3, 4, 5, 6, 7, 8, 9, 10])
    assert tuple(s) == STAT_KEYS
    assert s["median"] == 5.5
    assert s["p90"] == pytest.approx(9.1)  # linear interpolation: 9 + 0.1 * (10 - 9)
    assert s["p99"] == pytest.approx(9.91)
    assert s["mean"] == 5.5
    assert s["stdev"] == pytest.approx(math.sqrt(sum((x - 5.5) ** 2 for x in range(1, 11)) / 9))
    assert s["cv"] == pytest.approx(s["stdev"] / 5.5)
    assert s["n"] == 10
    assert s["ci95_low"] <= s["median"] <= s["ci95_high"]
    assert s["ci95_low"] < s["ci95_high"]


def test_summary_values_are_plain_python_numbers():
    s = summarize(np.array([1.0, 2.0, 4.0]))
    assert all(type(v) is float for k, v in s.items() if k != "n")
    assert type(s["n"]) is int


def test_one_sample_collapses_the_interval():
    s = summarize([3.25])
    assert s["median"] == s["mean"] == s["p90"] == s["ci95_low"] == s["ci95_high"] == 3.25
    assert s["stdev"] == 0.0 and s["cv"] == 0.0 and s["n"] == 1


def test_empty_and_non_finite_samples_are_rejected():
    with pytest.raises(ValueError, match="empty"):
        summarize([])
    with pytest.raises(ValueError, match="non-finite"):
        summarize([1.0, float("nan")])
    with pytest.raises(ValueError, match="confidence"):
        summarize([1.0, 2.0], confidence=1.5)


def test_bootstrap_is_reproducible_with_the_seed():
    x = np.random.default_rng(1).lognormal(size=30)
    assert median_ci(x, seed=7) == median_ci(x, seed=7)
    np.random.seed(0)  # the global RNG plays no part
    first = median_ci(x, seed=7)
    np.random.seed(1)
    assert median_ci(x, seed=7) == first
    assert summarize(x, seed=3) == summarize(x, seed=3)


def test_interval_narrows_with_more_samples():
    rng = np.random.default_rng(0)
    few = rng.normal(10.0, 1.0, size=10)
    many = rng.normal(10.0, 1.0, size=1000)
    assert relative_ci_width(many) < relative_ci_width(few) / 3
    lo, hi = median_ci(many)
    assert lo <= np.median(many) <= hi
    assert hi - lo < 0.3  # the median's standard error here is about 0.04


def test_wider_confidence_gives_a_wider_interval():
    x = np.random.default_rng(2).normal(5.0, 1.0, size=50)
    lo90, hi90 = median_ci(x, confidence=0.90)
    lo99, hi99 = median_ci(x, confidence=0.99)
    assert lo99 <= lo90 and hi90 <= hi99 and (hi99 - lo99) > (hi90 - lo90)


def test_relative_width_of_one_sample_is_unknown():
    assert relative_ci_width([1.0]) == math.inf
    assert relative_ci_width([2.0, 2.0, 2.0]) == 0.0


def test_settled_detects_the_end_of_warm_up():
    warming = [10.0, 8.0, 6.0, 5.0, 4.0, 3.0]
    assert not settled(warming, window=3, tol=0.05)
    steady = warming + [3.0, 3.02, 2.99, 3.01, 3.0, 2.98]
    assert settled(steady, window=3, tol=0.05)
    assert not settled([1.0, 1.0, 1.0], window=3)  # fewer than two windows
    # One outlier in the last window does not hold warm-up open: medians, not means.
    assert settled([3.0, 3.0, 3.0, 3.0, 30.0, 3.0], window=3, tol=0.05)
    with pytest.raises(ValueError, match="window"):
        settled([1.0] * 6, window=0)


def test_ratio_of_medians_and_its_interval():
    rng = np.random.default_rng(4)
    base = rng.normal(10.0, 0.5, size=200)
    new = rng.normal(5.0, 0.25, size=200)
    ratio, lo, hi = ratio_ci(base, new)
    assert ratio == pytest.approx(np.median(new) / np.median(base))
    assert lo <= ratio <= hi
    assert lo <= 0.5 <= hi and hi < 1.0  # clearly faster: the interval excludes 1
    same, lo_same, hi_same = ratio_ci(base, rng.normal(10.0, 0.5, size=200))
    assert lo_same < 1.0 < hi_same
    assert ratio_ci(base, new, seed=1) == ratio_ci(base, new, seed=1)
    with pytest.raises(ValueError, match="base_samples"):
        ratio_ci([], new)
