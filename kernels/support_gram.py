"""Per-sample support Grams: the coherence of each sample's active atoms, for the stability metric q*.

For a sample with support L (the atoms its code uses), its per-sample coherence is
``max_{a != b in L} |<u_a, u_b>|`` over the rows u of `unit` (SPEC section 5); q* compares it with
``1 / (2 |L| - 1)``. A sample with fewer than two active atoms has no pair and gets 0.0: the coherence of a
single atom is vacuous, and the uniqueness condition then only needs mu < 1.

`unit` must already hold unit-norm (AIP-whitened) atoms. Nothing here renormalises: for other rows the
results are plain inner products, not cosines.

One file in the Liger-Kernel way: the ``@triton.jit`` kernel, its launcher (`support_coherence` on the
Triton and interpreter backends) and the torch reference with the same signature
(`support_coherence_reference`).

Precision: every Gram entry is a float64 dot product of the stored values, on every path. Products of
fp32, fp16 or bf16 values are exact in float64 (at most 2 x 24 significant bits), so the only error is
float64 summation over d: ``|err| <= d * 2**-53 * sum_j |u_aj u_bj| <= d * 2**-53`` for unit rows
(2.6e-13 at d = 2304; float64 inputs add one rounding per product, (d + 1) * 2**-53), far below anything
q* can resolve. Why not fp32 on the GPU:
``tl.dot(..., input_precision="ieee")`` on fp32 is an FMA product without tensor cores (error up to
~d * 2**-24 = 1.4e-4 at d = 2304), whereas a float64 ``tl.dot`` compiles to the float64 tensor-core
instruction (DMMA, ``mma.sync.aligned.m8n8k4.row.col.f64``) on sm_80 and sm_90, and an H100 SXM has as many
float64 tensor-core FLOP/s as fp32 FMA FLOP/s (67 T each). Upcasting every tile to float64 before the dot
also means no bf16 ``tl.dot`` ever runs, so Triton issue 11584 (bf16 dots multiply raw bit patterns under
the interpreter) cannot arise here and no interpreter-only upcast is needed.
"""

import threading
import weakref
from typing import NamedTuple

import numpy as np
import torch

from .compat import f64_product, has_fp64_dot, widens_half_before_fp64_dot
from .dispatch import Backend, backend, launch, tl, triton

__all__ = ["SupportCoherence", "support_coherence", "support_coherence_reference"]

_UNIT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
# Torch path: the full float64 Gram is cached up to this many atoms, 4096**2 * 8 bytes = 128 MiB.
CACHED_GRAM_ATOMS = 4096
# Torch path: samples are processed in chunks whose float64 temporaries take about this many bytes.
CHUNK_BYTES = 64 << 20


class SupportCoherence(NamedTuple):
    """What `support_coherence` returns for `batch` samples of width k."""

    max_abs_cos: torch.Tensor
    """(batch,) float64: max |<u_a, u_b>| over distinct active atoms a != b; 0.0 below two atoms."""
    support_size: torch.Tensor
    """(batch,) int64: number of active atoms of each sample."""
    grams: torch.Tensor | None
    """(batch, k, k) float64 Gram of each sample's rows, in its index order; the rows and columns of
    inactive entries (padding, zero values) are 0. None unless `return_grams=True`."""


# --------------------------------------------------------------------------------------------------------
# Triton kernel
# --------------------------------------------------------------------------------------------------------


@triton.jit
def _support_gram_kernel(
    unit_ptr,
    idx_ptr,
    max_ptr,
    gram_ptr,
    K,
    D,
    stride_un,
    stride_ud,
    stride_ib,
    stride_gb,
    stride_gi,
    TILE: tl.constexpr,
    N_TILES: tl.constexpr,
    BLOCK_D: tl.constexpr,
    STORE_GRAM: tl.constexpr,
    FP64_DOT: tl.constexpr,
):
    """One program per sample: its (K, K) Gram in (TILE, TILE) blocks, float64, reduced to max |G_ab|.

    idx holds the sample's atom indices (int32) with every inactive entry already set to -1. The block
    pairs (ti, tj) with tj >= ti cover every pair once; each is a float64 dot over d in BLOCK_D chunks.
    """
    sample = tl.program_id(0).to(tl.int64)
    lane = tl.arange(0, TILE)
    cols = tl.arange(0, BLOCK_D)
    best = tl.zeros((), dtype=tl.float64)  # 0.0 is also the answer for a sample without a pair
    for ti in range(0, N_TILES):
        rows_i = ti * TILE + lane
        idx_i = tl.load(idx_ptr + sample * stride_ib + rows_i, mask=rows_i < K, other=-1)
        on_i = idx_i >= 0
        # Masked-off lanes still form an address: point them at row 0 rather than at row -1.
        ptr_i = unit_ptr + tl.where(on_i, idx_i, 0).to(tl.int64)[:, None] * stride_un
        for tj in range(ti, N_TILES):
            rows_j = tj * TILE + lane
            idx_j = tl.load(idx_ptr + sample * stride_ib + rows_j, mask=rows_j < K, other=-1)
            on_j = idx_j >= 0
            ptr_j = unit_ptr + tl.where(on_j, idx_j, 0).to(tl.int64)[:, None] * stride_un
            acc = tl.zeros((TILE, TILE), dtype=tl.float64)
            for d0 in range(0, D, BLOCK_D):
                d = d0 + cols
                d_ok = (d < D)[None, :]
                # Inactive rows are never read (no bytes for padding) and enter the dot as zeros.
                a = tl.load(ptr_i + d[None, :] * stride_ud, mask=on_i[:, None] & d_ok, other=0.0)
                a = a.to(tl.float64)
                if N_TILES == 1:
                    b = a  # one block: the Gram is a a^T, one gather per chunk
                else:
                    b = tl.load(ptr_j + d[None, :] * stride_ud, mask=on_j[:, None] & d_ok, other=0.0)
                    b = b.to(tl.float64)
                acc = f64_product(a, tl.trans(b), acc, FP64_DOT)
            pair = on_i[:, None] & on_j[None, :]
            distinct = rows_i[:, None] != rows_j[None, :]
            off = tl.where(pair & distinct, tl.abs(acc), 0.0)
            best = tl.maximum(best, tl.max(tl.max(off, axis=1), axis=0))
            if STORE_GRAM:
                gram = tl.where(pair, acc, 0.0)
                inside = (rows_i < K)[:, None] & (rows_j < K)[None, :]
                base = gram_ptr + sample * stride_gb
                tl.store(base + rows_i[:, None] * stride_gi + rows_j[None, :], gram, mask=inside)
                # The mirror block (tj, ti) is never computed: store this one transposed there.
                mirror = base + rows_j[None, :] * stride_gi + rows_i[:, None]
                tl.store(mirror, gram, mask=inside & (ti != tj))
    tl.store(max_ptr + sample, best)


class _Tiles(NamedTuple):
    tile: int
    block_d: int
    num_warps: int
    num_stages: int


def _gpu_tiles(k: int, dtype: torch.dtype, fp64_dot: bool = True) -> _Tiles:
    """H100 tiles for samples of width k (kernels/NOTES.md, support Gram, has the numbers).

    Up to k = 64 the whole Gram is one block, k padded to a power of two of at least 16 (tl.dot's minimum):
    one gather per d chunk serves both operands. Wider supports are walked in 32 x 32 blocks: two operand
    tiles plus the mirrored store of a 64 x 64 float64 block needed 255 registers and spilled on sm_90.
    BLOCK_D = 64 reads each gathered row in contiguous 256-byte (fp32) or 128-byte (bf16) pieces, whole
    cache lines. Compiled for sm_80 and sm_90 (tests/test_support_gram.py), none of these spill; at k = 32
    an fp32 input takes 72 registers at 4 warps and 16 KiB of shared memory, so up to seven programs share
    an SM and keep their gathers in flight. float64 atoms read 32 columns a chunk (the same 256 bytes a row):
    with 64, k = 128 spilled 16 bytes on sm_90 (Triton 3.9).
    """
    if not fp64_dot:
        return _FMA_TILES
    block_d = 32 if dtype == torch.float64 else 64
    if k <= 64:
        tile = max(16, triton.next_power_of_2(max(k, 1)))
        return _Tiles(tile, block_d, 4 if tile <= 32 else 8, 3)
    return _Tiles(32, block_d, 8, 3)


# Without a float64 tl.dot (Triton 3.4) the (TILE, BLOCK_D, TILE) broadcast product lives in registers.
_FMA_TILES = _Tiles(16, 8, 4, 3)


# The interpreter runs programs one by one in numpy: the smallest blocks make the tests' small shapes span
# several Gram blocks and d chunks (ragged edges included) on the same code path.
_INTERPRET_TILES = _Tiles(16, 16, 1, 1)


def _operand_dtype(dtype: torch.dtype, mode: Backend) -> torch.dtype:
    """The dtype the kernel reads the atoms in: their own, except float16 / bfloat16 under Triton 3.5-3.8,
    widened to float32 (exact) because those releases crash compiling a 16-bit -> float64 dot."""
    half = dtype in (torch.float16, torch.bfloat16)
    return torch.float32 if mode == "triton" and half and widens_half_before_fp64_dot() else dtype


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every kernel output is allocated here (the tests swap in a NaN-poisoning version)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _launch(
    unit: torch.Tensor, idx: torch.Tensor, return_grams: bool, mode: Backend
) -> tuple[torch.Tensor, torch.Tensor | None]:
    batch, k = idx.shape
    fp64_dot = has_fp64_dot()
    unit = unit.to(_operand_dtype(unit.dtype, mode))
    t = _INTERPRET_TILES if mode == "interpret" else _gpu_tiles(k, unit.dtype, fp64_dot)
    # _prepare checked n_atoms < 2**31; int32 halves the index bytes and registers.
    idx32 = idx.to(torch.int32).contiguous()
    best = _empty((batch,), torch.float64, unit.device)
    grams = _empty((batch, k, k), torch.float64, unit.device) if return_grams else best
    launch(
        _support_gram_kernel,
        (batch,),
        mode,
        unit,
        idx32,
        best,
        grams,
        k,
        unit.shape[1],
        unit.stride(0),
        unit.stride(1),
        idx32.stride(0),
        grams.stride(0) if return_grams else 0,
        grams.stride(1) if return_grams else 0,
        TILE=t.tile,
        N_TILES=triton.cdiv(max(k, 1), t.tile),
        BLOCK_D=t.block_d,
        STORE_GRAM=return_grams,
        FP64_DOT=fp64_dot,
        num_warps=t.num_warps,
        num_stages=t.num_stages,
    )
    return best, (grams if return_grams else None)


# --------------------------------------------------------------------------------------------------------
# Input checks (every path)
# --------------------------------------------------------------------------------------------------------


def _as_tensor(x, what: str) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        return torch.from_numpy(x)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what} must be a torch tensor or a numpy array, got {type(x).__name__}.")
    return x


def _prepare(unit, indices, values) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Checked unit (n_atoms, d), indices (batch, k) int64 with inactive entries set to -1, active mask."""
    unit = _as_tensor(unit, "unit")
    indices = _as_tensor(indices, "indices")
    values = None if values is None else _as_tensor(values, "values")
    backend(unit, indices, values)  # raises a clear error for tensors on different devices
    if unit.dtype not in _UNIT_DTYPES:
        raise TypeError(
            f"unit has dtype {unit.dtype}; pass floating unit-norm atoms (float64, float32, float16 or "
            "bfloat16), e.g. `unit.float()`."
        )
    if unit.ndim != 2 or unit.shape[0] == 0 or unit.shape[1] == 0:
        raise ValueError(
            f"unit must be a non-empty (n_atoms, d) matrix with atoms as rows, got {tuple(unit.shape)}."
        )
    if indices.dtype not in (torch.int64, torch.int32):
        raise TypeError(
            f"indices has dtype {indices.dtype}; pass integer atom indices (int64, -1 for padding), e.g. "
            "`indices.long()` when they hold whole numbers."
        )
    if indices.ndim != 2 or indices.shape[0] == 0:
        raise ValueError(
            f"indices must be (batch, k) with batch >= 1, got shape {tuple(indices.shape)}; for a single "
            "sample pass `indices[None]`."
        )
    n_atoms = unit.shape[0]
    if n_atoms >= 2**31:
        raise ValueError(f"unit has {n_atoms} atoms; at most 2**31 - 1 are supported, split the dictionary.")
    indices = indices.to(torch.int64)
    bad = (indices < -1) | (indices >= n_atoms)
    if bool(bad.any()):
        b, j = (int(v) for v in bad.nonzero()[0])
        raise ValueError(
            f"indices[{b}, {j}] = {int(indices[b, j])} is out of range for {n_atoms} atoms; atom indices "
            f"must be in [0, {n_atoms - 1}], with -1 marking padding."
        )
    listed = indices >= 0
    active = listed
    if values is not None:
        if values.shape != indices.shape:
            raise ValueError(
                f"values has shape {tuple(values.shape)} but indices {tuple(indices.shape)}; pass one value "
                "per index (or values=None when every listed atom is active)."
            )
        if values.is_complex():
            raise TypeError(f"values has complex dtype {values.dtype}; pass real code values.")
        active = listed & (values != 0)
    _check_duplicates(indices, listed)
    finite = torch.isfinite(unit).all(dim=1)
    if not bool(finite.all()):
        rows = (~finite).nonzero().flatten()
        raise ValueError(
            f"unit has {rows.numel()} rows with NaN/Inf entries (first: {rows[:5].tolist()}); pass finite "
            "atoms."
        )
    return unit, torch.where(active, indices, -1), active


def _check_duplicates(indices: torch.Tensor, listed: torch.Tensor) -> None:
    """Raise if a sample lists an atom twice (padding aside): its Gram would pair the atom with itself."""
    k = indices.shape[1]
    if k < 2:
        return
    # Padding becomes distinct negative numbers, so after sorting only listed atoms can be equal neighbours.
    filler = -1 - torch.arange(k, device=indices.device)
    ordered = torch.where(listed, indices, filler).sort(dim=1).values
    repeated = (ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] >= 0)
    if bool(repeated.any()):
        b, j = (int(v) for v in repeated.nonzero()[0])
        raise ValueError(
            f"sample {b} lists atom {int(ordered[b, j + 1])} more than once; each atom may appear once per "
            "sample: merge the repeated entries (sum their values) or set the extra indices to -1."
        )


# --------------------------------------------------------------------------------------------------------
# Torch reference
# --------------------------------------------------------------------------------------------------------


class _GramCache:
    """The float64 Gram of the last `unit` tensor seen, dropped when that tensor dies or changes in place.

    q* calls `support_coherence` chunk after chunk with the same atoms; rebuilding an (n, n) Gram on every
    call would cost more than the gathers it replaces.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ref: weakref.ref | None = None
        self._version = -1
        self._gram: torch.Tensor | None = None

    def get(self, unit: torch.Tensor) -> torch.Tensor:
        with self._lock:
            if self._ref is not None and self._ref() is unit and unit._version == self._version:
                return self._gram
            u = unit.to(torch.float64)
            gram = u @ u.T
            self._ref, self._version, self._gram = weakref.ref(unit, self._drop), unit._version, gram
            return gram

    def _drop(self, ref: weakref.ref) -> None:
        with self._lock:
            if ref is self._ref:  # the callback of an entry already replaced must not clear the new one
                self._ref, self._gram = None, None


_GRAM_CACHE = _GramCache()


def support_coherence_reference(
    unit: torch.Tensor,
    indices: torch.Tensor,
    values: torch.Tensor | None = None,
    *,
    return_grams: bool = False,
    cached_gram_atoms: int = CACHED_GRAM_ATOMS,
    chunk_bytes: int = CHUNK_BYTES,
) -> SupportCoherence:
    """Torch reference of `support_coherence` (same arguments and result), float64 throughout.

    Two ways to the per-sample Grams, both exact float64 dot products of the stored values:
    - n_atoms <= `cached_gram_atoms`: index the full (n_atoms, n_atoms) float64 Gram, computed once per
      `unit` tensor and cached (128 MiB at 4096 atoms; pass the same tensor again to reuse it);
    - otherwise: gather each sample's k rows (upcast to float64) and multiply them in batches (torch.bmm).
    Samples go in chunks of about `chunk_bytes` of float64 temporaries (gathered rows (c, k, d) and Grams
    (c, k, k), twice for the casts and masks), so memory stays bounded whatever the batch, apart from the
    (batch, k, k) result that `return_grams` asks for.
    """
    unit, idx, active = _prepare(unit, indices, values)
    batch, k = idx.shape
    device = unit.device
    best = torch.zeros(batch, dtype=torch.float64, device=device)
    grams = torch.zeros((batch, k, k), dtype=torch.float64, device=device) if return_grams else None
    full = _GRAM_CACHE.get(unit) if unit.shape[0] <= cached_gram_atoms else None
    per_sample = 2 * 8 * k * (k + (0 if full is not None else unit.shape[1]))
    chunk = max(1, chunk_bytes // max(per_sample, 1))
    off_diagonal = ~torch.eye(k, dtype=torch.bool, device=device)
    for s in range(0, batch, chunk):
        ix = idx[s : s + chunk].clamp(min=0)  # inactive entries read atom 0 and are masked out below
        if full is not None:
            g = full[ix[:, :, None], ix[:, None, :]]
        else:
            rows = unit[ix].to(torch.float64)
            g = torch.bmm(rows, rows.transpose(1, 2))
        on = active[s : s + chunk]
        g = g.masked_fill(~(on[:, :, None] & on[:, None, :]), 0.0)
        if k >= 2:
            best[s : s + chunk] = g.abs().masked_fill(~off_diagonal, 0.0).flatten(1).amax(dim=1)
        if grams is not None:
            grams[s : s + chunk] = g
    return SupportCoherence(best, active.sum(dim=1), grams)


# --------------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------------


def support_coherence(
    unit: torch.Tensor,
    indices: torch.Tensor,
    values: torch.Tensor | None = None,
    *,
    return_grams: bool = False,
) -> SupportCoherence:
    """Per-sample coherence of the active atoms of sparse codes given as (indices, values).

    Args:
        unit: (n_atoms, d) unit-norm atoms as rows (float64, float32, float16 or bfloat16), finite; used
            as given, not renormalised.
        indices: (batch, k) int64 (or int32) atom indices per sample, -1 for padding; an atom may appear
            at most once per sample.
        values: optional (batch, k) code values; an entry whose value is 0 is inactive, like padding.
        return_grams: also return each sample's (k, k) float64 Gram.

    Returns:
        SupportCoherence(max_abs_cos (batch,) float64, support_size (batch,) int64,
        grams (batch, k, k) float64 or None).

    CUDA tensors run the Triton kernel (ATOMS_KERNELS=interpret runs it in Triton's interpreter on CPU);
    other tensors run `support_coherence_reference`, whose docstring states the torch path's memory.
    """
    mode = backend(_as_tensor(unit, "unit"), _as_tensor(indices, "indices"))
    if mode == "torch":
        return support_coherence_reference(unit, indices, values, return_grams=return_grams)
    unit, idx, active = _prepare(unit, indices, values)
    best, grams = _launch(unit, idx, return_grams, mode)
    return SupportCoherence(best, active.sum(dim=1), grams)
