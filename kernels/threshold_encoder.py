"""Fused JumpReLU threshold encoder, forward and backward: JumpReLU_theta((x - b_dec) @ W_enc + b_enc).

One file in the Liger-Kernel way: the ``@triton.jit`` kernels, their launchers, the torch reference path, the
two `torch.library` custom ops that hold either (forward and backward, each with a fake implementation, the
forward with its autograd), the functional entry point and an `nn.Module`.

torch.compile: the custom ops are opaque to Dynamo and Inductor, which see their fake implementations, so
`torch.compile(..., fullgraph=True)` traces through `threshold_encode` (the threshold's value check, a host
sync, runs in eager mode only). Dtypes: inside torch.autocast the GEMM and the codes take the autocast dtype,
as nn.Linear does; outside it, x and the parameters are promoted to a common dtype, so bf16 activations with
fp32 master weights compute in fp32 (`_compute_dtype`). theta stays float32 either way.

Pseudo-derivatives (SPEC section 6, Rajamanoharan et al. 2024) with the rectangle kernel K(u) = 1[|u| <= 1/2]
and bandwidth e; l0 = sum_j H(z_j - theta_j) per sample is the L0 penalty's count:
    d codes / d z     = H(z - theta)                   (the mask; no delta term at the jump)
    d codes / d theta = -(theta / e) K((z - theta) / e)
    d l0 / d theta    = -(1 / e) K((z - theta) / e)    (l0 sends nothing to z)

What backward keeps (the Triton path): not the dense fp32 (batch, n_atoms) pre-activation, 4 bytes an element,
but a 2-bit state per element packed four to a byte: bit 0 = H(z - theta), bit 1 = K((z - theta) / e). That is
all the elementwise part of backward needs; with x - b_dec (batch, d) and W_enc it gives every gradient. Cost:
batch * n_atoms / 4 bytes (16.8 MB at batch 4096 and 16384 atoms, against 268 MB for fp32 z), written once by
the forward epilogue, read once by backward. The alternative, recomputing z tile by tile in backward, saves
those bytes but costs a fourth GEMM (2 batch d n_atoms FLOPs, a third more than forward and backward's three);
on an H100 the state bytes move in ~10 us, the extra GEMM takes ~310 us at the large shape (kernels/NOTES.md).
The codes themselves are not saved.
"""

from typing import NamedTuple

import torch

from .dispatch import Backend, backend, dot_in_fp32, launch, tl, triton
from .gemm_tile import encoder_tile, tile_position

__all__ = [
    "EncoderOutput",
    "ThresholdEncoder",
    "threshold_encode",
    "threshold_encode_reference",
]

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Elements of z per block of the CPU JumpReLU's forward passes: 2^18 fp32 = 1 MiB, a share of L2 per core.
_BLOCK_ELEMENTS = 2**18


class EncoderOutput(NamedTuple):
    """What `threshold_encode(..., return_l0=True)` returns."""

    codes: torch.Tensor
    """(..., n_atoms) in x's dtype: z H(z - theta)."""
    l0: torch.Tensor
    """(...) float32: per-sample count sum_j H(z_j - theta_j); its gradient reaches theta only (SPEC 6)."""


# ------------------------------------------------------------------------------------------------------------
# Triton kernels
# ------------------------------------------------------------------------------------------------------------


@triton.jit
def _encode_fwd_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    theta_ptr,
    codes_ptr,
    state_ptr,
    l0_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_xk,
    stride_wk,
    stride_wn,
    stride_cm,
    stride_sm,
    stride_lm,
    half_width,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    DOT_FP32: tl.constexpr,
    PRECISION: tl.constexpr,
    WRITE_L0: tl.constexpr,
):
    """One (BLOCK_M, BLOCK_N) tile of z = x @ W + b in fp32; the epilogue writes codes, 2-bit state, l0."""
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
    rows64 = rows.to(tl.int64)  # batch * n_atoms can pass 2**31 elements
    theta = tl.load(theta_ptr + cols, mask=col_ok, other=1.0)
    valid = row_ok[:, None] & col_ok[None, :]
    on = (z > theta[None, :]) & valid
    near = (tl.abs(z - theta[None, :]) <= half_width) & valid
    codes = tl.where(on, z, 0.0)
    tl.store(
        codes_ptr + rows64[:, None] * stride_cm + cols[None, :],
        codes.to(codes_ptr.dtype.element_ty),
        mask=valid,
    )

    # Four 2-bit states to a byte, column j of the tile at bits 2 (j % 4) and 2 (j % 4) + 1.
    state = on.to(tl.int32) + 2 * near.to(tl.int32)
    shifted = state << (2 * (tl.arange(0, BLOCK_N) % 4))[None, :]
    packed = tl.sum(tl.reshape(shifted, (BLOCK_M, BLOCK_N // 4, 4)), axis=2)
    quads = pid_n * (BLOCK_N // 4) + tl.arange(0, BLOCK_N // 4)
    tl.store(
        state_ptr + rows64[:, None] * stride_sm + quads[None, :],
        packed.to(tl.uint8),
        mask=row_ok[:, None] & (quads < (N + 3) // 4)[None, :],
    )
    if WRITE_L0:
        tl.store(l0_ptr + rows64 * stride_lm + pid_n, tl.sum(on.to(tl.float32), axis=1), mask=row_ok)


@triton.jit
def _encode_bwd_kernel(
    g_ptr,
    gl_ptr,
    state_ptr,
    theta_ptr,
    gz_ptr,
    gcol_ptr,
    gtheta_ptr,
    M,
    N,
    stride_gm,
    stride_gn,
    stride_glm,
    stride_sm,
    stride_zm,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_GL: tl.constexpr,
):
    """One (BLOCK_M, BLOCK_N) tile: grad_z = g H, plus per-row-block column sums of grad_z and window terms.

    Fused here: unpacking the state bits, the mask product, the b_enc column sum and the theta reduction
    sum_i K_ij (theta_j g_ij + gl_i) (codes' and l0's pseudo-gradients in one pass). The two GEMMs that follow
    (grad_z @ W^T, (x - b_dec)^T @ grad_z) are torch matmuls (cuBLAS).
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    valid = row_ok[:, None] & col_ok[None, :]
    rows64 = rows.to(tl.int64)

    g = tl.load(g_ptr + rows64[:, None] * stride_gm + cols[None, :] * stride_gn, mask=valid, other=0.0)
    g = g.to(tl.float32)
    byte = tl.load(state_ptr + rows64[:, None] * stride_sm + (cols // 4)[None, :], mask=valid, other=0)
    state = (byte.to(tl.int32) >> (2 * (cols % 4))[None, :]) & 3
    gz = tl.where((state & 1) != 0, g, 0.0)
    tl.store(gz_ptr + rows64[:, None] * stride_zm + cols[None, :], gz.to(gz_ptr.dtype.element_ty), mask=valid)

    theta = tl.load(theta_ptr + cols, mask=col_ok, other=0.0)
    window = theta[None, :] * g
    if HAS_GL:
        gl = tl.load(gl_ptr + rows64 * stride_glm, mask=row_ok, other=0.0)
        window += gl[:, None]
    window = tl.where(state >= 2, window, 0.0)
    tl.store(gcol_ptr + pid_m * N + cols, tl.sum(gz, axis=0), mask=col_ok)
    tl.store(gtheta_ptr + pid_m * N + cols, tl.sum(window, axis=0), mask=col_ok)


# ------------------------------------------------------------------------------------------------------------
# Launchers
# ------------------------------------------------------------------------------------------------------------


class _Tiles(NamedTuple):
    block_m: int
    block_n: int
    block_k: int
    group_m: int
    num_warps: int
    num_stages: int


# H100, tensor-core path (bf16, fp16, fp32 as tf32): 128 x 128 output tiles in two warpgroups (8 warps) map
# onto wgmma m64n128; BLOCK_K 64 bf16 (32 fp32) is a 128-byte row per operand load; 3 stages of A and B tiles
# = 96 KiB of the 228 KiB shared memory, so the cp.async pipeline hides HBM latency. The fp32 accumulator is
# 64 registers a thread; compiled, the kernel takes 186 registers on sm_90 and 238 on sm_80 (mma.sync keeps
# operand fragments in registers), no spills (tests/test_kernels_aot.py). Pipelining needs d divisible by 16
# (the launch's hint on K).
_FWD_GPU = {
    torch.bfloat16: _Tiles(128, 128, 64, 8, 8, 3),
    torch.float16: _Tiles(128, 128, 64, 8, 8, 3),
    torch.float32: _Tiles(128, 128, 32, 8, 8, 3),
}
# Exact fp32 ("ieee", torch's default matmul precision) is an FMA product with both operand tiles in
# registers: 128 x 128 x 32 needs 255 registers and spills on sm_80; 128 x 64 x 16 compiles to 128 registers,
# no spills.
_FWD_GPU_IEEE = _Tiles(128, 64, 16, 8, 8, 3)
# The interpreter runs one program at a time in numpy: small tiles make the tests' small shapes span several
# programs in both directions (ragged edges, grouped order, partial sums), at the same code path.
_FWD_INTERPRET = _Tiles(16, 32, 16, 2, 1, 1)
# Backward is memory-bound: 64 x 128 tiles at 8 warps = 32 elements a thread, 80-95 registers (64 a thread at
# 4 warps took 145), so 2-3 blocks share an SM and 16 KiB of bf16 g per block keeps HBM busy. Its partial sums
# are (batch / 64, n_atoms) fp32, 1/16 of grad_z's bytes in bf16.
_BWD_GPU = _Tiles(64, 128, 0, 0, 8, 1)
_BWD_INTERPRET = _Tiles(8, 32, 0, 0, 1, 1)


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every kernel output is allocated here (the tests swap in a NaN-poisoning version)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _no_l0(like: torch.Tensor) -> torch.Tensor:
    """The l0 output when it is not asked for: a custom op returns tensors, never None."""
    return torch.empty(0, dtype=torch.float32, device=like.device)


def _sum_dtype(dtype: torch.dtype) -> torch.dtype:
    """Column sums of gradients accumulate in float32 at least (float64 for float64 inputs)."""
    return torch.promote_types(dtype, torch.float32)


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs follow torch's own matmul setting: "highest" (torch's default) means exact fp32 products.
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


def _launch_forward(
    xc: torch.Tensor,
    W: torch.Tensor,
    b_enc: torch.Tensor,
    theta: torch.Tensor,
    bandwidth: float,
    want_l0: bool,
    mode: Backend,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """codes (M, N) in xc's dtype, l0 (M,) float32 ((0,) without `want_l0`), state (M, ceil(N / 4)) uint8."""
    M, K = xc.shape
    N = W.shape[1]
    precision = _precision(xc.dtype)
    if mode == "interpret":
        t = _FWD_INTERPRET
    else:
        t = _FWD_GPU_IEEE if precision == "ieee" else _FWD_GPU[xc.dtype]
    n_tiles_n = triton.cdiv(N, t.block_n)
    codes = _empty((M, N), xc.dtype, xc.device)
    state = _empty((M, triton.cdiv(N, 4)), torch.uint8, xc.device)
    l0_part = _empty((M, n_tiles_n), torch.float32, xc.device) if want_l0 else codes
    grid = (triton.cdiv(M, t.block_m) * n_tiles_n,)
    launch(
        _encode_fwd_kernel,
        grid,
        mode,
        xc,
        W,
        b_enc,
        theta,
        codes,
        state,
        l0_part,
        M,
        N,
        K,
        xc.stride(0),
        xc.stride(1),
        W.stride(0),
        W.stride(1),
        codes.stride(0),
        state.stride(0),
        l0_part.stride(0),
        bandwidth / 2,
        BLOCK_M=t.block_m,
        BLOCK_N=t.block_n,
        BLOCK_K=t.block_k,
        GROUP_M=t.group_m,
        DOT_FP32=dot_in_fp32(mode, xc.dtype),
        PRECISION=precision,
        WRITE_L0=want_l0,
        num_warps=t.num_warps,
        num_stages=t.num_stages,
    )
    return codes, (l0_part.sum(1) if want_l0 else _no_l0(xc)), state


def _launch_backward(
    g: torch.Tensor, gl: torch.Tensor | None, state: torch.Tensor, theta: torch.Tensor, mode: Backend
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """grad_z (M, N) in g's dtype; column sums of grad_z and sum_i K_ij (theta_j g_ij + gl_i), (N,) fp32."""
    M, N = g.shape
    t = _BWD_INTERPRET if mode == "interpret" else _BWD_GPU
    n_tiles_m = triton.cdiv(M, t.block_m)
    gz = _empty((M, N), g.dtype, g.device)
    gcol = _empty((n_tiles_m, N), torch.float32, g.device)
    gtheta = _empty((n_tiles_m, N), torch.float32, g.device)
    launch(
        _encode_bwd_kernel,
        (n_tiles_m, triton.cdiv(N, t.block_n)),
        mode,
        g,
        gz if gl is None else gl,
        state,
        theta,
        gz,
        gcol,
        gtheta,
        M,
        N,
        g.stride(0),
        g.stride(1),
        0 if gl is None else gl.stride(0),
        state.stride(0),
        gz.stride(0),
        BLOCK_M=t.block_m,
        BLOCK_N=t.block_n,
        HAS_GL=gl is not None,
        num_warps=t.num_warps,
    )
    return gz, gcol.sum(0), gtheta.sum(0)


# ------------------------------------------------------------------------------------------------------------
# Torch reference (the CPU path)
# ------------------------------------------------------------------------------------------------------------


def _torch_forward(
    xc: torch.Tensor,
    W: torch.Tensor,
    bias: torch.Tensor,
    theta: torch.Tensor,
    bandwidth: float,
    want_l0: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The forward op on the torch path: codes (M, N), l0 (M,) float32 or (0,), and the state (2, M, N) bool:
    the complement of the mask, z <= theta, and the rectangle window |z - theta| <= e / 2.

    addmm fuses the bias into the GEMM (bf16 GEMM for bf16 inputs): one write of z, which the codes then
    overwrite in place, row block by row block, so the four passes over a block (window test, mask, fill,
    count) hit cache instead of streaming the (batch, n_atoms) tensor four times. Masks are applied with
    masked_fill / where, never by multiplying with a bool tensor, which would first convert it to a float copy
    of the block. Two bool planes (2 bytes an element) rather than the kernels' 2-bit states: one byte holding
    both bits took 2-3% (fp32) and 8-12% (bf16) longer for a CPU training step at (4096, 576, 2304), measured
    here (two more passes over the bytes in each direction); keeping the window as indices, as this path once
    did, would give the op an output whose size depends on the data, which torch.compile graph-breaks on.
    """
    z = torch.addmm(bias, xc, W)
    M, N = z.shape
    state = torch.empty((2, M, N), dtype=torch.bool, device=z.device)
    l0 = torch.empty(M, dtype=torch.float32, device=z.device) if want_l0 else _no_l0(z)
    low, high = theta - bandwidth / 2, theta + bandwidth / 2
    rows = max(1, _BLOCK_ELEMENTS // N)
    for r in range(0, M, rows):
        block, off, near = z[r : r + rows], state[0, r : r + rows], state[1, r : r + rows]
        torch.ge(block, low, out=near).logical_and_(block <= high)
        torch.le(block, theta, out=off)
        block.masked_fill_(off, 0)
        if want_l0:
            torch.sub(N, off.sum(1, dtype=torch.float32), out=l0[r : r + rows])
    return z, l0, state


def _torch_backward(
    g: torch.Tensor, gl: torch.Tensor | None, state: torch.Tensor, theta: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The backward op on the torch path, from `_torch_forward`'s state.

    The window holds a few elements per million at e = 0.001: the theta sums gather them by index.
    """
    off, near = state
    grad_z = torch.where(off, 0, g)
    window = near.view(-1).nonzero().squeeze(1)
    rows, cols = window // off.shape[1], window % off.shape[1]
    terms = theta[cols] * g[rows, cols].to(theta.dtype)
    if gl is not None:
        terms += gl[rows].to(theta.dtype)
    gtheta = torch.zeros_like(theta).index_add_(0, cols, terms)
    return grad_z, grad_z.sum(0).to(_sum_dtype(g.dtype)), gtheta


# ------------------------------------------------------------------------------------------------------------
# Custom ops: the boundary torch.compile and autograd see
# ------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("atoms::threshold_encode", mutates_args=())
def _encode_op(
    xc: torch.Tensor,
    W: torch.Tensor,
    bias: torch.Tensor,
    theta: torch.Tensor,
    bandwidth: float,
    want_l0: bool,
    mode: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """xc (M, d), W (d, N), bias (N,) in one dtype, theta (N,) -> codes (M, N), l0 (M,) float32 ((0,) without
    `want_l0`), and the state backward reads: (M, ceil(N / 4)) uint8 from the kernels, (2, M, N) bool from
    the torch path. `mode` is the `dispatch.Backend` that runs."""
    if mode == "torch":
        return _torch_forward(xc, W, bias, theta, bandwidth, want_l0)
    # The kernel indexes the (N,) vectors with unit stride; a no-op for parameters.
    return _launch_forward(xc, W, bias.contiguous(), theta.contiguous(), bandwidth, want_l0, mode)


@_encode_op.register_fake
def _encode_fake(xc, W, bias, theta, bandwidth, want_l0, mode):
    M, N = xc.shape[0], W.shape[1]
    l0 = xc.new_empty(M, dtype=torch.float32) if want_l0 else _no_l0(xc)
    if mode == "torch":
        state = xc.new_empty((2, M, N), dtype=torch.bool)
    else:
        state = xc.new_empty((M, (N + 3) // 4), dtype=torch.uint8)
    return xc.new_empty((M, N)), l0, state


@torch.library.custom_op("atoms::threshold_encode_backward", mutates_args=())
def _encode_backward_op(
    grad_codes: torch.Tensor,
    grad_l0: torch.Tensor | None,
    state: torch.Tensor,
    theta: torch.Tensor,
    mode: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """grad_z (M, N) in grad_codes' dtype, its column sums (N,) (float32, float64 for float64), and
    sum_i K_ij (theta_j g_ij + gl_i) (N,) in theta's dtype."""
    if mode == "torch":
        return _torch_backward(grad_codes, grad_l0, state, theta)
    return _launch_backward(grad_codes, grad_l0, state, theta, mode)


@_encode_backward_op.register_fake
def _encode_backward_fake(grad_codes, grad_l0, state, theta, mode):
    column_sums = grad_codes.new_empty(grad_codes.shape[1], dtype=_sum_dtype(grad_codes.dtype))
    return grad_codes.new_empty(grad_codes.shape), column_sums, torch.empty_like(theta)


def _setup_context(ctx, inputs, output) -> None:
    xc, W, _bias, theta, bandwidth, want_l0, mode = inputs
    # Else autograd hands backward a zero tensor for every output without a gradient, the state included:
    # a fill of its whole size each step.
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(xc, W, theta, output[2])
    ctx.bandwidth, ctx.want_l0, ctx.mode = bandwidth, want_l0, mode


def _backward(ctx, grad_codes, grad_l0, _grad_state):
    """The elementwise part in the backward op; the two GEMMs are torch matmuls (cuBLAS, or Inductor's)."""
    xc, W, theta, state = ctx.saved_tensors
    if grad_codes is None:  # only l0 reached the loss
        grad_codes = xc.new_zeros((xc.shape[0], W.shape[1]))
    grad_l0 = grad_l0 if ctx.want_l0 else None  # the (0,) placeholder has no samples to send a gradient
    grad_z, gcol, gtheta = _encode_backward_op(grad_codes, grad_l0, state, theta, ctx.mode)
    need_x, need_w, need_bias, need_theta = ctx.needs_input_grad[:4]
    return (
        grad_z @ W.T if need_x else None,
        xc.T @ grad_z if need_w else None,
        gcol.to(W.dtype) if need_bias else None,
        gtheta * (-1.0 / ctx.bandwidth) if need_theta else None,
        None,
        None,
        None,
    )


_encode_op.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------------------------------------
# Public entry points
# ------------------------------------------------------------------------------------------------------------


def _check(x, W_enc, b_enc, threshold, b_dec, bandwidth, validate: bool) -> None:
    """Shapes and dtypes (free: tensor metadata), then the threshold's values unless `validate` is False or
    torch.compile is tracing: that test reads the tensor back, one host sync per call."""
    tensors = (("x", x), ("W_enc", W_enc), ("b_enc", b_enc), ("threshold", threshold), ("b_dec", b_dec))
    for name, t in tensors:
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(
                f"{name} must be a torch.Tensor, got {type(t).__name__}; wrap it with torch.as_tensor."
            )
    if W_enc.ndim != 2:
        raise ValueError(f"W_enc must be 2-D (d, n_atoms), got shape {tuple(W_enc.shape)}.")
    d, n_atoms = W_enc.shape
    if x.ndim == 0 or x.shape[-1] != d:
        raise ValueError(
            f"x has shape {tuple(x.shape)} but W_enc is (d={d}, n_atoms={n_atoms}): x must be (..., {d}); "
            "pass W_enc as (d, n_atoms) (transpose a (n_atoms, d) decoder-layout matrix)."
        )
    if x.numel() == 0 or n_atoms == 0:
        raise ValueError(
            f"empty input: x {tuple(x.shape)}, W_enc {tuple(W_enc.shape)}; pass at least one sample, d >= 1 "
            "and n_atoms >= 1."
        )
    for name, t, size in (("b_enc", b_enc, n_atoms), ("threshold", threshold, n_atoms), ("b_dec", b_dec, d)):
        if t is not None and tuple(t.shape) != (size,):
            raise ValueError(f"{name} must have shape ({size},), got {tuple(t.shape)}.")
    for name, t in (("x", x), ("W_enc", W_enc), ("b_enc", b_enc), ("b_dec", b_dec)):
        if t is not None and t.dtype not in (*_FLOAT_DTYPES, torch.float64):
            raise TypeError(
                f"{name} has dtype {t.dtype}; use float32, bfloat16 or float16 (float64: torch path only)."
            )
    allowed = (torch.float32, torch.float64) if x.dtype == torch.float64 else (torch.float32,)
    if threshold.dtype not in allowed:
        raise TypeError(f"threshold has dtype {threshold.dtype}; keep it in float32 (`threshold.float()`).")
    if not (isinstance(bandwidth, (int, float)) and 0 < bandwidth < float("inf")):
        raise ValueError(f"bandwidth must be a positive finite number, got {bandwidth!r} (default 0.001).")
    if validate and not torch.compiler.is_compiling():
        _check_threshold_values(threshold)


def _check_threshold_values(threshold: torch.Tensor) -> None:
    if not bool(((threshold > 0) & (threshold < float("inf"))).all()):
        bad = (~((threshold > 0) & (threshold < float("inf")))).nonzero().squeeze(1)
        raise ValueError(
            f"threshold must be positive and finite; {bad.numel()} entries are not (first at "
            f"{bad[:5].tolist()}, values {threshold[bad[:5]].tolist()}). Clamp it, e.g. "
            "`threshold.data.clamp_(min=1e-6)`, or use ThresholdEncoder, which keeps it positive."
        )


def _compute_dtype(x: torch.Tensor, *params: torch.Tensor | None) -> torch.dtype:
    """The dtype of the GEMM and the codes: autocast's inside torch.autocast on x's device, as nn.Linear
    computes there; otherwise torch's promotion of x's and the parameters' dtypes. Outside autocast nothing is
    computed in less precision than asked: bf16 activations with fp32 master weights give an fp32 GEMM, the
    cast SAELens makes (its SAEs move activations to their own dtype before encoding); users who want bf16
    products ask for them with autocast, as with any torch layer."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    dtype = x.dtype
    for p in params:
        if p is not None:
            dtype = torch.promote_types(dtype, p.dtype)
    return dtype


def _operands(
    x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, b_dec: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """xc = x - b_dec (M, d), W (d, N) and the bias (N,), cast to `_compute_dtype` (autograd takes gradients
    back to each input's own dtype).

    b_dec's gradient, -W_enc grad_bias, rides on a zero added to the bias: v.detach() - v is exactly 0 and has
    gradient -1 with respect to v = b_dec @ W_enc, and xc is taken on a detached b_dec (same values, same
    rounding). Autograd through x - b_dec would instead sum b_dec's gradient out of grad_xc, which costs a
    full GEMM (grad_z @ W^T, batch x n_atoms x d) when x needs no gradient, as in SAE training.
    """
    dtype = _compute_dtype(x, W_enc, b_enc, b_dec)
    W = W_enc.to(dtype)
    xc, bias = x.reshape(-1, W.shape[0]).to(dtype), b_enc.to(dtype)
    if b_dec is None:
        return xc, W, bias
    b_dec = b_dec.to(dtype)
    v = b_dec @ W.detach()
    return xc - b_dec.detach(), W, bias + (v.detach() - v)


def _mode(reference: bool, dtype: torch.dtype, *tensors: torch.Tensor | None) -> Backend:
    """The backend that runs: `dispatch.backend` (the torch path for the reference), for a compute `dtype`.

    Under torch.compile this runs when the function is traced and its answer is an argument of the ops in
    the graph, so the fake implementations' shapes and the run always agree; a later change of
    ATOMS_KERNELS reaches compiled code after `torch.compiler.reset()`.
    """
    mode: Backend = "torch" if reference else backend(*tensors)
    if mode != "torch" and dtype == torch.float64:
        raise TypeError(
            "the Triton threshold encoder takes float32, bfloat16 or float16; cast x and the parameters "
            "to float32, or set ATOMS_KERNELS=torch for the float64 reference."
        )
    return mode


def _encode(x, W_enc, b_enc, threshold, b_dec, bandwidth, return_l0, validate, reference):
    _check(x, W_enc, b_enc, threshold, b_dec, bandwidth, validate)
    xc, W, bias = _operands(x, W_enc, b_enc, b_dec)
    mode = _mode(reference, xc.dtype, x, W_enc, b_enc, threshold, b_dec)
    codes, l0, _ = _encode_op(xc, W, bias, threshold, float(bandwidth), return_l0, mode)
    batch = x.shape[:-1]
    codes = codes.reshape(*batch, -1)
    return EncoderOutput(codes, l0.reshape(batch)) if return_l0 else codes


def threshold_encode_reference(
    x: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    threshold: torch.Tensor,
    *,
    b_dec: torch.Tensor | None = None,
    bandwidth: float = 0.001,
    return_l0: bool = False,
    validate: bool = True,
) -> torch.Tensor | EncoderOutput:
    """`threshold_encode` on the torch path whatever the device and ATOMS_KERNELS (same signature, same
    pseudo-derivatives); the CPU path. Also accepts float64 inputs (with a float32 or float64 threshold), for
    gradient checks."""
    return _encode(x, W_enc, b_enc, threshold, b_dec, bandwidth, return_l0, validate, reference=True)


def threshold_encode(
    x: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    threshold: torch.Tensor,
    *,
    b_dec: torch.Tensor | None = None,
    bandwidth: float = 0.001,
    return_l0: bool = False,
    validate: bool = True,
) -> torch.Tensor | EncoderOutput:
    """JumpReLU codes = z H(z - theta) with z = (x - b_dec) @ W_enc + b_enc, differentiable in every input.

    Args:
        x: (..., d) activations, float32, bfloat16 or float16 (products accumulate in fp32).
        W_enc: (d, n_atoms).
        b_enc: (n_atoms,).
        threshold: (n_atoms,) float32, positive (theta).
        b_dec: (d,), subtracted from x first; None for no offset.
        bandwidth: e of the rectangle kernel in the theta pseudo-derivatives.
        return_l0: also return l0 (...) float32, sum_j H(z_j - theta_j) per sample, whose gradient reaches
            theta only: the L0 penalty's theta gradient comes out of the same backward pass as the codes'.
        validate: check that the threshold is positive and finite, which reads it back to the host (one
            sync per call); False skips it. Under torch.compile it is skipped; shapes and dtypes are always
            checked.

    Returns:
        codes (..., n_atoms), or `EncoderOutput(codes, l0)` when `return_l0`, in the compute dtype: inside
        torch.autocast the autocast dtype (x, W_enc, b_enc, b_dec cast to it; theta stays float32), otherwise
        the promotion of x's and the parameters' dtypes (bf16 x with fp32 weights computes in fp32).

    Runs the Triton kernels on CUDA tensors, the torch reference on CPU, per `dispatch.backend`, inside the
    custom op `torch.ops.atoms.threshold_encode` (with its autograd and fake implementation), so
    torch.compile(fullgraph=True) traces through it.
    """
    return _encode(x, W_enc, b_enc, threshold, b_dec, bandwidth, return_l0, validate, reference=False)


class ThresholdEncoder(torch.nn.Module):
    """Drop-in JumpReLU encoder for SAE code: parameters W_enc (d, n_atoms), b_enc, b_dec (d,), threshold.

    `threshold` is a raw float32 parameter (SPEC section 6: a log parameterisation freezes under Adam). The
    forward pass uses max(threshold, min_threshold) with a straight-through gradient, so an optimiser step
    that pushes an entry below zero neither breaks the encoder nor freezes that entry: its gradient still
    reaches it.
    """

    def __init__(
        self,
        d: int,
        n_atoms: int,
        bandwidth: float = 0.001,
        threshold_init: float = 0.001,
        min_threshold: float = 1e-6,
    ) -> None:
        super().__init__()
        if d < 1 or n_atoms < 1:
            raise ValueError(f"d and n_atoms must be >= 1, got d={d}, n_atoms={n_atoms}.")
        if not (bandwidth > 0 and threshold_init > 0 and min_threshold > 0):
            raise ValueError(
                "bandwidth, threshold_init and min_threshold must be positive, got "
                f"{bandwidth}, {threshold_init}, {min_threshold}."
            )
        self.d, self.n_atoms = d, n_atoms
        self.bandwidth = bandwidth
        self.min_threshold = min_threshold
        # Columns of unit norm: pre-activations of unit-mean-square inputs then start at the scale
        # theta_0 = 0.001 is set for (SPEC section 6 defaults).
        w = torch.randn(d, n_atoms)
        self.W_enc = torch.nn.Parameter(w / w.norm(dim=0, keepdim=True))
        self.b_enc = torch.nn.Parameter(torch.zeros(n_atoms))
        self.b_dec = torch.nn.Parameter(torch.zeros(d))
        self.threshold = torch.nn.Parameter(torch.full((n_atoms,), float(threshold_init)))

    def forward(self, x: torch.Tensor, return_l0: bool = False) -> torch.Tensor | EncoderOutput:
        """x (..., d) -> codes (..., n_atoms), or `EncoderOutput(codes, l0)` when `return_l0`."""
        raw = self.threshold.float()
        theta = raw + (raw.clamp(min=self.min_threshold) - raw).detach()
        return threshold_encode(
            x,
            self.W_enc,
            self.b_enc,
            theta,
            b_dec=self.b_dec,
            bandwidth=self.bandwidth,
            return_l0=return_l0,
        )

    def extra_repr(self) -> str:
        return f"d={self.d}, n_atoms={self.n_atoms}, bandwidth={self.bandwidth}"
