"""The sparse step's products on fixed-capacity rows of entries (kernels/sparse_select.py's output).

Entries live in (batch, C) slot arrays; row i's are its first min(counts[i], C) slots. Every kernel masks
the others out of its loads (a masked load is 0 and fetches nothing), so padding contributes exactly zero
whatever its memory holds, and every loop stops at the block's largest count, not at C.

    gather_sum      out[i] = sum_s values[i, s] table[idx[i, s]]          decoder forward, grad_u
    sampled_dot     out[i, s] = <dense[i], table[idx[i, s]]>              the codes' gradient at the entries
    segment_grads   per latent j, over its entries e (sorted by latent):   weight, b_enc and theta gradients
                    dW_dec[j] = sum_e code_e g[row_e],  dW_enc[:, j] = sum_e grad_z_e xc[row_e],
                    grad_b_enc[j] = sum_e grad_z_e,     window_sum[j] = sum_e window_e

segment_grads reads each latent's entries in a fixed (stable-sorted) order and owns its output rows, so it
needs no atomics and gives the same bits on every run; one pass over the entries serves both weight gradients
(each entry's g and xc rows are read once, next to each other).
"""

from typing import NamedTuple

import torch

from .dispatch import Backend, launch, tl, triton

__all__ = ["SegmentGrads", "gather_sum", "sampled_dot", "segment_grads"]


@triton.jit
def _gather_sum_kernel(
    idx_ptr,
    val_ptr,
    count_ptr,
    table_ptr,
    out_ptr,
    M,
    D,
    capacity,
    stride_im,
    stride_tn,
    stride_td,
    stride_om,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """out[rows, ds] = sum over filled slots s of values[row, s] * table[idx[row, s], ds], fp32 sums."""
    pid_m = tl.program_id(0)
    pid_d = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    ds = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < M
    d_ok = ds < D
    rows64 = rows.to(tl.int64)
    count = tl.minimum(tl.load(count_ptr + rows, mask=row_ok, other=0), capacity)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for s in range(0, tl.max(count, axis=0)):
        filled = s < count
        j = tl.load(idx_ptr + rows64 * stride_im + s, mask=filled, other=0)
        v = tl.load(val_ptr + rows64 * stride_im + s, mask=filled, other=0.0).to(tl.float32)
        t_ptrs = table_ptr + j.to(tl.int64)[:, None] * stride_tn + ds[None, :] * stride_td
        t = tl.load(t_ptrs, mask=filled[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        acc += v[:, None] * t
    out_ptrs = out_ptr + rows64[:, None] * stride_om + ds[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _sampled_dot_kernel(
    idx_ptr,
    count_ptr,
    dense_ptr,
    table_ptr,
    out_ptr,
    M,
    D,
    stride_im,
    stride_dm,
    stride_tn,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """out[rows, s] = <dense[row], table[idx[row, s]]> for one slot s, 0 where unfilled. Slots run on program
    axis 0, which takes up to 2^31 - 1 programs (axis 1 stops at 65535)."""
    s = tl.program_id(0)
    pid_m = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    rows64 = rows.to(tl.int64)
    filled = s < tl.load(count_ptr + rows, mask=row_ok, other=0)
    j = tl.load(idx_ptr + rows64 * stride_im + s, mask=filled, other=0).to(tl.int64)
    acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
    # Blocks whose rows all have fewer entries than s skip the d loop.
    d_end = tl.where(tl.max(filled.to(tl.int32), axis=0) > 0, D, 0)
    for d0 in range(0, d_end, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        mask = filled[:, None] & (ds < D)[None, :]
        a = tl.load(dense_ptr + rows64[:, None] * stride_dm + ds[None, :], mask=mask, other=0.0)
        b = tl.load(table_ptr + j[:, None] * stride_tn + ds[None, :], mask=mask, other=0.0)
        acc += tl.sum(a.to(tl.float32) * b.to(tl.float32), axis=1)
    tl.store(out_ptr + rows64 * stride_im + s, acc, mask=row_ok)


@triton.jit
def _segment_grads_kernel(
    order_ptr,
    seg_ptr,
    val_ptr,
    gz_ptr,
    win_ptr,
    g_ptr,
    xc_ptr,
    dwdec_ptr,
    dwenc_ptr,
    gb_ptr,
    gwin_ptr,
    D,
    capacity,
    stride_gm,
    stride_xm,
    stride_om,
    BLOCK_E: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DO_DEC: tl.constexpr,
    DO_ENC: tl.constexpr,
):
    """Latent j (program axis 0), columns ds (axis 1): sums over j's entries, BLOCK_E entries at a time.

    order (batch C,) holds flat slot indices sorted by latent; j's are order[seg[j]:seg[j + 1]].
    """
    j = tl.program_id(0)
    pid_d = tl.program_id(1)
    ds = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = ds < D
    start = tl.load(seg_ptr + j)
    end = tl.load(seg_ptr + j + 1)
    acc_dec = tl.zeros((BLOCK_D,), dtype=tl.float32)
    acc_enc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    sum_gz = tl.zeros((BLOCK_E,), dtype=tl.float32)
    sum_win = tl.zeros((BLOCK_E,), dtype=tl.float32)
    for e0 in range(start, end, BLOCK_E):
        es = e0 + tl.arange(0, BLOCK_E)
        e_ok = es < end
        flat = tl.load(order_ptr + es, mask=e_ok, other=0)
        rows = (flat // capacity).to(tl.int64)
        gz = tl.load(gz_ptr + flat, mask=e_ok, other=0.0)
        sum_gz += gz
        sum_win += tl.load(win_ptr + flat, mask=e_ok, other=0.0)
        mask = e_ok[:, None] & d_ok[None, :]
        if DO_DEC:
            v = tl.load(val_ptr + flat, mask=e_ok, other=0.0).to(tl.float32)
            g = tl.load(g_ptr + rows[:, None] * stride_gm + ds[None, :], mask=mask, other=0.0)
            acc_dec += tl.sum(v[:, None] * g.to(tl.float32), axis=0)
        if DO_ENC:
            x = tl.load(xc_ptr + rows[:, None] * stride_xm + ds[None, :], mask=mask, other=0.0)
            acc_enc += tl.sum(gz[:, None] * x.to(tl.float32), axis=0)
    out = j.to(tl.int64) * stride_om + ds
    if DO_DEC:
        tl.store(dwdec_ptr + out, acc_dec.to(dwdec_ptr.dtype.element_ty), mask=d_ok)
    if DO_ENC:
        tl.store(dwenc_ptr + out, acc_enc.to(dwenc_ptr.dtype.element_ty), mask=d_ok)
    first = pid_d == 0
    tl.store(gb_ptr + j, tl.sum(sum_gz, axis=0), mask=first)
    tl.store(gwin_ptr + j, tl.sum(sum_win, axis=0), mask=first)


class _Blocks(NamedTuple):
    block_m: int
    block_d: int
    num_warps: int


# Memory-bound gathers: each gathered row piece is BLOCK_D contiguous elements (128 bf16 = 256 bytes, two
# 128-byte lines; d = 2304 is 18 such pieces), 32 rows a program at 4 warps = 32 elements a thread.
_GATHER_GPU = _Blocks(32, 128, 4)
# segment_grads: 16 entries x 128 columns of g and of xc per step, 4 warps (16 elements a thread each).
_SEGMENT_GPU = _Blocks(16, 128, 4)
# Under the interpreter: small blocks so the tests' shapes span several programs and loop iterations.
_GATHER_INTERPRET = _Blocks(4, 8, 1)
_SEGMENT_INTERPRET = _Blocks(2, 8, 1)


def _blocks(mode: Backend, gpu: _Blocks, interpret: _Blocks) -> _Blocks:
    return interpret if mode == "interpret" else gpu


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every buffer a kernel writes is allocated here (the tests swap in a poisoning version)."""
    return torch.empty(shape, dtype=dtype, device=device)


def gather_sum(
    idx: torch.Tensor,
    values: torch.Tensor,
    counts: torch.Tensor,
    table: torch.Tensor,
    out_dtype: torch.dtype,
    mode: Backend,
) -> torch.Tensor:
    """(M, D) rows sum_s values[i, s] table[idx[i, s]] over row i's filled slots; idx, values (M, C), counts
    (M,), table (n_atoms, D) with any strides (W_enc.T for grad_u)."""
    M, capacity = idx.shape
    D = table.shape[1]
    b = _blocks(mode, _GATHER_GPU, _GATHER_INTERPRET)
    out = _empty((M, D), out_dtype, idx.device)
    launch(
        _gather_sum_kernel,
        (triton.cdiv(M, b.block_m), triton.cdiv(D, b.block_d)),
        mode,
        idx,
        values,
        counts,
        table,
        out,
        M,
        D,
        capacity,
        idx.stride(0),
        table.stride(0),
        table.stride(1),
        out.stride(0),
        BLOCK_M=b.block_m,
        BLOCK_D=b.block_d,
        num_warps=b.num_warps,
    )
    return out


def sampled_dot(
    idx: torch.Tensor, counts: torch.Tensor, dense: torch.Tensor, table: torch.Tensor, mode: Backend
) -> torch.Tensor:
    """(M, C) float32: <dense[i], table[idx[i, s]]> at row i's filled slots, 0 elsewhere; dense (M, D) and
    table (n_atoms, D) row-major."""
    M, capacity = idx.shape
    b = _blocks(mode, _GATHER_GPU, _GATHER_INTERPRET)
    out = _empty((M, capacity), torch.float32, idx.device)
    launch(
        _sampled_dot_kernel,
        (capacity, triton.cdiv(M, b.block_m)),
        mode,
        idx,
        counts,
        dense,
        table,
        out,
        M,
        dense.shape[1],
        idx.stride(0),
        dense.stride(0),
        table.stride(0),
        BLOCK_M=b.block_m,
        BLOCK_D=b.block_d,
        num_warps=b.num_warps,
    )
    return out


class SegmentGrads(NamedTuple):
    """What `segment_grads` returns; the weight gradients are None when not asked for."""

    grad_w_dec: torch.Tensor | None
    """(n_atoms, d): sum over latent j's entries of code * g[row]."""
    grad_w_enc: torch.Tensor | None
    """(d, n_atoms), a transposed view: column j = sum over j's entries of grad_z * xc[row]."""
    grad_b_enc: torch.Tensor
    """(n_atoms,) float32: sum of grad_z over j's entries."""
    window_sums: torch.Tensor
    """(n_atoms,) float32: sum of the window terms over j's entries."""


def segment_grads(
    idx: torch.Tensor,
    counts: torch.Tensor,
    values: torch.Tensor,
    grad_z: torch.Tensor,
    window: torch.Tensor,
    g: torch.Tensor | None,
    xc: torch.Tensor,
    n_atoms: int,
    want: tuple[bool, bool],
    mode: Backend,
) -> SegmentGrads:
    """Per-latent sums over the entries: idx, values, grad_z, window (M, C) (the last two float32), g and xc
    (M, d) row-major; `want` = (W_dec's gradient, W_enc's gradient). Entries are ordered by latent with a
    stable sort of the (M C,) latents, padding slots keyed past the last latent so no segment holds them;
    segment starts come from searchsorted: fixed sizes, no host sync."""
    capacity = idx.shape[1]
    d = xc.shape[1]
    filled = torch.arange(capacity, device=idx.device)[None, :] < counts[:, None]
    key = torch.where(filled, idx, n_atoms).view(-1)
    key, order = key.sort(stable=True)
    bounds = torch.arange(n_atoms + 1, device=idx.device, dtype=key.dtype)
    seg = torch.searchsorted(key, bounds).to(torch.int32)
    do_dec, do_enc = want[0] and g is not None, want[1]
    dw_dec = _empty((n_atoms, d), xc.dtype, xc.device) if do_dec else None
    dw_enc_t = _empty((n_atoms, d), xc.dtype, xc.device) if do_enc else None
    grad_b = _empty((n_atoms,), torch.float32, xc.device)
    window_sums = _empty((n_atoms,), torch.float32, xc.device)
    b = _blocks(mode, _SEGMENT_GPU, _SEGMENT_INTERPRET)
    # Without weight gradients one column block is enough: the scalar sums are the first block's.
    launch(
        _segment_grads_kernel,
        (n_atoms, triton.cdiv(d, b.block_d) if do_dec or do_enc else 1),
        mode,
        order.to(torch.int32),
        seg,
        values,
        grad_z,
        window,
        xc if g is None else g,
        xc,
        grad_b if dw_dec is None else dw_dec,
        grad_b if dw_enc_t is None else dw_enc_t,
        grad_b,
        window_sums,
        d,
        capacity,
        xc.stride(0) if g is None else g.stride(0),
        xc.stride(0),
        d,
        BLOCK_E=b.block_m,
        BLOCK_D=b.block_d,
        DO_DEC=do_dec,
        DO_ENC=do_enc,
        num_warps=b.num_warps,
    )
    return SegmentGrads(dw_dec, None if dw_enc_t is None else dw_enc_t.T, grad_b, window_sums)
