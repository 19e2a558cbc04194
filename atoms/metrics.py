"""The paper's metrics (SPEC section 5) and certified counterparts, for any dictionary and its sparse codes.

- Faithfulness: `r2` and the streaming `R2Accumulator`, in the Euclidean norm or the AIP norm.
- Stability: `q_star` in the quantile and the per-sample forms, from `per_sample_coherence` (the
  support-Gram reduction of atoms.kernels.support_gram). Both are heuristics; `certified_fractions` gives what
  is proven per sample (support under half a proven spark lower bound, Tropp's ERC, exact basis-pursuit
  recovery).
- `tsae_window`: the threshold window of SPEC theorem 4 evaluated on a trained model.
- Baseline helpers: `neuron_codes` and `neuron_dictionary` (the identity basis).

Sparse codes. A batch of codes is either dense (n, n_atoms) or sparse: indices (n, k) int64 with -1 for
padding and values (n, k), the padding's values 0 (`to_sparse` converts). An entry with a valid index and
value 0 is inactive. Every metric of codes here reads them as coefficients of `dictionary.unit`, the whitened
unit-norm atoms: m~ = sum_j delta_j unit_j. Codes of the raw atoms (m = delta @ W_dec) become unit codes by
scaling each atom's coefficient by its AIP norm, `unit_codes`. Supports, coherences, ERC and exact recovery
(judged by relative error) do not change under a positive global scale, so only per-atom scales matter:
a TSAE's codes f (x_hat = (f / s) @ raw atoms + offset, s its input scale, every atom of AIP norm 1, so
`Dictionary(*model.dictionary())` has norms 1) can be passed as they are.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import numpy as np
import torch

from atoms.aip import AIP
from atoms.dictionary import Dictionary
from atoms.errors import BadInputError, IllConditionedError, as_float_tensor
from atoms.kernels.progress import Progress, ticker
from atoms.kernels.support_gram import support_coherence
from atoms.recovery import RecoveryResult, basis_pursuit, certify_codes, erc_of_atoms, wilson_interval
from atoms.uniqueness import spark_lower_bounds

__all__ = [
    "Certified",
    "QStar",
    "R2Accumulator",
    "Window",
    "certified_fractions",
    "neuron_codes",
    "neuron_dictionary",
    "per_sample_coherence",
    "q_star",
    "r2",
    "to_sparse",
    "tsae_window",
    "unit_codes",
]

Array = torch.Tensor | np.ndarray
Codes = tuple[Array, Array]
# A basis-pursuit solver with `atoms.recovery.basis_pursuit`'s signature, e.g. a batched one.
BPSolver = Callable[..., RecoveryResult]

# Per-sample window check: rows per chunk so that a chunk's (rows, n_atoms) temporaries stay near 64 MiB.
_CHUNK_BYTES = 64 << 20
_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


# ------------------------------------------------------------------------------------------------------------
# Faithfulness R^2
# ------------------------------------------------------------------------------------------------------------


class R2Accumulator:
    """Streaming R^2 = 1 - sum ||m - m_hat||^2 / sum ||m - mean(m)||^2 over batches, float64 (SPEC section 5).

    mean(m) is the mean vector over every sample seen. The denominator is kept as Chan et al.'s pairwise
    update (count, mean (d,), scatter trace), which does not cancel catastrophically when the activations have
    a large mean. With an `aip`, both sums are taken on whitened vectors, i.e. in the AIP norm.

    Any batching gives the one-shot `r2` value up to float64 rounding (summation order differs, so not bit
    for bit): the tests hold it to 1e-12 relative.
    """

    def __init__(self, aip: AIP | None = None) -> None:
        if aip is not None and not isinstance(aip, AIP):
            raise BadInputError(f"aip must be an atoms.AIP or None, got {type(aip).__name__}.")
        self.aip = aip
        self.d: int | None = None if aip is None else aip.d
        self._count = 0
        self._mean: torch.Tensor | None = None
        self._scatter = 0.0
        self._sse = 0.0

    def __repr__(self) -> str:
        return f"R2Accumulator(d={self.d}, aip={self.aip is not None}, count={self._count})"

    @property
    def count(self) -> int:
        """Number of samples accumulated so far."""
        return self._count

    def _combine(self, count: int, mean: torch.Tensor, scatter: float, sse: float) -> None:
        if self._count == 0:
            self._count, self._mean, self._scatter, self._sse = count, mean, scatter, sse
            return
        total = self._count + count
        delta = mean - self._mean
        self._scatter += scatter + float(delta @ delta) * (self._count * count / total)
        self._mean = self._mean + delta * (count / total)
        self._sse += sse
        self._count = total

    def update(self, x: Array, x_hat: Array) -> R2Accumulator:
        """Add activations x (n, d) or (..., d) and reconstructions x_hat of the same shape; returns self."""
        # A statistic, not a loss: detach so that a model's output can be passed straight in.
        x = as_float_tensor(x, "x", ndim_min=2, d=self.d, dtype=torch.float64).detach()
        x_hat = as_float_tensor(x_hat, "x_hat", ndim_min=2, d=x.shape[-1], dtype=torch.float64).detach()
        if x.shape != x_hat.shape:
            raise BadInputError(
                f"x has shape {tuple(x.shape)} but x_hat {tuple(x_hat.shape)}; pass one reconstruction per "
                "activation, in the same layout."
            )
        x, x_hat = x.reshape(-1, x.shape[-1]), x_hat.reshape(-1, x.shape[-1]).to(x.device)
        if self.aip is not None:
            x, x_hat = self.aip.whiten(x), self.aip.whiten(x_hat)
        self.d = x.shape[1]
        mean = x.mean(dim=0)
        scatter = float((x - mean).pow(2).sum())
        sse = float((x - x_hat).pow(2).sum())
        self._combine(x.shape[0], mean.cpu(), scatter, sse)
        return self

    def merge(self, other: R2Accumulator) -> R2Accumulator:
        """A new accumulator holding both sets of samples (the same AIP required)."""
        if not isinstance(other, R2Accumulator):
            raise BadInputError(f"merge expects an R2Accumulator, got {type(other).__name__}.")
        same_aip = self.aip is other.aip or (
            self.aip is not None
            and other.aip is not None
            and torch.equal(self.aip.cholesky, other.aip.cholesky)
        )
        if not same_aip or (self.d is not None and other.d is not None and self.d != other.d):
            raise BadInputError(
                f"cannot merge {self!r} with {other!r}: both must measure the same width d in the same norm "
                "(the same AIP, or both Euclidean)."
            )
        out = R2Accumulator(self.aip)
        out.d = self.d if self.d is not None else other.d
        for part in (self, other):
            if part._count:
                out._combine(part._count, part._mean, part._scatter, part._sse)
        return out

    def state(self) -> tuple[int, torch.Tensor | None, float, float]:
        """(count, mean (d,) float64 or None before any sample, scatter, sse): what `from_state` rebuilds;
        for reductions across processes (atoms.distributed.all_reduce_r2)."""
        return self._count, None if self._mean is None else self._mean.clone(), self._scatter, self._sse

    @classmethod
    def from_state(
        cls, count: int, mean: torch.Tensor, scatter: float, sse: float, aip: AIP | None = None
    ) -> R2Accumulator:
        """The accumulator of `state()`'s values, mean (d,), in the norm of `aip` (None: Euclidean)."""
        out = cls(aip)
        out.d = mean.shape[0]
        if count:
            out._count, out._mean, out._scatter, out._sse = count, mean.to(torch.float64).cpu(), scatter, sse
        return out

    def value(self) -> float:
        """R^2 of everything accumulated; raises when there is no sample or the samples do not vary."""
        if self._count == 0:
            raise BadInputError("R2Accumulator has no samples yet; call update(x, x_hat) first.")
        if not self._scatter > 0:
            raise BadInputError(
                f"the {self._count} activations are all equal, so their variance is 0 and R^2 is undefined; "
                "pass at least two distinct activation vectors."
            )
        return 1.0 - self._sse / self._scatter


def r2(x: Array, x_hat: Array, aip: AIP | None = None) -> float:
    """Fraction of variance explained, 1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2, in float64.

    x, x_hat: (n, d) activations and reconstructions (numpy or torch, any float dtype). With `aip`, the norms
    are AIP norms (both sides whitened first); without, Euclidean. SPEC section 5 asks for both, since the
    paper does not say which it used. 1 for an exact reconstruction, 0 for the mean predictor, negative for
    anything worse than the mean.
    """
    return R2Accumulator(aip).update(x, x_hat).value()


# ------------------------------------------------------------------------------------------------------------
# Sparse codes
# ------------------------------------------------------------------------------------------------------------


def _check_int(value: Any, what: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise BadInputError(f"{what} must be an int >= {minimum}, got {value!r}.")
    return int(value)


def to_sparse(codes_dense: Array, k_max: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse form of dense codes (n, n_atoms): indices (n, k) int64 (-1 = padding) and values (n, k).

    Each row lists its non-zero entries by decreasing |value|, then padding (index -1, value 0). k is the
    largest number of non-zeros in a row (at least 1), or `k_max` when given; a row with more than `k_max`
    non-zeros raises BadInputError rather than being truncated. Values keep the input's floating dtype.
    """
    codes = as_float_tensor(codes_dense, "codes_dense", ndim_min=2)
    if codes.ndim != 2:
        raise BadInputError(
            f"codes_dense has shape {tuple(codes.shape)}; pass (n, n_atoms), e.g. codes.reshape(-1, n_atoms)."
        )
    n_atoms = codes.shape[1]
    nnz = (codes != 0).sum(dim=1)
    widest = int(nnz.max())
    if k_max is not None:
        k_max = _check_int(k_max, "k_max", 1)
        over = (nnz > k_max).nonzero().flatten()
        if over.numel():
            row = int(over[0])
            raise BadInputError(
                f"{over.numel()} rows of codes_dense have more than k_max = {k_max} non-zeros (row {row} has "
                f"{int(nnz[row])}, the widest {widest}); nothing is dropped silently: pass k_max >= {widest} "
                "or k_max=None."
            )
    width = k_max if k_max is not None else max(widest, 1)
    top = codes.abs().topk(min(width, n_atoms), dim=1).indices
    values = codes.gather(1, top)
    active = values != 0
    indices = torch.where(active, top, -1)
    values = torch.where(active, values, torch.zeros((), dtype=values.dtype, device=values.device))
    if width > n_atoms:
        pad = width - n_atoms
        indices = torch.cat([indices, indices.new_full((indices.shape[0], pad), -1)], dim=1)
        values = torch.cat([values, values.new_zeros((values.shape[0], pad))], dim=1)
    return indices, values


def _sparse(indices: Array, values: Array, n_atoms: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Checked sparse codes: indices (n, k) int64, values (n, k) float64, active mask (n, k) on values'
    device."""
    if isinstance(indices, np.ndarray):
        indices = torch.from_numpy(indices)
    if not isinstance(indices, torch.Tensor):
        raise BadInputError(f"indices must be a torch tensor or numpy array, got {type(indices).__name__}.")
    if indices.dtype not in _INT_DTYPES:
        raise BadInputError(
            f"indices has dtype {indices.dtype}; pass integer atom indices (int64, -1 for padding). Dense "
            "codes (n, n_atoms) go through to_sparse(codes) first."
        )
    if indices.ndim != 2 or indices.shape[0] == 0:
        raise BadInputError(
            f"indices must be (n, k) with n >= 1 samples, got shape {tuple(indices.shape)}; for one sample "
            "pass indices[None]."
        )
    vals = as_float_tensor(values, "values", ndim_min=1, dtype=torch.float64)
    if vals.shape != indices.shape:
        raise BadInputError(
            f"values has shape {tuple(vals.shape)} but indices {tuple(indices.shape)}; pass one value per "
            "index."
        )
    idx = indices.to(device=vals.device, dtype=torch.int64)
    bad = (idx < -1) | (idx >= n_atoms)
    if bool(bad.any()):
        b, j = (int(v) for v in bad.nonzero()[0])
        raise BadInputError(
            f"indices[{b}, {j}] = {int(idx[b, j])} is out of range for {n_atoms} atoms; atom indices must be "
            f"in [0, {n_atoms - 1}], with -1 marking padding."
        )
    padded = idx < 0
    leak = padded & (vals != 0)
    if bool(leak.any()):
        b, j = (int(v) for v in leak.nonzero()[0])
        raise BadInputError(
            f"indices[{b}, {j}] is padding (-1) but values[{b}, {j}] = {float(vals[b, j])!r} is not 0: a "
            f"padding entry cannot carry a code value ({int(leak.sum())} such entries). Give the value an "
            "atom index, or set it to 0."
        )
    if idx.shape[1] >= 2:
        filler = -1 - torch.arange(idx.shape[1], device=idx.device)
        ordered = torch.where(padded, filler, idx).sort(dim=1).values
        repeated = (ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] >= 0)
        if bool(repeated.any()):
            b, j = (int(v) for v in repeated.nonzero()[0])
            raise BadInputError(
                f"sample {b} lists atom {int(ordered[b, j + 1])} more than once; merge the repeated entries "
                "(sum their values) or set the extra indices to -1 and their values to 0."
            )
    return idx, vals, (~padded) & (vals != 0)


def _check_dictionary(dictionary: Dictionary) -> Dictionary:
    if not isinstance(dictionary, Dictionary):
        raise BadInputError(
            f"dictionary must be an atoms.Dictionary, got {type(dictionary).__name__}; build one with "
            "Dictionary(W_dec, aip)."
        )
    return dictionary


def unit_codes(dictionary: Dictionary, values: Array, indices: Array | None = None) -> torch.Tensor:
    """Convert codes of the raw atoms (m = delta @ dictionary.raw) to codes of `dictionary.unit`, float64.

    Whitening is linear, so m~ = sum_j delta_j norms_j unit_j: each coefficient is multiplied by its atom's
    AIP norm (`dictionary.norms`). values: dense (n, n_atoms) when `indices` is None, else sparse (n, k)
    aligned with indices (n, k) (padding -1 with value 0). Returns the same layout, on values' device. For a
    TSAE, whose atoms have AIP norm 1 in scaled-input units, this is the identity.
    """
    dictionary = _check_dictionary(dictionary)
    if indices is None:
        dense = as_float_tensor(values, "values", ndim_min=2, d=dictionary.n_atoms, dtype=torch.float64)
        return dense * dictionary.norms.to(dense.device)
    idx, vals, _ = _sparse(indices, values, dictionary.n_atoms)
    return torch.where(idx >= 0, vals * dictionary.norms.to(vals.device)[idx.clamp(min=0)], 0.0)


def neuron_dictionary(d: int, aip: AIP | None = None) -> Dictionary:
    """The neurons baseline's dictionary: the identity basis of R^d (d, d), under `aip` if given.

    Euclidean, its atoms are orthonormal (coherence 0); under an AIP they are the whitened coordinate axes
    L^{-1} e_j, normalised, which are not orthogonal unless C is diagonal.
    """
    d = _check_int(d, "d", 1)
    return Dictionary(torch.eye(d, dtype=torch.float64), aip)


def neuron_codes(x: Array) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse codes (indices (n, k), values (n, k)) of activations x (n, d) in the identity basis.

    The code of a sample is the activation itself: every non-zero coordinate is an active neuron (k is the
    largest count of non-zero coordinates in a row). They are codes of the raw atoms e_j: under an AIP, pass
    them through `unit_codes(neuron_dictionary(d, aip), values, indices)` where values matter.
    """
    return to_sparse(x)


# ------------------------------------------------------------------------------------------------------------
# Stability q*
# ------------------------------------------------------------------------------------------------------------


def per_sample_coherence(
    dictionary: Dictionary, indices: Array, values: Array, *, progress: Progress = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample coherence mu_i = max_{j != l in L_i} |<unit_j, unit_l>| and support size l0_i = |L_i|.

    indices, values: sparse codes (n, k), -1 padding; an entry with value 0 is inactive. Computed by
    `atoms.kernels.support_gram.support_coherence` on `dictionary.unit` (the AIP cosines when the dictionary
    has an AIP), 2048 samples per call. Returns mu (n,) float64 (0.0 when |L_i| < 2) and l0 (n,) int64.
    Memory: on the CPU the full (n_atoms, n_atoms) Gram only up to 4096 atoms (128 MiB), beyond that each
    sample's k rows gathered in chunks of about 64 MiB; never an (n, n_atoms) array. progress: False, True
    (a tqdm bar on stderr) or a hook(done, total), counting calls. Computed on the dictionary's device,
    returned on values' device.
    """
    dictionary = _check_dictionary(dictionary)
    idx, vals, _ = _sparse(indices, values, dictionary.n_atoms)
    unit = dictionary.unit
    chunk = 2048  # samples per call: progress steps; each call re-checks that `unit` is finite (O(n_atoms d))
    mu = torch.empty(idx.shape[0], dtype=torch.float64, device=vals.device)
    l0 = torch.empty(idx.shape[0], dtype=torch.int64, device=vals.device)
    with ticker(progress, -(-idx.shape[0] // chunk), "per-sample coherence", "call") as bar:
        for s in range(0, idx.shape[0], chunk):
            part = slice(s, s + chunk)
            out = support_coherence(unit, idx[part].to(unit.device), vals[part].to(unit.device))
            mu[part], l0[part] = out.max_abs_cos.to(mu.device), out.support_size.to(l0.device)
            bar.advance()
    return mu, l0


class QStar(NamedTuple):
    """q* in one form. value in [0, 1]; form: "quantile" or "per_sample"; detail: how it was reached."""

    value: float
    form: str
    detail: dict[str, Any]


def _uniqueness_bound(l0: torch.Tensor) -> torch.Tensor:
    """1 / (2 K - 1) per support size K (float64); +inf for K = 0: the empty code is trivially unique."""
    k = l0.to(torch.float64)
    return torch.where(l0 >= 1, 1.0 / (2.0 * k - 1.0), math.inf)


def q_star(mu_i: Array, l0_i: Array, *, form: Literal["quantile", "per_sample"] = "quantile") -> QStar:
    """Stability q* of SPEC section 5 from per-sample coherences mu_i (n,) and support sizes l0_i (n,).

    form="quantile": q* = sup{q in [0, 1] : mu_q < 1/(2 K_q - 1)}, with mu_q and K_q the lower empirical
    q-quantiles inf{x : F_n(x) >= q} (numpy's method="inverted_cdf"; at q = 0 the smallest sample). Both
    are step functions constant on ((j - 1)/n, j/n], so the sup is taken exactly over the breakpoints q = j/n:
    q* = j*/n for the largest j whose sorted values satisfy mu_(j) < 1/(2 K_(j) - 1), and 0 when none does
    (the set is empty). mu_q rises and 1/(2 K_q - 1) falls with q, so the condition holds on all of [0, q*].
    form="per_sample": the fraction of samples with mu_i < 1/(2 |L_i| - 1) (the paper's v1 wording). A
    sample with |L_i| = 1 satisfies it (bound 1 > mu_i = 0); one with |L_i| = 0 (the zero code) counts as
    satisfied, its bound taken as +inf, and `detail` counts such samples.

    Both are heuristics: uniqueness of a sparse representation is a global property of the dictionary
    (spark), which neither the quantile pairing of mu_q with K_q (taken from different samples) nor a
    support's own coherence decides. `certified_fractions` reports what is proven.
    """
    mu = as_float_tensor(mu_i, "mu_i", dtype=torch.float64).cpu()
    l0 = torch.from_numpy(l0_i) if isinstance(l0_i, np.ndarray) else l0_i
    if not isinstance(l0, torch.Tensor) or l0.dtype not in _INT_DTYPES:
        raise BadInputError(
            "l0_i must be an integer tensor or array of support sizes, got "
            f"{getattr(l0, 'dtype', type(l0).__name__)}; pass per_sample_coherence's second output."
        )
    l0 = l0.cpu().to(torch.int64)
    if mu.ndim != 1 or mu.shape != l0.shape:
        raise BadInputError(
            f"mu_i and l0_i must be 1-D of the same length (one entry per sample), got shapes "
            f"{tuple(mu.shape)} and {tuple(l0.shape)}."
        )
    if bool((mu < 0).any()) or bool((l0 < 0).any()):
        raise BadInputError(
            "mu_i and l0_i must be >= 0 (absolute cosines and support sizes); check what was passed, e.g. "
            "pass the output of per_sample_coherence."
        )
    n = mu.numel()
    if form == "per_sample":
        ok = mu < _uniqueness_bound(l0)
        detail = {
            "n": n,
            "satisfied": int(ok.sum()),
            "empty_supports": int((l0 == 0).sum()),
            "single_atom_supports": int((l0 == 1).sum()),
            "convention": "mu_i < 1/(2|L_i| - 1); |L_i| = 0 counts as satisfied",
        }
        return QStar(float(ok.double().mean()), form, detail)
    if form != "quantile":
        raise BadInputError(f"form must be 'quantile' or 'per_sample', got {form!r}.")
    mu_sorted = mu.sort().values
    k_sorted = l0.sort().values
    holds = (mu_sorted < _uniqueness_bound(k_sorted)).nonzero().flatten()
    j = int(holds.max()) + 1 if holds.numel() else 0
    detail = {
        "n": n,
        "breakpoint": j,
        "mu_q": float(mu_sorted[j - 1]) if j else None,
        "K_q": int(k_sorted[j - 1]) if j else None,
        "first_failure_mu_q": float(mu_sorted[j]) if j < n else None,
        "first_failure_K_q": int(k_sorted[j]) if j < n else None,
        "convention": "lower empirical quantile inf{x : F_n(x) >= q}; sup over breakpoints q = j/n",
    }
    return QStar(j / n, form, detail)


# ------------------------------------------------------------------------------------------------------------
# Certified fractions
# ------------------------------------------------------------------------------------------------------------


class Certified(NamedTuple):
    """Fractions of samples whose sparse representation is proven unique or recoverable.

    spark: support size < spark_lower / 2 (the representation is the unique sparsest; Donoho-Elad 2003),
    counted over all n samples; spark_lower is a proven lower bound and spark_source says which
    ("coherence", "babel" or "given").
    erc: Tropp's ERC(L_i) < 1 (basis pursuit and OMP recover every code on L_i), on a random subsample of
    erc_n samples (erc_rows); erc_values (erc_n,) the coefficients, erc_interval a Wilson 95% interval.
    bp: basis pursuit on m~ = code @ unit recovers the code: relative error under 1e-5 and a dual certificate
    of uniqueness checked on the answer count as recovered, over 1e-3 (or a rival code of no larger l1 norm)
    failed, the rest flagged (SPEC section 7, `atoms.recovery.classify`); bp_fraction = recovered / bp_n with
    a Wilson interval, on a random subsample of bp_n samples (bp_rows).
    A fraction with no sample (erc_samples=0 or bp_samples=0) is NaN, its interval (NaN, NaN).
    """

    n: int
    spark_lower: float
    spark_source: str
    spark_count: int
    spark_fraction: float
    erc_n: int
    erc_count: int
    erc_fraction: float
    erc_interval: tuple[float, float]
    erc_values: torch.Tensor
    erc_rows: torch.Tensor
    bp_n: int
    bp_recovered: int
    bp_flagged: int
    bp_failed: int
    bp_fraction: float
    bp_interval: tuple[float, float]
    bp_rows: torch.Tensor
    bp_solver: str
    seconds: float


def _as_unit_codes(
    dictionary: Dictionary, idx: torch.Tensor, vals: torch.Tensor, codes_of: str | None
) -> torch.Tensor:
    """Sparse values (n, k) as coefficients of dictionary.unit, by `certified_fractions`' codes_of rule."""
    if codes_of not in (None, "unit", "raw"):
        raise BadInputError(
            f"codes_of must be 'unit' (codes of the unit-norm atoms, a TSAE's) or 'raw' (codes of the raw "
            f"atoms, e.g. an SAE's own W_dec rows), got {codes_of!r}."
        )
    if codes_of == "raw":
        return unit_codes(dictionary, vals, idx)
    norms = dictionary.norms
    # float32 atoms normalised in float32 stay within ~1e-6 of 1: those are unit-norm already.
    if codes_of is None and float((norms - 1).abs().max()) > 1e-5:
        warnings.warn(
            f"certified_fractions reads the codes as coefficients of the unit-norm atoms, but this "
            f"dictionary's raw atoms have norms {float(norms.min()):.3g} to {float(norms.max()):.3g}: pass "
            "codes_of='raw' if the codes multiply the raw atoms (an SAE's own codes), or codes_of='unit' "
            "if they are already codes of the unit-norm atoms.",
            stacklevel=3,
        )
    return vals


def _warn_dense(n_dense: int, n: int, d: int) -> None:
    if n_dense:
        warnings.warn(
            f"{n_dense} of {n} samples have more than d = {d} active atoms: no certificate can hold for them "
            "(their atoms are linearly dependent), so they count as failed for basis pursuit and ERC without "
            "being solved; sparser codes (a larger sparsity coefficient or target_l0) can be certified.",
            stacklevel=3,
        )


def _interval(successes: int, trials: int) -> tuple[float, float]:
    if trials == 0:
        return math.nan, math.nan
    low, high = wilson_interval(successes, trials)
    return float(low), float(high)


def _erc_of_support(unit: torch.Tensor, support: torch.Tensor) -> float:
    """ERC(L) for unit atoms (n_atoms, d); 0 for the empty support (nothing to recover).

    A support holding every atom has no off-support atom: the max is over an empty set (0) when the atoms
    are independent. Dependent atoms on a support get +inf (the ERC premise fails).
    """
    if support.numel() == 0:
        return 0.0
    if support.numel() == unit.shape[0]:
        independent = np.linalg.matrix_rank(unit.numpy()) == unit.shape[0]
        return 0.0 if independent else math.inf
    try:
        # unit is the checked Dictionary's float64 CPU copy: each call skips erc()'s checks of the whole
        # dictionary, which cost more than the solve at 2304 atoms.
        return erc_of_atoms(unit, support.long())
    except IllConditionedError:
        return math.inf


def certified_fractions(
    dictionary: Dictionary,
    indices: Array,
    values: Array,
    *,
    spark_lower: float | None = None,
    erc_samples: int = 200,
    bp_samples: int | None = None,
    bp_solver: str | BPSolver = "batched",
    bp_fallback: bool = True,
    nonneg: bool = False,
    seed: int = 0,
    progress: Progress = False,
    codes_of: Literal["unit", "raw"] | None = None,
) -> Certified:
    """Certified counterparts of q*: spark, ERC and basis-pursuit fractions of the samples (SPEC section 5).

    dictionary: the atoms. indices, values: sparse codes (n, k), -1 padding. codes_of: "unit" reads the codes
    as coefficients of `dictionary.unit` (a TSAE's codes, whose atoms have AIP norm 1); "raw" as coefficients
    of the raw atoms (an SAE's own codes of its W_dec rows at their norms), converted here by `unit_codes`;
    None is "unit", with a warning when the raw atoms are not unit-norm (the two readings then differ, and
    picking the wrong one changes every result).
    Samples with more active atoms than d are decided without a solver: their atoms are linearly dependent,
    so a null-space direction inside the support moves the code without raising its l1 norm (signs and, for
    nonneg, positivity hold for small steps): basis pursuit fails on them and ERC is +inf. A warning says
    how many there are.
    spark_lower: a proven lower bound on spark(dictionary.unit); None takes the larger of the coherence and
    babel bounds of `uniqueness.spark_lower_bounds` (a few babel evaluations, each a pass over the Gram in
    tiles). erc_samples, bp_samples: sizes of the random subsamples (without replacement, the
    first rows of one permutation drawn from `seed`, so the BP rows are among the ERC rows when bp_samples
    <= erc_samples; all samples when n is smaller; bp_samples None: every sample). bp_solver: "batched"
    (default: the whole batch in one call of `atoms.recovery.basis_pursuit`'s batched solver, every recovery
    proven by a dual certificate; with `bp_fallback` False, a sample it proves nothing
    about is flagged instead of being re-solved by HiGHS), "linprog" (HiGHS per sample: 14 s each at 2304
    atoms in d = 576), "cvxpy", "omp", or a callable with the signature of `atoms.recovery.basis_pursuit`
    (W_dec, m, *, nonneg, true_codes) returning its RecoveryResult; a callable's "recovered" counts only where
    `atoms.recovery.certify_codes` certifies its code (flagged otherwise). nonneg: solve the non-negative
    basis pursuit (a TSAE's codes are non-negative, which makes recovery easier); False solves theorem 3's
    signed one.
    A sample with the zero code counts as certified under all three (its representation is unique).
    progress: False, True (tqdm bars on stderr) or a hook(done, total): the spark bounds' walks each report
    (when spark_lower is None), then one series over the ERC samples plus one step for the whole BP batch.
    Cost measured here at 2304 random atoms in d = 576 (2 shared cores, 2026-12-05): the spark bounds 0.1 s,
    ERC 1.2 ms per sample of 32 atoms. Memory: the spark bounds O(tile x n_atoms), ERC O(n_atoms x d) per
    sample, and BP a dense (bp_samples, n_atoms) code array: keep bp_samples small for large dictionaries.
    Devices: ERC runs in float64 on a CPU copy, basis pursuit's batched solver on the dictionary's device; the
    result's tensors are on values' device.
    """
    start = time.perf_counter()
    dictionary = _check_dictionary(dictionary)
    idx, vals, active = _sparse(indices, values, dictionary.n_atoms)
    vals = _as_unit_codes(dictionary, idx, vals, codes_of)
    erc_samples = _check_int(erc_samples, "erc_samples", 0)
    bp_samples = idx.shape[0] if bp_samples is None else _check_int(bp_samples, "bp_samples", 0)
    if not (isinstance(bp_solver, str) or callable(bp_solver)):
        raise BadInputError(
            f"bp_solver must be 'batched', 'linprog', 'cvxpy', 'omp' or a callable like "
            "atoms.recovery.basis_pursuit, "
            f"got {bp_solver!r}."
        )
    n = idx.shape[0]
    l0 = active.sum(dim=1)
    unit = dictionary.unit
    dense_codes = l0 > unit.shape[1]
    _warn_dense(int(dense_codes.sum()), n, unit.shape[1])

    if spark_lower is None:
        coh, bab = spark_lower_bounds(dictionary, progress=progress)
        spark_lower, source = (coh, "coherence") if coh >= bab else (bab, "babel")
    else:
        if isinstance(spark_lower, bool) or not isinstance(spark_lower, (int, float)) or not spark_lower >= 1:
            raise BadInputError(
                f"spark_lower must be a proven lower bound on the spark, a number >= 1 (math.inf allowed), "
                f"got {spark_lower!r}."
            )
        source = "given"
    spark_ok = l0.double() < spark_lower / 2
    spark_count = int(spark_ok.sum())

    # One permutation for both subsamples: the BP rows are the first bp_samples of it, so with bp_samples <=
    # erc_samples each BP sample also has its ERC (ERC < 1 must imply recovery: a consistency check).
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    erc_rows = order[:erc_samples].sort().values
    bp_rows = order[:bp_samples].sort().values
    bar = ticker(progress, erc_rows.numel() + (bp_rows.numel() > 0), "ERC and basis pursuit", "step")
    erc_list = []
    host_unit, host_idx, host_active = unit.cpu(), idx.cpu(), active.cpu()
    host_dense = dense_codes.cpu()
    for i in erc_rows.tolist():
        support = host_idx[i][host_active[i]]
        erc_list.append(math.inf if host_dense[i] else _erc_of_support(host_unit, support))
        bar.advance()
    erc_values = torch.tensor(erc_list, dtype=torch.float64, device=vals.device)
    erc_count = int((erc_values < 1).sum())

    counts = {"recovered": 0, "flagged": 0, "failed": 0}
    solver_name = bp_solver if isinstance(bp_solver, str) else getattr(bp_solver, "__name__", repr(bp_solver))
    counts["failed"] = int(host_dense[bp_rows].sum())  # proven above, no solver needed
    solved = bp_rows[~host_dense[bp_rows]]
    if solved.numel():
        dense = torch.zeros(solved.numel(), dictionary.n_atoms, dtype=torch.float64, device=vals.device)
        # scatter_add: padding entries all point at column 0 and must add 0 there, not overwrite atom 0.
        dense.scatter_add_(1, idx[solved].clamp(min=0), torch.where(active[solved], vals[solved], 0.0))
        m = dense @ unit.to(dense.device)
        if isinstance(bp_solver, str):
            extra = {"fallback": bp_fallback} if bp_solver == "batched" else {}
            result = basis_pursuit(unit, m, nonneg=nonneg, solver=bp_solver, true_codes=dense, **extra)
        else:
            result = bp_solver(unit, m, nonneg=nonneg, true_codes=dense)
        if result.decisions is None or len(result.decisions) != solved.numel():
            raise BadInputError(
                f"bp_solver {solver_name} returned no per-sample decisions for {solved.numel()} problems; "
                "it must return atoms.recovery.RecoveryResult with decisions (it receives true_codes)."
            )
        decisions = result.decisions
        if not isinstance(bp_solver, str):
            # basis_pursuit recovers only certified answers; another solver's word is checked here.
            proven = certify_codes(unit, m, result.codes, nonneg=nonneg).tolist()
            decisions = [
                "flagged" if decision == "recovered" and not ok else decision
                for decision, ok in zip(decisions, proven, strict=True)
            ]
        for decision in decisions:
            counts[decision] += 1
    if bp_rows.numel():
        bar.advance()
    bar.close()
    n_erc, n_bp = erc_rows.numel(), bp_rows.numel()
    return Certified(
        n=n,
        spark_lower=float(spark_lower),
        spark_source=source,
        spark_count=spark_count,
        spark_fraction=spark_count / n,
        erc_n=n_erc,
        erc_count=erc_count,
        erc_fraction=erc_count / n_erc if n_erc else math.nan,
        erc_interval=_interval(erc_count, n_erc),
        erc_values=erc_values,
        erc_rows=erc_rows.to(vals.device),
        bp_n=n_bp,
        bp_recovered=counts["recovered"],
        bp_flagged=counts["flagged"],
        bp_failed=counts["failed"],
        bp_fraction=counts["recovered"] / n_bp if n_bp else math.nan,
        bp_interval=_interval(counts["recovered"], n_bp),
        bp_rows=bp_rows.to(vals.device),
        bp_solver=solver_name,
        seconds=time.perf_counter() - start,
    )


# ------------------------------------------------------------------------------------------------------------
# TSAE threshold window (SPEC theorem 4)
# ------------------------------------------------------------------------------------------------------------


class Window(NamedTuple):
    """SPEC theorem 4's window eps K dmax < tau < dmin - eps (K - 1) dmax, evaluated on codes and thresholds.

    Global (the theorem as stated): eps = coherence, K = max support size, dmin/dmax = min/max non-zero code
    value over all samples; global_lower/upper, global_nonempty (dmin > eps (2K - 1) dmax) and
    atoms_in_global: fraction of all atoms whose tau_j lies strictly inside.
    Per atom (lower, upper (n_atoms,) float64): eps_j = the atom's max coherence, K and dmax global, dmin_j =
    the atom's smallest active value; upper is +inf for an atom that never fires (no on-support constraint
    in the data). atom_nonempty / atom_contains: fractions of the n_firing atoms whose window is non-empty /
    holds tau_j; n_silent atoms never fire.
    Per sample: samples_active_ok = fraction whose active atoms all hold tau_j in their per-atom windows;
    samples_certified = fraction for which the sample's own version of the theorem proves support recovery:
    tau_j < delta_ij - eps_j (|L_i| - 1) dmax_i for every active j and tau_j > eps_j |L_i| dmax_i for every
    inactive j (dmax_i the sample's largest value); sample_certified (n,) bool holds that verdict per sample.
    """

    eps: float
    K: int
    dmin: float
    dmax: float
    global_lower: float
    global_upper: float
    global_nonempty: bool
    atoms_in_global: float
    lower: torch.Tensor
    upper: torch.Tensor
    n_firing: int
    n_silent: int
    atom_nonempty: float
    atom_contains: float
    samples_active_ok: float
    samples_certified: float
    sample_certified: torch.Tensor
    convention: str


_WINDOW_CONVENTION = (
    "per atom: eps_j = max_l |cos(d_j, d_l)|, K = max_i |L_i| and dmax = max |delta| over all samples (the "
    "off-support bound of atom j involves every sample where j is silent), dmin_j = min of atom j's own "
    "active values; per sample: its own |L_i| and max value; fractions of atoms over the atoms that fire"
)


def tsae_window(dictionary: Dictionary, codes: Codes | Array, threshold: Array) -> Window:
    """SPEC theorem 4's threshold window evaluated on a trained model: globally, per atom and per sample.

    The theorem: for the encoder z = m~ @ unit^T followed by s_tau(z) = z 1[z >= tau], non-negative codes
    with at most K non-zeros in [dmin, dmax] and atoms of separability eps, every support is recovered when
    eps K dmax < tau < dmin - eps (K - 1) dmax. Per atom j, off its support z_j <= eps_j K dmax and on it
    z_j >= delta_j - eps_j (K - 1) dmax with eps_j the atom's own max coherence, which gives the per-atom and
    per-sample refinements described in `Window` (all are sufficient conditions, not necessary ones).

    dictionary: the model's atoms (for a TSAE, `Dictionary(*model.dictionary())`). codes: (indices,
    values) sparse (n, k) or dense (n, n_atoms), non-negative, coefficients of `dictionary.unit`. threshold:
    (n_atoms,) in the codes' units. For a TSAE, `model.encode(x)` and `model.threshold` are both in
    scaled-input units and its atoms have AIP norm 1, so they go in as they are. Its encoder fires on
    (u - b_dec) @ W_enc + b_enc >= theta; to fold the biases in, pass theta - b_enc + b_dec @ W_enc. The
    theorem assumes W_enc = unit^T; a trained encoder may differ, so this measures the premise on the decoder,
    the codes and the thresholds, not the encoder itself. Computed and returned on the codes' device.
    """
    dictionary = _check_dictionary(dictionary)
    n_atoms = dictionary.n_atoms
    if isinstance(codes, tuple) and len(codes) == 2:
        idx, vals, active = _sparse(codes[0], codes[1], n_atoms)
    elif isinstance(codes, (torch.Tensor, np.ndarray)):
        idx, vals, active = _sparse(*to_sparse(codes), n_atoms)
    else:
        raise BadInputError(
            "codes must be a tuple (indices, values) or a dense (n, n_atoms) array, got "
            f"{type(codes).__name__}."
        )
    device = vals.device
    tau = as_float_tensor(threshold, "threshold", dtype=torch.float64).to(device)
    if tau.shape != (n_atoms,):
        raise BadInputError(
            f"threshold has shape {tuple(tau.shape)}; pass one threshold per atom, shape ({n_atoms},)."
        )
    negative = active & (vals < 0)
    if bool(negative.any()):
        b, j = (int(v) for v in negative.nonzero()[0])
        raise BadInputError(
            f"values[{b}, {j}] = {float(vals[b, j])!r} is negative; theorem 4's window assumes non-negative "
            "codes (a threshold encoder's output). Use q_star or certified_fractions for signed codes."
        )
    if not bool(active.any()):
        raise BadInputError("every code is zero; the window needs at least one active atom in the batch.")
    l0 = active.sum(dim=1)
    act_vals = torch.where(active, vals, 0.0)
    K = int(l0.max())
    dmax = float(act_vals.max())
    dmin = float(torch.where(active, vals, math.inf).min())
    eps = dictionary.coherence()
    eps_j = dictionary.max_coherence()[0].to(device)

    g_lower, g_upper = eps * K * dmax, dmin - eps * (K - 1) * dmax
    atoms_in_global = float(((tau > g_lower) & (tau < g_upper)).double().mean())

    flat = idx[active]
    dmin_j = torch.full((n_atoms,), math.inf, dtype=torch.float64, device=device).scatter_reduce(
        0, flat, vals[active], reduce="amin"
    )
    firing = torch.isfinite(dmin_j)
    lower = eps_j * K * dmax
    upper = torch.where(firing, dmin_j - eps_j * (K - 1) * dmax, math.inf)
    inside = (tau > lower) & (tau < upper)
    n_firing = int(firing.sum())
    atom_nonempty = float((lower < upper)[firing].double().mean()) if n_firing else math.nan
    atom_contains = float(inside[firing].double().mean()) if n_firing else math.nan
    safe = idx.clamp(min=0)
    samples_active_ok = float((inside[safe] | ~active).all(dim=1).double().mean())

    dmax_i = act_vals.max(dim=1).values
    on_ok = ((tau[safe] < vals - eps_j[safe] * ((l0 - 1) * dmax_i)[:, None]) | ~active).all(dim=1)
    off_ok = torch.empty_like(on_ok)
    rows = max(1, _CHUNK_BYTES // (8 * 3 * n_atoms))
    for s in range(0, idx.shape[0], rows):
        c = (l0[s : s + rows] * dmax_i[s : s + rows]).double()
        margin = tau[None, :] - eps_j[None, :] * c[:, None]
        # Active atoms are judged by the on-support inequality: lift them out of the off-support minimum.
        on = torch.zeros_like(margin).scatter_add_(1, safe[s : s + rows], active[s : s + rows].double()) > 0
        off_ok[s : s + rows] = margin.masked_fill(on, math.inf).amin(dim=1) > 0
    certified = on_ok & off_ok
    return Window(
        eps=eps,
        K=K,
        dmin=dmin,
        dmax=dmax,
        global_lower=g_lower,
        global_upper=g_upper,
        global_nonempty=g_lower < g_upper,
        atoms_in_global=atoms_in_global,
        lower=lower,
        upper=upper,
        n_firing=n_firing,
        n_silent=n_atoms - n_firing,
        atom_nonempty=atom_nonempty,
        atom_contains=atom_contains,
        samples_active_ok=samples_active_ok,
        samples_certified=float(certified.double().mean()),
        sample_certified=certified,
        convention=_WINDOW_CONVENTION,
    )
