"""A dictionary of atoms (rows of W_dec) normalised under an AIP, and its coherence statistics.

Coherence mu = max_{i != j} |<d~_i, d~_j>| of the unit-norm (AIP-whitened) atoms, the Babel function mu1(k)
and the Welch bound mu >= sqrt((N - d) / (d (N - 1))) of SPEC section 3. Every statistic is computed in tiles
of the Gram matrix by atoms.kernels.aip_gram, so memory stays O(tile x n_atoms): an n_atoms x n_atoms matrix
is never built. Every walk takes `progress`: False (default), True for a tqdm bar on stderr, or a callable
hook(done, total) called after each step (atoms.kernels.progress); it never changes a result.
"""

from __future__ import annotations

import math
import numbers

import numpy as np
import torch

from atoms.aip import AIP
from atoms.errors import BadInputError, as_float_tensor
from atoms.kernels.aip_gram import (
    GramStats,
    babel_crossing_reference,
    babel_reference,
    default_tile,
    gram_reduce,
    near_duplicate_pairs_reference,
)
from atoms.kernels.progress import Progress

__all__ = ["Dictionary", "babel", "coherence", "welch_bound"]

_DEFAULT_BINS = 100
_MAX_DENSE = 4096  # largest dense Gram gram() builds: 4096^2 float64 is 128 MiB
_TINY = 1e-12  # an atom with norm below this times the median norm is treated as zero


def _rows_text(rows: torch.Tensor) -> str:
    """'[3, 17, ...] and more (12 atoms)': the first 10 row indices and the count."""
    more = " and more" if rows.numel() > 10 else ""
    return f"{rows[:10].tolist()}{more} ({rows.numel()} atoms)"


def _check_atoms_finite(W: torch.Tensor) -> None:
    bad_nan = torch.isnan(W).any(dim=1)
    bad_inf = torch.isinf(W).any(dim=1)
    bad = (bad_nan | bad_inf).nonzero().flatten()
    if bad.numel():
        raise BadInputError(
            f"W_dec has atoms (rows) with non-finite entries ({int(bad_nan.sum())} with NaN, "
            f"{int(bad_inf.sum())} with Inf) at rows {_rows_text(bad)}. Drop those rows or re-initialise "
            "them (e.g. to random unit vectors) before building a Dictionary; NaN decoder rows usually mean "
            "the training diverged."
        )


def _as_atoms(W_dec: torch.Tensor | np.ndarray) -> torch.Tensor:
    """W_dec (n_atoms, d) as a checked float64 tensor; atom-level messages for non-finite rows."""
    W = torch.from_numpy(W_dec) if isinstance(W_dec, np.ndarray) else W_dec
    if isinstance(W, torch.Tensor) and W.ndim != 2:
        raise BadInputError(
            f"W_dec has shape {tuple(W.shape)}; a dictionary is a 2-D (n_atoms, d) array with one atom per "
            "row. For a single atom pass W[None, :]; for a stack of dictionaries build one Dictionary each."
        )
    if isinstance(W, torch.Tensor) and W.is_floating_point():
        _check_atoms_finite(W)
    # Detached: statistics need no gradient, and a graph through every Gram tile would cost O(n^2) memory.
    return as_float_tensor(W, "W_dec", ndim_min=2, dtype=torch.float64).detach()


def _check_int(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise BadInputError(f"{what} must be an int, got {type(value).__name__} {value!r}.")
    return int(value)


class Dictionary:
    """Atoms W_dec (n_atoms, d), rows are atoms, normalised to unit norm under an AIP (Euclidean without one).

    Attributes:
        raw: (n_atoms, d) float64, the atoms as given.
        unit: (n_atoms, d) float64, the AIP-whitened atoms L^{-1} w scaled to unit norm (the raw atoms scaled
            to unit norm when aip is None); their dot products are the AIP cosines.
        norms: (n_atoms,) float64, the AIP norms sqrt(w^T C^{-1} w) of the raw atoms (Euclidean without an
            AIP), taken before the normalisation.
        aip: the AIP or None. tile: rows per Gram tile (memory O(tile x n_atoms); None: 1024, or 2048 from
            8192 atoms on, `atoms.kernels.aip_gram.default_tile`).

    Zero atoms (norm 0 or below 1e-12 times the median norm) and NaN/Inf atoms raise BadInputError naming
    their rows. The statistics of the default histogram pass are computed once and cached (a cached answer
    reports no progress).
    """

    def __init__(
        self, W_dec: torch.Tensor | np.ndarray, aip: AIP | None = None, *, tile: int | None = None
    ) -> None:
        raw = _as_atoms(W_dec)
        tile = default_tile(raw.shape[0]) if tile is None else _check_int(tile, "tile")
        if tile < 1:
            raise BadInputError(f"tile must be >= 1 (rows of the Gram matrix per step), got {tile}.")
        if aip is not None and not isinstance(aip, AIP):
            raise BadInputError(f"aip must be an atoms.AIP or None, got {type(aip).__name__}.")
        if aip is not None and aip.d != raw.shape[1]:
            raise BadInputError(
                f"W_dec has d = {raw.shape[1]} but the AIP has d = {aip.d}. Fit the AIP on activations of "
                "the same layer and model as the dictionary."
            )
        white = raw if aip is None else aip.whiten(raw)
        norms = torch.linalg.vector_norm(white, dim=1)
        self._check_norms(norms, "AIP norm" if aip is not None else "norm")
        self.raw = raw
        self.aip = aip
        self.tile = tile
        self.norms = norms
        self.unit = white / norms[:, None]
        self._stats: GramStats | None = None

    @staticmethod
    def _check_norms(norms: torch.Tensor, kind: str) -> None:
        overflow = (~torch.isfinite(norms)).nonzero().flatten()
        if overflow.numel():
            raise BadInputError(
                f"the {kind} of W_dec rows {_rows_text(overflow)} overflows float64. Rescale W_dec (atoms "
                "are normalised anyway, so any positive scale gives the same statistics)."
            )
        zero = ((norms == 0) | (norms < _TINY * norms.median())).nonzero().flatten()
        if zero.numel():
            raise BadInputError(
                f"W_dec has zero atoms: rows {_rows_text(zero)} have {kind} 0 or below {_TINY:g} times the "
                f"median {kind} ({float(norms.median()):.3g}), so they have no direction. Drop those rows or "
                "re-initialise them (e.g. to random unit vectors) before building a Dictionary."
            )

    def __repr__(self) -> str:
        return f"Dictionary(n_atoms={self.n_atoms}, d={self.d}, aip={self.aip!r})"

    @property
    def n_atoms(self) -> int:
        return self.unit.shape[0]

    @property
    def d(self) -> int:
        return self.unit.shape[1]

    def _gram_stats(self, progress: Progress = False) -> GramStats:
        if self._stats is None:
            self._stats = gram_reduce(self.unit, bins=_DEFAULT_BINS, tile=self.tile, progress=progress)
        return self._stats

    def coherence(self, *, progress: Progress = False) -> float:
        """Mutual coherence max_{i != j} |cos(d~_i, d~_j)|; 0.0 for a single atom."""
        return float(self._gram_stats(progress).max_abs_cos)

    def max_coherence(self, *, progress: Progress = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-atom max |cos| to another atom (n_atoms,) float64, and a partner reaching it (n_atoms,) int64.

        Ties: the partner is one of the atoms reaching the maximum. A single atom has value 0 and partner -1.
        """
        stats = self._gram_stats(progress)
        return stats.max_per_atom.clone(), stats.partner.clone()

    def babel(self, k: int, *, progress: Progress = False) -> float:
        """Babel function mu1(k) = max_i max_{|L| = k, i not in L} sum_{j in L} |cos(d~_i, d~_j)|.

        k must be in [1, n_atoms - 1]. mu1(1) is the coherence; mu1(k) <= k mu.
        """
        k = _check_int(k, "k")
        if not 1 <= k <= self.n_atoms - 1:
            raise BadInputError(
                f"babel(k) needs 1 <= k <= n_atoms - 1 = {self.n_atoms - 1} (k other atoms are summed per "
                f"atom), got k = {k}."
            )
        return float(babel_reference(self.unit, k, tile=self.tile, progress=progress))

    def babel_crossing(self, level: float = 1.0, *, progress: Progress = False) -> int | None:
        """The smallest k in [1, n_atoms - 1] with babel(k) >= level; None when babel(n_atoms - 1) < level.

        One walk over the Gram in row tiles (`atoms.kernels.aip_gram.babel_crossing_reference`), where a
        bisection over babel(k) takes about log2(n_atoms) walks. Tropp's spark bound is this k + 1 at level 1.
        """
        if not isinstance(level, numbers.Real) or isinstance(level, bool) or not math.isfinite(level):
            raise BadInputError(f"level must be a finite number (a Babel value to reach), got {level!r}.")
        if self.n_atoms == 1:
            return None
        return babel_crossing_reference(self.unit, float(level), tile=self.tile, progress=progress)

    def cos_histogram(
        self, bins: int = _DEFAULT_BINS, *, progress: Progress = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Histogram of |cos| over the n (n - 1) / 2 pairs i < j: counts (bins,) int64, edges (bins + 1,).

        Equal bins over [0, 1], edges[b] = b / bins (float64); a pair goes to bin floor(|cos| * bins), and
        |cos| = 1 (parallel or antiparallel atoms; rounding can put them a few ulp above 1) to the last bin.
        Same as numpy.histogram(|cos|, edges) except within a few ulp of an interior edge.
        """
        bins = _check_int(bins, "bins")
        if bins < 1:
            raise BadInputError(f"bins must be >= 1, got {bins}.")
        stats = (
            self._gram_stats(progress)
            if bins == _DEFAULT_BINS
            else gram_reduce(self.unit, bins=bins, tile=self.tile, progress=progress)
        )
        return stats.histogram.clone(), stats.edges.clone()

    def near_duplicates(
        self, threshold: float, *, max_pairs: int = 1_000_000, progress: Progress = False
    ) -> list[tuple[int, int, float]]:
        """Pairs (i, j, cos) with i < j and |cos| > threshold, sorted by (i, j); cos is the signed AIP cosine.

        threshold must be in [0, 1). A low threshold on a large dictionary matches most of its n^2 / 2 pairs:
        more than `max_pairs` raises ValueError instead of filling memory.
        """
        if not isinstance(threshold, numbers.Real) or not 0 <= float(threshold) < 1:
            raise BadInputError(
                "threshold must be a number in [0, 1) (pairs with |cos| > threshold are returned), got "
                f"{threshold!r}."
            )
        i, j, cos = near_duplicate_pairs_reference(
            self.unit,
            float(threshold),
            tile=self.tile,
            max_pairs=_check_int(max_pairs, "max_pairs"),
            progress=progress,
        )
        return list(zip(i.tolist(), j.tolist(), cos.tolist(), strict=True))

    def gram(self, index: torch.Tensor | np.ndarray | list[int] | None = None) -> torch.Tensor:
        """Dense Gram (k, k) float64 of the unit atoms in `index` (all atoms if None); at most 4096 atoms.

        The diagonal is 1 up to rounding. For statistics of a larger dictionary use coherence, max_coherence,
        babel, cos_histogram or near_duplicates, which work in tiles.
        """
        if index is None:
            rows = self.unit
        else:
            idx = torch.as_tensor(index)
            if idx.ndim != 1 or idx.dtype == torch.bool or idx.is_floating_point() or idx.is_complex():
                raise BadInputError(
                    f"index must be a 1-D sequence of atom indices (ints), got dtype {idx.dtype} shape "
                    f"{tuple(idx.shape)}."
                )
            outside = ((idx < 0) | (idx >= self.n_atoms)).nonzero().flatten()
            if outside.numel():
                raise BadInputError(
                    f"index holds {outside.numel()} entries outside [0, {self.n_atoms - 1}], e.g. "
                    f"{idx[outside[:10]].tolist()}; atom indices run from 0 to n_atoms - 1."
                )
            rows = self.unit[idx.to(self.unit.device)]
        if rows.shape[0] > _MAX_DENSE:
            raise BadInputError(
                f"gram() would build a dense {rows.shape[0]} x {rows.shape[0]} matrix; it is limited to "
                f"{_MAX_DENSE} atoms. Pass index= with at most {_MAX_DENSE} atoms, or use coherence(), "
                "max_coherence(), babel(), cos_histogram() or near_duplicates(), which work in tiles."
            )
        return rows @ rows.T


def _as_dictionary(D: Dictionary | torch.Tensor | np.ndarray, aip: AIP | None) -> Dictionary:
    if isinstance(D, Dictionary):
        if aip is not None and aip is not D.aip:
            raise BadInputError(
                "D is already a Dictionary with its own AIP; pass the AIP either to Dictionary(W_dec, aip) "
                "or with the raw W_dec to this function, not both."
            )
        return D
    return Dictionary(D, aip)


def coherence(
    D: Dictionary | torch.Tensor | np.ndarray, aip: AIP | None = None, *, progress: Progress = False
) -> float:
    """Mutual coherence of D, a (n_atoms, d) array (rows are atoms) or a Dictionary, under `aip` if given."""
    return _as_dictionary(D, aip).coherence(progress=progress)


def babel(
    D: Dictionary | torch.Tensor | np.ndarray, k: int, aip: AIP | None = None, *, progress: Progress = False
) -> float:
    """Babel function mu1(k) of D, a (n_atoms, d) array (rows are atoms) or a Dictionary, under `aip`."""
    return _as_dictionary(D, aip).babel(k, progress=progress)


def welch_bound(n_atoms: int, d: int) -> float:
    """Welch lower bound on the coherence of N = n_atoms unit vectors in R^d: sqrt((N - d) / (d (N - 1))).

    0.0 when N <= d (an orthonormal set has coherence 0). Equiangular tight frames reach the bound (the
    simplex, N = d + 1, has coherence 1/d).
    """
    n_atoms, d = _check_int(n_atoms, "n_atoms"), _check_int(d, "d")
    if n_atoms < 1 or d < 1:
        raise BadInputError(f"welch_bound needs n_atoms >= 1 and d >= 1, got n_atoms = {n_atoms}, d = {d}.")
    if n_atoms <= d:
        return 0.0
    return math.sqrt((n_atoms - d) / (d * (n_atoms - 1)))
