"""AIP Gram reduction: statistics of G = unit @ unit.T computed tile by tile, never as an (n, n) matrix.

`unit` is an (n, d) matrix whose rows are unit-norm atoms, already AIP-whitened by the caller, so G[i, j] is
the (AIP) cosine of atoms i and j. Three reductions share one tile walker (`_walk`):

- `gram_reduce_reference`: the maximum off-diagonal |cos|, each atom's maximum |cos| and the partner reaching
  it, a histogram of |cos| and the number of pairs above given thresholds, in one pass over the tiles (I, J)
  with J >= I (G is symmetric, so each off-diagonal tile serves both its rows and its columns).
- `near_duplicate_pairs_reference`: the pairs i < j with |cos| above a threshold.
- `babel_reference`: the Babel function mu1(k), per row tile against every column tile, keeping a running
  buffer of the k largest |cos| of each row.
- `babel_crossing_reference`: the smallest k with mu1(k) >= a level (the Babel spark bound), in one walk.

Every walk takes `progress` (False, True for a tqdm bar on stderr, or a hook(done, total); see
kernels/progress.py) counting tiles, row tiles or launches; it never changes a result.

Memory is O(tile x tile) per step (O(tile x (tile + k)) for Babel) plus the O(n) outputs.

`gram_reduce` is the entry point: CUDA tensors run the Triton kernel `_gram_reduce_kernel` (kernel,
launcher and reference in this one file, the Liger-Kernel way), CPU tensors the reference, and
``ATOMS_KERNELS=interpret`` the kernel in Triton's interpreter (kernels/dispatch.py). The kernel is described
after the rules below.

What the reference and the Triton kernel both follow (same outputs):

- Pairs are i != j only. Each unordered pair {i, j} counts once in `histogram`, `counts_above` and the
  near-duplicate list; `max_per_atom` and `partner` see both directions.
- `max_per_atom[i] = max_{j != i} |G[i, j]|`; `partner[i]` is a j != i reaching it. Ties: any such j is
  correct (the reference keeps the first one found in its walk order, the kernel the lowest index; neither
  is a promise).
- `max_abs_cos = max_i max_per_atom[i]`. With a single atom there are no pairs: `max_abs_cos = 0`,
  `max_per_atom = [0]`, `partner = [-1]`, an all-zero histogram and zero counts.
- `histogram` has `bins` equal bins over [0, 1], `edges[b] = b / bins` (float64). The bin of a pair is
  `min(floor(float64(|cos|) * bins), bins - 1)`, with the product rounded in float64: |cos| == 1 exactly, and
  the values a few ulp above 1 that rounding gives for (anti)parallel unit rows, fall into the last bin. This
  equals `numpy.histogram(abs_cos, bins=edges)` except for a |cos| within a few ulp of an interior edge, which
  may land one bin lower (an exact edge test with `torch.bucketize` measured about 10x slower than the floor).
- `counts_above[t]` is the number of pairs with |cos| > thresholds[t] (strict), compared in float64.
- Precision: dot products in the compute dtype, float64 for a float64 `unit` and float32 (float32
  accumulation of the exact products of the stored values) for float32, float16 and bfloat16; the cosines
  and the per-atom maxima come back in that dtype. On a GPU float32 means `tl.dot(..., input_precision=
  "ieee")` (TF32 has ~1e-3 relative error, too coarse for coherence; "tf32x3" is the opt-in alternative).
- Ordering of `near_duplicate_pairs_reference`: sorted by (i, j), i < j, cos signed.
- The input must be finite; these functions do not check it (atoms.Dictionary does, and names the bad rows).
- No autograd: the functions run under torch.no_grad(), so a tensor that requires grad keeps no graph of
  the tiles (which would hold O(n^2) memory for backward).

The Triton kernel. One program per (BLOCK, BLOCK) tile (I, J), J >= I, of G: a `tl.dot` over d in BLOCK_D
chunks, float32 accumulation (float64 for float64 atoms), then the tile is reduced in registers:
- Per-atom maxima by a deterministic two-stage reduction. A launch covers a band of row tiles; each program
  writes its tile's row maxima (and argmax columns) to R[J, rows of I] and, off the diagonal, its column
  maxima to C[I, cols of J]. Every owned entry of R and C has exactly one writer, so nothing races. On the
  host `torch.max(dim=0)` takes each atom's maximum over them (the first maximal row) and merges it into the
  running maximum, replacing an equal value only with a lower partner index: the partner is the lowest
  index reaching the maximum, the same on every run. R and C hold about 2 x band tiles x n (value, int32
  index) entries; a band is as many group rows as fit in PARTIAL_BYTES (256 MiB), at least one (2 GROUP n
  entries, 192 bytes per float64 atom), so 16384 atoms run in one launch (32 MiB float32, 96 MiB float64)
  and any n in O(n) memory. A packed (value, index) 64-bit atomic max would need no second stage, but no
  64-bit word holds a float64 and an index.
- Histogram and threshold counts: `tl.histogram` of the tile's bins, a tile sum per threshold, then one
  integer `atomic_add` per bin and per threshold. Integer sums are exact in any order: deterministic.
- Binning without float64 tiles (a float64 copy of the tile doubled the registers and spilled): b =
  trunc(|cos| bins) in float32, minus one where `fma(|cos|, bins, -b) < 0` (one rounding keeps the sign of the
  exact |cos| bins - b). That is floor of the exact product, the reference's rule: a float32 |cos| times
  bins < 2**24 is exact in float64. Thresholds are rounded down to float32 on the host, so `|cos| > t32` in
  float32 is `|cos| > t` in float64.
- Tile order: GROUP x GROUP blocks of tile pairs share 2 GROUP operand tiles in L2 (19 MB at BLOCK 128,
  d 2304, float32) instead of re-reading HBM.
Error against the float64 cosines of the *stored* rows (unit rows: sum_k |u_ik u_jk| <= 1): float64 (DMMA)
<= d 2**-53; float32 "ieee" (an FMA chain) <= d 2**-24, 1.4e-4 at d = 2304 in the worst case (~sqrt(d)
2**-24 = 3e-6 typically); bfloat16 / float16 products are exact in float32 and tensor-core accumulation may
truncate instead of rounding (Fasi et al. 2021), so <= 2 d 2**-24; float32 "tf32x3" adds <= 3 2**-22 (the
dropped lo x lo term and the TF32 rounding of the lo parts), under 1 % of that at d = 2304, so it is fit for
coherence. Plain TF32 (2**-11 per product) is refused. What rounding a bfloat16 atom itself (2**-9 relative
per entry) does to the cosines is the caller's choice of storage.

Near-duplicate pairs and Babel stay torch-only (on a GPU the reference runs there, as cuBLAS tile GEMMs):
a near-duplicate list has a data-dependent length (a kernel would need a count pass or a capacity guess,
then an atomic slot counter and a sort), for pairs that are few at useful thresholds, so the tile GEMMs
dominate either way; Babel needs each row's k largest |cos| over *all* columns, which the symmetric walk
splits between two programs, while `torch.topk` on a (tile, tile + k) buffer already does it in
O(tile (tile + k)) memory.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from itertools import groupby
from operator import attrgetter
from typing import Literal, NamedTuple

import numpy as np
import torch

from .compat import f64_product, has_fp64_dot
from .dispatch import Backend, backend, dot_in_fp32, launch, tl, triton
from .progress import Progress, ticker

__all__ = [
    "GramStats",
    "babel_crossing_reference",
    "babel_reference",
    "default_tile",
    "gram_reduce",
    "gram_reduce_reference",
    "near_duplicate_pairs_reference",
]

Precision = Literal["ieee", "tf32x3"]


class GramStats(NamedTuple):
    """Reductions of the Gram matrix of n unit atoms (see the module docstring for the exact semantics).

    max_abs_cos: () max off-diagonal |cos|, in the compute dtype (float64 for a float64 `unit`, else float32).
    max_per_atom: (n,) each atom's max |cos| to another atom, in the compute dtype.
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
    cos: torch.Tensor  # (rows, cols) signed cosines unit[r0:r0+rows] @ unit[c0:c0+cols].T, contiguous
    diagonal: bool  # r0 == c0: the tile is square and holds the self-pairs i == j on its diagonal


def _check(unit: torch.Tensor, tile: int) -> None:
    if not isinstance(unit, torch.Tensor) or unit.ndim != 2 or not unit.is_floating_point():
        raise ValueError(
            "unit must be a floating (n, d) torch tensor of unit-norm rows; "
            f"got {type(unit).__name__} {getattr(unit, 'shape', '')}."
        )
    if unit.shape[0] == 0 or unit.shape[1] == 0:
        raise ValueError(
            f"unit must hold at least one atom of dimension >= 1, got shape {tuple(unit.shape)}."
        )
    if isinstance(tile, bool) or not isinstance(tile, int) or tile < 1:
        raise ValueError(f"tile must be a positive int (rows per tile), got {tile!r}.")


def _check_bins(bins: int) -> None:
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
        raise ValueError(f"bins must be a positive int, got {bins!r}.")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; float32 and the half types are multiplied with float32 accumulation."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# A diagonal tile of an upper walk is computed in this many row strips, each from its own diagonal on:
# (STRIPS + 1) / (2 STRIPS) of the tile GEMM instead of all of it (5/8 at 4; more strips: thinner GEMMs).
DIAGONAL_STRIPS = 4


def _block(unit: torch.Tensor, start: int, size: int) -> torch.Tensor:
    """Rows unit[start : start + size] in the compute dtype, row-major: a no-op view for a row-major
    float64 or float32 `unit`. A row slice of a column-major `unit` is strided with a leading dimension of
    n, which made each tile GEMM about 20 % slower (16384 x 2304); copying the block costs a few % of it."""
    return unit[start : start + size].to(_compute_dtype(unit.dtype)).contiguous()


def _walk(unit: torch.Tensor, tile: int, *, upper: bool) -> Iterator[_Tile]:
    """Yield the tiles of unit @ unit.T in row-major order: every (I, J), or only J >= I when `upper`.

    Row-major order lets a consumer finish a row tile when its group of tiles ends (see babel_reference).
    Half-precision tiles are upcast to float32 first (exact), so their cosines carry float32 sums, as on
    the Triton path, instead of being rounded back to 8 or 11 bits. On the diagonal tiles of an upper walk
    only the entries j >= i are promised: the rest may hold cosines or zeros (`_diagonal_tile`).
    """
    n = unit.shape[0]
    for r0 in range(0, n, tile):
        rows = _block(unit, r0, tile)
        for c0 in range(r0 if upper else 0, n, tile):
            if upper and c0 == r0:
                yield _Tile(r0, c0, _diagonal_tile(rows), True)
            else:
                yield _Tile(r0, c0, rows @ _block(unit, c0, tile).T, r0 == c0)


def _n_tiles(n: int, tile: int, *, upper: bool) -> int:
    """How many tiles `_walk` yields for n rows: T (T + 1) / 2 of the upper walk, T^2 of the full one."""
    t = -(-n // tile)
    return t * (t + 1) // 2 if upper else t * t


def _diagonal_tile(rows: torch.Tensor) -> torch.Tensor:
    """(t, t) rows @ rows.T on and above the diagonal, strip by strip; the blocks left of each strip's
    diagonal block, never computed, are zeros. At d >> t the GEMM is the cost of a tile, so this saves
    3/8 of the diagonal tiles' time (about 1/4 of all work at n = 4 tile)."""
    t = rows.shape[0]
    cos = torch.empty(t, t, dtype=rows.dtype, device=rows.device)
    strip = -(-t // DIAGONAL_STRIPS)
    for k0 in range(0, t, strip):
        k1 = min(t, k0 + strip)
        cos[k0:k1, :k0] = 0.0
        torch.matmul(rows[k0:k1], rows[k0:].T, out=cos[k0:k1, k0:])
    return cos


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


# Entries of a tile reduced at a time, below ATen's grain size (32768), so that every element-wise op and
# reduction on a chunk runs inline on the calling thread: whole-tile ops each open an OpenMP parallel region,
# and on a loaded machine each region waits for a descheduled thread; that made the reductions as slow as
# the tile GEMM (4096 x 2304 float64, 2 cores, load 4), against under a tenth of it in chunks. The chunk and
# its scratch (128 KiB float64) also stay in a core's L2 cache.
_CHUNK = 1 << 14


def default_tile(n: int) -> int:
    """Rows per tile for n atoms on the torch path: 1024, or 2048 from 8192 atoms on.

    A diagonal tile computes its whole square for half the pairs, so the waste is about tile / (2 n) of the
    walk; larger tiles make larger, faster GEMMs. Measured on 2 idle cores at d = 2304 (float64, against a
    GEMM of the same FLOPs): 4096 atoms 1.31x at 1024 and 1.46x at 2048; 16384 atoms 1.32x at 1024, 1.23x at
    2048, 1.29x at 4096. A 2048 tile is 32 MiB of float64.
    """
    return 1024 if n < 8192 else 2048


@torch.no_grad()
def gram_reduce_reference(
    unit: torch.Tensor,
    *,
    bins: int = 100,
    thresholds: Sequence[float] = (),
    tile: int | None = None,
    progress: Progress = False,
) -> GramStats:
    """Max |cos|, per-atom max and partner, |cos| histogram and threshold counts of unit (n, d), in tiles.

    Walks only the tiles (I, J) with J >= I of G = unit @ unit.T; the diagonal tile's self-pairs are excluded.
    Memory: O(tile x tile) per step plus O(n + bins + len(thresholds)) outputs. tile None: `default_tile`.
    `progress` counts tiles.
    """
    tile = default_tile(unit.shape[0]) if tile is None else tile
    _check(unit, tile)
    _check_bins(bins)
    n, device = unit.shape[0], unit.device
    edges = torch.arange(bins + 1, dtype=torch.float64, device=device) / bins
    limits = [float(t) for t in thresholds]
    # -1 is below every |cos|, so the first real pair always replaces it; only n == 1 leaves it in place.
    best = torch.full((n,), -1.0, dtype=_compute_dtype(unit.dtype), device=device)
    partner = torch.full((n,), -1, dtype=torch.int64, device=device)
    histogram = torch.zeros(bins, dtype=torch.int64, device=device)
    above = torch.zeros(len(limits), dtype=torch.int64, device=device)
    width = min(n, tile)
    step = max(1, min(width, _CHUNK // width))  # rows of a tile per chunk: scratch <= one tile
    scaled = torch.empty(step * width, dtype=torch.float64, device=device)
    # int32 bin indices convert from float64 about 3x faster than int64.
    index = torch.empty(scaled.shape, dtype=torch.int32 if bins < 2**31 else torch.int64, device=device)
    hit = torch.empty(scaled.shape, dtype=torch.bool, device=device)
    # On and below the diagonal of a diagonal tile: the self-pairs and the second copy of each pair.
    lower = torch.ones(width, width, dtype=torch.bool, device=device).tril_()
    bar = ticker(progress, _n_tiles(n, tile, upper=True), "coherence", "tile")
    for t in _walk(unit, tile, upper=True):
        rows, cols = t.cos.shape
        for r in range(0, rows, step):
            a = t.cos[r : r + step].abs_()
            if t.diagonal:
                # -1 on and below the diagonal: j > i counts each pair once, and the maxima over rows and
                # over columns below then see every pair of the tile from both sides, as off the diagonal.
                a.masked_fill_(lower[r : r + a.shape[0], :cols], -1.0)
            chunk = a.reshape(-1)
            m = chunk.shape[0]
            pairs = scaled[:m]
            if chunk.dtype == torch.float64:
                for k, limit in enumerate(limits):
                    above[k] += torch.count_nonzero(torch.gt(chunk, limit, out=hit[:m]))
                torch.mul(chunk, bins, out=pairs)
            else:
                # Compared and scaled in float64: a Python float against a float32 tensor is rounded to
                # float32 first, and the bin rule rounds the product in float64.
                pairs.copy_(chunk)
                for k, limit in enumerate(limits):
                    above[k] += torch.count_nonzero(torch.gt(pairs, limit, out=hit[:m]))
                pairs.mul_(bins)
            # |cos| >= 0, so truncation is floor; |cos| >= 1 (1, or 1 + rounding) joins the last bin; the -1
            # entries of a diagonal tile land in bin 0 and are taken out below.
            pairs.clamp_(0.0, bins - 1)
            histogram += torch.bincount(index[:m].copy_(pairs), minlength=bins)
        # Whole-tile maxima: max with indices opens a parallel region whatever its size, so once per tile.
        _update_max(best, partner, t.r0, *t.cos.max(dim=1), offset=t.c0)
        _update_max(best, partner, t.c0, *t.cos.max(dim=0), offset=t.r0)
        if t.diagonal:
            masked = rows * (rows + 1) // 2
            histogram[0] -= masked
            for k, limit in enumerate(limits):
                if -1.0 > limit:
                    above[k] -= masked
        bar.advance()
    bar.close()
    if n == 1:
        best.zero_()
    return GramStats(best.max(), best, partner, histogram, edges, above)


@torch.no_grad()
def near_duplicate_pairs_reference(
    unit: torch.Tensor,
    threshold: float,
    *,
    tile: int = 1024,
    max_pairs: int | None = None,
    progress: Progress = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pairs i < j of rows of unit (n, d) with |cos| > threshold: (i (p,) int64, j (p,) int64, cos (p,)).

    Sorted by (i, j); cos is signed, in the compute dtype (float64 for float64 `unit`, else float32).
    `max_pairs` bounds the result's memory: the walk stops with a ValueError as soon as more pairs than that
    are found. `progress` counts tiles.
    """
    _check(unit, tile)
    n, device = unit.shape[0], unit.device
    # Hits go into buffers that grow by doubling, not into a list of per-tile tensors: small tensors kept
    # alive between the tile temporaries fragment the CPU heap so much that RSS grew by about one tile (14 MiB
    # at tile = 1024) per tile in a measurement; O(log p) buffer allocations avoid that.
    i = torch.empty(1024, dtype=torch.int64, device=device)
    j = torch.empty_like(i)
    cos = torch.empty(1024, dtype=_compute_dtype(unit.dtype), device=device)
    found = 0
    with ticker(progress, _n_tiles(n, tile, upper=True), "near duplicates", "tile") as bar:
        for t in _walk(unit, tile, upper=True):
            found, (i, j, cos) = _add_pairs(t, threshold, found, (i, j, cos), max_pairs)
            bar.advance()
    order = torch.argsort(i[:found] * n + j[:found])
    return i[order], j[order], cos[order]


def _add_pairs(
    t: _Tile,
    threshold: float,
    found: int,
    buffers: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    max_pairs: int | None,
) -> tuple[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Append tile t's pairs above threshold to the (i, j, cos) buffers: (new count, buffers)."""
    i, j, cos = buffers
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
    return end, (i, j, cos)


def _grown(buffer: torch.Tensor, used: int, size: int) -> torch.Tensor:
    """A (size,) buffer holding the first `used` entries of `buffer`."""
    out = torch.empty(size, dtype=buffer.dtype, device=buffer.device)
    out[:used] = buffer[:used]
    return out


@torch.no_grad()
def babel_reference(
    unit: torch.Tensor, k: int, *, tile: int = 1024, progress: Progress = False
) -> torch.Tensor:
    """Babel function mu1(k) = max_i (sum of the k largest |cos(u_i, u_j)|, j != i) of rows of unit (n, d).

    Returns a () tensor in the compute dtype (float64 for float64 `unit`, else float32). Each row tile meets
    every column tile and keeps the k largest |cos| of each of its rows so far: memory O(tile x (tile + k)).
    `progress` counts row tiles.
    """
    _check(unit, tile)
    n = unit.shape[0]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n - 1:
        raise ValueError(f"k must be an int in [1, n - 1] = [1, {n - 1}] (other atoms per row), got {k!r}.")
    result = torch.tensor(float("-inf"), dtype=_compute_dtype(unit.dtype), device=unit.device)
    with ticker(progress, -(-n // tile), f"babel({k})", "row tile") as bar:
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
            bar.advance()
    return result


# First width of the running top-|cos| buffer of `babel_crossing_reference`. Random atoms cross mu1(k) = 1 at
# k of about 10-30 (65536 Gaussian atoms in d = 2304: k = 13), so one walk with this width usually suffices.
CROSSING_WIDTH = 64


@torch.no_grad()
def babel_crossing_reference(
    unit: torch.Tensor,
    level: float,
    *,
    tile: int = 1024,
    width: int = CROSSING_WIDTH,
    progress: Progress = False,
) -> int | None:
    """Smallest k in [1, n - 1] with mu1(k) >= level for the rows of unit (n, d); None if mu1(n - 1) < level.

    mu1(k) >= level exactly when some row's k largest |cos| (j != i) sum to >= level, so the answer is the
    minimum over rows i of k_i, the length of row i's shortest prefix of sorted |cos| reaching `level`: one
    walk of the Gram, where bisecting on `babel_reference` takes about log2(n) walks. Each row tile keeps
    the `width` largest |cos| of its rows (only k_i below the best k so far matters) and the sum of all of
    them; a tile none of whose rows reaches `level` within `width`, although some row's full sum does, is
    walked again with 8 times the width (never for random atoms at the default 64). Memory O(tile x (tile +
    width)), at most O(tile x n). `progress` counts row tiles. Sums are taken in a different order than in
    `babel_reference`, so a row sum within a few ulp of `level` may be judged differently.
    """
    _check(unit, tile)
    n = unit.shape[0]
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ValueError(f"width must be a positive int (|cos| kept per row), got {width!r}.")
    best = n  # the answer is at most n - 1; n means "not reached yet"
    with ticker(progress, -(-n // tile), "babel crossing", "row tile") as bar:
        for r0 in range(0, n, tile):
            rows = _block(unit, r0, tile)
            while best > 1:
                keep = min(width, best - 1, n - 1)  # only rows with k_i < best can lower it
                top, total = _top_abs_cos(unit, rows, r0, keep, tile)
                reach = top.sort(dim=1, descending=True).values.cumsum(dim=1) >= level
                hit = reach.any(dim=1)
                if bool(hit.any()):
                    # argmax of a bool row is its first True: k_i - 1. Rows without a hit have k_i > keep.
                    first = reach.to(torch.uint8).argmax(dim=1)
                    best = min(best, int(first[hit].min()) + 1)
                    break
                if keep >= min(best - 1, n - 1) or not bool((total >= level).any()):
                    break
                width *= 8
            bar.advance()
    return None if best == n else best


def _top_abs_cos(
    unit: torch.Tensor, rows: torch.Tensor, r0: int, keep: int, tile: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The `keep` largest |cos| of each of `rows` (atoms r0, r0 + 1, ...) against every other atom (t, keep),
    unsorted, and the sum of all of them (t,)."""
    total = torch.zeros(rows.shape[0], dtype=rows.dtype, device=rows.device)
    top = None
    for c0 in range(0, unit.shape[0], tile):
        a = (rows @ _block(unit, c0, tile).T).abs_()
        if c0 == r0:
            # 0, not -inf: if a row's self-entry makes its top `keep`, every entry left out is 0 as well,
            # so the top sums are unchanged; the full sum needs a finite value.
            a.fill_diagonal_(0.0)
        total += a.sum(dim=1)
        pool = a if top is None else torch.cat([top, a], dim=1)
        top = pool.topk(min(keep, pool.shape[1]), dim=1, sorted=False).values
    return top, total


# ------------------------------------------------------------------------------------------------------------
# Triton kernel
# ------------------------------------------------------------------------------------------------------------


@triton.jit
def _gram_reduce_kernel(
    unit_ptr,
    row_max_ptr,
    row_idx_ptr,
    col_max_ptr,
    col_idx_ptr,
    hist_ptr,
    limits_ptr,
    above_ptr,
    N,
    D,
    stride_n,
    stride_d,
    bins,
    n_limits,
    s0,
    q0,
    band_n,
    BLOCK: tl.constexpr,
    BLOCK_D: tl.constexpr,
    GROUP: tl.constexpr,
    BINS_P2: tl.constexpr,
    PRECISION: tl.constexpr,
    DOT_FP32: tl.constexpr,
    FP64_DOT: tl.constexpr,
):
    """One (BLOCK, BLOCK) tile (ti, tj), ti <= tj, of G = unit unit^T with ti in the launch's band of row
    tiles (first tile t0 = s0 GROUP, first atom i0 = t0 BLOCK, band_n atoms), reduced in registers.

    Writes the tile's row maxima (and argmax columns) to R[tj - t0, rows - i0] (R: (n_tiles - t0, band_n)),
    its column maxima when ti != tj to C[ti - t0, cols - i0] (C: (band tiles, N - i0)), and adds its pairs
    j > i to the histogram and the threshold counts.
    """
    # Programs come in groups of GROUP x GROUP tile pairs. The groups (si, sj), si <= sj < S, are numbered
    # from the bottom-right corner of the upper triangle: r = S - 1 - si, c = S - 1 - sj <= r, q = r (r + 1)
    # / 2 + c, so each band of group rows [s0, s1) is the contiguous range of q from q0 = T(S - s1).
    pid = tl.program_id(0)
    n_tiles = tl.cdiv(N, BLOCK)
    n_groups = tl.cdiv(n_tiles, GROUP)
    q = q0 + (pid // (GROUP * GROUP)).to(tl.int64)  # int64: 8 q + 1 can pass 2**31
    r = ((tl.sqrt((8 * q + 1).to(tl.float64)) - 1) / 2).to(tl.int64)
    # The float64 square root can be one off at a triangular number; step back onto the exact integer.
    r = tl.where(r * (r + 1) // 2 > q, r - 1, r)
    r = tl.where((r + 1) * (r + 2) // 2 <= q, r + 1, r)
    c = q - r * (r + 1) // 2
    local = pid % (GROUP * GROUP)
    # Tile and atom indices in int32 (n < 2**31); only addresses are int64. int64 indices kept live across
    # the d loop cost a spilled register on sm_90.
    ti = ((n_groups - 1 - r) * GROUP + local // GROUP).to(tl.int32)
    tj = ((n_groups - 1 - c) * GROUP + local % GROUP).to(tl.int32)
    # Below the diagonal inside a diagonal group, or past the last tile: nothing to do.
    if (ti > tj) | (tj >= n_tiles):
        return

    lane = tl.arange(0, BLOCK)
    rows = ti * BLOCK + lane
    cols = tj * BLOCK + lane
    row_ok = rows < N
    col_ok = cols < N
    ks = tl.arange(0, BLOCK_D)
    a_ptrs = unit_ptr + rows.to(tl.int64)[:, None] * stride_n + ks[None, :] * stride_d
    b_ptrs = unit_ptr + cols.to(tl.int64)[:, None] * stride_n + ks[None, :] * stride_d
    if unit_ptr.dtype.element_ty == tl.float64:
        acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float64)
    else:
        acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d_ok = (ks < D - d0)[None, :]
        a = tl.load(a_ptrs, mask=row_ok[:, None] & d_ok, other=0.0)
        b = tl.load(b_ptrs, mask=col_ok[:, None] & d_ok, other=0.0)
        if DOT_FP32:  # the interpreter's bf16 dot multiplies bit patterns (triton issue 11584)
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if unit_ptr.dtype.element_ty == tl.float64:
            acc = f64_product(a, tl.trans(b), acc, FP64_DOT)
        else:
            acc = tl.dot(a, tl.trans(b), acc, input_precision=PRECISION)
        a_ptrs += BLOCK_D * stride_d
        b_ptrs += BLOCK_D * stride_d

    # One tile stays live through the epilogue: |cos| with -1 (below every |cos|) wherever an entry does
    # not count. A pair mask and a float64 copy kept beside it took every register and spilled 48 bytes
    # (bfloat16, sm_90).
    t0 = s0 * GROUP  # the band's first tile and atom, computed after the d loop: not live across it
    i0 = t0 * BLOCK
    distinct = row_ok[:, None] & col_ok[None, :] & (rows[:, None] != cols[None, :])
    mag = tl.where(distinct, tl.abs(acc), -1.0)
    row_max, row_arg = tl.max(mag, axis=1, return_indices=True)
    row_part = (tj - t0).to(tl.int64) * band_n + (rows - i0)  # int64: R can pass 2**31 entries
    tl.store(row_max_ptr + row_part, row_max, mask=row_ok)
    tl.store(row_idx_ptr + row_part, tj * BLOCK + row_arg, mask=row_ok)
    # On the diagonal tile the column maxima repeat the row maxima of the same atoms: stored once
    # (cols[k] != rows[k] exactly when tj != ti).
    col_max, col_arg = tl.max(mag, axis=0, return_indices=True)
    mirror = col_ok & (cols != rows)
    col_part = (ti - t0).to(tl.int64) * (N - i0) + (cols - i0)
    tl.store(col_max_ptr + col_part, col_max, mask=mirror)
    tl.store(col_idx_ptr + col_part, ti * BLOCK + col_arg, mask=mirror)

    # Each unordered pair once: j > i (all of an off-diagonal tile, the strict upper part of a diagonal one).
    mag = tl.where(cols[None, :] > rows[:, None], mag, -1.0)
    for t in range(0, n_limits):
        limit = tl.load(limits_ptr + t)  # >= -0.5, so the -1 entries never count
        # A float sum (exact: at most BLOCK**2 < 2**24 ones); an integer sum of the comparison bits went
        # through a 4-byte local-memory array on sm_90.
        hit = tl.sum(tl.sum(tl.where(mag > limit, 1.0, 0.0), axis=1), axis=0)
        tl.atomic_add(above_ptr + t, hit.to(tl.int64), sem="relaxed")
    if unit_ptr.dtype.element_ty == tl.float64:
        bin_ = (mag * bins).to(tl.int32)  # the reference's rule itself: float64 product, truncated
    else:
        scale = tl.zeros((), tl.float32) + bins  # not bins.to(): a launch turns bins == 1 into a constant
        bin_ = (mag * scale).to(tl.int32)
        bin_ = tl.where(tl.fma(mag, scale, -bin_.to(tl.float32)) < 0, bin_ - 1, bin_)
    bin_ = tl.minimum(bin_, bins - 1)
    counts = tl.histogram(tl.ravel(bin_), BINS_P2, mask=tl.ravel(mag >= 0))
    slot = tl.arange(0, BINS_P2)
    tl.atomic_add(hist_ptr + slot, counts.to(tl.int64), mask=slot < bins, sem="relaxed")


# ------------------------------------------------------------------------------------------------------------
# Launcher
# ------------------------------------------------------------------------------------------------------------


class _Blocks(NamedTuple):
    block: int  # atoms per tile side (power of two)
    block_d: int  # d chunk per tl.dot (power of two, >= 8)
    group: int  # tile pairs are walked in group x group blocks
    num_warps: int
    num_stages: int


# H100 choices (kernels/NOTES.md, AIP Gram reduction, has the numbers). Registers, shared memory and spills
# are from the ahead-of-time compilation in tests/test_aip_gram.py (sm_80 / sm_90); none of these spills.
# - bfloat16 / float16: 128 x 128 tiles in two warpgroups map onto wgmma m64n128k16 (mma.sync m16n8k16 on
#   sm_80); BLOCK_D 64 is a 128-byte row piece per operand; 3 stages = 96 KiB of shared memory on sm_90.
#   176 registers (sm_80), 247 (sm_90); float16 compiles the same way.
# - float32 "ieee": an FMA product (no tensor-core instruction multiplies exact fp32). BLOCK_D 16, 2 stages:
#   226 registers (sm_80), 254 (sm_90), one program of 8 warps per SM; an FMA d-chunk (1024 FMAs a thread)
#   outlasts the next chunk's load, so 2 stages suffice. BLOCK_D 8 made ptxas hold sm_80 at 128 registers
#   (two programs per SM) and spill 8 bytes.
# - float32 "tf32x3": three TF32 tensor-core products (wgmma m64n128k8 on sm_90). BLOCK_D 16, 2 stages:
#   250-255 registers; BLOCK_D 32 spilled 624 bytes on sm_80, 4 stages 8 bytes.
# - float64: DMMA (mma.sync m8n8k4 f64 on both: Hopper's wgmma has no float64 form). The float64 accumulator
#   takes twice the registers: 64 x 64 tiles at 4 warps, BLOCK_D 32, 168-174 registers; 128 x 128 spilled.
_GPU_BLOCKS = {
    (torch.bfloat16, "ieee"): _Blocks(128, 64, 8, 8, 3),
    (torch.float16, "ieee"): _Blocks(128, 64, 8, 8, 3),
    (torch.float32, "ieee"): _Blocks(128, 16, 8, 8, 2),
    (torch.float32, "tf32x3"): _Blocks(128, 16, 8, 8, 2),
    (torch.float64, "ieee"): _Blocks(64, 32, 8, 4, 3),
}
# Triton 3.4 has no float64 tl.dot: the (BLOCK, BLOCK_D, BLOCK) broadcast product of `f64_product` lives in
# registers, so the d chunk is small.
_FMA_FLOAT64_BLOCKS = _Blocks(32, 4, 8, 4, 2)
# The interpreter runs programs one at a time in numpy: the smallest blocks make the tests' small shapes
# span several tiles, d chunks and tile groups (ragged edges, skipped programs) on the same code path.
_INTERPRET_BLOCKS = _Blocks(16, 16, 2, 1, 1)
# Bytes of the partial per-atom maxima of one launch; larger dictionaries are walked in several bands of
# row tiles, so the kernel path needs O(n) memory beyond the atoms (16384 float32 atoms: one band, 32 MiB).
PARTIAL_BYTES = 256 << 20
# The per-program histogram lives in registers (BINS_P2 / (32 num_warps) counters a thread); more bins than
# this run on the torch reference, which has no such limit. 4096 spilled 856-1304 bytes under Triton 3.4 and
# 3.6 (bfloat16 and tf32x3 on sm_80, ieee on sm_90), 2048 16-24 bytes under 3.5; 1024 spills under none.
MAX_KERNEL_BINS = 1024


def _blocks(dtype: torch.dtype, precision: Precision, n: int, mode: Backend) -> _Blocks:
    if mode == "interpret":
        return _INTERPRET_BLOCKS
    if dtype == torch.float64 and not has_fp64_dot():
        return _FMA_FLOAT64_BLOCKS
    # `precision` only selects how float32 operands are multiplied; the other dtypes have one variant.
    b = _GPU_BLOCKS[(dtype, precision if dtype == torch.float32 else "ieee")]
    # A small dictionary needs no 128-wide tile; 16 is tl.dot's smallest.
    return b._replace(block=min(b.block, max(16, triton.next_power_of_2(n))))


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every kernel output that the kernel must fully overwrite is allocated here (tests poison it)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _kernel_limits(limits: Sequence[float], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Thresholds as the kernel compares them: raised to -0.5 (a negative threshold counts every pair, and
    -1 marks the entries that do not count), and for float32 rounded *down*, which makes the float32 test
    |cos| > t32 equal to the float64 test |cos| > t: t32 <= t, and the next float32 above t32 is above t."""
    t64 = torch.tensor([*limits, 0.0], dtype=torch.float64, device=device).clamp(min=-0.5)
    if dtype == torch.float64:
        return t64
    t32 = t64.to(torch.float32)
    return torch.where(t32.double() > t64, torch.nextafter(t32, torch.full_like(t32, -1.0)), t32)


def _launch(
    unit: torch.Tensor,
    bins: int,
    limits: Sequence[float],
    precision: Precision,
    mode: Backend,
    progress: Progress = False,
):
    """Run the kernel over every tile pair, band by band of row tiles, merging each band's partial maxima
    into the per-atom maxima: (best (n,), partner (n,) int64, histogram (bins,), counts (len(limits),)).
    `progress` counts bands (one launch each)."""
    n, d = unit.shape
    device = unit.device
    dtype = _compute_dtype(unit.dtype)
    b = _blocks(unit.dtype, precision, n, mode)
    n_tiles = triton.cdiv(n, b.block)
    n_groups = triton.cdiv(n_tiles, b.group)
    # A band of g group rows (g GROUP tiles) has R and C of about g GROUP n (value, int32 index) entries each.
    band_groups = max(1, min(n_groups, PARTIAL_BYTES // (2 * b.group * n * (dtype.itemsize + 4))))
    limits_t = _kernel_limits(limits, dtype, device)
    best = torch.full((n,), -1.0, dtype=dtype, device=device)  # -1: below every |cos|
    partner = torch.full((n,), -1, dtype=torch.int64, device=device)
    hist = torch.zeros(bins, dtype=torch.int64, device=device)  # atomics add into these two
    above = torch.zeros(len(limits) + 1, dtype=torch.int64, device=device)  # + 1: never a 0-size buffer
    tiles = torch.arange(n_tiles, device=device)
    atom_tile = torch.arange(n, device=device) // b.block
    bar = ticker(progress, -(-n_groups // band_groups), "coherence", "band")
    for s0 in range(0, n_groups, band_groups):
        s1 = min(n_groups, s0 + band_groups)
        t0, t1 = s0 * b.group, min(n_tiles, s1 * b.group)
        i0, i1 = t0 * b.block, min(n, t1 * b.block)
        row_max = _empty((n_tiles - t0, i1 - i0), dtype, device)
        row_idx = _empty((n_tiles - t0, i1 - i0), torch.int32, device)
        col_max = _empty((t1 - t0, n - i0), dtype, device)
        col_idx = _empty((t1 - t0, n - i0), torch.int32, device)
        q0, q1 = _triangle(n_groups - s1), _triangle(n_groups - s0)
        launch(
            _gram_reduce_kernel,
            ((q1 - q0) * b.group * b.group,),
            mode,
            unit,
            row_max,
            row_idx,
            col_max,
            col_idx,
            hist,
            limits_t,
            above,
            n,
            d,
            unit.stride(0),
            unit.stride(1),
            bins,
            len(limits),
            s0,
            q0,
            i1 - i0,
            BLOCK=b.block,
            BLOCK_D=b.block_d,
            GROUP=b.group,
            BINS_P2=max(2, triton.next_power_of_2(bins)),
            PRECISION=precision if unit.dtype == torch.float32 else "ieee",
            DOT_FP32=dot_in_fp32(mode, unit.dtype),
            FP64_DOT=has_fp64_dot(),
            num_warps=b.num_warps,
            num_stages=b.num_stages,
        )
        # Entries no program owns (R[k, i] with tile k + t0 below atom i's tile, C[k, j] with tile k + t0
        # at or past atom j's) get -2, below the -1 that marks "no pair" (an atom alone in the last tile);
        # every other entry was written by exactly one program.
        row_max.masked_fill_(tiles[t0:, None] < atom_tile[None, i0:i1], -2.0)
        col_max.masked_fill_(tiles[t0:t1, None] >= atom_tile[None, i0:], -2.0)
        _merge(best, partner, i0, row_max, row_idx)
        _merge(best, partner, i0, col_max, col_idx)
        bar.advance()
    bar.close()
    return best, partner, hist, above[: len(limits)]


def _triangle(k: int) -> int:
    return k * (k + 1) // 2


def _merge(
    best: torch.Tensor, partner: torch.Tensor, start: int, values: torch.Tensor, index: torch.Tensor
) -> None:
    """Raise best[start:] to each column's maximum of `values` (k, m), recording its index. Deterministic:
    torch.max(dim) returns the first maximal row on CPU and CUDA, and an equal value replaces the stored one
    only with a lower partner index, so the partner is the lowest index reaching the maximum."""
    value, row = values.max(dim=0)
    found = index.gather(0, row[None]).squeeze(0).to(torch.int64)
    seg = slice(start, start + value.shape[0])
    take = (value > best[seg]) | ((value == best[seg]) & (found < partner[seg]))
    best[seg] = torch.where(take, value, best[seg])
    partner[seg] = torch.where(take, found, partner[seg])


# ------------------------------------------------------------------------------------------------------------
# Entry point
# ------------------------------------------------------------------------------------------------------------

_KERNEL_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


@torch.no_grad()
def gram_reduce(
    unit: torch.Tensor | np.ndarray,
    *,
    bins: int = 100,
    thresholds: Sequence[float] = (),
    tile: int | None = None,
    precision: Precision = "ieee",
    progress: Progress = False,
) -> GramStats:
    """Max |cos|, per-atom max and partner, |cos| histogram and threshold counts of unit (n, d), in tiles.

    Args:
        unit: (n, d) unit-norm (AIP-whitened) atoms as rows, float64, float32, float16 or bfloat16, finite
            (not checked here); a numpy array is accepted.
        bins: equal bins of the |cos| histogram over [0, 1].
        thresholds: count the unordered pairs with |cos| > each of these.
        tile: rows per tile on the torch path (its memory is O(tile**2); None: `default_tile`); the Triton
            kernel picks its own power-of-two blocks.
        precision: float32 products on the Triton path, "ieee" (exact fp32, FMA) or "tf32x3" (three TF32
            tensor-core products, ~3 * 2**-22 extra error per product; see the module docstring).
        progress: False, True (a tqdm bar on stderr) or a hook(done, total) (kernels/progress.py), counting
            tiles on the torch path and launches (bands of row tiles) on the Triton path.

    Returns:
        GramStats (module docstring for the exact semantics), the same on every path up to the summation
        error of the module docstring.

    CUDA tensors run the Triton kernel (ATOMS_KERNELS=interpret runs it in Triton's interpreter on CPU);
    CPU tensors, ATOMS_KERNELS=torch and bins > MAX_KERNEL_BINS run `gram_reduce_reference`.
    """
    if isinstance(unit, np.ndarray):
        unit = torch.from_numpy(unit)
    if tile is None and isinstance(unit, torch.Tensor) and unit.ndim == 2:
        tile = default_tile(unit.shape[0])
    _check(unit, tile)
    _check_bins(bins)
    if precision not in ("ieee", "tf32x3"):
        raise ValueError(
            f"precision must be 'ieee' or 'tf32x3', got {precision!r}; plain TF32 (~1e-3 relative error per "
            "product) is too coarse for coherence statistics."
        )
    mode = backend(unit)
    if mode == "torch" or bins > MAX_KERNEL_BINS:
        return gram_reduce_reference(unit, bins=bins, thresholds=thresholds, tile=tile, progress=progress)
    if unit.dtype not in _KERNEL_DTYPES:
        raise TypeError(
            f"unit has dtype {unit.dtype}; the Triton kernel takes float64, float32, float16 or bfloat16 "
            "atoms, e.g. `unit.float()`."
        )
    if unit.shape[0] >= 2**31:
        raise ValueError(f"unit has {unit.shape[0]} atoms; at most 2**31 - 1 are supported, split it.")
    limits = [float(t) for t in thresholds]
    best, partner, hist, above = _launch(unit, bins, limits, precision, mode, progress)
    if unit.shape[0] == 1:  # no pair: the -1 placeholders become the documented 0 and -1
        best.zero_()
        partner.fill_(-1)
    edges = torch.arange(bins + 1, dtype=torch.float64, device=unit.device) / bins
    return GramStats(best.max(), best, partner, hist, edges, above)
