"""atoms.intervals against known sampling distributions and scipy's exact binomial interval."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from atoms.errors import BadInputError
from atoms.intervals import (
    Interval,
    bootstrap,
    bootstrap_r2,
    bootstrap_ratio,
    combine_seeds,
    fraction_interval,
    resample_ratio,
    resample_statistic,
)


def test_bootstrap_mean_covers_truth_with_normal_width():
    x = np.random.default_rng(1).normal(3.0, 2.0, size=5000)
    iv = bootstrap(x, np.mean, seed=0)
    assert isinstance(iv, Interval) and iv.n == 5000 and iv.level == 0.95
    assert iv.estimate == pytest.approx(x.mean(), abs=1e-12)
    assert iv.contains(3.0)
    # The normal theory width 2 * 1.96 * sigma / sqrt(n); the percentile bootstrap agrees within 10%.
    assert iv.width == pytest.approx(2 * 1.96 * 2.0 / math.sqrt(5000), rel=0.1)


def test_bootstrap_coverage_near_nominal():
    rng = np.random.default_rng(7)
    hits = sum(
        bootstrap(rng.exponential(1.0, size=300), n_resamples=400, seed=i).contains(1.0) for i in range(200)
    )
    # Nominal 95%; the percentile bootstrap of a skewed mean at n = 300 undercovers slightly. A binomial
    # 200-trial count under 170 or at 200 would mean a broken interval (too narrow or far too wide).
    assert 170 <= hits < 200


def test_bootstrap_of_rows_with_custom_statistic():
    rng = np.random.default_rng(2)
    pairs = np.stack([rng.normal(size=1000), rng.normal(size=1000)], axis=1)
    iv = bootstrap(pairs, lambda p: float(np.median(p[:, 0] - p[:, 1])), seed=3)
    assert iv.contains(0.0) and iv.low < iv.estimate < iv.high


def test_bootstrap_r2_covers_the_population_value():
    # m = x + noise, x ~ N(0, I_4), noise ~ N(0, s^2 I_4): the population R^2 is 1 - s^2. A mean of per-sample
    # ratios err_i / var_i (a ratio of chi-squares, mean 2 s^2 here) would miss it by far.
    rng = np.random.default_rng(4)
    n, d, s = 4000, 4, 0.3
    x = rng.normal(size=(n, d))
    noise = rng.normal(scale=s, size=(n, d))
    err = (noise**2).sum(axis=1)
    var = ((x - x.mean(axis=0)) ** 2).sum(axis=1)
    iv = bootstrap_r2(err, var, seed=0)
    assert iv.estimate == pytest.approx(1 - err.sum() / var.sum(), abs=1e-15)
    assert iv.contains(1 - s**2)
    assert iv.width < 0.01


def test_ratio_interval_and_replicates_agree():
    rng = np.random.default_rng(5)
    num, den = rng.uniform(0, 1, 500), rng.uniform(1, 2, 500)
    iv = bootstrap_ratio(num, den, seed=9)
    reps = resample_ratio(num, den, seed=9)
    assert reps.shape == (2000,) and reps.dtype == np.float64
    assert (iv.low, iv.high) == tuple(np.quantile(reps, [0.025, 0.975]))
    assert iv.estimate == pytest.approx(num.sum() / den.sum())


def test_determinism_by_seed():
    x = np.random.default_rng(0).normal(size=300)
    assert bootstrap(x, seed=11) == bootstrap(x, seed=11)
    assert bootstrap(x, seed=11).low != bootstrap(x, seed=12).low
    gen_a, gen_b = np.random.default_rng(3), np.random.default_rng(3)
    assert np.array_equal(resample_statistic(x, seed=gen_a), resample_statistic(x, seed=gen_b))


@pytest.mark.parametrize("k,n", [(0, 10), (3, 10), (10, 10), (0, 1), (1, 1), (5, 1000)])
def test_fraction_interval_matches_scipy_exact(k, n):
    iv = fraction_interval(k, n)
    ref = stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="exact")
    assert (iv.low, iv.high) == pytest.approx((ref.low, ref.high), abs=1e-12)
    assert 0.0 <= iv.low <= iv.estimate <= iv.high <= 1.0
    assert iv.estimate == k / n


def test_fraction_interval_edges_are_not_points():
    none, every = fraction_interval(0, 50), fraction_interval(50, 50)
    assert none.low == 0.0 and none.high == pytest.approx(1 - 0.025 ** (1 / 50))
    assert every.high == 1.0 and every.low == pytest.approx(0.025 ** (1 / 50))


def test_combine_seeds_covers_seed_spread():
    rng = np.random.default_rng(0)
    estimates = [0.80, 0.85, 0.90]
    replicates = [rng.normal(e, 0.001, size=500) for e in estimates]
    iv = combine_seeds(estimates, replicates, seed=1)
    assert iv.n == 3 and iv.estimate == pytest.approx(0.85)
    # Seeds differ by far more than the within-seed spread (0.001): the interval must reflect the seeds.
    assert iv.low < 0.83 and iv.high > 0.87
    assert 0.80 - 0.005 <= iv.low and iv.high <= 0.90 + 0.005
    same = combine_seeds([0.5] * 3, [rng.normal(0.5, 0.01, size=500) for _ in range(3)], seed=1)
    # Identical seeds: only the within-seed spread remains, shrunk by averaging three draws.
    assert same.width == pytest.approx(2 * 1.96 * 0.01 / math.sqrt(3), rel=0.15)
    assert combine_seeds(estimates, replicates, seed=1) == iv


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: bootstrap([]), "empty"),
        (lambda: bootstrap([1.0, math.nan, 2.0]), "non-finite"),
        (lambda: bootstrap([1.0]), "at least 2"),
        (lambda: bootstrap([1.0, 2.0], level=1.0), "level"),
        (lambda: bootstrap([1.0, 2.0], level=0.0), "level"),
        (lambda: bootstrap([1.0, 2.0], level=True), "level"),
        (lambda: bootstrap([1.0, 2.0], n_resamples=10), "n_resamples"),
        (lambda: bootstrap(["a", "b"]), "real numbers"),
        (lambda: bootstrap_r2([1.0, 2.0, 3.0], [1.0, 2.0]), "same length"),
        (lambda: bootstrap_r2([-1.0, 2.0], [1.0, 1.0]), ">= 0"),
        (lambda: bootstrap_ratio([1.0, 2.0], [0.0, 0.0]), "sums to 0"),
        (lambda: fraction_interval(3, 2), "successes"),
        (lambda: fraction_interval(0, 0), "trials"),
        (lambda: fraction_interval(1.5, 2), "int"),
        (lambda: fraction_interval(1, 2, level=2.0), "level"),
        (lambda: combine_seeds([], []), "one estimate"),
        (lambda: combine_seeds([0.5, 0.6], [[0.5, 0.5]]), "one estimate"),
        (lambda: combine_seeds([math.nan], [[0.5, 0.5]]), "non-finite"),
    ],
)
def test_bad_input(call, match):
    with pytest.raises(BadInputError, match=match):
        call()


def test_statistic_undefined_on_a_resample_is_reported():
    with pytest.raises(BadInputError, match="non-finite value"):
        bootstrap([0.0, 1.0, 2.0], lambda v: math.inf if v.max() == 0 else v.mean(), n_resamples=200)
