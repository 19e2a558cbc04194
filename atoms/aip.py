"""The atomic inner product (AIP): <x, y>_S = x^T S y with S = C^{-1}, C the second moment of one layer.

C = E[m m^T] is accumulated in float64 by `SecondMoment` (streaming, mergeable across batches and processes).
`AIP` keeps only the lower Cholesky factor L of C (C = L L^T) and whitens by a triangular solve,
x~ = L^{-1} x, so that <x~, y~> = x^T C^{-1} y and the AIP cosine is the Euclidean cosine of whitened vectors.
No explicit inverse is ever formed on the solve path.

`center=True` uses the covariance instead of the uncentered moment. It changes only the metric: vectors are
never shifted by the mean, because atoms are directions through the origin.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from atoms.errors import BadInputError, IllConditionedError, as_batches, as_float_tensor

__all__ = ["AIP", "Angles", "SecondMoment", "euclidean_angles"]

# Up to this many vectors, `pairs=None` measures every pair i < j (2048 vectors give about 2.1M pairs);
# beyond it a fixed-size random sample of distinct pairs keeps the cost independent of n.
ALL_PAIRS_MAX_N = 2048
SAMPLED_PAIRS = 100_000
_INDEX_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)

# None, a number of random pairs, or explicit (idx_i, idx_j) index arrays of equal length.
Pairs = int | tuple[torch.Tensor | np.ndarray, torch.Tensor | np.ndarray] | None


def _check_path_file(path: str | Path, what: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"{what} file {path} does not exist; check the path or save one first.")
    return path


def _read_safetensors(path: Path, fmt: str, keys: tuple[str, ...]) -> tuple[dict, dict]:
    """Load tensors and metadata of an atoms file, checking that it holds the expected format and keys."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except Exception as e:
        raise BadInputError(
            f"{path} is not a readable safetensors file ({e}); save it with {fmt}.save."
        ) from e
    missing = [k for k in keys if k not in tensors and k not in meta]
    if meta.get("format") != fmt or missing:
        raise BadInputError(
            f"{path} does not hold a {fmt} (format tag {meta.get('format')!r}, missing entries {missing}); "
            f"write it with {fmt}.save and load it with {fmt}.load."
        )
    return tensors, meta


class SecondMoment:
    """Streaming float64 second moment (and mean) of d-dimensional activations.

    Internally keeps the count n, the mean and the centered scatter M2 = sum (x - mean)(x - mean)^T, combined
    across batches by Chan et al.'s pairwise update. That is order-independent up to rounding and, unlike raw
    sums, does not cancel catastrophically when the covariance is requested for activations with a large mean.

    `matrix` is E[x x^T] (uncentered, the paper's C), or the covariance E[(x - mean)(x - mean)^T] when
    `center=True`; both divide by n, not n - 1 (the scale of C does not change any AIP cosine).
    """

    def __init__(self, d: int, center: bool = False) -> None:
        if not isinstance(d, int) or isinstance(d, bool) or d < 1:
            raise BadInputError(f"d must be a positive int (the activation width), got {d!r}.")
        self.d = d
        self.center = bool(center)
        self._count = 0
        self._mean = torch.zeros(d, dtype=torch.float64)
        self._m2 = torch.zeros(d, d, dtype=torch.float64)

    def __repr__(self) -> str:
        return f"SecondMoment(d={self.d}, center={self.center}, count={self._count})"

    @property
    def count(self) -> int:
        """Number of d-vectors accumulated so far."""
        return self._count

    def _require_samples(self) -> None:
        if self._count == 0:
            raise BadInputError(
                "SecondMoment has no samples yet; call update(activations) before reading it."
            )

    @property
    def mean(self) -> torch.Tensor:
        """Mean activation, (d,) float64 on the CPU."""
        self._require_samples()
        return self._mean.clone()

    @property
    def matrix(self) -> torch.Tensor:
        """E[x x^T], or the covariance when center=True; (d, d) float64 on the CPU, divided by the count."""
        self._require_samples()
        cov = self._m2 / self._count
        if self.center:
            return cov
        return cov + torch.outer(self._mean, self._mean)

    def _combine(self, count: int, mean: torch.Tensor, m2: torch.Tensor) -> None:
        """Chan's pairwise update: fold a block with (count, mean, m2) into this accumulator in place."""
        total = self._count + count
        delta = mean - self._mean
        self._m2 = self._m2 + m2 + torch.outer(delta, delta) * (self._count * count / total)
        self._mean = self._mean + delta * (count / total)
        self._count = total

    def update(self, x: torch.Tensor | np.ndarray) -> SecondMoment:
        """Add activations `x` of shape (..., d), any float dtype; returns self.

        The batch statistics are computed in float64 on x's device; only the (d, d) result moves to the CPU.
        """
        x = as_float_tensor(x, "activations", d=self.d)
        x = x.reshape(-1, self.d).to(torch.float64)
        mean = x.mean(dim=0)
        xc = x - mean
        self._combine(x.shape[0], mean.cpu(), (xc.T @ xc).cpu())
        return self

    def merge(self, other: SecondMoment) -> SecondMoment:
        """A new SecondMoment holding the union of both samples (order-independent up to float64 rounding)."""
        if not isinstance(other, SecondMoment):
            raise BadInputError(f"merge expects a SecondMoment, got {type(other).__name__}.")
        if other.d != self.d or other.center != self.center:
            raise BadInputError(
                f"cannot merge SecondMoment(d={self.d}, center={self.center}) with "
                f"SecondMoment(d={other.d}, center={other.center}); both must come from the same layer "
                "and use the same center setting."
            )
        out = SecondMoment(self.d, self.center)
        for part in (self, other):
            if part._count:
                out._combine(part._count, part._mean, part._m2)
        return out

    def state(self) -> tuple[int, torch.Tensor, torch.Tensor]:
        """(count, mean (d,), M2 (d, d)) float64 copies: what `from_state` needs to rebuild the accumulator.

        M2 is the centered scatter sum (x - mean)(x - mean)^T; atoms.distributed ships this across ranks.
        """
        return self._count, self._mean.clone(), self._m2.clone()

    @classmethod
    def from_state(
        cls, count: int, mean: torch.Tensor, m2: torch.Tensor, center: bool = False
    ) -> SecondMoment:
        """The accumulator with the given (count, mean (d,), M2 (d, d)), as `state` returns them."""
        mean = torch.as_tensor(mean, dtype=torch.float64).cpu()
        m2 = torch.as_tensor(m2, dtype=torch.float64).cpu()
        d = mean.shape[0] if mean.ndim == 1 else 0
        if not isinstance(count, int) or isinstance(count, bool) or count < 0 or d < 1 or m2.shape != (d, d):
            raise BadInputError(
                f"from_state needs an int count >= 0, mean (d,) and M2 (d, d); got count {count!r}, mean "
                f"{tuple(mean.shape)}, M2 {tuple(m2.shape)}. Pass the tuple SecondMoment.state() returns."
            )
        out = cls(d, center)
        out._count, out._mean, out._m2 = count, mean.clone(), m2.clone()
        return out

    def save(self, path: str | Path) -> None:
        """Write to a safetensors file (mean, scatter; d, center and count in the metadata)."""
        meta = {
            "format": "SecondMoment",
            "d": str(self.d),
            "center": str(self.center),
            "count": str(self._count),
        }
        save_file({"mean": self._mean.contiguous(), "m2": self._m2.contiguous()}, str(path), metadata=meta)

    @classmethod
    def load(cls, path: str | Path) -> SecondMoment:
        """Read a file written by `save`; a file with other contents raises BadInputError."""
        path = _check_path_file(path, "SecondMoment")
        tensors, meta = _read_safetensors(path, "SecondMoment", ("mean", "m2", "d", "center", "count"))
        try:
            d, count = int(meta["d"]), int(meta["count"])
        except ValueError as e:
            raise BadInputError(f"{path}: d and count in the metadata must be integers ({e}).") from e
        mean, m2 = tensors["mean"], tensors["m2"]
        if (
            meta["center"] not in ("True", "False")
            or count < 0
            or mean.shape != (d,)
            or m2.shape != (d, d)
            or mean.dtype != torch.float64
            or m2.dtype != torch.float64
        ):
            raise BadInputError(
                f"{path} is inconsistent: d = {d}, count = {count}, center = {meta['center']!r}, mean "
                f"{tuple(mean.shape)} {mean.dtype}, m2 {tuple(m2.shape)} {m2.dtype}; re-create it with "
                "SecondMoment.save."
            )
        out = cls(d, center=meta["center"] == "True")
        out._count, out._mean, out._m2 = count, mean, m2
        return out


class Angles(NamedTuple):
    """Angles between pairs of vectors and their summary.

    degrees: (n_pairs,) float64 angles in degrees; cosines: (n_pairs,) float64, both on the vectors' device;
    mean, median: of degrees; mean_abs_cos: mean of |cosines|.
    """

    degrees: torch.Tensor
    cosines: torch.Tensor
    mean: float
    median: float
    mean_abs_cos: float


def _sample_pairs(n: int, pairs: Pairs, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Index pairs (i, j), each (n_pairs,) int64, i != j, shared by AIP and Euclidean angles.

    None: every pair i < j if n <= ALL_PAIRS_MAX_N, else SAMPLED_PAIRS random distinct unordered pairs.
    int k: k random distinct unordered pairs. (idx_i, idx_j): used as given after checks.
    """
    total = n * (n - 1) // 2
    if pairs is None:
        if n <= ALL_PAIRS_MAX_N:
            if total == 0:
                raise BadInputError(f"angles need at least 2 vectors, got {n}.")
            i, j = torch.triu_indices(n, n, offset=1)
            return i, j
        pairs = SAMPLED_PAIRS
    if isinstance(pairs, (int, np.integer)) and not isinstance(pairs, bool):
        k = int(pairs)
        if not 1 <= k <= total:
            raise BadInputError(
                f"pairs={k} but {n} vectors have {total} distinct pairs; pass 1 <= pairs <= {total}, "
                "or pairs=None for all of them."
            )
        gen = torch.Generator().manual_seed(seed)
        if total <= max(4 * k, 1 << 22):
            # Few pairs in all, or most of them wanted: choose k of the enumerated pairs without replacement.
            i, j = torch.triu_indices(n, n, offset=1)
            pick = torch.randperm(total, generator=gen)[:k]
            return i[pick], j[pick]
        # Far more pairs than wanted: rejection sampling of distinct unordered pairs rarely rejects.
        codes = torch.empty(0, dtype=torch.int64)
        while codes.numel() < k:
            a = torch.randint(0, n, (2 * k,), generator=gen)
            b = torch.randint(0, n - 1, (2 * k,), generator=gen)
            b = b + (b >= a).long()  # uniform over j != i
            lo, hi = torch.minimum(a, b), torch.maximum(a, b)
            codes = torch.unique(torch.cat([codes, lo * n + hi]))
        codes = codes[torch.randperm(codes.numel(), generator=gen)[:k]]
        return codes // n, codes % n
    if isinstance(pairs, (tuple, list)) and len(pairs) == 2:
        i, j = (torch.as_tensor(p) for p in pairs)
        if i.dtype not in _INDEX_DTYPES or j.dtype not in _INDEX_DTYPES or i.ndim != 1 or i.shape != j.shape:
            raise BadInputError(
                f"pairs=(idx_i, idx_j) must be two 1-D integer index arrays of equal length, got dtypes "
                f"{i.dtype}, {j.dtype} and shapes {tuple(i.shape)}, {tuple(j.shape)}."
            )
        i, j = i.long(), j.long()
        if i.numel() == 0:
            raise BadInputError("pairs=(idx_i, idx_j) is empty; pass at least one pair.")
        out_of_range = ((i < 0) | (i >= n) | (j < 0) | (j >= n)).nonzero().flatten()
        if out_of_range.numel():
            raise BadInputError(
                f"pairs hold indices outside [0, {n}) at positions {out_of_range[:5].tolist()}; "
                f"x has {n} vectors."
            )
        same = (i == j).nonzero().flatten()
        if same.numel():
            raise BadInputError(
                f"pairs compare a vector with itself at positions {same[:5].tolist()} (angle 0 by "
                "definition); remove those pairs."
            )
        return i, j
    raise BadInputError(f"pairs must be None, an int, or a tuple (idx_i, idx_j); got {type(pairs).__name__}.")


def _unit_rows(u: torch.Tensor, what: str) -> torch.Tensor:
    """Rows of (n, d) float64 `u` scaled to unit norm; zero rows have no direction and raise."""
    norms = torch.linalg.vector_norm(u, dim=-1)
    zero = (norms == 0).nonzero().flatten()
    if zero.numel():
        raise BadInputError(
            f"{what} has {zero.numel()} zero vectors (rows {zero[:5].tolist()}); their angles are undefined. "
            "Drop those rows first."
        )
    return u / norms[:, None]


def _median(values: torch.Tensor) -> float:
    """numpy.median of a 1-D tensor on its own device: the mean of the two middle values when n is even."""
    ordered = values.sort().values
    n = ordered.numel()
    return float((ordered[(n - 1) // 2] + ordered[n // 2]) / 2)


def _angles(unit: torch.Tensor, pairs: Pairs, seed: int) -> Angles:
    """Angles between rows of `unit` (n, d) float64, unit-norm, over the pairs chosen by `_sample_pairs`;
    degrees and cosines on unit's device."""
    n = unit.shape[0]
    i, j = (index.to(unit.device) for index in _sample_pairs(n, pairs, seed))
    if n <= 4096 and 8 * i.numel() >= n * (n - 1):
        # When the pairs cover a quarter of all pairs or more, one BLAS Gram (n <= 4096: at most 128 MiB) is
        # much faster than gathering two rows per pair; for fewer pairs the gather does less work.
        cos = (unit @ unit.T)[i, j]
    else:
        chunk = max(1, (1 << 24) // unit.shape[1])
        cos = torch.cat(
            [(unit[i[s : s + chunk]] * unit[j[s : s + chunk]]).sum(-1) for s in range(0, i.numel(), chunk)]
        )
    # Cosines of unit vectors can exceed 1 by rounding; clamp only for arccos, the cosines stay as computed.
    degrees = torch.rad2deg(torch.arccos(cos.clamp(-1.0, 1.0)))
    return Angles(
        degrees=degrees,
        cosines=cos,
        mean=float(degrees.mean()),
        median=_median(degrees),
        mean_abs_cos=float(cos.abs().mean()),
    )


def euclidean_angles(
    x: torch.Tensor | np.ndarray,
    pairs: Pairs = None,
    seed: int = 0,
) -> Angles:
    """Euclidean angles between rows of x (n, d); the same seed picks the same pairs as `AIP.angles`."""
    x = as_float_tensor(x, "x", ndim_min=2, dtype=torch.float64)
    if x.ndim != 2:
        raise BadInputError(
            f"x must be (n, d), got shape {tuple(x.shape)}; reshape it with x.reshape(-1, d)."
        )
    return _angles(_unit_rows(x, "x"), pairs, seed)


def _suggest_ridge(eig: torch.Tensor, trace_over_d: float, max_condition: float) -> float:
    """Smallest power of ten r >= 1e-6 with (l_max + r t) / (l_min + r t) <= max_condition, t = trace(C)/d."""
    lmin, lmax = float(eig[0]), float(eig[-1])
    needed = (lmax - max_condition * lmin) / (max_condition - 1) / trace_over_d
    return 10.0 ** max(-6, math.ceil(math.log10(max(needed, 1e-300))))


def _moment_of(
    activations: torch.Tensor | np.ndarray | Iterable[torch.Tensor | np.ndarray], center: bool
) -> SecondMoment:
    """The SecondMoment of one (..., d) tensor or array, or of every batch of an iterable of them."""
    hint = (
        " To stream from a source of another kind, update an atoms.aip.SecondMoment batch by batch and call "
        "AIP.from_moment."
    )
    batches = as_batches(activations, hint=hint)
    first = next(batches)  # as_batches raises on an iterable without batches
    moment = SecondMoment(first.shape[-1], center).update(first)
    for x in batches:
        moment.update(x)
    return moment


def whiten_rows(rows: torch.Tensor, cholesky: torch.Tensor) -> torch.Tensor:
    """X~ = X L^{-T} for rows X (n, d) and the lower Cholesky factor L (d, d) of the second moment, in their
    (shared) dtype; row-major (n, d).

    Solved as X~^T = L^{-1} X^T, on the left, so that LAPACK's column-major output transposed back is
    row-major. A right-hand solve returns X~ column-major; every row slice of that (the Gram tiles of
    atoms.Dictionary, the row blocks of the CPU encoder) is a strided matrix, which made each 2048-row tile
    GEMM about 20 % slower at 16384 x 2304.
    """
    return torch.linalg.solve_triangular(cholesky, rows.T, upper=False).T


class AIP:
    """Atomic inner product x^T C^{-1} y, held as the lower Cholesky factor L of C (d, d) float64.

    Build with `fit` (activations), `from_moment` (a SecondMoment or a (d, d) matrix) or `from_dictionary`
    (C = W_dec^T W_dec), from tensors on any device. Attributes: d, cholesky (d, d) float64 on the CPU (cast
    to each input's dtype and device on use, so every method answers on its input's device), ridge (the
    relative ridge added, 0.0 if none), condition_number (of C after the ridge), n_samples (vectors behind C;
    None if unknown or built from a dictionary), center (True: covariance, False: uncentered moment, None:
    not built from activations). Vectors are never shifted by a mean: `center` changes only the metric.
    """

    def __init__(
        self,
        cholesky: torch.Tensor,
        *,
        ridge: float = 0.0,
        condition_number: float = float("nan"),
        n_samples: int | None = None,
        center: bool | None = None,
    ) -> None:
        """Wrap a lower Cholesky factor (d, d); prefer the constructors fit, from_moment, from_dictionary."""
        L = as_float_tensor(cholesky, "cholesky", ndim_min=2, dtype=torch.float64)
        if L.ndim != 2 or L.shape[0] != L.shape[1]:
            raise BadInputError(f"cholesky must be a square (d, d) matrix, got shape {tuple(L.shape)}.")
        if bool((L.triu(1) != 0).any()) or not bool((L.diagonal() > 0).all()):
            raise BadInputError(
                "cholesky must be lower triangular with a positive diagonal; build the AIP with "
                "AIP.from_moment or AIP.fit instead of passing a factor."
            )
        self.cholesky = L
        self.d = L.shape[0]
        self.ridge = float(ridge)
        self.condition_number = float(condition_number)
        self.n_samples = n_samples
        self.center = center
        self._cast: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}

    def __repr__(self) -> str:
        return (
            f"AIP(d={self.d}, condition_number={self.condition_number:.3g}, ridge={self.ridge:g}, "
            f"n_samples={self.n_samples}, center={self.center})"
        )

    @classmethod
    def from_moment(
        cls, moment: SecondMoment | torch.Tensor | np.ndarray, ridge: float = 0.0, max_condition: float = 1e10
    ) -> AIP:
        """AIP of a SecondMoment or a symmetric positive definite (d, d) matrix C.

        With ridge > 0, C + ridge * trace(C)/d * I is used and `ridge` is stored. If the condition number of
        the (ridged) C exceeds `max_condition`, or its Cholesky factorization fails, IllConditionedError says
        by how much, from how many samples, and which ridge would fix it.
        """
        if isinstance(moment, SecondMoment):
            C, n, center = moment.matrix, moment.count, moment.center
            source = f"from {n} samples for d = {moment.d}; at least d samples are needed, 10*d advisable"
        else:
            C = as_float_tensor(moment, "moment", ndim_min=2, dtype=torch.float64).cpu()
            if C.ndim != 2 or C.shape[0] != C.shape[1]:
                raise BadInputError(
                    f"moment must be a SecondMoment or a square (d, d) matrix, got shape {tuple(C.shape)}."
                )
            asym = float((C - C.T).abs().max())
            if asym > 1e-10 * float(C.abs().max()):
                raise BadInputError(
                    f"moment is not symmetric (max |C - C^T| = {asym:.3g}); pass (C + C.T) / 2 if the "
                    "asymmetry is rounding error."
                )
            n, center = None, None
            source = f"from an unknown number of samples for d = {C.shape[0]}"
        return cls._from_matrix(C, ridge, max_condition, source, n_samples=n, center=center)

    @classmethod
    def _from_matrix(
        cls,
        C: torch.Tensor,
        ridge: float,
        max_condition: float,
        source: str,
        *,
        n_samples: int | None,
        center: bool | None,
    ) -> AIP:
        if not (isinstance(ridge, (int, float)) and math.isfinite(ridge) and ridge >= 0):
            raise BadInputError(f"ridge must be a finite number >= 0, got {ridge!r}.")
        if not max_condition > 1:
            raise BadInputError(f"max_condition must be > 1, got {max_condition!r}.")
        d = C.shape[0]
        trace_over_d = float(torch.trace(C)) / d
        if trace_over_d <= 0:
            # A ridge is scaled by trace(C)/d, so it cannot repair a zero (or non-PSD, negative-trace) C.
            raise IllConditionedError(
                f"C has trace {trace_over_d * d:.3g} ({source}): every vector behind it is zero, or it is "
                "not a second moment, so no ridge can give a meaningful metric. Check the activation capture "
                "(hook point, layer index) or how C was computed."
            )
        if ridge > 0:
            C = C + (ridge * trace_over_d) * torch.eye(d, dtype=torch.float64)
        # eigvalsh only for the diagnostic; the solve path below uses the Cholesky factor alone.
        eig = torch.linalg.eigvalsh(C)
        cond = float(eig[-1] / eig[0]) if eig[0] > 0 else math.inf
        L, info = torch.linalg.cholesky_ex(C)
        if cond > max_condition or int(info) != 0:
            dead = (torch.diagonal(C) <= 0).nonzero().flatten()
            dead_text = (
                f" Dimensions {dead[:10].tolist()} are zero in every sample (dead)." if dead.numel() else ""
            )
            suggestion = _suggest_ridge(eig, trace_over_d, max_condition)
            raise IllConditionedError(
                f"the second moment C has condition number {cond:.3g} (eigenvalues from "
                f"{float(eig[0]):.3g} to {float(eig[-1]):.3g}; max_condition = {max_condition:.3g}), "
                f"estimated {source}.{dead_text} Fix: collect more activations, or pass "
                f"ridge={suggestion:g} to add {suggestion:g} * trace(C)/d * I, which the report records."
            )
        return cls(L, ridge=float(ridge), condition_number=cond, n_samples=n_samples, center=center)

    @classmethod
    def fit(
        cls,
        activations: torch.Tensor | np.ndarray | Iterable[torch.Tensor | np.ndarray],
        center: bool = False,
        ridge: float = 0.0,
        max_condition: float = 1e10,
    ) -> AIP:
        """AIP of activations: C is their uncentered second moment (covariance if center=True).

        activations: one (..., d) tensor or array, or any iterable of (batch, d) ones (a DataLoader, a
        generator, a list of batches; a batch given as a 1-tuple, as a DataLoader over a TensorDataset yields
        it, is unpacked). Batches stream through a SecondMoment in float64, never concatenated.
        """
        return cls.from_moment(_moment_of(activations, center), ridge, max_condition)

    @classmethod
    def from_dictionary(
        cls, W_dec: torch.Tensor | np.ndarray, ridge: float = 0.0, max_condition: float = 1e10
    ) -> AIP:
        """AIP of a dictionary W_dec (n_atoms, d), rows are atoms: C = W_dec^T W_dec, so S = (D D^T)^{-1}.

        (D = W_dec^T is the paper's d x N layout.) C is singular when n_atoms < d, which needs a ridge.
        """
        W = as_float_tensor(W_dec, "W_dec", ndim_min=2, dtype=torch.float64).cpu()
        if W.ndim != 2:
            raise BadInputError(f"W_dec must be (n_atoms, d), got shape {tuple(W.shape)}.")
        n_atoms, d = W.shape
        if n_atoms < d and ridge == 0:
            raise IllConditionedError(
                f"W_dec has {n_atoms} atoms for d = {d}: C = W_dec^T W_dec has rank at most {n_atoms} < {d}, "
                "so it is singular and S = C^{-1} does not exist. Fix: use a dictionary with at least d "
                "spanning atoms, or pass ridge=1e-6 to add 1e-6 * trace(C)/d * I, which the report records."
            )
        source = f"from {n_atoms} atoms for d = {d} (C = W_dec^T W_dec)"
        return cls._from_matrix(W.T @ W, ridge, max_condition, source, n_samples=None, center=None)

    def _factor(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x as (n, d) in its compute dtype, and L in that dtype on x's device (cached)."""
        x = as_float_tensor(x, "x", d=self.d)
        if x.dtype not in (torch.float64, torch.float32):
            # Half precision has no triangular solve and too little mantissa for it: compute in float32.
            x = x.float()
        key = (x.dtype, x.device)
        if key not in self._cast:
            self._cast[key] = self.cholesky.to(dtype=x.dtype, device=x.device)
        return x, self._cast[key]

    def whiten(self, x: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Whitened x~ = L^{-1} x for rows x (..., d); float64 in -> float64 out, otherwise float32 out.

        In float32 the relative error grows like sqrt(condition_number) * 6e-8.
        """
        x, L = self._factor(x)
        rows = x.reshape(-1, self.d)
        return whiten_rows(rows, L).reshape(x.shape)

    def unwhiten(self, z: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Inverse of whiten: x = L z for rows z (..., d); same dtype rules as whiten."""
        z, L = self._factor(z)
        return z @ L.T

    def inner(self, x: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray) -> torch.Tensor:
        """x^T C^{-1} y for rows x, y (..., d) (broadcast), float64 (...)."""
        x = self.whiten(as_float_tensor(x, "x", d=self.d, dtype=torch.float64))
        y = self.whiten(as_float_tensor(y, "y", d=self.d, dtype=torch.float64))
        return (x * y).sum(-1)

    def norm(self, x: torch.Tensor | np.ndarray) -> torch.Tensor:
        """AIP norm sqrt(x^T C^{-1} x) of rows x (..., d), float64 (...)."""
        x = as_float_tensor(x, "x", d=self.d, dtype=torch.float64)
        return torch.linalg.vector_norm(self.whiten(x), dim=-1)

    def cosine(self, x: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray) -> torch.Tensor:
        """AIP cosine of rows x, y (..., d) (broadcast), float64 (...); a zero vector raises BadInputError."""
        x = self.whiten(as_float_tensor(x, "x", d=self.d, dtype=torch.float64))
        y = self.whiten(as_float_tensor(y, "y", d=self.d, dtype=torch.float64))
        nx, ny = torch.linalg.vector_norm(x, dim=-1), torch.linalg.vector_norm(y, dim=-1)
        for name, nrm in (("x", nx), ("y", ny)):
            zero = (nrm == 0).nonzero()
            if zero.shape[0]:
                raise BadInputError(
                    f"{name} holds {zero.shape[0]} zero vectors (first at index {zero[0].tolist()}); a "
                    "cosine needs a direction. Drop them first."
                )
        return (x * y).sum(-1) / (nx * ny)

    def angles(
        self,
        x: torch.Tensor | np.ndarray,
        pairs: Pairs = None,
        seed: int = 0,
    ) -> Angles:
        """AIP angles between rows of x (n, d).

        pairs=None: all pairs i < j when n <= 2048, else 100,000 random distinct pairs; an int k: k random
        distinct pairs (i != j); (idx_i, idx_j): exactly those. The same seed picks the same pairs as
        `euclidean_angles`.
        """
        x = as_float_tensor(x, "x", ndim_min=2, d=self.d, dtype=torch.float64)
        if x.ndim != 2:
            raise BadInputError(
                f"x must be (n, d), got shape {tuple(x.shape)}; reshape it with x.reshape(-1, d)."
            )
        return _angles(_unit_rows(self.whiten(x), "x"), pairs, seed)

    def metric(self) -> torch.Tensor:
        """Diagnostic only: the dense S = C^{-1} (d, d) float64, by Cholesky solves against the identity.

        Meant for tests and small d (it is O(d^2) memory and O(d^3) time); use whiten/inner to compute with S.
        """
        eye = torch.eye(self.d, dtype=torch.float64)
        return torch.cholesky_solve(eye, self.cholesky)

    def save(self, path: str | Path) -> None:
        """Write a safetensors file: the Cholesky factor; ridge, condition, n_samples, center as metadata."""
        meta = {
            "format": "AIP",
            "ridge": repr(self.ridge),
            "condition": repr(self.condition_number),
            "n_samples": str(self.n_samples),
            "center": str(self.center),
        }
        save_file({"cholesky": self.cholesky.contiguous()}, str(path), metadata=meta)

    @classmethod
    def load(cls, path: str | Path) -> AIP:
        """Read a file written by `save`; a file with other contents raises BadInputError."""
        path = _check_path_file(path, "AIP")
        tensors, meta = _read_safetensors(
            path, "AIP", ("cholesky", "ridge", "condition", "n_samples", "center")
        )
        try:
            n_samples = None if meta["n_samples"] == "None" else int(meta["n_samples"])
            ridge, condition = float(meta["ridge"]), float(meta["condition"])
        except ValueError as e:
            raise BadInputError(
                f"{path}: unreadable AIP metadata ({e}); re-create the file with AIP.save."
            ) from e
        center = {"True": True, "False": False, "None": None}.get(meta["center"], "bad")
        if center == "bad":
            raise BadInputError(f"{path}: center must be True, False or None, got {meta['center']!r}.")
        return cls(
            tensors["cholesky"], ridge=ridge, condition_number=condition, n_samples=n_samples, center=center
        )
