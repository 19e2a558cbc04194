"""Sparse SAE training step: after the encoder's GEMM, only the active entries (and the threshold window's).

    z      = (u - b_dec) @ W_enc + b_enc                       (batch, n_atoms), one dense GEMM
    codes  = JumpReLU_theta(z)  or  ReLU(z)
    u_hat  = codes @ W_dec + b_dec                             (batch, d)

With tens of active latents out of thousands, a dense step pays six GEMMs of batch x d x n_atoms (encoder and
decoder forward, codes' gradient, both weight gradients, and the input gradient autograd may add) where one
would do. Here the forward GEMM runs in row blocks whose z stays in cache while it is compared with the
threshold and compacted to the selected entries; the (batch, n_atoms) pre-activation is never kept. Every
later product touches only those entries (l0 + w per row, w the window's few):
    decoder forward       u_hat = gather-sum of W_dec rows (embedding_bag)             batch l0 d
    codes' gradient       gc_e = <g_row, W_dec_col> at the entries (sampled dense-dense) batch (l0 + w) d
    W_dec's gradient      codes^T g  (sparse x dense, the entries sorted by column)     batch l0 d
    W_enc's gradient      (xc^T grad_z) = (grad_z^T xc)^T, the same column order       batch l0 d
    b_dec's gradient      g.sum(0) - W_enc @ grad_b_enc  (no batch x d x n_atoms product)
So a step costs one dense GEMM plus O(batch l0 d). Pseudo-derivatives as the threshold encoder's
(kernels/threshold_encoder.py, SPEC section 6): z gets the mask; theta gets -(theta / e) K from the codes and
-(1 / e) K from l0, K the rectangle window |z - theta| <= e / 2, with the same fp32 window bounds, so both
paths select the same entries and agree to rounding.

Outputs are what a loss needs: u_hat, l0 (batch,) (its gradient reaches theta, the L0 penalty's), the codes'
column sums (n_atoms,) (their gradient reaches z, the L1 penalty of a ReLU SAE: sum_j ||W_dec_j|| colsum_j /
batch), and the codes themselves as CSR (row offsets, columns, values), not differentiable. Any loss on u_hat
(an AIP or a Euclidean norm) backpropagates through it.

Entries where z is NaN are selected (as the dense JumpReLU keeps them: NaN <= theta is false), so a NaN
reaches u_hat and the loss as it does on the dense path rather than being dropped.

The torch path here runs on CPU tensors (embedding_bag, CSR sparse x dense products, sampled_addmm). It
compacts with nonzero(), whose output size depends on the data: one host sync per step, not capturable in a
CUDA graph. CUDA tensors (`dispatch.backend` "triton", or "interpret" for Triton's interpreter on CPU) take
the Triton path instead (kernels/sparse_triton.py): fixed-capacity rows of entries, no host sync with an int
`capacity`, codes returned as `PaddedCodes`. float64 stays on this torch path on every device.
"""

import warnings
from typing import NamedTuple

import torch

from .dispatch import backend
from .sparse_triton import TRITON_DTYPES, PaddedCodes, padded_autoencode

__all__ = ["SparseCodes", "SparseStepOutput", "mean_squared_error", "sparse_autoencode"]

# Elements of z per row block of the forward GEMM: 2^21 fp32 = 8 MiB, so the block is still in cache when
# compared and compacted. Measured at (4096, 576, 2304) fp32, 2 cores: GEMM + compare + compaction took
# 41.6 ms in blocks of 1024 rows (2.4M elements) and 44.6 / 47.8 ms in blocks of 512 / 256 rows, against
# 41.7 ms for the GEMM alone, and 41.7 + 5.9 + 4.0 ms for it, a full-size compare and a full-size nonzero.
_BLOCK_ELEMENTS = 2**21
# Sparse x dense products and sampled_addmm exist for these dtypes on the CPU; others gather instead.
_SPARSE_BLAS_DTYPES = (torch.float32, torch.float64)
# Entries per chunk of the gathering fallback: (chunk, d) rows of both operands at once.
_GATHER_CHUNK = 16_384


class SparseCodes(NamedTuple):
    """Codes (batch, n_atoms) in CSR form: row i's entries are col_indices[crow[i]:crow[i+1]] (ascending)."""

    crow_indices: torch.Tensor
    """(batch + 1,) int64 row offsets."""
    col_indices: torch.Tensor
    """(nnz,) int64 latent of each entry."""
    values: torch.Tensor
    """(nnz,) codes at the entries; zero at window entries below the threshold (kept for theta's gradient)."""
    n_atoms: int

    def to_dense(self) -> torch.Tensor:
        """The codes as a dense (batch, n_atoms) tensor."""
        batch = self.crow_indices.numel() - 1
        dense = self.values.new_zeros((batch, self.n_atoms))
        rows = _rows_of(self.crow_indices, self.col_indices.numel())
        dense[rows, self.col_indices] = self.values
        return dense

    def fired(self) -> torch.Tensor:
        """(n_atoms,) bool: latents with a non-zero code in some row."""
        counts = torch.zeros(self.n_atoms, dtype=torch.int64, device=self.values.device)
        return counts.index_add_(0, self.col_indices, (self.values != 0).long()) > 0


class SparseStepOutput(NamedTuple):
    """What `sparse_autoencode` returns."""

    u_hat: torch.Tensor
    """(batch, d) reconstruction, differentiable."""
    l0: torch.Tensor
    """(batch,) float32 active count; its gradient reaches theta (JumpReLU only)."""
    column_sums: torch.Tensor
    """(n_atoms,) sum of each latent's codes over the batch; its gradient reaches z at the active entries."""
    codes: SparseCodes | PaddedCodes
    """The codes (not differentiable): CSR from the torch path, fixed-capacity rows from the Triton path."""


def _rows_of(crow: torch.Tensor, nnz: int) -> torch.Tensor:
    """Row index of each of the nnz entries of CSR offsets crow (batch + 1,)."""
    counts = crow[1:] - crow[:-1]
    return torch.repeat_interleave(torch.arange(counts.numel(), device=crow.device), counts, output_size=nnz)


def _offsets(index: torch.Tensor, size: int) -> torch.Tensor:
    """CSR offsets (size + 1,) of sorted indices (nnz,) into [0, size)."""
    crow = torch.zeros(size + 1, dtype=torch.int64, device=index.device)
    torch.cumsum(torch.bincount(index, minlength=size), 0, out=crow[1:])
    return crow


def _csr(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    with warnings.catch_warnings():
        # "Sparse CSR tensor support is in beta state": the ops used here are stable since torch 2.0.
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(crow, col, values, size, check_invariants=False)


def _blas(*tensors: torch.Tensor) -> bool:
    return all(t.dtype in _SPARSE_BLAS_DTYPES for t in tensors)


def _select(
    xc: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, low: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward GEMM in row blocks, each compacted while in cache: flat indices (nnz,) into the (batch,
    n_atoms) z of the entries not below `low` (n_atoms,), or without it the entries above 0 (where ReLU's
    gradient is non-zero), and z there (nnz,)."""
    batch, n_atoms = xc.shape[0], W_enc.shape[1]
    rows = max(1, _BLOCK_ELEMENTS // n_atoms)
    flat, values = [], []
    for r in range(0, batch, rows):
        z = torch.addmm(b_enc, xc[r : r + rows], W_enc).view(-1)
        block = z.view(-1, n_atoms)
        below = (torch.lt(block, low) if low is not None else torch.le(block, 0)).view(-1)
        keep = below.logical_not_().nonzero().squeeze(1)
        values.append(z[keep])
        flat.append(keep.add_(r * n_atoms))
    return torch.cat(flat), torch.cat(values)


def _sampled_dot(
    g: torch.Tensor, W_dec: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, row: torch.Tensor
) -> torch.Tensor:
    """gc_e = <g[row_e], W_dec[col_e]> (nnz,) for the CSR entries: (g @ W_dec^T) sampled at them."""
    if _blas(g, W_dec):
        pattern = _csr(crow, col, g.new_zeros(col.numel()), (g.shape[0], W_dec.shape[0]))
        return torch.sparse.sampled_addmm(pattern, g, W_dec.T, beta=0.0).values()
    out = torch.empty(col.numel(), dtype=g.dtype, device=g.device)
    for s in range(0, col.numel(), _GATHER_CHUNK):
        r, c = row[s : s + _GATHER_CHUNK], col[s : s + _GATHER_CHUNK]
        out[s : s + _GATHER_CHUNK] = (g[r].float() * W_dec[c].float()).sum(-1).to(g.dtype)
    return out


class _ByColumn(NamedTuple):
    """The entries in column order: the pattern of codes^T (n_atoms, batch) in CSR form."""

    order: torch.Tensor
    crow: torch.Tensor
    row: torch.Tensor

    def times(self, values: torch.Tensor, dense: torch.Tensor, n_atoms: int) -> torch.Tensor:
        """sum over entries e of values_e dense[row_e] into row col_e: (n_atoms, k) for dense (batch, k)."""
        values = values[self.order]
        if _blas(values, dense):
            return _csr(self.crow, self.row, values, (n_atoms, dense.shape[0])) @ dense
        out = torch.zeros((n_atoms, dense.shape[1]), dtype=torch.float32, device=dense.device)
        cols = _rows_of(self.crow, self.row.numel())
        for s in range(0, self.row.numel(), _GATHER_CHUNK):
            part = slice(s, s + _GATHER_CHUNK)
            out.index_add_(0, cols[part], values[part, None].float() * dense[self.row[part]].float())
        return out.to(dense.dtype)


class _SparseAutoencode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, W_enc, b_enc, theta, b_dec, W_dec, bandwidth):
        jump = theta is not None
        batch, n_atoms = u.shape[0], W_enc.shape[1]
        xc = u - b_dec
        low = theta - bandwidth / 2 if jump else None
        flat, z = _select(xc, W_enc, b_enc, low)
        row, col = flat // n_atoms, flat % n_atoms
        if jump:
            # The threshold encoder's tests, with its fp32 bounds: mask = not (z <= theta), window = z in
            # [theta - e/2, theta + e/2] (every entry is >= the low end already, or NaN).
            active = torch.le(z, theta[col]).logical_not_()
            window = torch.le(z, (theta + bandwidth / 2)[col])
        else:
            active = torch.ones_like(z, dtype=torch.bool)
            window = None
        codes = torch.where(active, z, 0)
        crow = _offsets(row, batch)
        u_hat = torch.nn.functional.embedding_bag(
            col, W_dec, crow, mode="sum", per_sample_weights=codes, include_last_offset=True
        )
        u_hat += b_dec
        l0 = torch.zeros(batch, dtype=torch.float32, device=u.device).index_add_(0, row, active.float())
        column_sums = torch.zeros(n_atoms, dtype=u.dtype, device=u.device).index_add_(0, col, codes)
        ctx.save_for_backward(xc, W_enc, W_dec, theta, crow, row, col, codes, active, window)
        ctx.bandwidth = bandwidth
        ctx.mark_non_differentiable(crow, col, codes)
        ctx.set_materialize_grads(False)
        return u_hat, l0, column_sums, crow, col, codes

    @staticmethod
    def backward(ctx, g, grad_l0, grad_column_sums, *_codes):
        xc, W_enc, W_dec, theta, crow, row, col, codes, active, window = ctx.saved_tensors
        n_atoms = W_enc.shape[1]
        need_u, need_w_enc, need_b_enc, need_theta, need_b_dec, need_w_dec = ctx.needs_input_grad[:6]
        # The gradient in the codes at the entries: through u_hat, and through the column sums.
        gc = _sampled_dot(g, W_dec, crow, col, row) if g is not None else torch.zeros_like(codes)
        if grad_column_sums is not None:
            gc += grad_column_sums[col]
        grad_z = torch.where(active, gc, 0)
        by_column = None
        if need_w_dec or need_w_enc:
            order = torch.argsort(col, stable=True)
            by_column = _ByColumn(order, _offsets(col[order], n_atoms), row[order])
        grad_w_dec = by_column.times(codes, g, n_atoms) if need_w_dec and g is not None else None
        grad_w_enc = by_column.times(grad_z, xc, n_atoms).T if need_w_enc else None
        grad_b_enc = torch.zeros(n_atoms, dtype=xc.dtype, device=xc.device).index_add_(0, col, grad_z)
        grad_b_dec = None
        if need_b_dec:
            grad_b_dec = -(W_enc @ grad_b_enc)
            if g is not None:
                grad_b_dec += g.sum(0)
        grad_u = None
        if need_u:
            grad_u = _csr(crow, col, grad_z, (xc.shape[0], n_atoms)) @ W_enc.T
        grad_theta = None
        if need_theta and window is not None:
            near = window.nonzero().squeeze(1)
            near_col = col[near]
            terms = theta[near_col] * gc[near].to(theta.dtype)
            if grad_l0 is not None:
                terms += grad_l0[row[near]].to(theta.dtype)
            grad_theta = torch.zeros_like(theta).index_add_(0, near_col, terms) * (-1.0 / ctx.bandwidth)
        return (
            grad_u,
            grad_w_enc,
            grad_b_enc if need_b_enc else None,
            grad_theta,
            grad_b_dec,
            grad_w_dec,
            None,
        )


def _check(u, W_enc, b_enc, threshold, b_dec, W_dec, bandwidth) -> None:
    for name, t in (("u", u), ("W_enc", W_enc), ("b_enc", b_enc), ("b_dec", b_dec), ("W_dec", W_dec)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}.")
        if t.dtype != u.dtype:
            raise TypeError(
                f"{name} has dtype {t.dtype} but u has {u.dtype}; cast them to one dtype (the SAE's)."
            )
    if u.ndim != 2 or W_enc.ndim != 2 or u.shape[1] != W_enc.shape[0]:
        raise ValueError(
            f"u must be (batch, d) and W_enc (d, n_atoms); got {tuple(u.shape)} and {tuple(W_enc.shape)}."
        )
    d, n_atoms = W_enc.shape
    if u.shape[0] == 0:
        raise ValueError("u has no rows; pass at least one sample.")
    expected = (("b_enc", b_enc, (n_atoms,)), ("b_dec", b_dec, (d,)), ("W_dec", W_dec, (n_atoms, d)))
    for name, t, shape in expected:
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}.")
    if threshold is not None:
        if not isinstance(threshold, torch.Tensor) or tuple(threshold.shape) != (n_atoms,):
            raise ValueError(f"threshold must be a ({n_atoms},) tensor, or None for a ReLU SAE.")
        if threshold.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"threshold has dtype {threshold.dtype}; keep it in float32.")
        if not (isinstance(bandwidth, (int, float)) and 0 < bandwidth < float("inf")):
            raise ValueError(f"bandwidth must be a positive finite number, got {bandwidth!r}.")


def sparse_autoencode(
    u: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    W_dec: torch.Tensor,
    b_dec: torch.Tensor,
    threshold: torch.Tensor | None = None,
    bandwidth: float = 0.001,
    capacity: int | None = None,
) -> SparseStepOutput:
    """Encode and decode u (batch, d) touching only the active entries after the encoder's GEMM.

    Args:
        u: (batch, d) inputs, in the parameters' dtype (float32 or float64 use the sparse BLAS products;
            other dtypes gather in fp32).
        W_enc: (d, n_atoms); b_enc: (n_atoms,); W_dec: (n_atoms, d); b_dec: (d,), subtracted from u first.
        threshold: (n_atoms,) positive theta of a JumpReLU (float32), or None for a ReLU SAE. Not checked
            for positivity here (a read-back per call): the SAEs keep it positive.
        bandwidth: e of the rectangle kernel in theta's pseudo-derivatives (JumpReLU only).
        capacity: Triton path only (ignored by the torch path, which is exact): entry slots a row. None
            sizes them exactly with one host sync per call; an int makes the step sync-free and
            CUDA-graph capturable, and rows selecting more entries than that lose the rest, counted on the
            device in `codes.dropped`: check it (`codes.check()`) where the caller syncs anyway
            (kernels/sparse_triton.py).

    Returns:
        `SparseStepOutput(u_hat (batch, d), l0 (batch,), column_sums (n_atoms,), codes)`, equal to the dense
        `codes = JumpReLU(z)` (or ReLU), `codes @ W_dec + b_dec` path to rounding, and with the same
        gradients in every parameter (and in u).
    """
    _check(u, W_enc, b_enc, threshold, b_dec, W_dec, bandwidth)
    mode = backend(u, W_enc, b_enc, threshold, b_dec, W_dec)
    if mode != "torch" and u.dtype in TRITON_DTYPES:
        return SparseStepOutput(
            *padded_autoencode(u, W_enc, b_enc, W_dec, b_dec, threshold, bandwidth, capacity, mode)
        )
    u_hat, l0, column_sums, crow, col, values = _SparseAutoencode.apply(
        u, W_enc, b_enc, threshold, b_dec, W_dec, float(bandwidth)
    )
    return SparseStepOutput(u_hat, l0, column_sums, SparseCodes(crow, col, values, W_enc.shape[1]))


class _MeanSquaredError(torch.autograd.Function):
    @staticmethod
    def forward(ctx, prediction, target):
        residual = prediction - target
        flat = residual.view(-1)
        ctx.save_for_backward(residual)
        return torch.dot(flat, flat) / residual.shape[0]

    @staticmethod
    def backward(ctx, grad):
        (residual,) = ctx.saved_tensors
        g = residual * (grad * (2.0 / residual.shape[0])).to(residual.dtype)
        need_prediction, need_target = ctx.needs_input_grad
        return g if need_prediction else None, -g if need_target else None


def mean_squared_error(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over rows of ||prediction - target||^2 for (batch, d) tensors of one dtype; differentiable.

    Three passes over (batch, d) (the residual, its dot product, the gradient's scaling) where autograd of
    `(p - t).pow(2).sum(-1).mean()` makes eight: at (4096, 576) fp32 on 2 cores, 1.5 against 6.8 ms for
    forward and backward, a tenth of a sparse step.
    """
    if prediction.shape != target.shape or prediction.ndim != 2 or prediction.dtype != target.dtype:
        raise ValueError(
            f"prediction and target must be (batch, d) tensors of one shape and dtype, got "
            f"{tuple(prediction.shape)} {prediction.dtype} and {tuple(target.shape)} {target.dtype}."
        )
    return _MeanSquaredError.apply(prediction.contiguous(), target)
