"""The encoder's GEMM tile, for fused kernels that consume z in their epilogue without storing it.

`tile_position` and `encoder_tile` are what `sparse_select._select_kernel` (compaction epilogue) and
`threshold_encoder._encode_fwd_kernel` (dense codes and packed state) run before their epilogues.
"""

from .dispatch import tl, triton

__all__ = ["encoder_tile", "tile_position"]


@triton.jit
def tile_position(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n): the row and column tile of this program, in grouped order: GROUP_M consecutive row
    tiles reuse the same W column tiles while they sit in L2."""
    pid = tl.program_id(0)
    n_tiles_m = (M + BLOCK_M - 1) // BLOCK_M
    n_tiles_n = (N + BLOCK_N - 1) // BLOCK_N
    group = GROUP_M * n_tiles_n
    first_m = (pid // group) * GROUP_M
    group_m = tl.minimum(n_tiles_m - first_m, GROUP_M)
    return first_m + (pid % group) % group_m, (pid % group) // group_m


@triton.jit
def encoder_tile(
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
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_FP32: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """(z, rows, cols) of tile (pid_m, pid_n): z = x @ W + b (BLOCK_M, BLOCK_N) in fp32 registers, with the
    tile's row and column indices (BLOCK_M,) and (BLOCK_N,), int32; x (M, K), W (K, N), b (N,)."""
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    row_ok = rows < M
    col_ok = cols < N
    # int64 row offsets: batch * n_atoms (and batch * d) can pass 2**31 elements.
    x_ptrs = x_ptr + rows.to(tl.int64)[:, None] * stride_xm + ks[None, :] * stride_xk
    w_ptrs = w_ptr + ks[:, None] * stride_wk + cols[None, :] * stride_wn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = ks < K - k0
        a = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if DOT_FP32:  # the interpreter's bf16 tl.dot multiplies bit patterns (dispatch.dot_in_fp32)
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk
    return acc + tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :], rows, cols
