"""From held-out measurements to the evidence the verdict rules read (atoms.verdicts).

Per trained seed, each statistic gets its full-sample estimate and bootstrap replicates over the held-out
samples (atoms.intervals); the seeds are then combined by the hierarchical bootstrap
(`atoms.intervals.combine_seeds`). A claim's evidence is stored in the results as plain JSON
(`claim_record`) and read back as `atoms.verdicts.ClaimEvidence` (`evidence_from_record`), so a report can
rebuild every verdict from results.json alone.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch

from atoms.aip import AIP
from atoms.intervals import Interval, combine_seeds, percentile_interval, resample_ratio, resample_statistic
from atoms.verdicts import ClaimEvidence, Premise

__all__ = [
    "RESAMPLES",
    "SeedStatistic",
    "angle_means",
    "claim_record",
    "evidence_from_record",
    "q_star_quantile",
    "r2_statistic",
    "seed_interval",
    "statistic",
]

RESAMPLES = 1000
"""Bootstrap replicates per seed and statistic: the 2.5% and 97.5% quantiles then rest on 25 replicates
each, and a statistic that loops in Python (q*, the window margin) costs about a second per seed."""


class SeedStatistic(NamedTuple):
    """One seed's estimate of a statistic and its bootstrap replicates over held-out samples."""

    estimate: float
    replicates: np.ndarray
    """(RESAMPLES,) float64."""
    n: int
    """Held-out samples behind it."""


def _rows(x: torch.Tensor, aip: AIP | None) -> torch.Tensor:
    x = x.to(torch.float64)
    return aip.whiten(x) if aip is not None else x


def r2_statistic(
    x: torch.Tensor, x_hat: torch.Tensor, aip: AIP | None = None, *, seed: int = 0
) -> SeedStatistic:
    """R^2 = 1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 of rows x, x_hat (n, d), in the AIP norm when
    `aip` is given, with replicates resampling the per-sample (error, variance) pairs."""
    a, b = _rows(x, aip), _rows(x_hat, aip)
    err = (a - b).pow(2).sum(-1).cpu().numpy()
    var = (a - a.mean(0)).pow(2).sum(-1).cpu().numpy()
    reps = 1.0 - resample_ratio(err, var, n_resamples=RESAMPLES, seed=seed)
    return SeedStatistic(float(1.0 - err.sum() / var.sum()), reps, int(err.shape[0]))


def statistic(values: np.ndarray, function: Any, *, seed: int = 0) -> SeedStatistic:
    """`function` of per-sample rows `values` (n, ...) with its replicates over resampled rows."""
    values = np.asarray(values, dtype=np.float64)
    reps = resample_statistic(values, function, n_resamples=RESAMPLES, seed=seed)
    return SeedStatistic(float(function(values)), reps, int(values.shape[0]))


def q_star_quantile(rows: np.ndarray) -> float:
    """q* in its quantile form (atoms.metrics.q_star) of rows (n, 2) = (mu_i, l0_i).

    mu_(j) rises and 1/(2 K_(j) - 1) falls with j, so the condition holds on a prefix of the sorted pairs
    and q* is its length over n (a zero support's bound is +inf).
    """
    mu = np.sort(rows[:, 0])
    k = np.sort(rows[:, 1])
    with np.errstate(divide="ignore"):
        bound = np.where(k > 0, 1.0 / (2.0 * k - 1.0), np.inf)
    return float(np.count_nonzero(mu < bound) / rows.shape[0])


def angle_means(x: torch.Tensor, aip: AIP | None = None) -> np.ndarray:
    """Per-vector mean angle in degrees (n,) to the other n - 1 vectors of rows x (n, d), in the AIP
    geometry when `aip` is given. Their mean is the mean pair angle; resampling vectors (not pairs, which
    share vectors and are not independent) gives its interval."""
    u = _rows(x, aip)
    u = u / u.norm(dim=1, keepdim=True)
    cos = (u @ u.T).clamp(-1.0, 1.0)
    degrees = torch.rad2deg(torch.arccos(cos))
    degrees.fill_diagonal_(0.0)
    return (degrees.sum(1) / (x.shape[0] - 1)).cpu().numpy()


def seed_interval(per_seed: Sequence[SeedStatistic], *, seed: int = 0) -> Interval:
    """The interval of a statistic over seeds (hierarchical bootstrap), or of one seed's replicates."""
    if len(per_seed) == 1:
        s = per_seed[0]
        return percentile_interval(
            s.estimate, s.replicates, method="percentile bootstrap over held-out samples (one seed)", n=s.n
        )
    return combine_seeds([s.estimate for s in per_seed], [s.replicates for s in per_seed], seed=seed)


def claim_record(
    claim: str,
    interval: Interval,
    conditions: Mapping[str, Any],
    *,
    converged: bool | None = None,
    convergence_reason: str = "",
    seeds: int = 1,
    premises: Sequence[Premise] = (),
) -> dict[str, Any]:
    """The JSON form of a claim's evidence (the fields of atoms.verdicts.ClaimEvidence)."""
    return {
        "claim": claim,
        "estimate": interval.estimate,
        "low": interval.low,
        "high": interval.high,
        "level": interval.level,
        "method": interval.method,
        "n": interval.n,
        "conditions": dict(conditions),
        "converged": converged,
        "convergence_reason": convergence_reason,
        "seeds": seeds,
        "premises": [{"name": p.name, "met": p.met, "detail": p.detail} for p in premises],
    }


def evidence_from_record(record: Mapping[str, Any]) -> ClaimEvidence:
    """`claim_record`'s output back as atoms.verdicts.ClaimEvidence."""
    interval = Interval(
        float(record["estimate"]),
        float(record["low"]),
        float(record["high"]),
        float(record["level"]),
        str(record["method"]),
        int(record["n"]),
    )
    return ClaimEvidence(
        claim=record["claim"],
        interval=interval,
        conditions=dict(record["conditions"]),
        converged=record["converged"],
        convergence_reason=record["convergence_reason"],
        seeds=int(record["seeds"]),
        premises=tuple(Premise(p["name"], bool(p["met"]), p["detail"]) for p in record["premises"]),
    )
