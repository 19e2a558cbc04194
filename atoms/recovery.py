"""Exact sparse recovery: basis pursuit references, OMP, solver-free certificates and the phase transition.

Basis pursuit: min ||delta||_1 s.t. delta @ W_dec = m (and delta >= 0 when `nonneg`), SPEC section 4, theorem
3. Four solvers: the batched torch solver of `atoms.batched_recovery` (ADMM, active-set polish and a dual
certificate per sample; the default), the cvxpy reference (Clarabel; one Problem per dictionary with m as a
Parameter, so a batch re-solves without re-compiling), scipy's HiGHS on the split LP delta = u - v, and
orthogonal matching pursuit. Success policy (SPEC section 7): relative error under 1e-5 is recovered, over
1e-3 is failed, in between flagged; the relative residual ||delta @ W_dec - m|| / ||m|| is held to the same
bands, and a solver status never decides alone.

Certificates that need no solver: the minimum-norm dual certificate and Tropp's exact recovery condition
(ERC). `phase_transition` measures success over a (delta = m/N, rho = k/m) grid of Gaussian problems beside
the Donoho-Tanner curve, computed here from the statistical dimension of the l1 descent cone.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections import OrderedDict
from typing import Literal, NamedTuple

import cvxpy as cp
import numpy as np
import torch
from scipy import optimize, stats

from atoms.batched_recovery import certificate_room, solve_batched
from atoms.dictionary import Dictionary
from atoms.errors import BadInputError, IllConditionedError, as_float_tensor

__all__ = [
    "FAILED_ABOVE",
    "RECOVERED_BELOW",
    "BPProblem",
    "BatchedProof",
    "Certificate",
    "PhaseTransition",
    "RecoveryResult",
    "basis_pursuit",
    "classify",
    "cvxpy_problem",
    "donoho_tanner_curve",
    "dual_certificate",
    "erc",
    "phase_transition",
    "wilson_interval",
]

RECOVERED_BELOW = 1e-5
FAILED_ABOVE = 1e-3
# Statuses that certify a solve; anything else can at best be "flagged".
_CERTIFIED = ("optimal", "converged")
_LINPROG_STATUS = {
    0: "optimal",
    1: "iteration_limit",
    2: "infeasible",
    3: "unbounded",
    4: "numerical_difficulties",
}
# Dual certificate: W_L y = sign(delta_L) must hold to this max-abs residual for y to count.
_CERTIFICATE_RESIDUAL = 1e-8
_PROBLEM_CACHE_SIZE = 4
_SOLVERS = ("batched", "cvxpy", "linprog", "omp")
# The batched solver's status for a sample it neither certified nor bounded (and did not hand to HiGHS).
_UNPROVEN = "unsolved"
# ... and for one where it found a feasible code of smaller l1 norm than the true code (use_true_codes).
_BEATEN = "beaten"
_WILSON_Z = float(stats.norm.ppf(0.975))

Array = torch.Tensor | np.ndarray


class BatchedProof(NamedTuple):
    """What the batched solver proved about each sample of a batch of B (see `atoms.batched_recovery`).

    duals (B, d): the dual certificate y, for the unit-norm m (NaN where none; y does not depend on m's
    scale). max_off (B,): max |<d_j, y>| over atoms off the support for a certified sample (< 1 proves the
    code the unique minimiser), over all atoms otherwise. gaps (B,): relative duality gap (p - q) / p of the
    answer. iterations (B,): ADMM iterations spent. fallback (B,) bool: re-solved by HiGHS after the batched
    solver proved nothing (its status then is HiGHS's, and its duals, max_off and gaps are NaN).
    """

    duals: torch.Tensor
    max_off: torch.Tensor
    gaps: torch.Tensor
    iterations: torch.Tensor
    fallback: torch.Tensor


class RecoveryResult(NamedTuple):
    """Basis pursuit (or OMP) on a batch.

    codes (batch, n_atoms) float64.
    residuals (batch,): relative ||delta @ W_dec - m|| / ||m|| (absolute when m = 0).
    statuses: the solver's word per sample. The batched solver says "optimal" only with a dual certificate
    of the unique minimiser and "converged" with a duality gap under 1e-9; a zero m is "optimal" (the zero
    code, no solve).
    With `true_codes`: errors (batch,), the relative ||delta - delta_true|| / ||delta_true||; decisions
    ("recovered" / "flagged" / "failed"), one reason per sample and the count of each decision. Without
    `true_codes` those four are None.
    proof: the batched solver's certificates (`BatchedProof`); None for the other solvers.
    """

    codes: torch.Tensor
    residuals: torch.Tensor
    statuses: list[str]
    solver: str
    seconds: float
    errors: torch.Tensor | None
    decisions: list[str] | None
    reasons: list[str] | None
    counts: dict[str, int] | None
    proof: BatchedProof | None = None


class BPProblem(NamedTuple):
    """A compiled cvxpy basis pursuit: set `m.value` (d,) and call `problem.solve`; the code is `x.value`."""

    problem: cp.Problem
    x: cp.Variable
    m: cp.Parameter


_PROBLEMS: OrderedDict[tuple, BPProblem] = OrderedDict()


def _band(value: float) -> str:
    if value < RECOVERED_BELOW:
        return "recovered"
    if value <= FAILED_ABOVE:
        return "flagged"
    return "failed"  # NaN lands here too: every comparison with NaN is False.


_ORDER = {"recovered": 0, "flagged": 1, "failed": 2}


def classify(errors: Array, residuals: Array, statuses: list[str]) -> tuple[list[str], list[str]]:
    """Decide each sample from its relative error, relative residual and solver status.

    errors, residuals: (batch,). Each is put in a band: under 1e-5 recovered, over 1e-3 failed, in between
    flagged (NaN: failed). The decision is the worse of the two bands; a sample that would be recovered but
    whose status is not "optimal"/"converged" is flagged, so a status neither rescues nor condemns a sample
    alone; a batched-solver answer with status "unsolved" (nothing proven) is flagged, never failed, and
    one with status "beaten" (a feasible code of smaller l1 norm than the true one: proof of failure) fails.
    Returns (decisions, reasons), one per sample.
    """
    err = torch.as_tensor(errors, dtype=torch.float64).reshape(-1)
    res = torch.as_tensor(residuals, dtype=torch.float64).reshape(-1)
    if not (err.shape[0] == res.shape[0] == len(statuses)):
        raise BadInputError(
            f"classify needs one error, residual and status per sample; got {err.shape[0]}, {res.shape[0]} "
            f"and {len(statuses)}."
        )
    decisions, reasons = [], []
    for e, r, status in zip(err.tolist(), res.tolist(), statuses, strict=True):
        band_e, band_r = _band(e), _band(r)
        decision = max(band_e, band_r, key=_ORDER.__getitem__)
        reason = f"relative error {e:.2e}, relative residual {r:.2e}, status {status!r}"
        if _ORDER[band_r] > _ORDER[band_e]:
            reason += f": the residual puts it in {band_r!r} whatever the status says"
        if decision == "recovered" and status not in _CERTIFIED:
            decision = "flagged"
            reason += ": values match but the solver did not certify them"
        if status == _BEATEN:
            # Proof of failure: a feasible code with a smaller l1 norm than the true code exists.
            decision = "failed"
            reason += ": a feasible code with a smaller l1 norm than the true code was found"
        elif decision == "failed" and status == _UNPROVEN:
            # An iterate the solver could not prove anything about is not evidence that recovery fails.
            decision = "flagged"
            reason += ": the batched solver proved nothing (no fallback), so failure is not established"
        decisions.append(decision)
        reasons.append(reason)
    return decisions, reasons


def _raw_atoms(W_dec: Array | Dictionary) -> torch.Tensor:
    """The checked raw atoms (n_atoms, d) float64 of an array or a Dictionary (zero/NaN atoms rejected)."""
    return (W_dec if isinstance(W_dec, Dictionary) else Dictionary(W_dec)).raw


def _dictionary_key(W: torch.Tensor, nonneg: bool) -> tuple:
    digest = hashlib.blake2b(W.contiguous().numpy().tobytes(), digest_size=16).hexdigest()
    return (tuple(W.shape), bool(nonneg), digest)


def cvxpy_problem(W_dec: Array | Dictionary, nonneg: bool = False) -> BPProblem:
    """The cached cvxpy basis pursuit for W_dec (n_atoms, d): built once per (dictionary values, nonneg).

    The key is the shape and a hash of the float64 values, so an equal copy of the dictionary reuses the
    problem. The right-hand side is a `cp.Parameter` (d,), which keeps the problem DPP: re-solves skip
    canonicalisation. The last few problems are kept (least recently used first out).
    """
    W = _raw_atoms(W_dec)
    key = _dictionary_key(W, nonneg)
    if key in _PROBLEMS:
        _PROBLEMS.move_to_end(key)
        return _PROBLEMS[key]
    n_atoms, d = W.shape
    x = cp.Variable(n_atoms, nonneg=bool(nonneg))
    m = cp.Parameter(d)
    objective = cp.sum(x) if nonneg else cp.norm1(x)
    problem = cp.Problem(cp.Minimize(objective), [W.numpy().T @ x == m])
    _PROBLEMS[key] = BPProblem(problem, x, m)
    while len(_PROBLEMS) > _PROBLEM_CACHE_SIZE:
        _PROBLEMS.popitem(last=False)
    return _PROBLEMS[key]


def _solve_cvxpy(
    W: np.ndarray, M: np.ndarray, nonneg: bool, cvxpy_solver: str
) -> tuple[np.ndarray, list[str]]:
    bp = cvxpy_problem(torch.from_numpy(W), nonneg)
    codes = np.zeros((M.shape[0], W.shape[0]))
    statuses = []
    for b, m in enumerate(M):
        bp.m.value = m
        try:
            bp.problem.solve(solver=cvxpy_solver)
        except cp.error.SolverError as e:
            statuses.append(f"solver_error: {e}")
            codes[b] = np.nan
            continue
        statuses.append(str(bp.problem.status))
        codes[b] = np.nan if bp.x.value is None else bp.x.value
    return codes, statuses


def _solve_linprog(W: np.ndarray, M: np.ndarray, nonneg: bool) -> tuple[np.ndarray, list[str]]:
    n_atoms = W.shape[0]
    # Split LP: delta = u - v with u, v >= 0 and cost 1^T (u + v); nonneg: delta itself, cost 1^T delta.
    A_eq = W.T if nonneg else np.hstack([W.T, -W.T])
    cost = np.ones(A_eq.shape[1])
    codes = np.zeros((M.shape[0], n_atoms))
    statuses = []
    for b, m in enumerate(M):
        res = optimize.linprog(cost, A_eq=A_eq, b_eq=m, bounds=(0, None), method="highs")
        statuses.append(_LINPROG_STATUS.get(res.status, f"status_{res.status}"))
        if res.x is None:
            codes[b] = np.nan
        else:
            codes[b] = res.x if nonneg else res.x[:n_atoms] - res.x[n_atoms:]
    return codes, statuses


def _solve_omp(W: np.ndarray, M: np.ndarray, nonneg: bool, k: int | None) -> tuple[np.ndarray, list[str]]:
    """OMP: add the atom of largest cosine with the residual, refit by least squares (NNLS if nonneg)."""
    n_atoms, d = W.shape
    U = W / np.linalg.norm(W, axis=1, keepdims=True)
    steps = k if k is not None else min(n_atoms, d)
    codes = np.zeros((M.shape[0], n_atoms))
    statuses = []
    for b, m in enumerate(M):
        support: list[int] = []
        coef = np.zeros(0)
        r = m.copy()
        status = "stopped_at_k"
        for _ in range(steps):
            if np.linalg.norm(r) <= 1e-12 * np.linalg.norm(m):
                break
            corr = U @ r if nonneg else np.abs(U @ r)
            corr[support] = -np.inf
            j = int(np.argmax(corr))
            if corr[j] <= 0:
                break
            support.append(j)
            A = W[support].T
            coef = optimize.nnls(A, m)[0] if nonneg else np.linalg.lstsq(A, m, rcond=None)[0]
            r = m - A @ coef
        if np.linalg.norm(r) <= 1e-10 * np.linalg.norm(m):
            status = "converged"
        codes[b, support] = coef
        statuses.append(status)
    return codes, statuses


def basis_pursuit(
    W_dec: Array | Dictionary,
    m: Array,
    *,
    nonneg: bool = False,
    solver: Literal["batched", "cvxpy", "linprog", "omp"] = "batched",
    k: int | None = None,
    true_codes: Array | None = None,
    cvxpy_solver: str = "CLARABEL",
    fallback: bool = True,
    device: str | torch.device | None = None,
    use_true_codes: bool = True,
) -> RecoveryResult:
    """Solve min ||delta||_1 s.t. delta @ W_dec = m (delta >= 0 if `nonneg`) for each sample of a batch.

    W_dec: (n_atoms, d) tensor/array (rows are atoms, used as given: no normalisation) or a `Dictionary` (its
    raw atoms).  m: (batch, d) or (d,).
    true_codes: (batch, n_atoms) or (n_atoms,); enables errors and decisions.
    solver: "batched" (default: `atoms.batched_recovery.solve_batched`, the whole batch at once in torch on
    `device` (W_dec's device when None), float64; each answer proven by a dual certificate or a duality gap,
    see `RecoveryResult.proof`; with `fallback`, samples it proves nothing about are re-solved by HiGHS),
    With `true_codes` and `use_true_codes`, the batched solver first searches each true code's certificate
    (status "optimal" when found), and stops on a sample as soon as it holds a feasible code of smaller l1
    norm than the true code (status "beaten", decision "failed", the code returned is that feasible code,
    not the minimiser; `atoms.batched_recovery.solve_batched`, `known`): the proofs a recovery experiment
    needs, far sooner than solving every problem to optimality.
    "cvxpy" (reference; `cvxpy_problem` is built once per dictionary and re-solved per sample with
    `cvxpy_solver`, Clarabel by default, whose default tolerances leave errors near 1e-8, far inside the 1e-5
    band), "linprog" (HiGHS on the split LP), or "omp" (`k` steps, or until the residual vanishes when k is
    None; greedy pursuit rather than basis pursuit, the second recovery algorithm of theorem 3).
    Each sample is solved with m scaled to unit norm and the code scaled back (basis pursuit is positively
    homogeneous), so solver tolerances mean the same thing for every sample.
    """
    start = time.perf_counter()
    W = _raw_atoms(W_dec)
    n_atoms, d = W.shape
    M = as_float_tensor(m, "m", d=d, dtype=torch.float64)
    if M.ndim > 2:
        raise BadInputError(f"m has shape {tuple(M.shape)}; pass (batch, d) or (d,).")
    M = M.reshape(-1, d)
    if solver not in _SOLVERS:
        raise BadInputError(f"solver must be one of {_SOLVERS}, got {solver!r}.")
    if solver == "cvxpy" and cvxpy_solver.upper() not in cp.installed_solvers():
        raise BadInputError(
            f"cvxpy_solver {cvxpy_solver!r} is not installed; choose one of {cp.installed_solvers()} "
            "(CLARABEL is the reference)."
        )
    if k is not None:
        if solver != "omp":
            raise BadInputError(
                f"k is the number of OMP steps and only applies to solver='omp' (got {solver!r})."
            )
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= min(n_atoms, d):
            raise BadInputError(f"k must be an int in [1, min(n_atoms, d) = {min(n_atoms, d)}], got {k!r}.")
    truth = None
    if true_codes is not None:
        truth = as_float_tensor(true_codes, "true_codes", d=n_atoms, dtype=torch.float64).reshape(-1, n_atoms)
        if truth.shape[0] != M.shape[0]:
            raise BadInputError(
                f"true_codes has {truth.shape[0]} samples but m has {M.shape[0]}; pass one code per sample."
            )
    scale = torch.linalg.vector_norm(M, dim=1)
    nonzero = scale > 0
    unit_m = M[nonzero] / scale[nonzero, None]
    Mn = unit_m.numpy()
    Wn = W.numpy()
    proof = None
    if solver == "batched":
        known = None
        if truth is not None and use_true_codes:
            known = truth[nonzero] / scale[nonzero, None]
        solved, solved_status, proof = _solve_batched(W, unit_m, nonneg, fallback, device, known)
    elif solver == "cvxpy":
        solved, solved_status = _solve_cvxpy(Wn, Mn, nonneg, cvxpy_solver)
    elif solver == "linprog":
        solved, solved_status = _solve_linprog(Wn, Mn, nonneg)
    else:
        solved, solved_status = _solve_omp(Wn, Mn, nonneg, k)
    codes = torch.zeros(M.shape[0], n_atoms, dtype=torch.float64)
    codes[nonzero] = torch.from_numpy(solved) * scale[nonzero, None]
    # m = 0: the zero code is the unique minimiser, no solver needed.
    statuses = ["optimal"] * M.shape[0]
    for i, status in zip(nonzero.nonzero().flatten().tolist(), solved_status, strict=True):
        statuses[i] = status
    residuals = torch.linalg.vector_norm(codes @ W - M, dim=1) / torch.where(nonzero, scale, 1.0)
    errors = decisions = reasons = counts = None
    if truth is not None:
        norms = torch.linalg.vector_norm(truth, dim=1)
        errors = torch.linalg.vector_norm(codes - truth, dim=1) / torch.where(norms > 0, norms, 1.0)
        decisions, reasons = classify(errors, residuals, statuses)
        counts = {name: decisions.count(name) for name in _ORDER}
    if proof is not None:
        proof = _expand_proof(proof, nonzero, d)
    return RecoveryResult(
        codes,
        residuals,
        statuses,
        solver,
        time.perf_counter() - start,
        errors,
        decisions,
        reasons,
        counts,
        proof,
    )


def _solve_batched(
    W: torch.Tensor,
    Mn: torch.Tensor,
    nonneg: bool,
    fallback: bool,
    device: str | torch.device | None,
    known: torch.Tensor | None,
) -> tuple[np.ndarray, list[str], BatchedProof]:
    """The batched solver on unit rows Mn (b, d); unproven samples re-solved by HiGHS when `fallback`."""
    target = torch.device(device) if device is not None else W.device
    known = None if known is None else known.to(target)
    solution = solve_batched(W.to(target), Mn.to(target), nonneg=nonneg, known=known)
    codes = solution.codes.cpu().numpy()
    statuses = list(solution.status)
    redo = [i for i, status in enumerate(statuses) if status == "unsolved"] if fallback else []
    if redo:
        codes[redo], highs = _solve_linprog(W.numpy(), Mn[redo].numpy(), nonneg)
        for i, status in zip(redo, highs, strict=True):
            statuses[i] = status
    used = torch.zeros(len(statuses), dtype=torch.bool)
    used[redo] = True
    # A HiGHS answer carries HiGHS's status, not the batched solver's (unproven) dual and gap.
    duals, max_off, gaps = (t.cpu().clone() for t in (solution.duals, solution.max_off, solution.gaps))
    for t in (duals, max_off, gaps):
        t[used] = torch.nan
    proof = BatchedProof(duals, max_off, gaps, solution.iterations.cpu(), used)
    return codes, statuses, proof


def _expand_proof(proof: BatchedProof, nonzero: torch.Tensor, d: int) -> BatchedProof:
    """The proof of the non-zero rows spread over the whole batch; a zero m gets y = 0 and gap 0 (the zero
    code is the unique minimiser, with nothing to certify)."""
    B = nonzero.shape[0]
    duals = torch.zeros(B, d, dtype=torch.float64)
    max_off = torch.full((B,), -math.inf, dtype=torch.float64)
    gaps = torch.zeros(B, dtype=torch.float64)
    iterations = torch.zeros(B, dtype=torch.int64)
    fallback = torch.zeros(B, dtype=torch.bool)
    for full, part in zip((duals, max_off, gaps, iterations, fallback), proof, strict=True):
        full[nonzero] = part.to(full.dtype)
    return BatchedProof(duals, max_off, gaps, iterations, fallback)


class Certificate(NamedTuple):
    """Minimum-norm dual certificate for basis pursuit at a code delta.

    ok: y certifies that delta is the unique minimiser: the support's atoms are independent,
    W_L y = sign(delta_L) holds to 1e-8 and every off-support |<d_j, y>| < 1 (<d_j, y> < 1 when nonneg), with
    room for the rounding in y and in the products (`atoms.batched_recovery.certificate_room`).
    ok = False does not prove failure: another y might still certify.
    y (d,).  max_off_support: max_{j not in L} |<d_j, y>| (the signed max when nonneg; -inf with no atom off
    the support).  residual: max |W_L y - sign(delta_L)|.  support (k,) int64.  reason: why not ok.
    """

    ok: bool
    y: torch.Tensor
    max_off_support: float
    residual: float
    support: torch.Tensor
    reason: str


def _support(delta: torch.Tensor, support_tol: float) -> torch.Tensor:
    peak = float(delta.abs().max())
    if peak == 0:
        raise BadInputError("delta is the zero code; a certificate needs at least one non-zero entry.")
    return (delta.abs() > support_tol * peak).nonzero().flatten()


def dual_certificate(
    W_dec: Array | Dictionary, delta: Array, *, nonneg: bool = False, support_tol: float = 1e-9
) -> Certificate:
    """Check the minimum-norm dual certificate of basis pursuit at delta (n_atoms,) for W_dec (n_atoms, d).

    Support L: entries with |delta_j| > support_tol * max|delta|. y = W_L^T a with (W_L W_L^T) a = s, solved
    by Cholesky, is the minimum-norm solution of W_L y = s, s = sign(delta_L) (all ones when nonneg). delta is
    the unique solution of basis pursuit on W_dec as given if additionally max_{j not in L} |<d_j, y>| < 1
    (for nonneg: <d_j, y> < 1), with d_j the raw rows of W_dec (Fuchs 2004; Tropp 2006).
    """
    W = _raw_atoms(W_dec)
    n_atoms, d = W.shape
    code = as_float_tensor(delta, "delta", d=n_atoms, dtype=torch.float64)
    if code.ndim != 1:
        raise BadInputError(f"delta has shape {tuple(code.shape)}; pass one code of shape ({n_atoms},).")
    L = _support(code, support_tol)
    if nonneg and bool((code[L] < 0).any()):
        raise BadInputError(
            f"delta has negative entries at {L[code[L] < 0][:10].tolist()} but nonneg=True; pass "
            "nonneg=False or a non-negative code."
        )
    s = torch.sign(code[L])
    WL = W[L]
    off = torch.ones(n_atoms, dtype=torch.bool)
    off[L] = False
    chol, info = torch.linalg.cholesky_ex(WL @ WL.T)
    if int(info) != 0:
        reason = "the support's atoms are linearly dependent (W_L W_L^T is not positive definite)"
        return Certificate(False, torch.zeros(d, dtype=torch.float64), math.nan, math.inf, L, reason)
    y = WL.T @ torch.cholesky_solve(s[:, None], chol)[:, 0]
    error = WL @ y - s
    residual = float(error.abs().max())
    inner = W[off] @ y
    if inner.numel() == 0:
        max_off = -math.inf
    else:
        max_off = float(inner.max() if nonneg else inner.abs().max())
    # What rounding in y and in the products may hide (atoms.batched_recovery.certificate_room).
    room = float(certificate_room(chol[None], error[None], y[None], torch.linalg.vector_norm(W, dim=1).max()))
    reasons = []
    if not residual <= _CERTIFICATE_RESIDUAL:
        reasons.append(f"W_L y = sign(delta_L) holds only to {residual:.1e} (ill-conditioned support)")
    if not max_off + room < 1:
        reasons.append(f"an off-support atom reaches {max_off:.6f} (+ {room:.1e} for rounding), not < 1")
    return Certificate(not reasons, y, max_off, residual, L, "; ".join(reasons))


def erc(W_dec: Array | Dictionary, support: Array | list[int]) -> float:
    """Tropp's exact recovery coefficient max_{j not in L} ||pinv(D_L) d_j||_1 for a support L.

    W_dec (n_atoms, d) rows are atoms, used as given (unit-normalise or whiten first for coherence bounds);
    D_L = W_dec[L]^T (d, k). pinv(D_L) d_j is computed as the least-squares solution of D_L c = d_j (lstsq, no
    pseudo-inverse is formed). ERC(L) < 1 implies basis pursuit and OMP recover every code supported on L
    (Tropp 2004).
    """
    W = _raw_atoms(W_dec)
    n_atoms = W.shape[0]
    L = torch.as_tensor(np.asarray(support)).reshape(-1)
    if L.numel() == 0 or L.is_floating_point() or L.dtype == torch.bool:
        raise BadInputError(f"support must be a non-empty list of atom indices (ints), got {support!r}.")
    L = L.long()
    if int(L.min()) < 0 or int(L.max()) >= n_atoms or torch.unique(L).numel() != L.numel():
        raise BadInputError(
            f"support {L.tolist()[:20]} must hold distinct indices in [0, {n_atoms}); remove repeats and "
            "out-of-range entries."
        )
    off = torch.ones(n_atoms, dtype=torch.bool)
    off[L] = False
    if not bool(off.any()):
        raise BadInputError("support covers every atom; ERC needs at least one atom outside the support.")
    coef, _, rank, _ = np.linalg.lstsq(W[L].T.numpy(), W[off].T.numpy(), rcond=None)
    if rank < L.numel():
        raise IllConditionedError(
            f"the {L.numel()} atoms of the support span only rank {rank}; ERC needs linearly independent "
            "atoms on the support. Use a smaller support or remove duplicate atoms."
        )
    return float(np.abs(coef).sum(axis=0).max())


def wilson_interval(successes: Array, trials: int, z: float = _WILSON_Z) -> tuple[torch.Tensor, torch.Tensor]:
    """Wilson score interval (95% by default) of the binomial rate successes / trials: (low, high) float64."""
    if isinstance(trials, bool) or not isinstance(trials, (int, np.integer)) or trials < 1:
        raise BadInputError(f"trials must be an int >= 1, got {trials!r}.")
    k = torch.as_tensor(successes, dtype=torch.float64)
    if bool(((k < 0) | (k > trials)).any()):
        raise BadInputError(f"successes must lie in [0, trials = {trials}], got {successes!r}.")
    p = k / trials
    denom = 1 + z * z / trials
    center = (p + z * z / (2 * trials)) / denom
    half = z / denom * torch.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials))
    # The exact interval lies in [0, 1]; the clamps only absorb rounding at 0 and `trials` successes.
    return (center - half).clamp_min(0.0), (center + half).clamp_max(1.0)


def _tail_second_moment(tau: float) -> float:
    """E[(g - tau)_+^2], g ~ N(0, 1): int_tau^inf (u - tau)^2 phi(u) du = (1 + tau^2) Q(tau) - tau phi(tau)"""
    return (1 + tau * tau) * stats.norm.sf(tau) - tau * stats.norm.pdf(tau)


def _statistical_dimension(rho_n: float, nonneg: bool) -> float:
    """psi(rho_N) = inf_{tau >= 0} rho_N (1 + tau^2) + (1 - rho_N) * sides * E[(g - tau)_+^2].

    The normalised statistical dimension of the l1 descent cone at a (rho_N * N)-sparse point (Amelunxen,
    Lotz, McCoy, Tropp, "Living on the edge", 2014, section 4): sides = 2 for l1 (off-support subgradients
    fill [-tau, tau], two tails), sides = 1 for l1 on the non-negative orthant (they fill (-inf, tau], one
    tail).
    """
    if rho_n >= 1:
        return 1.0
    sides = 1 if nonneg else 2

    def objective(tau: float) -> float:
        return rho_n * (1 + tau * tau) + (1 - rho_n) * sides * _tail_second_moment(tau)

    best = optimize.minimize_scalar(objective, bounds=(0.0, 40.0), method="bounded", options={"xatol": 1e-12})
    return float(best.fun)


def donoho_tanner_curve(delta_grid: Array | list[float], nonneg: bool = False) -> torch.Tensor:
    """The l1 phase transition rho*(delta) in the (delta = m/N, rho = k/m) plane; float64, delta_grid's shape.

    Basis pursuit on a Gaussian m x N system succeeds with high probability for k/m below rho*(delta) and
    fails above it. Derived from the statistical dimension psi (`_statistical_dimension`): the transition sits
    at m/N = psi(k/N); with k/N = rho * delta, rho*(delta) solves psi(rho * delta) = delta (Brent's method).
    This coincides with Donoho-Tanner's weak threshold for the cross-polytope (signed) and the simplex
    (nonneg).
    """
    grid = torch.as_tensor(np.asarray(delta_grid, dtype=np.float64))
    if grid.numel() == 0 or not bool(torch.isfinite(grid).all()) or bool(((grid <= 0) | (grid > 1)).any()):
        raise BadInputError(
            f"delta_grid values must be finite numbers in (0, 1] (delta = m/N), got {delta_grid!r}."
        )
    out = []
    for delta in grid.reshape(-1).tolist():
        gap = _statistical_dimension(delta, nonneg) - delta
        if gap <= 0:
            out.append(1.0)
            continue

        def excess(rho: float, delta: float = delta) -> float:
            return _statistical_dimension(rho * delta, nonneg) - delta

        out.append(optimize.brentq(excess, 0.0, 1.0, xtol=1e-12))
    return torch.tensor(out, dtype=torch.float64).reshape(grid.shape)


class PhaseTransition(NamedTuple):
    """Basis pursuit success over a grid, with Wilson 95% intervals and the theoretical curve.

    deltas (n_delta,) = m/N; rhos (n_rho,) = k/m; measurements (n_delta,): the m used; sparsities
    (n_delta, n_rho): the k used; successes, flagged, failures (n_delta, n_rho) int64 counts out of `trials`;
    rates = successes / trials with ci_low, ci_high; curve (n_delta,): rho*(delta) from `donoho_tanner_curve`.
    codes_per_dictionary: trials sharing one Gaussian dictionary.
    """

    n: int
    deltas: torch.Tensor
    rhos: torch.Tensor
    trials: int
    nonneg: bool
    solver: str
    codes_per_dictionary: int
    measurements: torch.Tensor
    sparsities: torch.Tensor
    successes: torch.Tensor
    flagged: torch.Tensor
    failures: torch.Tensor
    rates: torch.Tensor
    ci_low: torch.Tensor
    ci_high: torch.Tensor
    curve: torch.Tensor
    seconds: float


def _grid(values: Array | list[float], name: str) -> torch.Tensor:
    grid = torch.as_tensor(np.asarray(values, dtype=np.float64)).reshape(-1)
    if grid.numel() == 0 or not bool(torch.isfinite(grid).all()) or bool(((grid <= 0) | (grid > 1)).any()):
        raise BadInputError(f"{name} must be a non-empty list of numbers in (0, 1], got {values!r}.")
    return grid


def phase_transition(
    n: int = 100,
    deltas: Array | list[float] = (0.25, 0.5, 0.75),
    rhos: Array | list[float] = (0.1, 0.3, 0.5, 0.7),
    trials: int = 20,
    nonneg: bool = False,
    seed: int = 0,
    solver: Literal["batched", "cvxpy", "linprog", "omp"] = "batched",
    codes_per_dictionary: int = 10,
) -> PhaseTransition:
    """Success rate of basis pursuit on Gaussian problems over a (delta = m/N, rho = k/m) grid.

    n: the number of atoms N. For each cell, m = round(delta * N) and k = max(1, round(rho * m)); the trials
    come in groups of `codes_per_dictionary` that share a fresh N x m Gaussian dictionary, each trial a code
    with k non-zeros on a uniform random support, N(0, 1) values (|N(0, 1)| when nonneg); a group is one
    call of `basis_pursuit`, so the batched solver gets batches. A trial succeeds when `basis_pursuit`
    decides "recovered"; flagged and failed trials are counted apart. The Wilson interval treats the trials
    as independent: exact for codes_per_dictionary = 1 (a fresh dictionary per trial), and close for small
    groups because the success rate given a Gaussian dictionary concentrates as N grows.
    """
    start = time.perf_counter()
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 2:
        raise BadInputError(f"n (the number of atoms) must be an int >= 2, got {n!r}.")
    if isinstance(trials, bool) or not isinstance(trials, (int, np.integer)) or trials < 1:
        raise BadInputError(f"trials must be an int >= 1, got {trials!r}.")
    group = codes_per_dictionary
    if isinstance(group, bool) or not isinstance(group, (int, np.integer)) or group < 1:
        raise BadInputError(f"codes_per_dictionary must be an int >= 1, got {group!r}.")
    delta_grid, rho_grid = _grid(deltas, "deltas"), _grid(rhos, "rhos")
    measurements = torch.clamp(torch.round(delta_grid * n), min=1).long()
    sparsities = torch.clamp(torch.round(rho_grid[None, :] * measurements[:, None]), min=1).long()
    counts = {name: torch.zeros(len(delta_grid), len(rho_grid), dtype=torch.int64) for name in _ORDER}
    rng = np.random.default_rng(seed)
    for a, m in enumerate(measurements.tolist()):
        for b, k in enumerate(sparsities[a].tolist()):
            for first in range(0, trials, group):
                W = rng.standard_normal((n, m))
                codes = np.zeros((min(group, trials - first), n))
                for code in codes:
                    values = rng.standard_normal(k)
                    code[rng.choice(n, size=k, replace=False)] = np.abs(values) if nonneg else values
                steps = min(k, m) if solver == "omp" else None
                result = basis_pursuit(W, codes @ W, nonneg=nonneg, solver=solver, k=steps, true_codes=codes)
                for decision in result.decisions:
                    counts[decision][a, b] += 1
    rates = counts["recovered"].double() / trials
    low, high = wilson_interval(counts["recovered"], trials)
    return PhaseTransition(
        n=int(n),
        deltas=delta_grid,
        rhos=rho_grid,
        trials=int(trials),
        nonneg=bool(nonneg),
        solver=solver,
        codes_per_dictionary=int(min(group, trials)),
        measurements=measurements,
        sparsities=sparsities,
        successes=counts["recovered"],
        flagged=counts["flagged"],
        failures=counts["failed"],
        rates=rates,
        ci_low=low,
        ci_high=high,
        curve=donoho_tanner_curve(delta_grid, nonneg),
        seconds=time.perf_counter() - start,
    )
