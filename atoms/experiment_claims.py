"""The evidence of each of the paper's claims at one layer, with intervals over held-out samples and seeds.

Every seed of the main sparsity gives its statistics with bootstrap replicates over held-out samples
(`seed_statistics`); `claims` combines them across seeds (`atoms.evidence.seed_interval`) into one record per
claim (`atoms.evidence.claim_record`), which the verdict rules of atoms.verdicts read.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from atoms.aip import AIP
from atoms.dictionary import Dictionary
from atoms.evidence import (
    SeedStatistic,
    claim_record,
    q_star_quantile,
    r2_statistic,
    seed_interval,
    statistic,
)
from atoms.experiment_config import ExperimentConfig
from atoms.experiment_definitions import Keys, each
from atoms.experiment_metrics import sample_coherence
from atoms.verdicts import Premise

__all__ = ["CLAIM", "SEED", "claims", "seed_statistics"]

SEED = Keys(
    {
        "kind": "Which SAE: features (ReLU SAE) or atoms (TSAE).",
        "seed": "Seed index (0 is the run's seed; seed i uses seed + 1000 i).",
        "r2_euclidean": "Held-out R^2 of this seed's SAE at main_l0, Euclidean norm.",
        "r2_aip": "Held-out R^2 of this seed's SAE at main_l0, AIP norm.",
        "q_star_quantile": "q* (quantile form, AIP) of this seed's SAE.",
        "l0": "Mean held-out l0 of this seed's SAE.",
        "tokens_seen": "Training vectors this seed's SAE saw.",
        "converged": "Whether this seed's training converged by the plateau rule.",
        "convergence_reason": "Why this seed's training counts as converged or not, in words.",
    }
)
"""An entry of a layer's "seeds": one training seed of the main sparsity."""

CLAIM = Keys(
    {
        "claim": "Name of the claim (a key of atoms.verdicts.PAPER_CLAIMS).",
        "estimate": "Our estimate of the claim's statistic (mean over seeds where trained).",
        "low": "Lower end of its 95% interval (bootstrap over held-out samples and seeds).",
        "high": "Upper end of its 95% interval.",
        "level": "Confidence level of the interval.",
        "method": "How the interval was computed.",
        "n": "Held-out samples (one seed) or seeds behind the interval.",
        "conditions": each("A condition of the measurement (layer, tokens, L0, n_atoms, ...)."),
        "converged": "Whether every seed's training converged (null where none is involved).",
        "convergence_reason": "Each seed's convergence, in words (empty where no training is involved).",
        "seeds": "Training seeds behind the interval (1 where no training is involved).",
        "premises": each(
            Keys(
                {
                    "name": "The premise of the comparison, in words.",
                    "met": "Whether the premise of the comparison holds.",
                    "detail": "The numbers behind it.",
                }
            )
        ),
    }
)
"""An entry of a layer's "claims" (the record of atoms.evidence.claim_record)."""


def _window_margin(eps: float) -> Callable[[np.ndarray], float]:
    """The statistic dmin - eps (2K - 1) dmax of rows (l0_i, smallest, largest non-zero code_i) of the
    samples with a non-empty code: theorem 4's window is non-empty iff it is > 0."""

    def margin(rows: np.ndarray) -> float:
        return float(rows[:, 1].min() - eps * (2.0 * rows[:, 0].max() - 1.0) * rows[:, 2].max())

    return margin


def seed_statistics(
    kind: str,
    s: int,
    dic_aip: Dictionary,
    codes: torch.Tensor,
    h: torch.Tensor,
    x_hat: torch.Tensor,
    aip: AIP,
    sample_rows: torch.Tensor,
    training: dict[str, Any],
    config: ExperimentConfig,
) -> tuple[dict[str, Any], dict[str, SeedStatistic]]:
    """One seed's record of the main sparsity (SEED) and its statistics, each with its bootstrap replicates
    over held-out samples, for the claims. training: the SAE's training record."""
    seed = config.seed + 7 * s
    mu, l0 = sample_coherence(dic_aip, codes[sample_rows])
    coherence = dic_aip.coherence()
    l0_rows = l0.double().numpy()
    stats = {
        "r2_euclidean": r2_statistic(h, x_hat, seed=seed),
        "r2_aip": r2_statistic(h, x_hat, aip, seed=seed),
        "q_star": statistic(np.stack([mu.numpy(), l0_rows], 1), q_star_quantile, seed=seed),
        "rip_margin": statistic(
            l0_rows, lambda k: 1.0 - (max(1.0, np.median(k)) - 1.0) * coherence, seed=seed
        ),
        "uniqueness_margin": statistic(
            l0_rows, lambda k: 1.0 / (2.0 * max(1.0, np.median(k)) - 1.0) - coherence, seed=seed
        ),
    }
    if kind == "atoms":
        active = codes[(codes != 0).any(dim=1)]
        masked = torch.where(active != 0, active, torch.inf)
        rows = torch.stack(
            [(active != 0).sum(1).double(), masked.min(1).values.double(), active.max(1).values.double()], 1
        )
        stats["window_margin"] = statistic(rows.numpy(), _window_margin(coherence), seed=seed)
    conv = training["convergence"]
    record = SEED.build(
        kind=kind,
        seed=s,
        r2_euclidean=stats["r2_euclidean"].estimate,
        r2_aip=stats["r2_aip"].estimate,
        q_star_quantile=stats["q_star"].estimate,
        l0=float((codes != 0).sum(1).double().mean()),
        tokens_seen=training["tokens_seen"],
        converged=conv["converged"],
        convergence_reason=conv["reason"],
    )
    return record, stats


# Claims measured on the trained SAEs of each kind: (claim, statistic of seed_statistics, norm).
_TRAINED_CLAIMS = {
    "atoms": [
        ("r2_atoms", "r2_euclidean", "euclidean"),
        ("r2_atoms", "r2_aip", "aip"),
        ("q_star_atoms", "q_star", "aip"),
        ("tsae_window", "window_margin", "aip"),
        ("rip_premise", "rip_margin", "aip"),
        ("uniqueness_premise", "uniqueness_margin", "aip"),
    ],
    "features": [
        ("r2_features", "r2_euclidean", "euclidean"),
        ("r2_features", "r2_aip", "aip"),
        ("q_star_features", "q_star", "aip"),
    ],
}


def claims(
    layer: int,
    config: ExperimentConfig,
    n_atoms: int,
    d: int,
    angles: dict[str, SeedStatistic],
    neuron_q: SeedStatistic,
    per_seed: dict[str, list[tuple[dict[str, Any], dict[str, SeedStatistic]]]],
    fit_tokens: int,
    dics: dict[str, dict[str, Any]],
    heldout_tokens: int,
) -> list[dict[str, Any]]:
    """Every claim's evidence at this layer (atoms.evidence.claim_record), for the verdict rules.

    angles: the mean-angle statistics by geometry; neuron_q: the neurons' q*; per_seed: each kind's
    (record, statistics) of seed_statistics; fit_tokens: the tokens the AIP was fitted on; dics: the
    layer's DICTIONARY records.
    """
    base = {"model": config.model, "layer": layer, "heldout_tokens": heldout_tokens}
    size = Premise(
        "dictionary size 4d, as the paper's",
        n_atoms == 4 * d,
        f"n_atoms = {n_atoms}, d = {d}",
    )
    heldout = Premise(
        "S estimated on other text than the angles'",
        True,
        f"the AIP is fitted on {fit_tokens} tokens of the fit articles, the angles measured on "
        "held-out articles",
    )
    records = [
        claim_record(
            "aip_angles_90", seed_interval([angles["aip"]]), {**base, "norm": "aip"}, premises=[heldout]
        ),
        claim_record(
            "euclidean_angles_off_90", seed_interval([angles["euclidean"]]), {**base, "norm": "euclidean"}
        ),
        claim_record(
            "q_star_neurons",
            seed_interval([neuron_q]),
            {**base, "L0": dics["neurons"]["l0"], "q_star_samples": dics["neurons"]["q_star_samples"]},
        ),
    ]
    for kind, rows in _TRAINED_CLAIMS.items():
        seeds = [record for record, _ in per_seed[kind]]
        converged = all(r["converged"] for r in seeds)
        reasons = "; ".join(f"seed {r['seed']}: {r['convergence_reason']}" for r in seeds)
        conditions = {
            **base,
            "L0": float(np.mean([r["l0"] for r in seeds])),
            "target_L0": config.main_l0,
            "tokens_seen": int(np.mean([r["tokens_seen"] for r in seeds])),
            "n_atoms": n_atoms,
        }
        for claim, name, norm in rows:
            interval = seed_interval([stats[name] for _, stats in per_seed[kind]], seed=config.seed)
            records.append(
                claim_record(
                    claim,
                    interval,
                    {**conditions, "norm": norm}
                    | (
                        {"q_star_samples": dics[kind]["q_star_samples"]} if claim.startswith("q_star") else {}
                    ),
                    converged=converged,
                    convergence_reason=reasons,
                    seeds=len(seeds),
                    premises=[size] if claim.startswith(("r2", "q_star")) else [],
                )
            )
    return records
