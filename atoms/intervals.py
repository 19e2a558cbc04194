"""Confidence intervals for the verdict table (SPEC section 8), all in float64.

- `bootstrap`: percentile bootstrap of any statistic of per-sample rows (held-out samples resampled with
  replacement).
- `bootstrap_ratio` / `bootstrap_r2`: the same for a ratio of sums of paired per-sample quantities, e.g.
  R^2 = 1 - sum_i err_i / sum_i var_i with err_i = ||m_i - m_hat_i||^2 and var_i = ||m_i - mean(m)||^2. The
  pairs are resampled together, so the interval is that of the pooled ratio, not of a mean of per-sample
  ratios (which R^2 is not).
- `fraction_interval`: the Clopper-Pearson (exact binomial) interval of a fraction of samples, e.g. a
  certified fraction or the per-sample q*. Exact coverage >= level for every true rate, and always inside
  [0, 1], also at 0 / n and n / n where a normal approximation collapses to a point.
- `combine_seeds`: an interval over training seeds by a two-level (hierarchical) bootstrap of the per-seed
  bootstrap replicates (`resample_statistic` / `resample_ratio` return them).

Every function is deterministic given `seed` (an int or a numpy Generator). The percentile interval is
[q_(1 - level) / 2, q_(1 + level) / 2] of the replicates (Efron and Tibshirani 1993, ch. 13); the estimate
is the statistic on the full sample, not the replicates' mean.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

import numpy as np
from numpy.typing import ArrayLike

from atoms.errors import BadInputError

__all__ = [
    "Interval",
    "bootstrap",
    "bootstrap_r2",
    "bootstrap_ratio",
    "combine_seeds",
    "fraction_interval",
    "percentile_interval",
    "resample_ratio",
    "resample_statistic",
]

DEFAULT_LEVEL = 0.95
"""Two-sided confidence level of every interval unless a caller asks for another."""
DEFAULT_RESAMPLES = 2000
"""Bootstrap replicates: with 2000, each 2.5% tail holds 50 replicates, enough for a stable percentile."""
# Index blocks of at most this many entries (8 bytes each: 32 MiB) are drawn at once when resampling sums.
_BLOCK_ENTRIES = 1 << 22

Seed = int | np.random.Generator


class Interval(NamedTuple):
    """An estimate with a two-sided confidence interval."""

    estimate: float
    """The statistic on the full sample (for seeds: the mean of the per-seed estimates)."""
    low: float
    """Lower end of the interval."""
    high: float
    """Upper end of the interval."""
    level: float
    """Confidence level, in (0, 1)."""
    method: str
    """How the interval was computed, printed beside it in the report."""
    n: int
    """Units resampled at the top level: samples, or seeds for `combine_seeds`."""

    def contains(self, value: float) -> bool:
        """Whether `value` lies in [low, high]."""
        return self.low <= value <= self.high

    @property
    def width(self) -> float:
        """high - low."""
        return self.high - self.low


def _check_level(level: float) -> float:
    if isinstance(level, bool) or not isinstance(level, (int, float)) or not 0 < level < 1:
        raise BadInputError(f"level must be a float in (0, 1), e.g. 0.95; got {level!r}.")
    return float(level)


def _check_resamples(n_resamples: int, level: float) -> None:
    # Each tail must hold at least one replicate, or its percentile is the extreme replicate by default.
    need = math.ceil(2 / (1 - level))
    if isinstance(n_resamples, bool) or not isinstance(n_resamples, (int, np.integer)) or n_resamples < need:
        raise BadInputError(
            f"n_resamples must be an int >= {need} at level {level} (each tail needs a replicate); got "
            f"{n_resamples!r}. The default is {DEFAULT_RESAMPLES}."
        )


def _as_samples(values: ArrayLike, what: str) -> np.ndarray:
    """A float64 array of per-sample rows, (n_samples, ...), with at least two finite samples."""
    arr = np.asarray(values)
    if arr.dtype.kind not in "biuf":
        raise BadInputError(f"{what} must hold real numbers, got dtype {arr.dtype}.")
    arr = arr.astype(np.float64)
    if arr.ndim == 0 or arr.shape[0] == 0:
        raise BadInputError(f"{what} is empty (shape {arr.shape}); pass one value (or row) per sample.")
    bad = ~np.isfinite(arr)
    if bad.any():
        raise BadInputError(
            f"{what} holds {int(bad.sum())} non-finite values (NaN or Inf), the first at flat index "
            f"{int(np.flatnonzero(bad)[0])}; drop or repair those samples first."
        )
    if arr.shape[0] < 2:
        raise BadInputError(
            f"{what} has {arr.shape[0]} sample; a bootstrap needs at least 2 (one sample has no spread)."
        )
    return arr


def _index_blocks(rng: np.random.Generator, n: int, n_resamples: int) -> Iterator[np.ndarray]:
    """(rows, n) int64 blocks of resampling indices, n_resamples rows in all."""
    rows = max(1, _BLOCK_ENTRIES // n)
    for start in range(0, n_resamples, rows):
        yield rng.integers(0, n, size=(min(rows, n_resamples - start), n))


def percentile_interval(
    estimate: float, replicates: ArrayLike, *, level: float = DEFAULT_LEVEL, method: str, n: int
) -> Interval:
    """The percentile interval of bootstrap `replicates` (n_resamples,) around `estimate`."""
    level = _check_level(level)
    reps = _as_samples(replicates, "replicates")
    if reps.ndim != 1:
        raise BadInputError(f"replicates must be 1-D (n_resamples,), got shape {reps.shape}.")
    low, high = np.quantile(reps, [(1 - level) / 2, (1 + level) / 2])
    return Interval(float(estimate), float(low), float(high), level, method, int(n))


def resample_statistic(
    values: ArrayLike,
    statistic: Callable[[np.ndarray], float] = np.mean,
    *,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: Seed = 0,
) -> np.ndarray:
    """Bootstrap replicates (n_resamples,) float64 of `statistic` over resamples of the rows of `values`.

    values: (n_samples,) or (n_samples, ...) per-sample rows; `statistic` maps a resample of the same shape
    to a float.
    """
    arr = _as_samples(values, "values")
    _check_resamples(n_resamples, 0.5)
    rng = np.random.default_rng(seed)
    out = np.empty(n_resamples, dtype=np.float64)
    i = 0
    for block in _index_blocks(rng, arr.shape[0], n_resamples):
        for idx in block:
            out[i] = statistic(arr[idx])
            i += 1
    if not np.isfinite(out).all():
        raise BadInputError(
            f"statistic returned a non-finite value on {int((~np.isfinite(out)).sum())} of {n_resamples} "
            "resamples; it must be defined on every resample (e.g. not divide by a count that can be 0)."
        )
    return out


def bootstrap(
    values: ArrayLike,
    statistic: Callable[[np.ndarray], float] = np.mean,
    *,
    level: float = DEFAULT_LEVEL,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: Seed = 0,
) -> Interval:
    """Percentile bootstrap interval of `statistic` over the samples (rows) of `values`.

    values: (n_samples,) or (n_samples, ...) per-sample rows, e.g. held-out angles (n,) or
    (coherence, l0) pairs (n, 2) for the quantile form of q*.
    """
    level = _check_level(level)
    _check_resamples(n_resamples, level)
    arr = _as_samples(values, "values")
    estimate = float(statistic(arr))
    reps = resample_statistic(arr, statistic, n_resamples=n_resamples, seed=seed)
    name = getattr(statistic, "__name__", "statistic")
    return percentile_interval(
        estimate, reps, level=level, method=f"percentile bootstrap of {name}", n=arr.shape[0]
    )


def _paired(numerator: ArrayLike, denominator: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    num = _as_samples(numerator, "numerator")
    den = _as_samples(denominator, "denominator")
    if num.ndim != 1 or num.shape != den.shape:
        raise BadInputError(
            f"numerator and denominator must be 1-D with one entry per sample and the same length; got "
            f"shapes {num.shape} and {den.shape}."
        )
    if den.sum() == 0:
        raise BadInputError("denominator sums to 0 over all samples; the ratio is undefined.")
    return num, den


def resample_ratio(
    numerator: ArrayLike, denominator: ArrayLike, *, n_resamples: int = DEFAULT_RESAMPLES, seed: Seed = 0
) -> np.ndarray:
    """Replicates (n_resamples,) of sum(numerator) / sum(denominator), the (n_samples,) pairs resampled
    together. For per-seed R^2 replicates pass `1 - resample_ratio(err, var)`."""
    num, den = _paired(numerator, denominator)
    _check_resamples(n_resamples, 0.5)
    rng = np.random.default_rng(seed)
    parts = []
    for idx in _index_blocks(rng, num.shape[0], n_resamples):
        d = den[idx].sum(axis=1)
        if (d == 0).any():
            raise BadInputError(
                "the denominator sums to 0 on a resample (most samples have a zero denominator); the "
                "ratio is undefined there. Use more samples."
            )
        parts.append(num[idx].sum(axis=1) / d)
    return np.concatenate(parts)


def bootstrap_ratio(
    numerator: ArrayLike,
    denominator: ArrayLike,
    *,
    level: float = DEFAULT_LEVEL,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: Seed = 0,
) -> Interval:
    """Percentile bootstrap interval of sum(numerator) / sum(denominator) over paired (n_samples,) values."""
    level = _check_level(level)
    _check_resamples(n_resamples, level)
    num, den = _paired(numerator, denominator)
    reps = resample_ratio(num, den, n_resamples=n_resamples, seed=seed)
    return percentile_interval(
        float(num.sum() / den.sum()),
        reps,
        level=level,
        method="percentile bootstrap of a ratio of sums (pairs resampled)",
        n=num.shape[0],
    )


def bootstrap_r2(
    squared_error: ArrayLike,
    centered_sq_norm: ArrayLike,
    *,
    level: float = DEFAULT_LEVEL,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: Seed = 0,
) -> Interval:
    """Interval of R^2 = 1 - sum_i err_i / sum_i var_i from per-sample (n_samples,) float arrays.

    squared_error: ||m_i - m_hat_i||^2; centered_sq_norm: ||m_i - mean(m)||^2 with the full sample's mean (in
    the norm the R^2 is reported in). A resample keeps that mean instead of recomputing its own; the
    resample's own would lower its denominator by n ||mean_b - mean||^2, of relative size about 1/n, which
    is under 0.1% of the denominator at the thousands of held-out samples the report uses.
    """
    level = _check_level(level)
    _check_resamples(n_resamples, level)
    err, var = _paired(squared_error, centered_sq_norm)
    if (err < 0).any() or (var < 0).any():
        raise BadInputError("squared errors and centered squared norms must be >= 0.")
    reps = 1.0 - resample_ratio(err, var, n_resamples=n_resamples, seed=seed)
    return percentile_interval(
        float(1.0 - err.sum() / var.sum()),
        reps,
        level=level,
        method="percentile bootstrap of R^2 (per-sample error and variance resampled in pairs)",
        n=err.shape[0],
    )


def fraction_interval(successes: int, trials: int, *, level: float = DEFAULT_LEVEL) -> Interval:
    """Clopper-Pearson interval of the fraction successes / trials (e.g. certified samples / samples)."""
    from scipy.special import betaincinv

    level = _check_level(level)
    for name, v in (("successes", successes), ("trials", trials)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise BadInputError(f"{name} must be an int, got {v!r}.")
    if trials < 1 or not 0 <= successes <= trials:
        raise BadInputError(f"need trials >= 1 and 0 <= successes <= trials, got {successes} / {trials}.")
    k, n, alpha = int(successes), int(trials), 1 - level
    # Beta quantiles of the exact binomial tails; at 0 or n successes that side is the bound itself.
    low = 0.0 if k == 0 else float(betaincinv(k, n - k + 1, alpha / 2))
    high = 1.0 if k == n else float(betaincinv(k + 1, n - k, 1 - alpha / 2))
    return Interval(k / n, low, high, level, "Clopper-Pearson (exact binomial)", n)


def combine_seeds(
    estimates: Sequence[float],
    replicates: Sequence[ArrayLike],
    *,
    level: float = DEFAULT_LEVEL,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: Seed = 0,
) -> Interval:
    """Interval of a statistic's mean over training seeds, covering seed-to-seed and sampling variation.

    estimates: one full-sample estimate per seed; replicates: per seed, its bootstrap replicates
    (n_resamples_s,) over held-out samples (from `resample_statistic` / `resample_ratio`).
    Two-level bootstrap (Davison and Hinkley 1997, section 3.8; Saravanan et al. 2020): each combined
    replicate draws S seeds with replacement from the S given, takes one random within-seed replicate of
    each, and averages them. The estimate is the mean of the per-seed estimates.

    With few seeds the outer level sees few distinct draws (10 multisets at S = 3) and, as any bootstrap,
    underestimates the between-seed variance by a factor (S - 1) / S: the interval is a floor on the
    uncertainty, which is why the verdicts also require a minimum number of seeds.
    """
    level = _check_level(level)
    _check_resamples(n_resamples, level)
    s = len(estimates)
    if s == 0 or len(replicates) != s:
        raise BadInputError(
            f"pass one estimate and one replicate array per seed, at least one seed; got {s} estimates and "
            f"{len(replicates)} replicate arrays."
        )
    est = np.asarray(estimates, dtype=np.float64)
    if not np.isfinite(est).all():
        raise BadInputError(f"estimates hold non-finite values: {est.tolist()}.")
    reps = [_as_samples(r, f"replicates of seed {i}") for i, r in enumerate(replicates)]
    if any(r.ndim != 1 for r in reps):
        raise BadInputError("each seed's replicates must be 1-D (n_resamples,).")
    lengths = np.array([r.shape[0] for r in reps])
    padded = np.zeros((s, int(lengths.max())), dtype=np.float64)
    for i, r in enumerate(reps):
        padded[i, : r.shape[0]] = r
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, s, size=(n_resamples, s))
    within = (rng.random((n_resamples, s)) * lengths[picks]).astype(np.int64)
    combined = padded[picks, within].mean(axis=1)
    return percentile_interval(
        float(est.mean()),
        combined,
        level=level,
        method=f"hierarchical bootstrap over {s} seeds (seeds, then held-out samples, resampled)",
        n=s,
    )
