"""`evaluate`: every metric of SPEC section 5 for one SAE-like module, in one call, streaming.

The module is named `evaluation` rather than `evaluate` so that importing it never replaces the public
function `atoms.evaluate` by a module of the same name (a submodule import sets the package attribute).

One pass over the activations (two when the AIP is fitted here: `AIP.fit` streams them first) computes R^2 in
both norms (`R2Accumulator`), the support sizes and per-sample coherences (for L0 and q*), and keeps the first
`certify_samples` codes for the certified fractions, which then run once on those within a time budget.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Iterable, Iterator
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from atoms.aip import AIP
from atoms.dictionary import Dictionary
from atoms.errors import BadInputError, as_batches
from atoms.metrics import (
    Certified,
    QStar,
    R2Accumulator,
    certified_fractions,
    per_sample_coherence,
    q_star,
    to_sparse,
    unit_codes,
)
from atoms.tsae import SparseAutoencoder, as_sae

__all__ = ["EvalResult", "evaluate"]

Activations = torch.Tensor | np.ndarray | Iterable[torch.Tensor | np.ndarray]

L0_QUANTILES = (0.1, 0.5, 0.9, 1.0)
# Rows per batch when a single tensor is streamed: bounds the (batch, n_atoms) codes in memory.
_TENSOR_BATCH = 4096
# Cost model of the certified fractions, in operations per second, from the measurements in
# atoms.metrics.certified_fractions' docstring and the README (2304 atoms in d = 576, 2 shared CPU cores):
# the spark bounds took 13 s (n_atoms^2 d = 3.1e9), ERC about 1 s a sample at l0 near 150 (n_atoms d l0 =
# 2.0e8), the batched basis pursuit 18-40 s for 1024 samples (about 4 n_atoms d per sample).
_OPS_PER_SECOND = 2e8
_BP_OPS_PER_ATOM_DIM = 4


class EvalResult(NamedTuple):
    """What `evaluate` measured. Tensors are on the activations' device."""

    n: int
    """Number of activation vectors evaluated."""
    r2_euclidean: float
    """Faithfulness R^2 = 1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2, Euclidean norm."""
    r2_aip: float
    """The same R^2 on whitened vectors (the AIP norm), under `aip`."""
    l0_mean: float
    """Mean number of active latents per sample."""
    l0_quantiles: dict[float, float]
    """Support-size quantiles inf{x : F_n(x) >= q} (q*'s convention), keyed by q in L0_QUANTILES (1: max)."""
    coherence_aip: float
    """Max |AIP cosine| between two decoder atoms (SPEC section 3's mu)."""
    coherence_euclidean: float
    """Max |Euclidean cosine| between two decoder atoms."""
    q_star: QStar
    """Stability q*, quantile form: sup{q : mu_q < 1/(2 K_q - 1)}, per-sample coherences under the AIP."""
    q_star_per_sample: QStar
    """Stability q*, per-sample form: the fraction of samples with mu_i < 1/(2 |L_i| - 1)."""
    mu: torch.Tensor
    """(n,) float64 per-sample coherence under the AIP: max |cos| between two atoms of a sample's support."""
    l0: torch.Tensor
    """(n,) int64 support size per sample."""
    certified: Certified | None
    """Spark, ERC and basis-pursuit fractions (`atoms.metrics.certified_fractions`) over those of the first
    certify_samples samples that have l0 <= d, their codes converted to unit codes; None if there is none."""
    n_dense: int
    """Samples among the first certify_samples with l0 > d, left out of `certified`: any d + 1 atoms in R^d
    are linearly dependent, so such a code is never the unique one and all three certificates fail."""
    aip: AIP
    """The AIP of r2_aip, coherence_aip and q*: the one given, or fitted on the activations."""
    seconds: float
    """Wall time of the whole evaluation."""


class _Stream(NamedTuple):
    """What the pass over the activations accumulates."""

    r2_euclidean: R2Accumulator
    r2_aip: R2Accumulator
    mu: torch.Tensor
    l0: torch.Tensor
    kept: tuple[torch.Tensor, torch.Tensor] | None


def _is_one_shot(activations: Activations) -> bool:
    """True for iterators (generators, `iter(...)`), which a second pass would find empty."""
    return isinstance(activations, Iterator)


def _batches(activations: Activations, d: int) -> Iterator[torch.Tensor]:
    """(batch, d) checked float tensors (`as_batches`); one tensor or array is cut into _TENSOR_BATCH rows."""
    for x in as_batches(activations, d):
        yield from x.split(_TENSOR_BATCH)


def _cat_sparse(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse codes (n_i, k_i) of several batches as one (sum n_i, max k_i), padded with -1 and 0."""
    width = max(idx.shape[1] for idx, _ in parts)
    pad = [(width - idx.shape[1], idx, vals) for idx, vals in parts]
    indices = torch.cat([nn.functional.pad(idx, (0, extra), value=-1) for extra, idx, _ in pad])
    values = torch.cat([nn.functional.pad(vals, (0, extra)) for extra, _, vals in pad])
    return indices, values


def _stream(
    sae: SparseAutoencoder, activations: Activations, aip: AIP, dictionary: Dictionary, keep: int
) -> _Stream:
    """One pass: R^2 in both norms, per-sample coherence and l0, and the first `keep` unit codes."""
    euclidean, whitened = R2Accumulator(), R2Accumulator(aip)
    mus, l0s, kept = [], [], []
    n_kept = 0
    device = None
    for x in _batches(activations, sae.d):
        device = x.device if device is None else device
        with torch.no_grad():
            codes = sae.encode(x)
            x_hat = sae.decode(codes)
        euclidean.update(x, x_hat)
        whitened.update(x, x_hat)
        indices, values = to_sparse(codes.to(device))
        # Codes multiply the raw atoms over the model's input scale (x_hat = (codes / s) @ raw + offset), and
        # unit_codes scales each by its atom's AIP norm: ERC and basis pursuit then see codes of the unit-norm
        # atoms they test, whatever the SAE's decoder norms.
        values = unit_codes(dictionary, values.double() / sae.input_scale, indices)
        mu, l0 = per_sample_coherence(dictionary, indices, values)
        mus.append(mu)
        l0s.append(l0)
        if n_kept < keep:
            kept.append((indices[: keep - n_kept], values[: keep - n_kept]))
            n_kept += kept[-1][0].shape[0]
    return _Stream(euclidean, whitened, torch.cat(mus), torch.cat(l0s), _cat_sparse(kept) if kept else None)


def _check_count(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise BadInputError(f"{what} must be an int >= 0, got {value!r}.")
    return int(value)


def _check_budget(value: object) -> float | None:
    ok = value is None or (
        isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    )
    if not ok:
        raise BadInputError(
            f"time_budget_s must be a number of seconds > 0, or None for no limit; got {value!r}."
        )
    return value


def _certify(
    dictionary: Dictionary,
    kept: tuple[torch.Tensor, torch.Tensor] | None,
    *,
    time_budget_s: float | None,
    nonneg: bool,
    seed: int,
) -> tuple[Certified | None, int]:
    """certified_fractions on the kept codes with l0 <= d, its sample counts capped to the time budget;
    returns it (None when no code qualifies) and the number of kept codes with l0 > d."""
    if kept is None:
        return None, 0
    indices, values = kept
    l0 = (values != 0).sum(dim=1)
    sparse = l0 <= dictionary.d
    n_dense = int((~sparse).sum())
    if n_dense:
        warnings.warn(
            f"{n_dense} of the {l0.numel()} samples kept for the certified fractions have l0 > d = "
            f"{dictionary.d} (largest {int(l0.max())}): any d + 1 atoms in R^d are linearly dependent, so "
            "their codes are never unique and every certificate fails for them. They are left out of the "
            "spark, ERC and basis-pursuit fractions and counted in EvalResult.n_dense; train for sparser "
            "codes (l0 well under d / 2) for the certificates to mean anything.",
            stacklevel=3,
        )
    if n_dense == l0.numel():
        return None, n_dense
    indices, values = indices[sparse], values[sparse]
    n, n_atoms, d = indices.shape[0], dictionary.n_atoms, dictionary.d
    mean_l0 = float(l0[sparse].double().mean())
    spark_s = n_atoms**2 * d / _OPS_PER_SECOND
    per_sample_s = (n_atoms * d * mean_l0 + _BP_OPS_PER_ATOM_DIM * n_atoms * d) / _OPS_PER_SECOND
    estimate = spark_s + n * per_sample_s
    samples, spark_lower = n, None
    if time_budget_s is not None and estimate > time_budget_s:
        if spark_s > time_budget_s / 2:
            # The coherence bound spark >= 1 + 1/mu (SPEC theorem 2) costs one Gram pass, already cached.
            mu = dictionary.coherence()
            spark_lower, spark_s = (1.0 + 1.0 / mu if mu > 0 else math.inf), 0.0
        samples = max(0, min(n, int((time_budget_s - spark_s) / per_sample_s)))
        fallback = ", and the spark bound is the coherence bound 1 + 1/mu" if spark_lower is not None else ""
        warnings.warn(
            f"the certified fractions would take about {estimate:.0f} s here (spark bounds "
            f"{n_atoms**2 * d / _OPS_PER_SECOND:.1f} s for {n_atoms} atoms in d = {d}, then "
            f"{per_sample_s:.2g} s a sample for ERC and basis pursuit at mean l0 {mean_l0:.1f}, {n} "
            f"samples), over time_budget_s = {time_budget_s:g}: ERC and basis pursuit run on {samples} of "
            f"them{fallback}. Raise time_budget_s (or pass None) for all of them.",
            stacklevel=3,
        )
    certified = certified_fractions(
        dictionary,
        indices,
        values,
        spark_lower=spark_lower,
        erc_samples=samples,
        bp_samples=samples,
        nonneg=nonneg,
        seed=seed,
        codes_of="unit",
    )
    return certified, n_dense


def _quantiles(l0: torch.Tensor) -> dict[float, float]:
    """Lower empirical quantiles of l0 (n,) at L0_QUANTILES, by sorting: torch.quantile refuses more than
    2^24 samples."""
    ordered = l0.sort().values
    return {q: float(ordered[max(math.ceil(q * l0.numel()) - 1, 0)]) for q in L0_QUANTILES}


def _fit_aip(activations: Activations, aip: AIP | None, d: int) -> AIP:
    """The given AIP, or one fitted on the activations (which are then read twice), checked against d."""
    if aip is None:
        if _is_one_shot(activations):
            raise BadInputError(
                f"activations is a one-shot iterator ({type(activations).__name__}), but with aip=None it "
                "is read twice (once to fit the AIP, once to measure); pass something that can be iterated "
                "again (a DataLoader, a list of batches, a tensor), or pass an aip fitted beforehand."
            )
        aip = AIP.fit(activations)
        source = "the activations have"
    elif not isinstance(aip, AIP):
        raise BadInputError(f"aip must be an atoms.AIP or None, got {type(aip).__name__}.")
    else:
        source = "aip has"
    if aip.d != d:
        raise BadInputError(
            f"{source} d = {aip.d} but the SAE has d = {d}; pass activations (and an AIP fitted on them) of "
            "the layer the SAE reads."
        )
    return aip


def evaluate(
    sae: nn.Module,
    activations: Activations,
    aip: AIP | None = None,
    *,
    certify_samples: int = 256,
    time_budget_s: float | None = 60.0,
    nonneg: bool = True,
    seed: int = 0,
) -> EvalResult:
    """SPEC section 5's metrics of an SAE on activations: R^2, L0, coherence, q* and certified fractions.

    sae: a TSAE or ReLUSAE, or any module with SAELens-style weights (`atoms.tsae.as_sae`: W_enc (d, n),
    b_enc (n,), W_dec (n, d), b_dec (d,), threshold or log_threshold (n,) for a JumpReLU SAE).
    activations: one (..., d) tensor or array (streamed in batches of 4096 rows), or any iterable of
    (batch, d) batches (a DataLoader, a list, a generator), each read once and never concatenated.
    aip: the AIP of the AIP-norm R^2, the AIP coherence and q*; None fits one on the activations (uncentered,
    no ridge: `AIP.fit`), which reads them twice, so a one-shot iterator then needs an AIP passed.

    Codes are converted here to codes of the AIP-unit-norm atoms (`atoms.metrics.unit_codes`, after dividing
    by the model's input scale), which ERC and basis pursuit assume. certify_samples: the first that many
    samples, in the order given (shuffle a loader for a random subsample), go to the certified fractions,
    where ERC and basis pursuit run on all of them (nonneg: the non-negative basis pursuit, right for
    threshold and ReLU codes; seed: certified_fractions' subsample). time_budget_s: when the estimated time
    of the certified fractions exceeds it, fewer samples go through ERC and basis pursuit (and the spark bound
    falls back to the coherence bound 1 + 1/mu when the babel bound alone would take half of it), with a
    warning giving the estimate; None runs them all. Kept samples with l0 > d are left out with a warning:
    no certificate can hold for them.
    """
    start = time.perf_counter()
    model = as_sae(sae)
    certify_samples = _check_count(certify_samples, "certify_samples")
    time_budget_s = _check_budget(time_budget_s)
    if not isinstance(nonneg, bool):
        raise BadInputError(f"nonneg must be a bool, got {nonneg!r}.")
    seed = _check_count(seed, "seed")
    aip = _fit_aip(activations, aip, model.d)
    raw, _ = model.dictionary()
    dictionary, euclidean = Dictionary(raw, aip), Dictionary(raw)
    stream = _stream(model, activations, aip, dictionary, certify_samples)
    certified, n_dense = _certify(
        dictionary, stream.kept, time_budget_s=time_budget_s, nonneg=nonneg, seed=seed
    )
    return EvalResult(
        n=stream.l0.numel(),
        r2_euclidean=stream.r2_euclidean.value(),
        r2_aip=stream.r2_aip.value(),
        l0_mean=float(stream.l0.double().mean()),
        l0_quantiles=_quantiles(stream.l0),
        coherence_aip=dictionary.coherence(),
        coherence_euclidean=euclidean.coherence(),
        q_star=q_star(stream.mu, stream.l0),
        q_star_per_sample=q_star(stream.mu, stream.l0, form="per_sample"),
        mu=stream.mu,
        l0=stream.l0,
        certified=certified,
        n_dense=n_dense,
        aip=aip,
        seconds=time.perf_counter() - start,
    )
