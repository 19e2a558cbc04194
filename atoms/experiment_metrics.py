"""Metrics of one dictionary on held-out codes: neurons, features and atoms are measured alike.

R^2 in both norms, l0, q* in both forms and geometries, the certified fractions (spark, ERC, basis pursuit),
coherence against the Welch bound, the theorems' premises, the TSAE's threshold window (SPEC theorem 4), and
the point each trained SAE adds to the R^2-vs-L0 frontier. Each record's keys are declared here with their
definitions (atoms.experiment_definitions).
"""

from __future__ import annotations

from typing import Any

import torch

from atoms.aip import AIP
from atoms.dictionary import Dictionary, welch_bound
from atoms.experiment_config import ExperimentConfig
from atoms.experiment_definitions import Keys, each
from atoms.experiment_training import TRAINING
from atoms.metrics import certified_fractions, per_sample_coherence, q_star, r2, to_sparse, tsae_window
from atoms.theorems import CLAIMS, instance
from atoms.tsae import MIN_THRESHOLD, TSAE

__all__ = [
    "DICTIONARY",
    "FRONTIER",
    "dictionary_metrics",
    "frontier_point",
    "random_rows",
    "sample_coherence",
    "window",
]

# Per-sample (mu_i, l0_i) pairs kept per dictionary for the q* scatter figure.
SCATTER_POINTS = 400
# Rows per call of per_sample_coherence, sorted by support size (see sample_coherence).
COHERENCE_BUCKET = 128


def random_rows(n: int, k: int, seed: int) -> torch.Tensor:
    """k distinct random rows of n (all of them, in order, when k >= n), sorted."""
    if k >= n:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k].sort().values


def sample_coherence(dictionary: Dictionary, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`atoms.metrics.per_sample_coherence` of dense codes (n, n_atoms), in buckets of similar support size.

    to_sparse pads every row to the widest support of its batch and a support Gram costs width^2 per row;
    sorted into buckets of COHERENCE_BUCKET rows, each row pays about its own size. Returns mu (n,) float64
    and l0 (n,) int64 in the rows' order.
    """
    n = codes.shape[0]
    order = (codes != 0).sum(dim=1).argsort()
    mu = torch.empty(n, dtype=torch.float64)
    l0 = torch.empty(n, dtype=torch.int64)
    for s in range(0, n, COHERENCE_BUCKET):
        rows = order[s : s + COHERENCE_BUCKET]
        mu[rows], l0[rows] = per_sample_coherence(dictionary, *to_sparse(codes[rows]))
    return mu, l0


_Q_STARS = {
    "q_star_quantile": "q* = sup{q : mu_q < 1/(2 K_q - 1)}, mu_q and K_q the q-quantiles of the "
    "per-sample coherence (atoms normalised under the AIP) and of l0 (SPEC section 5).",
    "q_star_per_sample": "Fraction of held-out samples with mu_i < 1/(2 |L_i| - 1), atoms normalised "
    "under the AIP (the paper's v1 wording).",
    "q_star_quantile_euclidean": "q* (quantile form) with the atoms normalised in the Euclidean norm.",
    "q_star_per_sample_euclidean": "q* (per-sample form) with Euclidean-normalised atoms.",
    "q_star_samples": "Held-out samples behind q* and the certified fractions.",
    "q_star_mu_q": "mu_q at the last q where the quantile condition holds (null: it never holds).",
    "q_star_K_q": "K_q at the last q where the quantile condition holds (null: it never holds).",
    "median_sample_coherence": "Median per-sample coherence mu_i under the AIP.",
    "uniqueness_bound_at_median_l0": "1/(2K - 1) at K = the median l0: what mu_i must stay under.",
}
_SCATTER = Keys(
    {
        "mu": "Per-sample coherences (AIP) of a random subsample, for the q* figure.",
        "l0": "Support sizes of the same subsample.",
    }
)


def _q_stars(dic_aip: Dictionary, dic_euc: Dictionary, codes: torch.Tensor, seed: int) -> dict[str, Any]:
    mu, l0 = sample_coherence(dic_aip, codes)
    quant = q_star(mu, l0, form="quantile")
    mu_e, l0_e = sample_coherence(dic_euc, codes)
    k_med = max(1, int(l0.double().median().round()))
    pick = random_rows(mu.numel(), SCATTER_POINTS, seed + 5)
    return {
        "q_star_quantile": quant.value,
        "q_star_per_sample": q_star(mu, l0, form="per_sample").value,
        "q_star_quantile_euclidean": q_star(mu_e, l0_e, form="quantile").value,
        "q_star_per_sample_euclidean": q_star(mu_e, l0_e, form="per_sample").value,
        "q_star_samples": int(mu.numel()),
        "q_star_mu_q": quant.detail["mu_q"],
        "q_star_K_q": quant.detail["K_q"],
        "median_sample_coherence": float(mu.median()),
        "uniqueness_bound_at_median_l0": 1.0 / (2 * k_med - 1),
        "scatter": _SCATTER.build(mu=mu[pick].tolist(), l0=l0[pick].tolist()),
    }


CERTIFIED = Keys(
    {
        "spark_lower": "Proven lower bound on spark(D) under the AIP (the larger of the coherence and babel "
        "bounds).",
        "spark_source": "Which bound gave spark_lower.",
        "spark_fraction": "Fraction of samples with l0 < spark_lower/2: their code is the unique sparsest "
        "one (Donoho-Elad 2003).",
        "erc_fraction": "Fraction of the ERC subsample whose support has Tropp's ERC < 1 (basis pursuit and "
        "OMP recover every code on it).",
        "erc_n": "Samples in the ERC subsample.",
        "erc_interval": each(
            "Wilson 95% interval of erc_fraction (low, high).", doc="Wilson 95% interval of erc_fraction."
        ),
        "bp_fraction": "Fraction of the basis-pursuit subsample recovered exactly (relative error < 1e-5).",
        "bp_n": "Samples solved by basis pursuit.",
        "bp_recovered": "Basis-pursuit samples recovered (relative error < 1e-5, dual certificate).",
        "bp_flagged": "Basis-pursuit samples neither recovered nor failed (1e-5 to 1e-3, or unproven).",
        "bp_failed": "Basis-pursuit samples over 1e-3 relative error or with a rival code.",
        "bp_interval": each(
            "Wilson 95% interval of bp_fraction (low, high).", doc="Wilson 95% interval of bp_fraction."
        ),
        "bp_solver": "Basis-pursuit solver used (ExperimentConfig.bp_solver).",
        "seconds": "Wall seconds of the certified fractions of this dictionary.",
        "basis": "True for the neurons: they form a basis, so every code is the unique representation and "
        "basis pursuit recovers it trivially; their certified fractions are not comparable to the SAEs'.",
    },
    optional=["basis"],
)


def _certified(
    dic_aip: Dictionary,
    idx: torch.Tensor,
    vals: torch.Tensor,
    config: ExperimentConfig,
    nonneg: bool,
    basis: bool,
) -> dict[str, Any]:
    cert = certified_fractions(
        dic_aip,
        idx,
        vals,
        codes_of="raw",
        erc_samples=config.erc_samples,
        bp_samples=config.bp_samples,
        bp_solver=config.bp_solver,
        bp_fallback=config.bp_fallback,
        nonneg=nonneg,
        seed=config.seed,
    )
    # The record is the declared fields of atoms.metrics.Certified, its intervals as [low, high].
    record = {k: getattr(cert, k) for k in CERTIFIED.keys if k != "basis"}
    record["erc_interval"], record["bp_interval"] = list(cert.erc_interval), list(cert.bp_interval)
    return CERTIFIED.build(**record, **({"basis": True} if basis else {}))


_CLAIM = {c.name: c for c in CLAIMS}

THEORY = Keys(
    {
        "coherence": "Coherence mu under the AIP (the theorems' premises read it).",
        "K": "K = the median l0 (at least 1), at which the premises are evaluated.",
        "welch_holds": "Whether the coherence is at least the Welch bound (the Welch claim's conclusion).",
        "welch_margin": "mu minus the Welch bound (>= 0: the Welch claim holds).",
        "uniqueness_margin": "1/(2K - 1) - mu: > 0 iff theorem 2's premise holds at K.",
        "l1_margin": "(1 + 1/mu)/2 - K: > 0 iff theorem 3's coherence premise holds at K.",
    }
)


def _theory(dic_aip: Dictionary, l0: torch.Tensor) -> dict[str, Any]:
    """The theorems' premises on a trained dictionary (atoms.theorems' claims), at K = the median l0.

    Only what is cheap at this size is evaluated: the Welch claim in full (its conclusion is exact), and the
    premise margins of uniqueness (theorem 2) and coherence-based l1 recovery (theorem 3); their conclusions
    need the spark or basis pursuit, which the certified fractions sample.
    """
    k = min(max(1, int(l0.double().median().round())), dic_aip.n_atoms)
    inst = instance(dic_aip, k, label="trained dictionary")
    welch = _CLAIM["welch"].check(inst)
    return THEORY.build(
        coherence=inst.mu,
        K=k,
        welch_holds=bool(welch.conclusion),
        welch_margin=welch.conclusion_margin,
        uniqueness_margin=_CLAIM["uniqueness_coherence"].premise(inst),
        l1_margin=_CLAIM["l1_coherence"].premise(inst),
    )


WINDOW = Keys(
    {
        "eps": "Coherence of the TSAE's atoms under the AIP (theorem 4's eps).",
        "K": "Largest support size among held-out codes.",
        "dmin": "Smallest non-zero code value.",
        "dmax": "Largest code value.",
        "global_lower": "eps K dmax: the window's lower end.",
        "global_upper": "dmin - eps (K - 1) dmax: the window's upper end.",
        "atoms_in_global": "Fraction of atoms whose effective threshold lies inside the global window.",
        "n_firing": "Atoms that fire on some held-out token.",
        "n_silent": "Atoms that fire on no held-out token.",
        "atom_nonempty": "Fraction of firing atoms whose own window is non-empty.",
        "atom_contains": "Fraction of firing atoms whose threshold lies in their own window.",
        "samples_active_ok": "Fraction of samples whose active atoms all have thresholds in their windows.",
        "samples_certified": "Fraction of samples whose support recovery the per-sample theorem proves (the "
        "TSAE window fraction).",
        "global_nonempty": "1 if the global window is non-empty, else 0.",
    }
)


def window(model: TSAE, dic_aip: Dictionary, codes: torch.Tensor) -> dict[str, Any]:
    """SPEC theorem 4's window on the trained TSAE, with the encoder biases folded into the thresholds."""
    p = {k: v.detach().to("cpu", torch.float64) for k, v in model.named_parameters()}
    theta = p["threshold"].clamp(min=MIN_THRESHOLD)
    effective = theta - p["b_enc"] + p["b_dec"] @ p["W_enc"]
    win = tsae_window(dic_aip, to_sparse(codes), effective)
    keep = {k: getattr(win, k) for k in WINDOW.keys if k != "global_nonempty"}
    return WINDOW.build(**keep, global_nonempty=int(win.global_nonempty))


DICTIONARY = Keys(
    {
        "n_atoms": "Atoms of the dictionary (d for neurons).",
        "r2_euclidean": "R^2 = 1 - sum ||m - m_hat||^2 / sum ||m - mean(m)||^2 on held-out tokens, Euclidean "
        "norm (neurons reconstruct exactly: 1).",
        "r2_aip": "The same R^2 in the AIP norm (whitened vectors).",
        "l0": "Mean number of non-zero code entries per held-out token.",
        "l0_median": "Median number of non-zero code entries per held-out token.",
        "silent_heldout": "Latents (or neurons) never positive on the held-out tokens.",
        "coherence_aip": "Coherence max_{i != j} |<d~_i, d~_j>| of the atoms under the AIP.",
        "coherence_euclidean": "Coherence of the atoms in the Euclidean norm.",
        "welch_bound": "Welch bound sqrt((N - d)/(d (N - 1))) on the coherence of N unit atoms in R^d.",
        **_Q_STARS,
        "scatter": _SCATTER,
        "certified": CERTIFIED,
        "theory": THEORY,
        "dead_training": "Latents that fired on none of the last fit_tokens training vectors (null for "
        "neurons).",
        "training": TRAINING,
        "window": WINDOW,
    },
    optional=["training", "window"],
)
"""A layer's "dictionaries" entry: neurons, features (ReLU SAE) or atoms (TSAE; only these have a window)."""


def dictionary_metrics(
    dic_aip: Dictionary,
    dic_euc: Dictionary,
    codes: torch.Tensor,
    heldout: torch.Tensor,
    x_hat: torch.Tensor,
    aip: AIP,
    config: ExperimentConfig,
    *,
    nonneg: bool,
    sample_rows: torch.Tensor,
    basis: bool = False,
    **trained: Any,
) -> dict[str, Any]:
    """R^2, l0, q*, certified fractions, coherence and premises of one dictionary on held-out codes.

    codes (n, n_atoms) dense, aligned with heldout (n, d) and its reconstruction x_hat (n, d); q*, the
    certified fractions and the premises use the rows `sample_rows` (each costs its support size squared).
    basis: the dictionary is a basis (the neurons). trained: the record's remaining keys (dead_training, and
    for an SAE its training record and, for the TSAE, its window).
    """
    nnz = (codes != 0).sum(dim=1)
    sub = codes[sample_rows]
    idx, vals = to_sparse(sub)
    return DICTIONARY.build(
        n_atoms=dic_aip.n_atoms,
        r2_euclidean=r2(heldout, x_hat),
        r2_aip=r2(heldout, x_hat, aip),
        l0=float(nnz.double().mean()),
        l0_median=float(nnz.double().median()),
        silent_heldout=int((~(codes > 0).any(dim=0)).sum()),
        coherence_aip=dic_aip.coherence(),
        coherence_euclidean=dic_euc.coherence(),
        welch_bound=welch_bound(dic_aip.n_atoms, dic_aip.d),
        **_q_stars(dic_aip, dic_euc, sub, config.seed),
        certified=_certified(dic_aip, idx, vals, config, nonneg, basis),
        theory=_theory(dic_aip, (sub != 0).sum(dim=1)),
        **trained,
    )


FRONTIER = Keys(
    {
        "target_l0": "Target mean L0 of this point of the R^2-vs-L0 frontier (first seed).",
        "l0": "Mean l0 reached on the held-out tokens.",
        "r2_euclidean": "Held-out R^2, Euclidean norm.",
        "r2_aip": "Held-out R^2, AIP norm.",
        "q_star_quantile": "q* (quantile form, AIP) on the q* samples.",
        "q_star_per_sample": "q* (per-sample form, AIP) on the q* samples.",
        "spark_fraction": "Fraction of samples proven unique by the spark bound.",
        "erc_fraction": "Fraction of the ERC subsample whose support has ERC < 1.",
        "bp_fraction": "Fraction of the basis-pursuit subsample recovered with a checked certificate.",
        "converged": "Whether this SAE's training converged by the plateau rule.",
        "steps": "Optimizer steps this SAE trained.",
    }
)


def frontier_point(target: float, metrics: dict[str, Any]) -> dict[str, Any]:
    """The R^2-vs-L0 frontier's point of an SAE trained to `target` mean L0, from its DICTIONARY record."""
    cert = metrics["certified"]
    return FRONTIER.build(
        target_l0=target,
        l0=metrics["l0"],
        r2_euclidean=metrics["r2_euclidean"],
        r2_aip=metrics["r2_aip"],
        q_star_quantile=metrics["q_star_quantile"],
        q_star_per_sample=metrics["q_star_per_sample"],
        spark_fraction=cert["spark_fraction"],
        erc_fraction=cert["erc_fraction"],
        bp_fraction=cert["bp_fraction"],
        converged=metrics["training"]["convergence"]["converged"],
        steps=metrics["training"]["steps"],
    )
