"""Batched basis pursuit: many right-hand sides, one dictionary, in torch, each answer with its proof.

min ||delta||_1 s.t. delta @ W = m (and delta >= 0 when `nonneg`) for a batch of m (SPEC section 4,
theorem 3), the same code on CPU and CUDA, float64 by default:

1. ADMM (Douglas-Rachford splitting of the l1 norm and the affine set {x : x @ W = m}), scaled form with
   over-relaxation and a per-sample penalty rho balanced from the primal and dual residuals (Boyd et al. 2011,
   sections 3.4.1 and 3.4.3). The x-update is the orthogonal projection onto the affine set, which does not
   depend on rho, so every sample keeps its own rho for free. With the thin SVD W = P S Q^T, taken once per
   dictionary, proj(v) = v - (v @ P) @ P^T + x0, x0 = (m @ Q / S) @ P^T the minimum-norm solution: two GEMMs
   an iteration, and a rank-deficient W costs nothing extra.
2. Polish: every `check_every` iterations, each sample whose support (the non-zeros of z, exact after soft
   thresholding) and signs have not changed since the previous check is solved by least squares on that
   support (Cholesky of the support Gram, one step of iterative refinement).
3. Certificate: the polished delta is the unique minimiser when the support's atoms are independent,
   delta @ W = m, and some y has W_L y = s = sign(delta_L) and |W_j y| < 1 off L (W_j y < 1 when nonneg; Fuchs
   2004). Two candidates are checked: ADMM's dual moved the least distance onto {W_L y = s} (rho u lies in the
   subdifferential of ||z||_1, and y0 solves W y0 = rho u in least squares), and the minimum-norm y (y0 = 0).
   The check is in float64 on W as given; nothing ADMM reports is trusted.
4. A sample without a certificate after `max_iter` gets a duality-gap bound: p = ||x||_1 at a feasible x and
   q = y . m at a dual-feasible y (y0 scaled into the dual polytope). p - q under `gap_tol` p is "converged":
   optimal to that tolerance, uniqueness unproven. What is left is handed to the caller (HiGHS in
   `atoms.recovery.basis_pursuit`), never guessed.

5. Given known feasible codes (`known`, the planted codes of a recovery experiment), each is first tried
   directly: a second ADMM searches its certificate (a y with W_L y = s on the known support L and every
   off-support |W_j y| <= 0.99), which takes tens of iterations where the certificate has room, and the
   candidate is verified as in 3 (`_search_known`). Where no certificate exists, the direction in which
   that ADMM diverges points to cheaper feasible codes, which are built and verified (`_descent`). A
   feasible code of smaller l1 norm than the known code proves the known code is not the minimiser (status
   "beaten"), all a failed recovery needs. The samples left then iterate as above, and also stop as soon
   as ADMM's feasible iterate beats the known code, often in tens of iterations. Measured on 256 codes of
   one layer of an `atoms run --quick` (576 x 2304, mean support ~170): for the ReLU SAE's, unproven codes
   fell from 116 to 2 (245 proven recovered, 9 proven failed) and the time from 50 s to 8 s; for the
   TSAE's, where the primal iterations already proved 242, from 14 to 11 (3 proven failed), at 12 s
   against 9.5 s. The codes left unproven had the largest supports (300-580 non-zeros in d = 576).

6. Answers of other solvers (HiGHS, cvxpy, OMP) are proven the same way (`certify`): each is read on its
   support, refitted there, and its certificate checked (minimum-norm y) or searched for as in 5.

Finished samples leave the batch at each check, so the iterations get cheaper as the easy samples certify.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import NamedTuple

import torch

__all__ = ["BatchedSolution", "certificate_room", "certify", "disproof", "solve_batched"]

# A polished code must satisfy delta @ W = m to this relative residual (m has unit norm here).
_FEASIBLE = 1e-9
# W_L y = s must hold to this max-abs residual for y to count (as atoms.recovery.dual_certificate).
_EQUALITY = 1e-8
# Smallest over largest Cholesky pivot of a support Gram below which the support's atoms count as dependent.
_INDEPENDENT = 1e-6
# A feasible code this much (relatively) below a known code's l1 norm proves the known code not the minimiser.
_BEATEN = 1e-6
# A feasible code apart from a known code with an l1 norm at most this much (relatively) above it is a second
# minimiser when the known code is one: the rounding of a vertex's l1 norm, and gap_tol's default.
_TIE = 1e-9
# Entries of another solver's answer under this fraction of its Euclidean norm are read as zeros (`certify`):
# Clarabel leaves up to 1.5e-6 of the largest entry off the support (measured on 256 x 64 Gaussian problems,
# non-negative, k = 4-20), and basis_pursuit's recovery band counts relative errors under 1e-5 as a match.
_ANSWER_ZERO = 1e-5
# Entries of a polished code this small relative to its largest are read as zeros of the support.
_PRUNE = 1e-12
# Residual balancing (Boyd et al. 2011, 3.4.1): rho moves by _RHO_STEP when one residual is _RHO_RATIO x the
# other.
_RHO_RATIO = 10.0
_RHO_STEP = 2.0
# Over-relaxation and the first rho's multiple of n_atoms / ||x0||_1: the best measured of alpha in {1, 1.6}
# and {0.3, 1, 3, 10} on 256 x 128 Gaussian problems at sparsity 20, signed and non-negative (~50 iterations).
_RELAX = 1.6
_RHO0 = 3.0
# Iterations before a support whose polish did not certify is polished again.
_RETRY = 100
# Certificate search on known supports: the off-support W_j y are aimed at |W_j y| <= 1 - _SEARCH_MARGIN, so
# that the exact step onto W_L y = s afterwards leaves them below 1; the candidate y is checked at these
# iterations (on ReLU-SAE codes of an `atoms run --quick`, 576 x 2304 at ~170 non-zeros: 118 of 128 certified
# by 50).
_SEARCH_MARGIN = 1e-2
_SEARCH_CHECKS = (20, 50, 100, 200)
_SEARCH_CHUNK = 128
# Entries of the search's drift below this fraction of its largest are taken as zeros of a failure direction.
_DRIFT_ZERO = 1e-3
# Rounds of `_descent`'s projection, each after dropping the off-support entries the last one made negative.
_DRIFT_ROUNDS = 4
# The drift is tried from this search iteration on: earlier it has not yet turned towards a separating
# direction, and each try costs a d x d Gram per sample (n_atoms d^2).
_DESCENT_FROM = 50
# Samples per masked copy of W in `_masked_gram`.
_GRAM_GROUP = 16


# Below this many multiply-adds an iteration (batch x n_atoms x d), the CPU iterations run on one thread.
_PARALLEL_WORK = 2**22


@contextmanager
def _threads_for(work: int, device: torch.device) -> Iterator[None]:
    """One intra-op CPU thread for small batches, the caller's count otherwise.

    An iteration on a small batch is a few microseconds of arithmetic per op, less than waking a thread
    pool; and when the cores are shared, a parallel region waits for a descheduled thread: measured here with
    one other busy process on 2 cores, a (10 x 200) @ (200 x 150) product took 18 ms on 2 threads against
    0.1 ms on one, and the SVD of a 200 x 150 matrix 0.6 s against 6 ms.
    """
    if device.type != "cpu" or work >= _PARALLEL_WORK:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class BatchedSolution(NamedTuple):
    """Answers of `solve_batched` for a batch of B right-hand sides, dictionary (n_atoms, d).

    codes (B, n_atoms): the polished code when certified, else ADMM's last feasible iterate (NaN for an
    infeasible m). status: "optimal" (the code is proven the unique minimiser), "converged" (proven optimal to
    `gap_tol`), "beaten" (a feasible code below the known one's l1 norm, see solve_batched), "infeasible"
    (m is not in the span of the atoms) or "unsolved" (neither, after max_iter).
    duals (B, d): the certificate y (NaN when none). max_off (B,): for an "optimal" sample, max over atoms
    off the support of |W_j y| (W_j y when nonneg), the certificate's strict inequality < 1; for the others,
    the same max over all atoms. gaps (B,): relative duality gap
    (p - q) / p (inf when no feasible code was found). iterations (B,): ADMM iterations spent on each sample
    (for a known code certified by the search, the search's iterations).
    """

    codes: torch.Tensor
    status: list[str]
    duals: torch.Tensor
    max_off: torch.Tensor
    gaps: torch.Tensor
    iterations: torch.Tensor


class _Factor(NamedTuple):
    """Thin SVD of the dictionary W (n_atoms, d) = P diag(S) Q^T restricted to its numerical rank r."""

    P: torch.Tensor  # (n_atoms, r), orthonormal columns
    S: torch.Tensor  # (r,)
    Q: torch.Tensor  # (d, r), orthonormal columns


def _factor(W: torch.Tensor) -> _Factor:
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    # The usual numerical-rank cut (as numpy.linalg.matrix_rank): singular values under it are rounding.
    cut = S[0] * max(W.shape) * torch.finfo(W.dtype).eps
    r = int((cut < S).sum())
    return _Factor(U[:, :r], S[:r], Vh[:r].T)


def _shrink(w: torch.Tensor, threshold: torch.Tensor, nonneg: bool) -> torch.Tensor:
    """prox of ||.||_1 / rho (of ||.||_1 plus the indicator of x >= 0 when nonneg), threshold = 1 / rho."""
    if nonneg:
        return (w - threshold).clamp_min_(0.0)
    # w - clip(w, -t, t): two passes over the batch instead of sign, abs, clamp and a product.
    return w - torch.clamp(w, -threshold, threshold)


def _least_squares_dual(f: _Factor, g: torch.Tensor) -> torch.Tensor:
    """y (b, d) minimising ||W y - g|| for each row g (b, n_atoms): y = Q diag(1/S) P^T g."""
    return ((g @ f.P) / f.S) @ f.Q.T


class _Polished(NamedTuple):
    codes: torch.Tensor  # (b, n_atoms)
    duals: torch.Tensor  # (b, d)
    max_off: torch.Tensor  # (b,)
    gaps: torch.Tensor  # (b,)
    bound: torch.Tensor  # (b,) the dual lower bound q of `duals` (see _dual_bound)
    feasible: torch.Tensor  # (b,) bool: the code satisfies delta @ W = m (and delta >= 0)
    certified: torch.Tensor  # (b,) bool


def _support_solve(
    W: torch.Tensor, M: torch.Tensor, support: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Least squares on each row's support (b, n_atoms) bool: idx (b, K), valid, A (b, K, d), chol, c (b, K).

    idx lists each row's support first (padded with distinct off-support atoms, valid False); A holds the
    support's atoms (zero rows for padding); chol is the Cholesky factor of A A^T with ones on the padded
    diagonal; c the coefficients (zero on padding). Rows whose support atoms are dependent have NaN in c.
    """
    counts = support.sum(dim=1)
    K = max(int(counts.max()), 1)
    # A stable descending sort puts each row's support first; every row of idx is a permutation's prefix, so
    # its entries are distinct and a scatter through it never overwrites a support entry with padding.
    idx = torch.sort(support.to(torch.int8), dim=1, descending=True, stable=True).indices[:, :K]
    valid = torch.arange(K, device=W.device) < counts[:, None]
    A = W[idx] * valid[..., None]
    G = A @ A.transpose(1, 2)
    G.diagonal(dim1=1, dim2=2).add_((~valid).to(G.dtype))
    chol, info = torch.linalg.cholesky_ex(G)
    # Dependent atoms need not make the factorisation fail: an exactly repeated atom leaves a pivot of
    # rounding size (about sqrt(eps) of the largest), which Cholesky accepts. A pivot ratio under
    # _INDEPENDENT (conditions of the support's atoms beyond ~1e6) counts as dependent.
    pivots = chol.diagonal(dim1=1, dim2=2)
    smallest = pivots.masked_fill(~valid, torch.inf).amin(dim=1)
    largest = pivots.masked_fill(~valid, 0.0).amax(dim=1)
    independent = (info == 0) & (smallest > _INDEPENDENT * largest)
    rhs = (A @ M[:, :, None]).squeeze(-1)
    c = torch.cholesky_solve(rhs[..., None], chol).squeeze(-1)
    # One step of iterative refinement on the normal equations' residual in the measurement space.
    r = M - (c[:, None, :] @ A).squeeze(1)
    c = c + torch.cholesky_solve((A @ r[:, :, None]), chol).squeeze(-1)
    c = torch.where(independent[:, None], c * valid, torch.nan)
    return idx, valid, A, chol, c


class _SupportFit(NamedTuple):
    """Least squares of each sample on a given support, with what a certificate check needs (b rows)."""

    idx: torch.Tensor  # (b, K) each row's support first, then padding (see _support_solve)
    valid: torch.Tensor  # (b, K) bool: idx is on the support
    A: torch.Tensor  # (b, K, d) the support's atoms, zero rows for padding
    chol: torch.Tensor  # (b, K, K) Cholesky factor of A A^T (ones on the padded diagonal)
    codes: torch.Tensor  # (b, n_atoms) the least-squares code on the support (zero elsewhere)
    signs: torch.Tensor  # (b, K) sign of each support coefficient, zero on padding
    on_support: torch.Tensor  # (b, n_atoms) bool
    feasible: torch.Tensor  # (b,) bool: the code satisfies delta @ W = m (and delta > 0 on its support)


def _fit_support(W: torch.Tensor, M: torch.Tensor, support: torch.Tensor, nonneg: bool) -> _SupportFit:
    """Least squares on each sample's support (b, n_atoms) bool, entries that come out numerically zero
    pruned (their sign would be noise in the certificate's s); W (n_atoms, d), M (b, d) unit rows."""
    idx, valid, A, chol, c = _support_solve(W, M, support)
    tiny = c.abs() <= _PRUNE * c.abs().amax(dim=1, keepdim=True)
    if bool((tiny & valid).any()):
        pruned = torch.zeros_like(support).scatter_(1, idx, valid & ~tiny)
        idx, valid, A, chol, c = _support_solve(W, M, pruned)
    codes = torch.zeros_like(support, dtype=W.dtype).scatter_(1, idx, torch.nan_to_num(c, nan=0.0))
    residual = torch.linalg.vector_norm((c[:, None, :] @ A).squeeze(1) - M, dim=1)
    signs_ok = (c > 0) | ~valid if nonneg else (c != 0) | ~valid
    feasible = (residual <= _FEASIBLE) & signs_ok.all(dim=1) & ~c.isnan().any(dim=1) & valid.any(dim=1)
    signs = torch.sign(c.nan_to_num(0.0)) * valid
    on_support = torch.zeros_like(support).scatter_(1, idx, valid)
    return _SupportFit(idx, valid, A, chol, codes, signs, on_support, feasible)


def _rows(fit: NamedTuple, keep: torch.Tensor) -> NamedTuple:
    """The rows `keep` of every (batch-first) tensor of a NamedTuple of tensors."""
    return type(fit)(*(t[keep] for t in fit))


def certificate_room(
    chol: torch.Tensor, residual: torch.Tensor, y: torch.Tensor, atom_norm: torch.Tensor
) -> torch.Tensor:
    """How far (b,) the computed |W_j y| may sit below the exact value for a y corrected onto W_L y = s
    exactly; residual e = W_L y - s (b, K) as computed, chol (b, K, K) of W_L W_L^T, atom_norm = max ||W_j||.

    Two parts. The least correction of y, delta = -W_L^T (W_L W_L^T)^{-1} e, has norm ||chol^{-1} e||, so
    |W_j (y + delta)| <= |W_j y| + ||W_j|| ||delta||. And a dot product of length d is computed to within
    d eps ||W_j|| ||y|| (Higham, 3.1), for W_j y as for the W_L y that gave e: twice that. A certificate needs
    max_off plus this under 1; an exact y exists then. Without it an atom repeated off the support (W_j =
    W_i, i in L, whose exact certificate has |W_j y| = 1: no unique minimiser) passed whenever W_j y came out
    a rounding under 1.
    """
    correction = torch.linalg.vector_norm(
        torch.linalg.solve_triangular(chol, residual[..., None], upper=False), dim=(1, 2)
    )
    rounding = 2 * y.shape[1] * torch.finfo(y.dtype).eps * torch.linalg.vector_norm(y, dim=1)
    return atom_norm * (correction + rounding)


def _check_duals(
    W: torch.Tensor, M: torch.Tensor, fit: _SupportFit, starts: tuple[torch.Tensor, ...], nonneg: bool
) -> _Polished:
    """Certificate candidates for the fitted codes: each start y (b, d) moved the least distance onto
    {W_L y = s}, then checked in W's dtype; the first that certifies is kept, else the one of smallest
    max_off (the better-scaled lower bound)."""
    A, chol, valid, s = fit.A, fit.chol, fit.valid, fit.signs
    atom_norm = torch.linalg.vector_norm(W, dim=1).max()
    best = None
    for start in starts:
        # The least change of y that makes W_L y = s: y + A^T (A A^T)^{-1} (s - A y).
        gap_s = s - (A @ start[:, :, None]).squeeze(-1) * valid
        y = start + (torch.cholesky_solve(gap_s[..., None], chol).transpose(1, 2) @ A).squeeze(1)
        residual = ((A @ y[:, :, None]).squeeze(-1) - s).mul_(valid)
        equality = residual.abs().amax(dim=1)
        off = _off(W, y, nonneg)
        max_off = off.masked_fill(fit.on_support, -torch.inf).amax(dim=1)
        room = certificate_room(chol, residual, y, atom_norm)
        ok = fit.feasible & (equality <= _EQUALITY) & (max_off + room < 1)
        candidate = (y, max_off, ok, _dual_bound(off, y, M))
        if best is None:
            best = candidate
        else:
            take = ~best[2] & (ok | (max_off < best[1]))
            best = tuple(
                torch.where(take[:, None] if new.ndim == 2 else take, new, old)
                for old, new in zip(best, candidate, strict=True)
            )
    y, max_off, certified, bound = best
    p = fit.codes.abs().sum(dim=1)
    gaps = (p - bound) / p.clamp_min(torch.finfo(W.dtype).tiny)
    return _Polished(fit.codes, y, max_off, gaps, bound, fit.feasible, certified)


def _polish(
    W: torch.Tensor, M: torch.Tensor, support: torch.Tensor, y0: torch.Tensor, nonneg: bool
) -> _Polished:
    """Least squares on each sample's support, then the two certificate candidates (ADMM's dual y0 and the
    minimum-norm y); see the module docstring. W (n_atoms, d); M (b, d) unit rows; support (b, n_atoms)
    bool, non-empty rows; y0 (b, d)."""
    fit = _fit_support(W, M, support, nonneg)
    return _check_duals(W, M, fit, (y0, torch.zeros_like(y0)), nonneg)


def _off(W: torch.Tensor, y: torch.Tensor, nonneg: bool) -> torch.Tensor:
    """(b, n_atoms) the quantities a dual y (b, d) must keep under 1: |W_j y|, or W_j y when nonneg."""
    inner = y @ W.T
    return inner if nonneg else inner.abs_()


def _dual_bound(off: torch.Tensor, y: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """q = (y / max(1, t)) . m (b,), t = max_j off_j, where off (b, n_atoms) holds |W_j y| (W_j y when
    nonneg): y / max(1, t) is dual feasible, so q is a lower bound on the optimum (weak duality)."""
    return (y * M).sum(dim=1) / off.amax(dim=1).clamp_min(1.0)


def solve_batched(
    W: torch.Tensor,
    M: torch.Tensor,
    *,
    nonneg: bool = False,
    max_iter: int = 1000,
    check_every: int = 10,
    gap_tol: float = 1e-9,
    known: torch.Tensor | None = None,
) -> BatchedSolution:
    """Basis pursuit for every row of M (B, d) with the atoms W (n_atoms, d); see the module docstring.

    W and M are used in their dtype and device (float64 is what the certificates are meant for); rows of M
    should have unit norm (basis pursuit is positively homogeneous; `atoms.recovery.basis_pursuit` scales
    them), so the tolerances are relative. known (B, n_atoms): feasible codes known in advance (the planted
    codes of a recovery experiment, for the unit-norm m). Each is first tried directly: its certificate is
    searched for ("optimal" when found), and where none exists a cheaper feasible code (item 5 of the
    module docstring). A sample stops with status "beaten" as soon as a feasible code is found whose l1
    norm is below (1 - 1e-6) the known one's: that proves the known code is not the minimiser, all a
    recovery experiment asks of a failure. The code returned for it is that feasible code, not the
    minimiser. Returns a `BatchedSolution`.
    """
    with _threads_for(M.shape[0] * W.shape[0] * W.shape[1], W.device):
        return _solve(W, M, nonneg, max_iter, check_every, gap_tol, known)


def certify(
    W: torch.Tensor, M: torch.Tensor, codes: torch.Tensor, *, nonneg: bool = False
) -> BatchedSolution:
    """Prove answers of any solver, codes (B, n_atoms) for the unit rows M (B, d), the unique minimisers.

    An answer is read on its support (entries over 1e-5 of its Euclidean norm; smaller ones are an
    interior-point solver's rounding), refitted there by least squares and checked as the batched solver's
    own answers are: the minimum-norm y, then the certificate search of a known code (item 5 of the module
    docstring). status: "optimal" (certified; the code returned is the refit), "beaten" (a feasible code of
    smaller l1 norm than the refit was found: the answer is not a minimiser; that code is returned) or
    "unsolved" (neither; the answer is returned as given, NaN answers included). duals, gaps: the
    certificate's (NaN otherwise). max_off: the certificate's; for an uncertified answer the minimum-norm
    y's, NaN where the refit does not reach m (dependent support atoms, or a support missing an atom).
    iterations: the search's. W, M and codes on one device, in W's dtype (float64 for a sound check).
    """
    with _threads_for(M.shape[0] * W.shape[0] * W.shape[1], W.device):
        return _certify(W, M, codes, nonneg)


def _certify(W: torch.Tensor, M: torch.Tensor, codes: torch.Tensor, nonneg: bool) -> BatchedSolution:
    B = codes.shape[0]
    max_off = torch.full((B,), torch.nan, dtype=W.dtype, device=W.device)
    iterations = torch.zeros(B, dtype=torch.int64, device=W.device)
    solution = BatchedSolution(
        codes.clone(), ["unsolved"] * B, torch.full_like(M, torch.nan), max_off, max_off.clone(), iterations
    )
    out = (solution.codes, solution.duals, max_off, solution.gaps, iterations, solution.status)
    # NaN answers compare False everywhere: an empty support, never checked.
    support = codes.abs() > _ANSWER_ZERO * torch.linalg.vector_norm(codes, dim=1, keepdim=True)
    rows = support.any(dim=1).nonzero().flatten()
    if rows.numel():
        fit = _fit_support(W, M[rows], support[rows], nonneg)
        first = _check_duals(W, M[rows], fit, (torch.zeros_like(M[rows]),), nonneg)
        max_off[rows] = torch.where(fit.feasible, first.max_off, torch.nan)
        _record(first, torch.arange(rows.numel(), device=W.device), rows, 0, out)
        search = fit.feasible & ~first.certified
        if bool(search.any()):
            _search_known(W, _factor(W), M[rows[search]], fit.codes[search], nonneg, rows[search], out)
    return solution


def _solve(
    W: torch.Tensor,
    M: torch.Tensor,
    nonneg: bool,
    max_iter: int,
    check_every: int,
    gap_tol: float,
    known: torch.Tensor | None,
) -> BatchedSolution:
    B, n_atoms = M.shape[0], W.shape[0]
    f = _factor(W)
    coords = M @ f.Q  # (B, r)
    x0 = (coords / f.S) @ f.P.T
    # m must lie in the span of the atoms: its part outside span(Q) is what no code can reach.
    outside = torch.linalg.vector_norm(M - coords @ f.Q.T, dim=1)

    codes = torch.full((B, n_atoms), torch.nan, dtype=W.dtype, device=W.device)
    duals = torch.full_like(M, torch.nan)
    max_off = torch.full((B,), torch.nan, dtype=W.dtype, device=W.device)
    gaps = torch.full_like(max_off, torch.nan)
    iterations = torch.zeros(B, dtype=torch.int64, device=W.device)
    status = ["unsolved"] * B
    for i in (outside > _FEASIBLE).nonzero().flatten().tolist():
        status[i] = "infeasible"

    out = (codes, duals, max_off, gaps, iterations, status)
    if f.S.numel() == n_atoms:
        return _independent_atoms(f, x0, outside, nonneg, out)

    rows = (outside <= _FEASIBLE).nonzero().flatten()  # original indices of the samples still iterating
    if known is not None and rows.numel():
        settled = _search_known(W, f, M[rows], known[rows].to(W), nonneg, rows, out)
        rows = rows[~settled]
    m, x_min = M[rows], x0[rows]
    z = x_min.clamp_min(0.0) if nonneg else x_min.clone()
    u = torch.zeros_like(z)
    # rho starts at a multiple of n_atoms / ||x0||_1: the first threshold 1 / rho is then a fraction of the
    # mean |entry| of the minimum-norm solution x0.
    rho = (_RHO0 * n_atoms / x_min.abs().sum(dim=1).clamp_min(torch.finfo(W.dtype).tiny))[:, None]
    last_signs = torch.zeros_like(z, dtype=torch.int8)
    # Iteration from which a sample may be polished again: a support that failed to certify is retried only
    # after _RETRY iterations (its dual may still be improving), a new support at once. Polishing costs
    # K^2 d per sample, far more than an iteration at large supports.
    next_try = torch.zeros(rows.numel(), dtype=torch.int64, device=W.device)
    x = x_min
    if known is None:
        target = torch.full((rows.numel(),), -torch.inf, dtype=W.dtype, device=W.device)
    else:
        target = known[rows].abs().sum(dim=1).to(W) * (1 - _BEATEN)
    for it in range(1, max_iter + 1):
        if rows.numel() == 0:
            break
        v = z - u
        x = v - (v @ f.P) @ f.P.T + x_min
        xh = _RELAX * x + (1 - _RELAX) * z
        z_old = z
        w = xh + u
        z = _shrink(w, 1.0 / rho, nonneg)
        u = w - z
        if it % check_every and it != max_iter:
            continue
        # Residual balancing: primal ||x - z|| against dual rho ||z - z_old||.
        primal = torch.linalg.vector_norm(x - z, dim=1, keepdim=True)
        dual = rho * torch.linalg.vector_norm(z - z_old, dim=1, keepdim=True)
        up = primal > _RHO_RATIO * dual
        down = dual > _RHO_RATIO * primal
        scale = torch.where(up, _RHO_STEP, torch.where(down, 1 / _RHO_STEP, 1.0))
        rho = rho * scale
        u = u / scale

        signs = torch.sign(z).to(torch.int8)
        same = (signs == last_signs).all(dim=1)
        next_try = torch.where(same, next_try, 0)
        stable = same & (signs != 0).any(dim=1) & (next_try <= it)
        last_signs = signs
        finished = torch.zeros(rows.numel(), dtype=torch.bool, device=W.device)
        if bool(stable.any()):
            pick = stable.nonzero().flatten()
            y0 = _least_squares_dual(f, rho[pick] * u[pick])
            polished = _polish(W, m[pick], signs[pick] != 0, y0, nonneg)
            next_try[pick] = it + _RETRY
            finished[_record(polished, pick, rows, it, out)] = True
        if known is not None:
            # x is feasible by construction (a projection onto x @ W = m), checked again here; for the
            # non-negative problem it counts only where it is also >= 0, which is rarer.
            beaten = ~finished & _beats(x, W, m, target, nonneg)
            _record_beaten(x, beaten, rows, it, out)
            finished |= beaten
        if bool(finished.any()):
            keep = ~finished
            rows, m, x_min, z, u, rho, last_signs, x, target, next_try = (
                t[keep] for t in (rows, m, x_min, z, u, rho, last_signs, x, target, next_try)
            )

    if rows.numel():
        iterations[rows] = max_iter
        _finish_uncertified(W, f, rows, m, x, z, u, rho, nonneg, gap_tol, max_iter, out)
    return BatchedSolution(codes, status, duals, max_off, gaps, iterations)


def _box(w: torch.Tensor, on_support: torch.Tensor, targets: torch.Tensor, nonneg: bool) -> torch.Tensor:
    """Projection of w (b, n_atoms) onto the certificate box of `_search_known`: the support's entries set to
    their signs, the others clamped to 1 - _SEARCH_MARGIN in absolute value (from above only when nonneg)."""
    limit = 1.0 - _SEARCH_MARGIN
    inside = w.clamp_max(limit) if nonneg else w.clamp(-limit, limit)
    return torch.where(on_support, targets, inside)


def _masked_gram(W: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """W_R^T W_R (b, d, d) for each row's atoms R = keep (b, n_atoms) bool; W (n_atoms, d). Built a few
    samples at a time: the masked copies of W they need (group x n_atoms x d) would take 1.4 GB at once
    for 128 samples of 2304 x 576."""
    grams = [(W * group[:, :, None]).transpose(1, 2) @ W for group in keep.to(W.dtype).split(_GRAM_GROUP)]
    return torch.cat(grams)


def _descent(
    W: torch.Tensor,
    M: torch.Tensor,
    fit: _SupportFit,
    drift: torch.Tensor,
    nonneg: bool,
    rows: torch.Tensor,
    it: int,
    out: tuple,
) -> torch.Tensor:
    """Try to prove the fitted known codes (b samples) not the minimisers from the search's drift (b,
    n_atoms), its last change of u; writes what it proves with `_record_beaten` (rows: the samples'
    positions in the batch), returns that mask (b,).

    When the range of W and the certificate box do not meet, ADMM's u grows along a direction h that
    separates them (Banjac et al. 2019): h @ W = 0 with s . h_L + ||h_off||_1 < 0 (h_off >= 0 when nonneg),
    a direction in which the known code x0 stays feasible while its l1 norm falls. The drift only tends to
    such an h (its negative off-support entries fade like 1 / iterations), so it is cleaned: both signs of
    it are tried; entries under _DRIFT_ZERO of the largest (and, when nonneg, the negative ones off L) are
    set to zero, which leaves the set R; the rest is projected exactly onto {h_R @ W_R = 0} (a Cholesky of
    W_R^T W_R, d x d, for the samples whose cleaned direction descends), and when nonneg the off-support
    entries that the projection made negative leave R for another round. The step is half the largest that
    keeps the signs of x0 on L. Nothing is trusted: x0 + t h counts only where `_beats` verifies it.
    """
    x0 = fit.codes
    target = x0.abs().sum(dim=1) * (1 - _BEATEN)
    proven = torch.zeros(x0.shape[0], dtype=torch.bool, device=W.device)
    for direction in (drift, -drift):
        keep = direction.abs() > _DRIFT_ZERO * direction.abs().amax(dim=1, keepdim=True)
        if nonneg:
            keep &= fit.on_support | (direction > 0)
        h = direction * keep
        slope = (h * torch.sign(x0)).sum(dim=1) + (h.abs() * ~fit.on_support).sum(dim=1)
        pick = (~proven & (slope < 0)).nonzero().flatten()
        if pick.numel() == 0:
            continue
        direction, keep, off = direction[pick], keep[pick], ~fit.on_support[pick]
        for _ in range(_DRIFT_ROUNDS):
            h = direction * keep
            chol, info = torch.linalg.cholesky_ex(_masked_gram(W, keep))
            h = h - keep * (torch.cholesky_solve((h @ W)[..., None], chol).squeeze(-1) @ W.T)
            # The projection can turn a few small off-support entries negative: out of R, and again.
            negative = off & keep & (h < 0) if nonneg else torch.zeros_like(keep)
            if not bool(negative.any()):
                break
            keep &= ~negative
        shrinking = fit.on_support[pick] & (h * x0[pick] < 0)
        reach = torch.where(shrinking, x0[pick].abs() / h.abs(), torch.inf).amin(dim=1, keepdim=True)
        x = x0[pick] + 0.5 * reach.nan_to_num(posinf=0.0) * h
        beaten = (info == 0) & _beats(x, W, M[pick], target[pick], nonneg)
        _record_beaten(x, beaten, rows[pick], it, out)
        proven[pick[beaten]] = True
    return proven


def _search_known(
    W: torch.Tensor,
    f: _Factor,
    M: torch.Tensor,
    known: torch.Tensor,
    nonneg: bool,
    rows: torch.Tensor,
    out: tuple,
) -> torch.Tensor:
    """Prove known codes (b, n_atoms) the unique minimisers for M (b, d) by finding their certificates.

    The known code's support L and signs s fix the certificate's conditions: W_L y = s and |W_j y| < 1 off L
    (W_j y < 1 when nonneg). Finding such a y is a convex feasibility problem in v = W y: v must lie in the
    range of W and in the box B = {v_L = s, |v_j| <= 1 - _SEARCH_MARGIN off L}. ADMM alternates the projection
    onto the range, v -> P P^T v with the dictionary's SVD (two GEMMs for the whole batch, as the primal
    iterations), and the clamp onto B; the y with W y the range iterate is checked at _SEARCH_CHECKS by
    `_check_duals` (moved exactly onto W_L y = s, verified in W's dtype). When the true code's best
    certificate has room (max_off of 0.5-0.75 measured by HiGHS on ReLU-SAE codes of an `atoms run --quick`
    that the primal iterations left unproven after 1000 iterations), this finds one in tens of iterations.
    A code that is not the minimiser has no certificate: the box and the range do not meet, nothing is
    certified, and the direction in which ADMM's u then grows may prove the failure (`_descent`, status
    "beaten").

    Samples are searched in chunks of similar support size (the support fit pads every sample of a chunk to
    its largest support: memory chunk x K x d). A support larger than the rank of W has dependent atoms and
    is never the unique minimiser's: not searched. Proven samples are written into `out` (see `_record`;
    rows maps them to the batch); returns the mask (b,) of those proven either way.
    """
    sizes = (known != 0).sum(dim=1)
    eligible = (sizes <= f.S.numel()).nonzero().flatten()
    order = eligible[torch.argsort(sizes[eligible], stable=True)]
    settled = torch.zeros(known.shape[0], dtype=torch.bool, device=W.device)
    for active in order.split(_SEARCH_CHUNK) if order.numel() else ():
        fit = _fit_support(W, M[active], known[active] != 0, nonneg)
        fit, active = _rows(fit, fit.feasible), active[fit.feasible]
        targets = torch.zeros_like(fit.codes).scatter_(1, fit.idx, fit.signs)
        v = _box(torch.zeros_like(targets), fit.on_support, targets, nonneg)
        u = torch.zeros_like(v)
        for it in range(1, _SEARCH_CHECKS[-1] + 1):
            if active.numel() == 0:
                break
            in_range = ((v - u) @ f.P) @ f.P.T
            relaxed = _RELAX * in_range + (1 - _RELAX) * v
            v = _box(relaxed + u, fit.on_support, targets, nonneg)
            u = u + relaxed - v
            if it not in _SEARCH_CHECKS:
                continue
            checked = _check_duals(W, M[active], fit, (_least_squares_dual(f, in_range),), nonneg)
            settled[_record(checked, active, rows, it, out)] = True
            left = ~checked.certified
            beaten = torch.zeros_like(left)
            drift = (relaxed - v)[left]  # the last change of u
            if it >= _DESCENT_FROM:
                beaten[left] = _descent(
                    W, M[active[left]], _rows(fit, left), drift, nonneg, rows[active[left]], it, out
                )
            settled[active[beaten]] = True
            keep = left & ~beaten
            fit = _rows(fit, keep)
            active, targets, v, u = (t[keep] for t in (active, targets, v, u))
    return settled


def _beats(
    x: torch.Tensor, W: torch.Tensor, M: torch.Tensor, target: torch.Tensor, nonneg: bool
) -> torch.Tensor:
    """(b,) bool: the code x (b, n_atoms) reaches M (b, d) to _FEASIBLE, is >= 0 when nonneg, and has an l1
    norm under `target` (b,): proof that a known code of l1 norm above target is not the minimiser."""
    residual = torch.linalg.vector_norm(x @ W - M, dim=1)
    feasible = (residual <= _FEASIBLE) & ((x >= 0).all(dim=1) if nonneg else True)
    return feasible & (x.abs().sum(dim=1) < target)


def disproof(
    x: torch.Tensor, W: torch.Tensor, M: torch.Tensor, known: torch.Tensor, nonneg: bool, apart: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Whether codes x (b, n_atoms) show that the known codes (b, n_atoms) for the unit rows M (b, d) are not
    the unique minimisers: (beaten, tied), (b,) bool each.

    beaten: x reaches m (to 1e-9, and x >= 0 when nonneg) with an l1 norm below (1 - 1e-6) the known code's,
    as `solve_batched`'s "beaten". tied: not beaten, but x lies more than `apart` (relative Euclidean
    distance) from the known code with an l1 norm at most (1 + 1e-9) the known code's: a second minimiser
    wherever the known code is one, to the rounding of an l1 norm.
    """
    l1 = known.abs().sum(dim=1)
    beaten = _beats(x, W, M, l1 * (1 - _BEATEN), nonneg)
    level = _beats(x, W, M, l1 * (1 + _TIE), nonneg)
    far = torch.linalg.vector_norm(x - known, dim=1) > apart * torch.linalg.vector_norm(known, dim=1)
    return beaten, level & far & ~beaten


def _record_beaten(x: torch.Tensor, beaten: torch.Tensor, rows: torch.Tensor, it: int, out: tuple) -> None:
    """Write the codes x (b, n_atoms) that beat their known code (mask `beaten`, b) into `out` as in
    `_record`, status "beaten"."""
    codes, _, _, _, iterations, status = out
    originals = rows[beaten]
    codes[originals] = x[beaten]
    iterations[originals] = it
    for i in originals.tolist():
        status[i] = "beaten"


def _record(polished: _Polished, pick: torch.Tensor, rows: torch.Tensor, it: int, out: tuple) -> torch.Tensor:
    """Write the certified answers among the polished samples `pick` (positions in the active batch) into
    the outputs `out` = (codes, duals, max_off, gaps, iterations, status); returns their positions."""
    codes, duals, max_off, gaps, iterations, status = out
    done = pick[polished.certified]
    originals = rows[done]
    codes[originals] = polished.codes[polished.certified]
    duals[originals] = polished.duals[polished.certified]
    max_off[originals] = polished.max_off[polished.certified]
    gaps[originals] = polished.gaps[polished.certified]
    iterations[originals] = it
    for i in originals.tolist():
        status[i] = "optimal"
    return done


def _independent_atoms(
    f: _Factor,
    x0: torch.Tensor,
    outside: torch.Tensor,
    nonneg: bool,
    out: tuple,
) -> BatchedSolution:
    """Independent atoms (rank = n_atoms, e.g. the neuron basis): delta @ W = m has at most one solution, x0,
    which is therefore the unique minimiser, with nothing to iterate (non-negative: when x0 >= 0).

    Its certificate y solves W y = sign(x0) exactly (W has full row rank) and no atom is off the support in
    the sense that matters: a zero entry of x0 has W_j y = 0. Entries under _PRUNE of the largest are rounding
    and read as zeros. Writes into `out` (see `_record`).
    """
    codes, duals, max_off, gaps, iterations, status = out
    x = torch.where(x0.abs() <= _PRUNE * x0.abs().amax(dim=1, keepdim=True), 0.0, x0)
    ok = outside <= _FEASIBLE
    if nonneg:
        ok &= (x >= 0).all(dim=1)
    codes[ok] = x[ok]
    duals[ok] = _least_squares_dual(f, torch.sign(x[ok]))
    max_off[ok] = -torch.inf
    gaps[ok] = 0.0
    for i, good in enumerate(ok.tolist()):
        status[i] = "optimal" if good else "infeasible"
    return BatchedSolution(codes, status, duals, max_off, gaps, iterations)


def _finish_uncertified(
    W: torch.Tensor,
    f: _Factor,
    rows: torch.Tensor,
    m: torch.Tensor,
    x: torch.Tensor,
    z: torch.Tensor,
    u: torch.Tensor,
    rho: torch.Tensor,
    nonneg: bool,
    gap_tol: float,
    max_iter: int,
    out: tuple,
) -> None:
    """Samples still iterating at max_iter: "optimal" where a last polish certifies; otherwise the better of
    the polished support solution and ADMM's feasible x, bounded by the duality gap, "converged" when the
    gap is under gap_tol. Writes into `out` (see `_record`)."""
    codes, duals, max_off, gaps, _, status = out
    y0 = _least_squares_dual(f, rho * u)
    # An empty support (z = 0) polishes to the zero code, which is infeasible for a unit m: it loses below.
    polished = _polish(W, m, z != 0, y0, nonneg)
    # ADMM's x is feasible for the equality by construction (a projection); for nonneg it also needs x >= 0.
    primal = x if not nonneg else torch.where((x >= 0).all(dim=1, keepdim=True), x, torch.nan)
    p = primal.abs().sum(dim=1)
    p_pol = torch.where(polished.feasible, polished.codes.abs().sum(dim=1), torch.inf)
    use = ~(p <= p_pol)  # a NaN p (x not non-negative) prefers the polished code
    best = torch.where(use[:, None], polished.codes, primal)
    p = torch.where(use, p_pol, p)
    q = _dual_bound(_off(W, y0, nonneg), y0, m)
    take = polished.bound > q
    y = torch.where(take[:, None], polished.duals, y0)
    q = torch.maximum(q, polished.bound)
    # No feasible code at hand (p = inf): the gap is unbounded, not undefined.
    gap = torch.where(p.isinf(), torch.inf, (p - q) / p.clamp_min(torch.finfo(W.dtype).tiny))
    codes[rows] = best
    duals[rows] = y
    max_off[rows] = _off(W, y, nonneg).amax(dim=1)
    gaps[rows] = gap
    for i, g in zip(rows.tolist(), gap.tolist(), strict=True):
        status[i] = "converged" if g <= gap_tol else "unsolved"
    # The last polish, with the final dual, may certify a support that earlier tries did not.
    _record(polished, torch.arange(rows.numel(), device=rows.device), rows, max_iter, out)
