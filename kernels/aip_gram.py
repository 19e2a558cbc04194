"""AIP Gram reduction: statistics of G = unit @ unit.T computed tile by tile, never as an (n, n) matrix.

`unit` is an (n, d) matrix whose rows are unit-norm atoms, already AIP-whitened by the caller, so G[i, j] is
the (AIP) cosine of atoms i and j. Three reductions share one tile walker (`_walk`):

- `gram_reduce_reference`: the maximum off-diagonal |cos|, each atom's maximum |cos| and the partner reaching
  it, a histogram of |cos| and the number of pairs above given thresholds, in one pass over the tiles (I, J)
  with J >= I (G is symmetric, so each off-diagonal tile serves both its rows and its columns).
- `near_duplicate_pairs_reference`: the pairs i < j with |cos| above a threshold.
- `babel_reference`: the Babel function mu1(k), per row tile against every column tile, keeping a running
  buffer of the k largest |cos| of each row.

Memory is O(tile x tile) per step (O(tile x (tile + k)) for Babel) plus the O(n) outputs.

What the Triton kernel that joins this file later must match (same signatures, same outputs):

- Pairs are i != j only. Each unordered pair {i, j} counts once in `histogram`, `counts_above` and the
  near-duplicate list; `max_per_atom` and `partner` see both directions.
- `max_per_atom[i] = max_{j != i} |G[i, j]|`; `partner[i]` is a j != i reaching it. Ties: any such j is
  correct (the reference keeps the first one found in its walk order, which is not a promise).
- `max_abs_cos = max_i max_per_atom[i]`. With a single atom there are no pairs: `max_abs_cos = 0`,
  `max_per_atom = [0]`, `partner = [-1]`, an all-zero histogram and zero counts.
- `histogram` has `bins` equal bins over [0, 1], `edges[b] = b / bins` (float64). The bin of a pair is
  `min(floor(float64(|cos|) * bins), bins - 1)`, with the product rounded in float64: |cos| == 1 exactly, and
  the values a few ulp above 1 that rounding gives for (anti)parallel unit rows, fall into the last bin. This
  equals `numpy.histogram(abs_cos, bins=edges)` except for a |cos| within a few ulp of an interior edge, which
  may land one bin lower (an exact edge test with `torch.bucketize` measured about 10x slower than the floor).
- `counts_above[t]` is the number of pairs with |cos| > thresholds[t] (strict), compared in float64.
- Precision: dot products in the dtype of `unit`, no lower. On a GPU that means
  `tl.dot(..., input_precision="ieee")` for float32 (TF32 has ~1e-3 relative error, too coarse for coherence);
  a float64 input is reduced in float64.
- Ordering of `near_duplicate_pairs_reference`: sorted by (i, j), i < j, cos signed.
- The input must be finite; these functions do not check it (atoms.Dictionary does, and names the bad rows).
- No autograd: the functions run under torch.no_grad(), so a tensor that requires grad keeps no graph of
  the tiles (which would hold O(n^2) memory for backward).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from itertools import groupby
from operator import attrgetter
from typing import NamedTuple

import torch

__all__ = ["GramStats", "babel_reference", "gram_reduce_reference", "near_duplicate_pairs_reference"]


class GramStats(NamedTuple):
    """Reductions of the Gram matrix of n unit atoms (see the module docstring for the exact semantics).

    max_abs_cos: () max off-diagonal |cos|, dtype of `unit`.
    max_per_atom: (n,) each atom's max |cos| to another atom, dtype of `unit`.
    partner: (n,) int64 index of an atom reaching `max_per_atom` (-1 only when n == 1).
    histogram: (bins,) int64 counts of |cos| over unordered pairs; sums to n (n - 1) / 2.
    edges: (bins + 1,) float64 bin edges b / bins.
    counts_above: (n_thresholds,) int64 number of unordered pairs with |cos| > each threshold.
    """

    max_abs_cos: torch.Tensor
    max_per_atom: torch.Tensor
    partner: torch.Tensor
    histogram: torch.Tensor
    edges: torch.Tensor
    counts_above: torch.Tensor


class _Tile(NamedTuple):
    r0: int  # first row (atom index) of the tile
    c0: int  # first column (atom index) of the tile
    cos: torch.Tensor  # (rows, cols) signed cosines unit[r0:r0+rows] @ unit[c0:c0+cols].T
    diagonal: bool  # r0 == c0: the tile is square and holds the self-pairs i == j on its diagonal


def _check(unit: torch.Tensor, tile: int) -> None:
    if not isinstance(unit, torch.Tensor) or unit.ndim != 2 or not unit.is_floating_point():
        raise ValueError(
            "unit must be a floating (n, d) torch tensor of unit-norm rows; "
            f"got {type(unit).__name__} {getattr(unit, 'shape', '')}."
        )
    if isinstance(tile, bool) or not isinstance(tile, int) or tile < 1:
        raise ValueError(f"tile must be a positive int (rows per tile), got {tile!r}.")


def _walk(unit: torch.Tensor, tile: int, *, upper: bool) -> Iterator[_Tile]:
    """Yield the tiles of unit @ unit.T in row-major order: every (I, J), or only J >= I when `upper`.

    Row-major order lets a consumer finish a row tile when its group of tiles ends (see babel_reference).
    """
    n = unit.shape[0]
    for r0 in range(0, n, tile):
        rows = unit[r0 : r0 + tile]
        for c0 in range(r0 if upper else 0, n, tile):
            yield _Tile(r0, c0, rows @ unit[c0 : c0 + tile].T, r0 == c0)


def _strict_upper(block: torch.Tensor) -> torch.Tensor:
    """(t, t) bool mask of j > i: on a diagonal tile, the entries that are each unordered pair once."""
    return torch.ones(block.shape, dtype=torch.bool, device=block.device).triu(1)


def _update_max(
    best: torch.Tensor,
    partner: torch.Tensor,
    start: int,
    values: torch.Tensor,
    index: torch.Tensor,
    offset: int,
) -> None:
    """Raise best[start:start+len(values)] to `values` where larger, recording the partner index + offset."""
    seg = slice(start, start + values.shape[0])
    better = values > best[seg]
    best[seg] = torch.where(better, values, best[seg])
    partner[seg] = torch.where(better, index + offset, partner[seg])


@torch.no_grad()
def gram_reduce_reference(
    unit: torch.Tensor, *, bins: int = 100, thresholds: Sequence[float] = (), tile: int = 1024
) -> GramStats:
    """Max |cos|, per-atom max and partner, |cos| histogram and threshold counts of unit (n, d), in tiles.

    Walks only the tiles (I, J) with J >= I of G = unit @ unit.T; the diagonal tile's self-pairs are excluded.
    Memory: O(tile x tile) per step plus O(n + bins + len(thresholds)) outputs.
    """
    _check(unit, tile)
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
        raise ValueError(f"bins must be a positive int, got {bins!r}.")
    n, device = unit.shape[0], unit.device
    edges = torch.arange(bins + 1, dtype=torch.float64, device=device) / bins
    limits = [float(t) for t in thresholds]
    # -1 is below every |cos|, so the first real pair always replaces it; only n == 1 leaves it in place.
    best = torch.full((n,), -1.0, dtype=unit.dtype, device=device)
    partner = torch.full((n,), -1, dtype=torch.int64, device=device)
    histogram = torch.zeros(bins, dtype=torch.int64, device=device)
    above = torch.zeros(len(limits), dtype=torch.int64, device=device)
    for t in _walk(unit, tile, upper=True):
        a = t.cos.abs()
        if t.diagonal:
            pairs = a[_strict_upper(a)]
            a.fill_diagonal_(-1.0)
            _update_max(best, partner, t.r0, *a.max(dim=1), offset=t.c0)
        else:
            pairs = a.reshape(-1)
            _update_max(best, partner, t.r0, *a.max(dim=1), offset=t.c0)
            _update_max(best, partner, t.c0, *a.max(dim=0), offset=t.r0)
        pairs = pairs.to(torch.float64)
        # |cos| >= 0, so truncation is floor; |cos| >= 1 (1, or 1 + rounding) joins the last bin.
        index = (pairs * bins).long().clamp_(max=bins - 1)
        histogram += torch.bincount(index, minlength=bins)
        for k, limit in enumerate(limits):
            above[k] += (pairs > limit).sum()
    if n == 1:
        best.zero_()
    return GramStats(best.max(), best, partner, histogram, edges, above)


@torch.no_grad()
def near_duplicate_pairs_reference(
    unit: torch.Tensor, threshold: float, *, tile: int = 1024, max_pairs: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pairs i < j of rows of unit (n, d) with |cos| > threshold: (i (p,) int64, j (p,) int64, cos (p,)).

    Sorted by (i, j); cos is signed, in the dtype of `unit`. `max_pairs` bounds the result's memory: the walk
    stops with a ValueError as soon as more pairs than that are found.
    """
    _check(unit, tile)
    n, device = unit.shape[0], unit.device
    # Hits go into buffers that grow by doubling, not into a list of per-tile tensors: small tensors kept
    # alive between the tile temporaries fragment the CPU heap so much that RSS grew by about one tile (14 MiB
    # at tile = 1024) per tile in a measurement; O(log p) buffer allocations avoid that.
    i = torch.empty(1024, dtype=torch.int64, device=device)
    j = torch.empty_like(i)
    cos = torch.empty(1024, dtype=unit.dtype, device=device)
    found = 0
    for t in _walk(unit, tile, upper=True):
        hit = t.cos.abs().to(torch.float64) > threshold
        if t.diagonal:
            hit &= _strict_upper(hit)
        r, c = hit.nonzero(as_tuple=True)
        end = found + r.shape[0]
        if max_pairs is not None and end > max_pairs:
            raise ValueError(
                f"more than max_pairs={max_pairs} atom pairs have |cos| > {threshold}; raise the threshold, "
                "or raise max_pairs if that many pairs are wanted."
            )
        if end > i.shape[0]:
            i, j, cos = (_grown(buffer, found, max(2 * buffer.shape[0], end)) for buffer in (i, j, cos))
        i[found:end] = r + t.r0
        j[found:end] = c + t.c0
        cos[found:end] = t.cos[r, c]
        found = end
    order = torch.argsort(i[:found] * n + j[:found])
    return i[order], j[order], cos[order]


def _grown(buffer: torch.Tensor, used: int, size: int) -> torch.Tensor:
    """A (size,) buffer holding the first `used` entries of `buffer`."""
    out = torch.empty(size, dtype=buffer.dtype, device=buffer.device)
    out[:used] = buffer[:used]
    return out


@torch.no_grad()
def babel_reference(unit: torch.Tensor, k: int, *, tile: int = 1024) -> torch.Tensor:
    """Babel function mu1(k) = max_i (sum of the k largest |cos(u_i, u_j)|, j != i) of rows of unit (n, d).

    Returns a () tensor in the dtype of `unit`. Each row tile meets every column tile and keeps the k largest
    |cos| of each of its rows so far: memory O(tile x (tile + k)).
    """
    _check(unit, tile)
    n = unit.shape[0]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n - 1:
        raise ValueError(f"k must be an int in [1, n - 1] = [1, {n - 1}] (other atoms per row), got {k!r}.")
    result = torch.tensor(float("-inf"), dtype=unit.dtype, device=unit.device)
    for _, row_tiles in groupby(_walk(unit, tile, upper=False), key=attrgetter("r0")):
        top = None
        for t in row_tiles:
            a = t.cos.abs()
            if t.diagonal:
                # -inf never makes the top k: each row has n - 1 >= k real values by the end of its walk.
                a.fill_diagonal_(float("-inf"))
            pool = a if top is None else torch.cat([top, a], dim=1)
            top = pool.topk(min(k, pool.shape[1]), dim=1, sorted=False).values
        torch.maximum(result, top.sum(dim=1).max(), out=result)
    return result
