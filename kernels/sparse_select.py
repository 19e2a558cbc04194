"""Fused encoder GEMM + JumpReLU (or ReLU) that writes only the selected entries, into fixed-capacity rows.

    z = xc @ W_enc + b_enc            (batch, n_atoms), one tile at a time in fp32 registers, never stored
    selected: z > theta or z is NaN (active), or |z - theta| <= e / 2 (threshold window, theta's gradient)
    ReLU: theta = 0 and no window

Each row of the batch owns `capacity` slots. A tile's epilogue counts its selected entries per row, reserves
that many slots with one atomic add on the row's counter, and stores (latent, code, flags) at the reserved
slots. Counts keep growing past the capacity, so `counts` is each row's true number of entries; what does
not fit is not stored, and `dropped` = sum over rows of max(0, count - capacity) is computed on the device.
Output sizes depend on the shape and the capacity only: no host sync, and the launch (with the torch ops
around it) can be captured in a CUDA graph.

Flags per slot: bit 0 = active (z > theta, or NaN: kept as the torch paths keep it, so a NaN reaches the loss
instead of being dropped), bit 1 = in the threshold window. Codes are z at active entries, 0 at window
entries below theta.

Tiles reserve their runs of slots in whatever order they finish, so after the kernel each row is sorted by
latent (`torch.sort`, fixed size): the entries come out ascending, and sums over a row's entries run in the
same order on every run. Padding slots (past a row's count) hold latent 0, code 0 and flags 0.
"""

from typing import NamedTuple

import torch

from .dispatch import HAS_TRITON, Backend, dot_in_fp32, launch, tl, triton
from .gemm_tile import encoder_tile, tile_position

__all__ = ["Selected", "select_entries"]


class Selected(NamedTuple):
    """Fixed-capacity output of the forward kernel: row i's entries are the first min(counts[i], C) slots."""

    indices: torch.Tensor
    """(batch, C) int32 latents, ascending within each row; 0 in padding slots."""
    values: torch.Tensor
    """(batch, C) codes in the compute dtype; 0 at window entries below theta and in padding slots."""
    flags: torch.Tensor
    """(batch, C) uint8: bit 0 active, bit 1 in the threshold window; 0 in padding slots."""
    counts: torch.Tensor
    """(batch,) int32 entries each row selected; above C where the row overflowed."""
    dropped: torch.Tensor
    """(1,) int32 entries that did not fit, over all rows: 0 unless some row overflowed."""


@triton.jit
def _select_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    theta_ptr,
    idx_ptr,
    val_ptr,
    flag_ptr,
    count_ptr,
    M,
    N,
    K,
    capacity,
    stride_xm,
    stride_xk,
    stride_wk,
    stride_wn,
    stride_om,
    half_width,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    DOT_FP32: tl.constexpr,
    PRECISION: tl.constexpr,
    JUMP: tl.constexpr,
):
    """One (BLOCK_M, BLOCK_N) tile of z in fp32; the epilogue compacts its selected entries into row slots."""
    pid_m, pid_n = tile_position(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    z, rows, cols = encoder_tile(
        x_ptr,
        w_ptr,
        b_ptr,
        M,
        N,
        K,
        stride_xm,
        stride_xk,
        stride_wk,
        stride_wn,
        pid_m,
        pid_n,
        BLOCK_M,
        BLOCK_N,
        BLOCK_K,
        DOT_FP32,
        PRECISION,
    )
    row_ok = rows < M
    col_ok = cols < N
    rows64 = rows.to(tl.int64)
    if JUMP:
        theta = tl.load(theta_ptr + cols, mask=col_ok, other=1.0)
    else:
        theta = tl.zeros((BLOCK_N,), dtype=tl.float32)
    valid = row_ok[:, None] & col_ok[None, :]
    # Active: z > theta, or NaN (kept as the torch paths keep it, so a NaN reaches the loss). Window
    # (JumpReLU): the dense kernel's test |z - theta| <= e / 2 in fp32, so both select the same entries.
    chosen = ((z > theta[None, :]) | (z != z)) & valid
    if JUMP:
        chosen = chosen | ((tl.abs(z - theta[None, :]) <= half_width) & valid)
    n_row = tl.sum(chosen.to(tl.int32), axis=1)
    # One atomic per row with entries reserves this tile's run of slots in the row.
    base = tl.atomic_add(count_ptr + rows, n_row, mask=row_ok & (n_row > 0))

    # Entries are few (L0 plus the window: ~1% of a tile), so they leave the tile one per row at a time,
    # leftmost first: each step reduces the tile to (BLOCK_M,) vectors and stores those. Scatter stores of
    # whole tiles at data-dependent slots instead took 64-bit addresses for every element and spilled
    # ~1 KB at 128 x 128 (tests/test_kernels_aot.py); so does a prefix sum along the rows. Only z stays live
    # across the steps, with -inf marking the entries not chosen (no chosen z is -inf); each entry's flags
    # are recomputed from its own z, the same fp32 value, so they agree with the choice.
    z = tl.where(chosen, z, float("-inf"))
    last = tl.full((BLOCK_M,), -1, dtype=tl.int32)
    for r in range(0, tl.max(n_row, axis=0)):
        after = (z != float("-inf")) & (cols[None, :] > last[:, None])
        col = tl.min(tl.where(after, cols[None, :], N), axis=1)
        # A sum over the one hit element: exact, and NaN stays NaN.
        value = tl.sum(tl.where(cols[None, :] == col[:, None], z, 0.0), axis=1)
        slot = base + r
        keep = (col < N) & (slot < capacity)
        theta_e = tl.load(theta_ptr + col, mask=keep, other=0.0) if JUMP else 0.0
        on = (value > theta_e) | (value != value)
        flag = on.to(tl.int32)
        if JUMP:
            flag += 2 * (tl.abs(value - theta_e) <= half_width).to(tl.int32)
        out = rows64 * stride_om + slot
        tl.store(idx_ptr + out, col, mask=keep)
        tl.store(val_ptr + out, tl.where(on, value, 0.0).to(val_ptr.dtype.element_ty), mask=keep)
        tl.store(flag_ptr + out, flag.to(tl.uint8), mask=keep)
        last = col


class _Tiles(NamedTuple):
    block_m: int
    block_n: int
    block_k: int
    group_m: int
    num_warps: int
    num_stages: int


# Tensor-core tiles (bf16, fp16, and fp32 as TF32), from the measured dense fused forward (H200, bf16,
# 4096 x 2304 x 16384, time over cuBLAS's): 128 x 256 x 64 / 4 stages 1.52-1.63x, 128 x 128 x 64 / 3 stages
# 2.0x. Both go to the autotuner on sm_90 (192 KiB and 96 KiB of shared memory; 251 and 163 registers, no
# spills, Triton 3.9). On sm_80 only 128 x 128: it was not measured there, and 128 x 256 spills 16 bytes
# under Triton 3.4 (mma.sync keeps operand fragments in registers). fp32 (TF32) keeps 128-byte operand
# rows with BLOCK_K 32, the same shared memory.
TUNED_TILES = {
    2: (_Tiles(128, 256, 64, 8, 8, 4), _Tiles(128, 128, 64, 8, 8, 3)),
    4: (_Tiles(128, 256, 32, 8, 8, 4), _Tiles(128, 128, 32, 8, 8, 3)),
}


def tuned_tiles(item_size: int, capability: int) -> tuple[_Tiles, ...]:
    """The tiles the autotuner tries for `item_size`-byte operands on compute capability `capability`."""
    wide, square = TUNED_TILES[item_size]
    return (wide, square) if capability >= 90 else (square,)


# Exact fp32 ("ieee", torch's default matmul precision) is an FMA product with both operand tiles in
# registers: the threshold encoder's 128 x 64 x 16 (128 registers there, no spills), not tuned.
IEEE_TILES = _Tiles(128, 64, 16, 8, 8, 3)
# The interpreter runs one program at a time in numpy: small tiles make the tests' small shapes span several
# programs in both directions (ragged edges, several tiles reserving slots in one row).
INTERPRET_TILES = _Tiles(16, 32, 16, 2, 1, 1)


def _config(t: _Tiles) -> "triton.Config":
    meta = {"BLOCK_M": t.block_m, "BLOCK_N": t.block_n, "BLOCK_K": t.block_k, "GROUP_M": t.group_m}
    return triton.Config(meta, num_warps=t.num_warps, num_stages=t.num_stages)


def _for_this_gpu(configs: list, named_args: dict, **kwargs) -> list:
    major, minor = torch.cuda.get_device_capability()
    item_size = named_args["x_ptr"].element_size()
    wanted = {(t.block_n, t.num_stages) for t in tuned_tiles(item_size, 10 * major + minor)}
    return [c for c in configs if (c.kwargs["BLOCK_N"], c.num_stages) in wanted]


def _tuned(item_size: int):
    # Autotuning runs the kernel several times: the row counters must start from zero each time (the tuner
    # zeroes them again before the real run). Keyed on the GEMM's N and K (and, by the tuner, the dtypes).
    return triton.autotune(
        configs=[_config(t) for t in TUNED_TILES[item_size]],
        key=["N", "K"],
        reset_to_zero=["count_ptr"],
        prune_configs_by={"early_config_prune": _for_this_gpu},
    )(_select_kernel)


_TUNED = {size: _tuned(size) for size in TUNED_TILES} if HAS_TRITON else {}


def _precision(dtype: torch.dtype) -> str:
    # fp32 follows torch's own matmul setting, as the threshold encoder does: "highest" means exact fp32.
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every buffer a kernel writes is allocated here (the tests swap in a poisoning version)."""
    return torch.empty(shape, dtype=dtype, device=device)


def select_entries(
    xc: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    theta: torch.Tensor | None,
    bandwidth: float,
    capacity: int,
    mode: Backend,
) -> Selected:
    """The selected entries of JumpReLU_theta(xc @ W_enc + b_enc) (ReLU when theta is None), `capacity` slots
    a row.

    xc (M, d), W_enc (d, N), b_enc (N,) in one dtype (float32, bfloat16, float16); theta (N,) float32.
    """
    M, K = xc.shape
    N = W_enc.shape[1]
    device = xc.device
    idx = _empty((M, capacity), torch.int32, device)
    val = _empty((M, capacity), xc.dtype, device)
    flags = _empty((M, capacity), torch.uint8, device)
    counts = torch.zeros(M, dtype=torch.int32, device=device)
    precision = _precision(xc.dtype)
    args = (xc, W_enc, b_enc, b_enc if theta is None else theta, idx, val, flags, counts, M, N, K)
    args += (capacity, xc.stride(0), xc.stride(1), W_enc.stride(0), W_enc.stride(1), idx.stride(0))
    args += (bandwidth / 2,)
    meta = {"DOT_FP32": dot_in_fp32(mode, xc.dtype), "PRECISION": precision, "JUMP": theta is not None}
    if mode == "triton" and precision != "ieee":
        kernel = _TUNED[xc.element_size()]

        def grid(m):
            return (triton.cdiv(M, m["BLOCK_M"]) * triton.cdiv(N, m["BLOCK_N"]),)

        launch(kernel, grid, mode, *args, **meta)
    else:
        t = INTERPRET_TILES if mode == "interpret" else IEEE_TILES
        grid = (triton.cdiv(M, t.block_m) * triton.cdiv(N, t.block_n),)
        meta.update(BLOCK_M=t.block_m, BLOCK_N=t.block_n, BLOCK_K=t.block_k, GROUP_M=t.group_m)
        launch(_select_kernel, grid, mode, *args, **meta, num_warps=t.num_warps, num_stages=t.num_stages)
    # What did not fit: each row's count past the capacity, summed on the device (no sync).
    dropped = (counts - capacity).clamp_(min=0).sum(dtype=torch.int32).reshape(1)
    return _sorted(Selected(idx, val, flags, counts, dropped), N)


def _sorted(s: Selected, n_atoms: int) -> Selected:
    """Each row's entries in ascending latent order, padding slots zeroed (their memory was never written)."""
    capacity = s.indices.shape[1]
    filled = torch.arange(capacity, device=s.counts.device)[None, :] < s.counts[:, None]
    key, order = torch.where(filled, s.indices, n_atoms).sort(dim=1)
    zero = torch.zeros((), dtype=s.values.dtype, device=s.values.device)
    return Selected(
        torch.where(filled, key, 0),
        torch.where(filled, s.values.gather(1, order), zero),
        torch.where(filled, s.flags.gather(1, order), 0),
        s.counts,
        s.dropped,
    )
