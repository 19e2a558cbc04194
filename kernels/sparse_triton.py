"""The sparse training step on the GPU: fixed-capacity entry buffers, no host sync, CUDA-graph capturable.

What `sparse_step.sparse_autoencode` runs on CUDA tensors (and, with ATOMS_KERNELS=interpret, through Triton's
interpreter on CPU). The same step as the torch path there, on (batch, C) slot buffers instead of CSR:

    forward   select_entries (sparse_select.py): encoder GEMM + JumpReLU / ReLU, entries into C slots a row
              u_hat = gather_sum(codes, W_dec) + b_dec; l0 and the codes' column sums from the slots
    backward  gc = sampled_dot(g, W_dec) at the entries (+ the column sums' gradient)
              grad_z = gc at active entries; window terms theta gc + grad_l0 at window entries
              segment_grads: dW_dec, dW_enc, grad_b_enc, theta's sums, one pass over the entries by latent
              grad_b_dec = g.sum(0) - W_enc grad_b_enc; grad_u = gather_sum(grad_z, W_enc^T)

Capacity and overflow. Sizes depend on the batch, n_atoms and the capacity C only. With `capacity=None` the
forward kernel runs with a first guess, reads the `dropped` counter back (one host sync, as the torch
path's nonzero) and, if some row overflowed, runs again with C = the fullest row's count: exact, never
capturable. With an int `capacity` nothing is read back: a row that selects more than C entries keeps its
first C (in the order the tiles reserved slots) and the rest are counted in `codes.dropped`, a device
tensor. That step is then wrong for those rows, so the count must be checked before the step's update
is trusted: `codes.check()` raises CapacityOverflowError naming the capacity needed. A trainer reads it
where it already synchronises (train_step reads the loss and L0 back every step; read `dropped` with them)
and, on overflow, redoes the step with a larger capacity or on the dense path; `codes.counts.max()` (on
the device) is the capacity the batch needed, the next step's with a margin.
"""

from typing import NamedTuple

import torch

from .dispatch import Backend
from .sparse_gather import gather_sum, sampled_dot, segment_grads
from .sparse_select import select_entries

__all__ = ["CapacityOverflowError", "PaddedCodes", "default_capacity", "padded_autoencode"]

# Compute dtypes of the Triton path; float64 takes the torch path (no float64 tl.dot under Triton 3.4).
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class CapacityOverflowError(RuntimeError):
    """Some rows selected more entries than the capacity: the step's results for them are incomplete."""


class PaddedCodes(NamedTuple):
    """Codes (batch, n_atoms) as fixed-capacity rows: row i's entries are its first min(counts[i], C) slots,
    ascending by latent; the other slots hold latent 0 and code 0."""

    indices: torch.Tensor
    """(batch, C) int32 latents."""
    values: torch.Tensor
    """(batch, C) codes; zero at window entries below the threshold (kept for theta's gradient)."""
    counts: torch.Tensor
    """(batch,) int32 entries each row selected (active and window); above C where the row overflowed."""
    dropped: torch.Tensor
    """(1,) int32 on the device: entries that did not fit, 0 unless some row overflowed (`check`)."""
    n_atoms: int

    def to_dense(self) -> torch.Tensor:
        """The codes as a dense (batch, n_atoms) tensor (padding adds code 0 to latent 0: no change)."""
        dense = self.values.new_zeros((self.values.shape[0], self.n_atoms))
        return dense.scatter_add_(1, self.indices.long(), self.values)

    def fired(self) -> torch.Tensor:
        """(n_atoms,) bool: latents with a non-zero code in some row."""
        hits = torch.zeros(self.n_atoms, dtype=torch.int64, device=self.values.device)
        return hits.index_add_(0, self.indices.view(-1), (self.values != 0).view(-1).long()) > 0

    def check(self) -> None:
        """Raise CapacityOverflowError if some row overflowed. Reads two numbers back: a host sync."""
        dropped, needed = (int(v) for v in torch.stack([self.dropped[0], self.counts.max()]).tolist())
        if dropped:
            capacity = self.indices.shape[1]
            raise CapacityOverflowError(
                f"{dropped} selected entries did not fit in the capacity of {capacity} a row (the fullest "
                f"row selected {needed}): the step's outputs and gradients miss them. Redo the step with "
                f"capacity >= {needed} (plus a margin, e.g. 1.25x), or capacity=None (sized exactly, one "
                "host sync per step), or on the dense path."
            )


def default_capacity(n_atoms: int) -> int:
    """First guess when no capacity is given: 1/8 of the latents (the trainer takes the sparse path at mean
    L0 <= 8% of them), in multiples of 16 slots (aligned rows), at most n_atoms."""
    return min(n_atoms, max(16, -(-n_atoms // 128) * 16))


class _PaddedAutoencode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, W_enc, b_enc, theta, b_dec, W_dec, bandwidth, capacity, mode):
        n_atoms = W_enc.shape[1]
        xc = u - b_dec
        chosen = select_entries(
            xc, W_enc, b_enc, theta, bandwidth, capacity or default_capacity(n_atoms), mode
        )
        if capacity is None:
            dropped, needed = torch.stack([chosen.dropped[0], chosen.counts.max()]).tolist()
            if dropped:
                chosen = select_entries(xc, W_enc, b_enc, theta, bandwidth, needed, mode)
        idx, values, flags, counts, dropped = chosen
        u_hat = gather_sum(idx, values, counts, W_dec, u.dtype, mode)
        u_hat += b_dec
        l0 = (flags & 1).sum(1, dtype=torch.float32)
        column_sums = torch.zeros(n_atoms, dtype=torch.float32, device=u.device)
        column_sums = column_sums.index_add_(0, idx.view(-1), values.view(-1).float()).to(u.dtype)
        ctx.save_for_backward(xc, W_enc, W_dec, theta, idx, values, flags, counts)
        ctx.bandwidth, ctx.mode = bandwidth, mode
        ctx.mark_non_differentiable(idx, values, counts, dropped)
        ctx.set_materialize_grads(False)
        return u_hat, l0, column_sums, idx, values, counts, dropped

    @staticmethod
    def backward(ctx, g, grad_l0, grad_column_sums, *_codes):
        xc, W_enc, W_dec, theta, idx, values, flags, counts = ctx.saved_tensors
        mode, n_atoms = ctx.mode, W_enc.shape[1]
        need_u, need_w_enc, need_b_enc, need_theta, need_b_dec, need_w_dec = ctx.needs_input_grad[:6]
        # The gradient in the codes at the entries: through u_hat and through the column sums. Padding
        # slots get whatever latent 0's terms are, and the flag masks below zero them.
        if g is not None:
            g = g.contiguous()
            gc = sampled_dot(idx, counts, g, W_dec, mode)
        else:
            gc = torch.zeros(idx.shape, dtype=torch.float32, device=idx.device)
        if grad_column_sums is not None:
            gc += grad_column_sums.float()[idx]
        grad_z = torch.where((flags & 1) != 0, gc, 0.0)
        # theta's pseudo-gradient terms at window entries: theta_j gc (codes) + grad_l0 (the L0 count).
        window = torch.zeros_like(gc)
        if need_theta and theta is not None:
            window = gc * theta[idx]
            if grad_l0 is not None:
                window += grad_l0.float()[:, None]
            window = torch.where((flags & 2) != 0, window, 0.0)
        sums = segment_grads(
            idx, counts, values, grad_z, window, g, xc, n_atoms, (need_w_dec, need_w_enc), mode
        )
        grad_b_enc = sums.grad_b_enc.to(xc.dtype)
        grad_b_dec = None
        if need_b_dec:
            grad_b_dec = -(W_enc @ grad_b_enc)
            if g is not None:
                grad_b_dec += g.sum(0)
        grad_u = gather_sum(idx, grad_z, counts, W_enc.T, xc.dtype, mode) if need_u else None
        grad_theta = None
        if need_theta and theta is not None:
            grad_theta = (sums.window_sums * (-1.0 / ctx.bandwidth)).to(theta.dtype)
        return (
            grad_u,
            sums.grad_w_enc,
            grad_b_enc if need_b_enc else None,
            grad_theta,
            grad_b_dec,
            sums.grad_w_dec,
            None,
            None,
            None,
        )


def padded_autoencode(
    u: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    W_dec: torch.Tensor,
    b_dec: torch.Tensor,
    threshold: torch.Tensor | None,
    bandwidth: float,
    capacity: int | None,
    mode: Backend,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, PaddedCodes]:
    """`sparse_step.sparse_autoencode` on the Triton kernels (checked inputs, a compute dtype of
    TRITON_DTYPES): u_hat (batch, d), l0 (batch,) float32, column sums (n_atoms,) and the codes."""
    n_atoms = W_enc.shape[1]
    if capacity is not None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"capacity must be a positive int (slots a row) or None, got {capacity!r}.")
        capacity = min(capacity, n_atoms)  # a row holds at most n_atoms entries
    if u.shape[0] * (capacity or default_capacity(n_atoms)) >= 2**31:
        raise ValueError(
            f"batch {u.shape[0]} x capacity {capacity} slots pass 2^31, the kernels' int32 slot index; "
            "split the batch or lower the capacity."
        )
    theta = None if threshold is None else threshold.float().contiguous()
    u_hat, l0, column_sums, idx, values, counts, dropped = _PaddedAutoencode.apply(
        u, W_enc, b_enc.contiguous(), theta, b_dec, W_dec.contiguous(), float(bandwidth), capacity, mode
    )
    return u_hat, l0, column_sums, PaddedCodes(idx, values, counts, dropped, n_atoms)
