"""Exact sparse recovery: basis pursuit references, OMP, solver-free certificates and the phase transition.

Basis pursuit: min ||delta||_1 s.t. delta @ W_dec = m (and delta >= 0 when `nonneg`), SPEC section 4, theorem
3. Four solvers: the batched torch solver of `atoms.batched_recovery` (ADMM, active-set polish and a dual
certificate per sample; the default), the cvxpy reference (Clarabel; one Problem per dictionary with m as a
Parameter, so a batch re-solves without re-compiling), scipy's HiGHS on the split LP delta = u - v, and
orthogonal matching pursuit. Success policy (SPEC section 7): relative error under 1e-5 is recovered, over
1e-3 is failed, in between flagged; the relative residual ||delta @ W_dec - m|| / ||m|| is held to the same
bands, and a solver status never decides alone. Every answer, whichever solver gave it, is called "optimal"
(and can be recovered) only once a dual certificate of unique optimality has been checked on it; a true code
that another feasible code of smaller or equal l1 norm rivals is failed (`classify`).

Certificates that need no solver: the minimum-norm dual certificate and Tropp's exact recovery condition
(ERC). `phase_transition` measures success over a (delta = m/N, rho = k/m) grid of Gaussian problems beside
the Donoho-Tanner curve, computed here from the statistical dimension of the l1 descent cone.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections import OrderedDict
from collections.abc import Iterator
from typing import TYPE_CHECKING, Literal, NamedTuple

import numpy as np
import torch
from scipy import optimize

from atoms.batched_recovery import certificate_room, certify, disproof, solve_batched
from atoms.dictionary import Dictionary
from atoms.errors import BadInputError, IllConditionedError, as_float_tensor

if TYPE_CHECKING:
    import cvxpy as cp

__all__ = [
    "FAILED_ABOVE",
    "RECOVERED_BELOW",
    "BPProblem",
    "BatchedProof",
    "Certificate",
    "PhaseTransition",
    "RecoveryResult",
    "basis_pursuit",
    "certify_codes",
    "classify",
    "cvxpy_problem",
    "donoho_tanner_curve",
    "dual_certificate",
    "erc",
    "erc_of_atoms",
    "phase_transition",
    "wilson_interval",
]

RECOVERED_BELOW = 1e-5
FAILED_ABOVE = 1e-3
# The status of an answer with a dual certificate of uniqueness checked on it; nothing else is recovered.
_CERTIFIED = "optimal"
# Solver words that claim a solution: without a certificate they become "uncertified".
_CLAIMS = ("optimal", "converged")
_UNCERTIFIED = "uncertified"
# Batched-solver statuses that rest on the solver's own checked proof (see `atoms.batched_recovery`).
_PROVEN = {
    "optimal": "dual certificate of uniqueness checked",
    "beaten": "a feasible code of smaller l1 norm than the true code was found",
    "infeasible": "m is outside the span of the atoms",
}
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
# Proofs that the true code is not the unique minimiser: a feasible code of smaller l1 norm, or one apart from
# it of equal l1 norm (`atoms.batched_recovery.disproof`).
_BEATEN = "beaten"
_TIED = "tied"
# scipy.stats.norm.ppf(0.975), written out: cvxpy and scipy.stats are imported only by the functions that
# use them, so that training code importing atoms.metrics does not pay for them.
_WILSON_Z = 1.959963984540054

Array = torch.Tensor | np.ndarray


class BatchedProof(NamedTuple):
    """What the batched solver proved about each sample of a batch of B (see `atoms.batched_recovery`).

    duals (B, d): the dual certificate y, for the unit-norm m (NaN where none; y does not depend on m's
    scale). max_off (B,): max |<d_j, y>| over atoms off the support for a certified sample (status
    "optimal": < 1 proves the code the unique minimiser), over all atoms otherwise. gaps (B,): relative
    duality gap (p - q) / p of the answer. iterations (B,): ADMM iterations spent. fallback (B,) bool:
    re-solved by HiGHS after the batched solver proved nothing; its gap is then NaN, and its dual and max_off
    are those of the certificate checked on HiGHS's answer (NaN when none was found).
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
    statuses, whatever the solver: "optimal" (a dual certificate of uniqueness was checked on the answer: it
    is the unique minimiser; a zero m is "optimal", the zero code), "uncertified" (the solver claims a
    solution, "optimal" or "converged", but no certificate was found and nothing refutes it), "beaten" /
    "tied" (with true codes: a feasible code of smaller / equal l1 norm apart from the true code is known, so
    the true code is not the unique minimiser; that code is returned), "infeasible" (m outside the span),
    "unsolved" (the batched solver proved nothing and did not fall back), or a solver's own failure word
    ("iteration_limit", "stopped_at_k", "solver_error: ...", ...).
    evidence: one note per sample on what its status rests on: which solver answered with what word, the
    certificate's max_off, or how a rival code was found.
    With `true_codes`: errors (batch,), the relative ||delta - delta_true|| / ||delta_true||; decisions
    ("recovered" / "flagged" / "failed", `classify`), one reason per sample and the count of each decision.
    Without `true_codes` those four are None.
    proof: the batched solver's certificates (`BatchedProof`); None for the other solvers.
    """

    codes: torch.Tensor
    residuals: torch.Tensor
    statuses: list[str]
    evidence: list[str]
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


def classify(
    errors: Array, residuals: Array, statuses: list[str], evidence: list[str] | None = None
) -> tuple[list[str], list[str]]:
    """Decide each sample from its relative error, relative residual and status (`RecoveryResult.statuses`).

    errors, residuals: (batch,). Each is put in a band: under 1e-5 recovered, over 1e-3 failed, in between
    flagged (NaN: failed). The decision is the worse of the two bands, then the status: a sample that would
    be recovered is flagged unless its status is "optimal" (a dual certificate of uniqueness checked on the
    answer), so no solver's word alone recovers a sample; "beaten" and "tied" (a feasible code of smaller
    or equal l1 norm apart from the true code: the true code is not the unique minimiser, and a solver's
    answer would be arbitrary) fail; a failed band with status "unsolved" (the batched solver proved
    nothing) is flagged, never failed. evidence: one note per sample, appended to its reason.
    Returns (decisions, reasons), one per sample.
    """
    err = torch.as_tensor(errors, dtype=torch.float64).reshape(-1)
    res = torch.as_tensor(residuals, dtype=torch.float64).reshape(-1)
    if not (err.shape[0] == res.shape[0] == len(statuses)):
        raise BadInputError(
            f"classify needs one error, residual and status per sample; got {err.shape[0]}, {res.shape[0]} "
            f"and {len(statuses)}."
        )
    notes = [""] * len(statuses) if evidence is None else [f" ({note})" for note in evidence]
    if len(notes) != len(statuses):
        raise BadInputError(
            f"classify needs one evidence note per sample; got {len(notes)} for {len(statuses)}."
        )
    decisions, reasons = [], []
    for e, r, status, note in zip(err.tolist(), res.tolist(), statuses, notes, strict=True):
        band_e, band_r = _band(e), _band(r)
        decision = max(band_e, band_r, key=_ORDER.__getitem__)
        reason = f"relative error {e:.2e}, relative residual {r:.2e}, status {status!r}"
        if _ORDER[band_r] > _ORDER[band_e]:
            reason += f": the residual puts it in {band_r!r} whatever the status says"
        if status == _BEATEN:
            # Proof of failure: a feasible code with a smaller l1 norm than the true code exists.
            decision = "failed"
            reason += ": a feasible code with a smaller l1 norm than the true code was found"
        elif status == _TIED:
            # The true code is at best one of several minimisers: basis pursuit's answer is arbitrary.
            decision = "failed"
            reason += ": a feasible code apart from the true code has the same l1 norm (not unique)"
        elif decision == "recovered" and status != _CERTIFIED:
            decision = "flagged"
            reason += ": values match but no dual certificate of uniqueness was checked on the answer"
        elif decision == "failed" and status == _UNPROVEN:
            # An iterate the solver could not prove anything about is not evidence that recovery fails.
            decision = "flagged"
            reason += ": the batched solver proved nothing (no fallback), so failure is not established"
        decisions.append(decision)
        reasons.append(reason + note)
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
    canonicalisation. The last few problems are kept (least recently used first out). W_dec on any device
    (copied to the CPU).
    """
    W = _raw_atoms(W_dec).cpu()
    key = _dictionary_key(W, nonneg)
    if key in _PROBLEMS:
        _PROBLEMS.move_to_end(key)
        return _PROBLEMS[key]
    import cvxpy as cp

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
    import cvxpy as cp

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
    `device` (W_dec's device when None), float64; each answer proven by a dual certificate or bounded by a
    duality gap, see `RecoveryResult.proof`; with `fallback`, samples it proves nothing about are re-solved
    by HiGHS). With `true_codes` and `use_true_codes`, the batched solver first searches each true code's
    certificate (status "optimal" when found), and stops on a sample as soon as it holds a feasible code of
    smaller l1 norm than the true code (status "beaten", decision "failed", the code returned is that
    feasible code, not the minimiser; `atoms.batched_recovery.solve_batched`, `known`): the proofs a recovery
    experiment needs, far sooner than solving every problem to optimality.
    "cvxpy" (reference; `cvxpy_problem` is built once per dictionary and re-solved per sample with
    `cvxpy_solver`, Clarabel by default, whose default tolerances leave errors near 1e-8, far inside the 1e-5
    band), "linprog" (HiGHS on the split LP), or "omp" (`k` steps, or until the residual vanishes when k is
    None; greedy pursuit rather than basis pursuit, the second recovery algorithm of theorem 3).
    Each sample is solved with m scaled to unit norm and the code scaled back (basis pursuit is positively
    homogeneous), so solver tolerances mean the same thing for every sample.
    Certification, whatever the solver: every answer the batched solver has not proven itself (HiGHS's,
    cvxpy's, OMP's, a gap-bounded one) is read on its support and refitted there, and its dual certificate
    checked or searched for (`atoms.batched_recovery.certify`, on `device`): status "optimal" and the refit
    as the code when it holds, "uncertified" (a claimed solution) otherwise. With `true_codes`, an answer not
    so proven is then confronted with rivals of the true code (`_refute`): itself, and where it matches the
    true code, a move along dependent support atoms and a second HiGHS solve (not when the batched solver
    runs with `fallback` False); a feasible rival of smaller or equal l1 norm apart from the true code makes
    it "beaten" or "tied" (failed), and is returned as its code.
    Devices: "cvxpy", "linprog", "omp" and the HiGHS fallback copy W_dec and m to the CPU themselves; every
    tensor of the result (codes, residuals, errors, proof) is on m's device.
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
    if solver == "cvxpy":
        import cvxpy as cp

        if cvxpy_solver.upper() not in cp.installed_solvers():
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
        truth = truth.to(M.device)
    scale = torch.linalg.vector_norm(M, dim=1)
    nonzero = scale > 0
    unit_m = M[nonzero] / scale[nonzero, None]
    unit_truth = None if truth is None else truth[nonzero] / scale[nonzero, None]
    target = torch.device(device) if device is not None else W.device
    proof = None
    if solver == "batched":
        known = unit_truth if use_true_codes else None
        solved, words, proof = _solve_batched(W, unit_m, nonneg, fallback, target, known)
        sources = ["HiGHS fallback" if used else "batched" for used in proof.fallback.tolist()]
    else:
        solved, words = _solve_on_host(solver, W, unit_m, nonneg, k, cvxpy_solver)
        sources = [solver] * len(words)
    checked = _check_answers(W.to(target), unit_m.to(target), solved.to(target), words, sources, nonneg)
    if unit_truth is not None:
        checked = _refute(W, unit_m, unit_truth, checked, nonneg, highs=solver != "batched" or fallback)
    W = W.to(M.device)
    codes = torch.zeros(M.shape[0], n_atoms, dtype=torch.float64, device=M.device)
    codes[nonzero] = checked.codes.to(M.device) * scale[nonzero, None]
    # m = 0: the zero code is the unique minimiser, no solver needed.
    statuses = [_CERTIFIED] * M.shape[0]
    evidence = ["m = 0: the zero code is the unique minimiser"] * M.shape[0]
    rows = nonzero.nonzero().flatten().tolist()
    for i, status, note in zip(rows, checked.statuses, checked.evidence, strict=True):
        statuses[i], evidence[i] = status, note
    residuals = torch.linalg.vector_norm(codes @ W - M, dim=1) / torch.where(nonzero, scale, 1.0)
    errors = decisions = reasons = counts = None
    if truth is not None:
        norms = torch.linalg.vector_norm(truth, dim=1)
        errors = torch.linalg.vector_norm(codes - truth, dim=1) / torch.where(norms > 0, norms, 1.0)
        decisions, reasons = classify(errors, residuals, statuses, evidence)
        counts = {name: decisions.count(name) for name in _ORDER}
    if proof is not None:
        proof = _expand_proof(_with_certificates(proof, checked), nonzero, d)
    return RecoveryResult(
        codes,
        residuals,
        statuses,
        evidence,
        solver,
        time.perf_counter() - start,
        errors,
        decisions,
        reasons,
        counts,
        proof,
    )


def certify_codes(W_dec: Array | Dictionary, m: Array, codes: Array, *, nonneg: bool = False) -> torch.Tensor:
    """Whether each code is the certified basis-pursuit answer for its m: (batch,) bool on m's device.

    W_dec (n_atoms, d) or a Dictionary (its raw atoms); m (batch, d) or (d,); codes (batch, n_atoms), from any
    solver. A code counts when a dual certificate of uniqueness checks on its refit
    (`atoms.batched_recovery.certify`, with the rounding room of `certificate_room`) and the code matches
    that refit to the recovery band (relative error under 1e-5): what `basis_pursuit` calls "optimal". A
    zero m counts with the zero code; a code holding NaN never does.
    """
    W = _raw_atoms(W_dec)
    n_atoms, d = W.shape
    M = as_float_tensor(m, "m", d=d, dtype=torch.float64).reshape(-1, d)
    C = torch.as_tensor(codes).to(device=M.device, dtype=torch.float64)
    if C.shape != (M.shape[0], n_atoms):
        raise BadInputError(
            f"codes has shape {tuple(C.shape)}; pass one code of {n_atoms} entries per m ({M.shape[0]})."
        )
    scale = torch.linalg.vector_norm(M, dim=1)
    live = scale > 0
    ok = ~live & (C == 0).all(dim=1)
    if bool(live.any()):
        answers = C[live] / scale[live, None]
        cert = certify(W.to(M.device), M[live] / scale[live, None], answers, nonneg=nonneg)
        certified = torch.tensor([status == _CERTIFIED for status in cert.status], device=M.device)
        gap = torch.linalg.vector_norm(answers - cert.codes, dim=1)
        ok[live] = certified & (gap < RECOVERED_BELOW * torch.linalg.vector_norm(cert.codes, dim=1))
    return ok


def _solve_on_host(
    solver: str, W: torch.Tensor, Mn: torch.Tensor, nonneg: bool, k: int | None, cvxpy_solver: str
) -> tuple[torch.Tensor, list[str]]:
    """cvxpy, linprog or OMP on unit rows Mn (b, d), in numpy on the CPU; codes (b, n_atoms) on the CPU."""
    Wn, Mn_host = W.cpu().numpy(), Mn.cpu().numpy()
    if solver == "cvxpy":
        codes, statuses = _solve_cvxpy(Wn, Mn_host, nonneg, cvxpy_solver)
    elif solver == "linprog":
        codes, statuses = _solve_linprog(Wn, Mn_host, nonneg)
    else:
        codes, statuses = _solve_omp(Wn, Mn_host, nonneg, k)
    return torch.from_numpy(codes), statuses


def _solve_batched(
    W: torch.Tensor,
    Mn: torch.Tensor,
    nonneg: bool,
    fallback: bool,
    target: torch.device,
    known: torch.Tensor | None,
) -> tuple[torch.Tensor, list[str], BatchedProof]:
    """The batched solver on unit rows Mn (b, d) on the `target` device; unproven samples re-solved by HiGHS
    on the CPU when `fallback`. Codes (b, n_atoms) and the proof are on the target device."""
    known = None if known is None else known.to(target)
    solution = solve_batched(W.to(target), Mn.to(target), nonneg=nonneg, known=known)
    codes = solution.codes.clone()
    statuses = list(solution.status)
    redo = [i for i, status in enumerate(statuses) if status == "unsolved"] if fallback else []
    if redo:
        highs_codes, highs = _solve_linprog(W.cpu().numpy(), Mn[redo].cpu().numpy(), nonneg)
        codes[redo] = torch.from_numpy(highs_codes).to(target)
        for i, status in zip(redo, highs, strict=True):
            statuses[i] = status
    used = torch.zeros(len(statuses), dtype=torch.bool, device=target)
    used[redo] = True
    # A HiGHS answer carries HiGHS's status, not the batched solver's (unproven) dual and gap.
    duals, max_off, gaps = (t.clone() for t in (solution.duals, solution.max_off, solution.gaps))
    for t in (duals, max_off, gaps):
        t[used] = torch.nan
    proof = BatchedProof(duals, max_off, gaps, solution.iterations, used)
    return codes, statuses, proof


def _expand_proof(proof: BatchedProof, nonzero: torch.Tensor, d: int) -> BatchedProof:
    """The proof of the non-zero rows spread over the whole batch, on nonzero's device; a zero m gets y = 0
    and gap 0 (the zero code is the unique minimiser, with nothing to certify)."""
    B, device = nonzero.shape[0], nonzero.device
    duals = torch.zeros(B, d, dtype=torch.float64, device=device)
    max_off = torch.full((B,), -math.inf, dtype=torch.float64, device=device)
    gaps = torch.zeros(B, dtype=torch.float64, device=device)
    iterations = torch.zeros(B, dtype=torch.int64, device=device)
    fallback = torch.zeros(B, dtype=torch.bool, device=device)
    for full, part in zip((duals, max_off, gaps, iterations, fallback), proof, strict=True):
        full[nonzero] = part.to(device=device, dtype=full.dtype)
    return BatchedProof(duals, max_off, gaps, iterations, fallback)


class _Checked(NamedTuple):
    """Answers for unit rows after their certificate check: codes (b, n_atoms), a status and an evidence note
    per answer, and the certificates the check found (duals (b, d), max_off (b,); NaN where it found none)."""

    codes: torch.Tensor
    statuses: list[str]
    evidence: list[str]
    duals: torch.Tensor
    max_off: torch.Tensor


def _check_answers(
    W: torch.Tensor, Mn: torch.Tensor, codes: torch.Tensor, words: list[str], sources: list[str], nonneg: bool
) -> _Checked:
    """Check a certificate (`atoms.batched_recovery.certify`) on every answer (b, n_atoms) for the unit rows
    Mn (b, d) that the batched solver has not proven itself, on W's device. A certified answer becomes
    "optimal" (its code the refit that was certified); otherwise a claimed solution ("optimal",
    "converged") becomes "uncertified", and any other word (a solver's failure) stays. sources: who
    answered, per answer."""
    statuses, evidence, rows = list(words), [], []
    for i, (source, word) in enumerate(zip(sources, words, strict=True)):
        if source == "batched" and word in _PROVEN:
            evidence.append(f"{source}: {word!r}, {_PROVEN[word]}")
        else:
            evidence.append(f"{source}: {word!r}")
            rows.append(i)
    duals = torch.full_like(Mn, torch.nan)
    max_off = torch.full((Mn.shape[0],), torch.nan, dtype=Mn.dtype, device=Mn.device)
    codes = codes.clone()
    if rows:
        index = torch.tensor(rows, device=Mn.device)
        cert = certify(W, Mn[index], codes[index], nonneg=nonneg)
        ok = torch.tensor([status == _CERTIFIED for status in cert.status], device=Mn.device)
        for full, part in ((codes, cert.codes), (duals, cert.duals), (max_off, cert.max_off)):
            full[index[ok]] = part[ok]
        for i, status, off in zip(rows, cert.status, cert.max_off.tolist(), strict=True):
            if status == _CERTIFIED:
                statuses[i] = _CERTIFIED
                evidence[i] += f", dual certificate of uniqueness checked (max_off = {off:.6f})"
                continue
            if words[i] in _CLAIMS:
                statuses[i] = _UNCERTIFIED
            evidence[i] += f", uncertified: {_why_uncertified(status, off)}"
    return _Checked(codes, statuses, evidence, duals, max_off)


def _why_uncertified(status: str, max_off: float) -> str:
    """Why `certify` (its status and max_off for one answer) did not certify it."""
    if status == _BEATEN:
        return "a feasible code of smaller l1 norm exists, so the answer is not a minimiser"
    if math.isnan(max_off):
        return (
            "no dual certificate (no code, or its refit on its support misses m: dependent or missing atoms)"
        )
    return f"no dual certificate of uniqueness found (minimum-norm y: max_off = {max_off:.6f})"


def _with_certificates(proof: BatchedProof, checked: _Checked) -> BatchedProof:
    """The batched proof with the certificates that the answer check found (on HiGHS's answers and on
    gap-bounded ones) in place of NaN or the gap's dual."""
    found = ~checked.max_off.isnan()
    duals = torch.where(found[:, None], checked.duals, proof.duals)
    return proof._replace(duals=duals, max_off=torch.where(found, checked.max_off, proof.max_off))


def _refute(
    W: torch.Tensor, Mn: torch.Tensor, truth: torch.Tensor, checked: _Checked, nonneg: bool, highs: bool
) -> _Checked:
    """Look for proof that the true codes truth (b, n_atoms) for the unit rows Mn (b, d) are not the unique
    minimisers, for every answer that no proof settles (status not "optimal", "beaten" or "infeasible").

    A rival is a feasible code of smaller l1 norm (status "beaten") or one apart from the true code by more
    than the failed band with an l1 norm equal to rounding (status "tied"; `atoms.batched_recovery.disproof`),
    and it replaces the answer. Candidates (`_rivals`): the answer itself; then, where the answer matches
    the true code to the failed band (so that the decision hinges on uniqueness), a move along dependent atoms
    of the true support and, with `highs`, a second HiGHS solve. In float64 on the CPU; returns a _Checked
    on checked's device.
    """
    W, Mn, truth, answers = (t.cpu() for t in (W, Mn, truth, checked.codes))
    norms = torch.linalg.vector_norm(truth, dim=1)
    errors = torch.linalg.vector_norm(answers - truth, dim=1) / torch.where(norms > 0, norms, 1.0)
    codes, statuses, evidence = checked.codes.clone(), list(checked.statuses), list(checked.evidence)
    for i, status in enumerate(checked.statuses):
        if status in _PROVEN:
            continue
        close = bool(errors[i] <= FAILED_ABOVE)
        for rival, how in _rivals(W, Mn[i], truth[i], answers[i], nonneg, close, highs):
            beaten, tied = disproof(rival[None], W, Mn[i : i + 1], truth[i : i + 1], nonneg, FAILED_ABOVE)
            if bool(beaten) or bool(tied):
                statuses[i] = _BEATEN if bool(beaten) else _TIED
                codes[i] = rival.to(codes.device)
                evidence[i] += f"; {statuses[i]}: {how} is feasible with l1 norm " + (
                    "below the true code's" if bool(beaten) else "equal to the true code's, apart from it"
                )
                break
    return checked._replace(codes=codes, statuses=statuses, evidence=evidence)


def _rivals(
    W: torch.Tensor,
    m: torch.Tensor,
    truth: torch.Tensor,
    answer: torch.Tensor,
    nonneg: bool,
    close: bool,
    highs: bool,
) -> Iterator[tuple[torch.Tensor, str]]:
    """Candidate rivals of the true code (n_atoms,) for the unit m (d,), each with how it was found, cheapest
    first and lazily (the caller stops at the first that holds): the solver's answer; where `close`, a move
    along dependent atoms of the true support and, with `highs`, a second solve."""
    yield answer, "the solver's answer"
    if not close:
        return
    move = _dependent_move(W, truth)
    if move is not None:
        yield move, "a move along dependent atoms of the true support"
    if highs:
        second = _second_minimiser(W, m, truth, nonneg)
        if second is not None:
            yield second, "a second HiGHS solve (most l1 mass off the true signs at the true l1 norm)"


def _dependent_move(W: torch.Tensor, code: torch.Tensor) -> torch.Tensor | None:
    """code (n_atoms,) moved along h with h @ W = 0 on its support L, if the support's atoms are dependent:
    h is the left singular vector of W_L for its smallest singular value (zero exactly then), signed so that
    the l1 norm, linear in the step while no sign flips, does not rise; the step is half the largest that
    keeps the signs. None for a support of one atom. Whether the move stays feasible, and so proves
    anything, is for `disproof` to check (an independent support moves off m)."""
    L = code.nonzero().flatten()
    if L.numel() < 2:
        return None
    h = torch.linalg.svd(W[L]).U[:, -1]
    signs = torch.sign(code[L])
    if float(signs @ h) > 0:
        h = -h
    shrinking = h * signs < 0
    if not bool(shrinking.any()):
        return None
    moved = code.clone()
    moved[L] += 0.5 * float((code[L].abs() / h.abs())[shrinking].min()) * h
    return moved


def _second_minimiser(
    W: torch.Tensor, m: torch.Tensor, truth: torch.Tensor, nonneg: bool
) -> torch.Tensor | None:
    """A feasible code with l1 norm at most the true code's (n_atoms,) carrying the most l1 mass off its sign
    pattern, by HiGHS on the split LP (delta itself when nonneg); None when HiGHS finds none.

    The mass is zero only when every code at the true code's l1 norm keeps its signs, and with independent
    support atoms that is the true code alone; so where the true code is not the unique minimiser, this finds
    a second one, apart from it (a vertex of the optimal face). W (n_atoms, d), m (d,), on the CPU.
    """
    n_atoms = truth.numel()
    Wn, code = W.numpy(), truth.numpy()
    if nonneg:
        A_eq, pattern = Wn.T, code > 0
    else:
        A_eq, pattern = np.hstack([Wn.T, -Wn.T]), np.concatenate([code > 0, code < 0])
    res = optimize.linprog(
        -(~pattern).astype(np.float64),
        A_ub=np.ones((1, A_eq.shape[1])),
        b_ub=[np.abs(code).sum()],
        A_eq=A_eq,
        b_eq=m.numpy(),
        bounds=(0, None),
        method="highs",
    )
    if res.x is None:
        return None
    return torch.from_numpy(res.x if nonneg else res.x[:n_atoms] - res.x[n_atoms:])


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
    Computed on delta's device, where y and support are returned.
    """
    W = _raw_atoms(W_dec)
    n_atoms, d = W.shape
    code = as_float_tensor(delta, "delta", d=n_atoms, dtype=torch.float64)
    if code.ndim != 1:
        raise BadInputError(f"delta has shape {tuple(code.shape)}; pass one code of shape ({n_atoms},).")
    W = W.to(code.device)
    L = _support(code, support_tol)
    if nonneg and bool((code[L] < 0).any()):
        raise BadInputError(
            f"delta has negative entries at {L[code[L] < 0][:10].tolist()} but nonneg=True; pass "
            "nonneg=False or a non-negative code."
        )
    s = torch.sign(code[L])
    WL = W[L]
    off = torch.ones(n_atoms, dtype=torch.bool, device=code.device)
    off[L] = False
    chol, info = torch.linalg.cholesky_ex(WL @ WL.T)
    if int(info) != 0:
        reason = "the support's atoms are linearly dependent (W_L W_L^T is not positive definite)"
        zero = torch.zeros(d, dtype=torch.float64, device=code.device)
        return Certificate(False, zero, math.nan, math.inf, L, reason)
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
    D_L = W_dec[L]^T (d, k). ERC(L) < 1 implies basis pursuit and OMP recover every code supported on L
    (Tropp 2004). W_dec and support on any device: the solve runs in float64 on the CPU (`erc_of_atoms`).
    """
    W = _raw_atoms(W_dec).cpu()
    n_atoms = W.shape[0]
    host = support.cpu() if isinstance(support, torch.Tensor) else np.asarray(support)
    L = torch.as_tensor(host).reshape(-1)
    if L.numel() == 0 or L.is_floating_point() or L.dtype == torch.bool:
        raise BadInputError(f"support must be a non-empty list of atom indices (ints), got {support!r}.")
    L = L.long()
    if int(L.min()) < 0 or int(L.max()) >= n_atoms or torch.unique(L).numel() != L.numel():
        raise BadInputError(
            f"support {L.tolist()[:20]} must hold distinct indices in [0, {n_atoms}); remove repeats and "
            "out-of-range entries."
        )
    if L.numel() == n_atoms:
        raise BadInputError("support covers every atom; ERC needs at least one atom outside the support.")
    return erc_of_atoms(W, L)


def erc_of_atoms(W: torch.Tensor, L: torch.Tensor) -> float:
    """`erc` without the input checks, for callers that evaluate many supports of one checked dictionary.

    W (n_atoms, d) float64 on the CPU; L (k,) distinct int64 indices, 0 < k < n_atoms. pinv(D_L) d_j is the
    least-squares solution of D_L c = d_j, taken from the thin QR factorisation D_L = Q R as the triangular
    solve R c = Q^T d_j for every atom at once (no pseudo-inverse is formed): one (k, d) x (d, n_atoms)
    product, where a least-squares solver per call would also factor and copy the off-support atoms. The
    support's rank is decided as numpy's lstsq does, on the singular values of R (those of D_L) against
    eps * max(d, k) times the largest; a rank-deficient support raises IllConditionedError.
    """
    k, d = L.numel(), W.shape[1]
    Q, R = torch.linalg.qr(W[L].T)
    singular = torch.linalg.svdvals(R)
    rank = int((singular > torch.finfo(W.dtype).eps * max(d, k) * singular[0]).sum())
    if rank < k:
        raise IllConditionedError(
            f"the {k} atoms of the support span only rank {rank}; ERC needs linearly independent "
            "atoms on the support. Use a smaller support or remove duplicate atoms."
        )
    coef = torch.linalg.solve_triangular(R, Q.T @ W.T, upper=True)  # (k, n_atoms)
    column_l1 = coef.abs().sum(dim=0)
    column_l1[L] = -math.inf  # the support's own atoms are not in the max
    return float(column_l1.max())


def wilson_interval(successes: Array, trials: int, z: float = _WILSON_Z) -> tuple[torch.Tensor, torch.Tensor]:
    """Wilson score interval (95% by default) of the binomial rate successes / trials: (low, high) float64,
    on successes' device."""
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
    from scipy import stats

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
    (nonneg). Returned on delta_grid's device (computed on the CPU).
    """
    grid = _host_float64(delta_grid)
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
    device = delta_grid.device if isinstance(delta_grid, torch.Tensor) else None
    return torch.tensor(out, dtype=torch.float64, device=device).reshape(grid.shape)


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


def _host_float64(values: Array | list[float]) -> torch.Tensor:
    """A float64 CPU copy of numbers given as a tensor (any device), an array or a list."""
    if isinstance(values, torch.Tensor):
        return values.detach().to(device="cpu", dtype=torch.float64)
    return torch.as_tensor(np.asarray(values, dtype=np.float64))


def _grid(values: Array | list[float], name: str) -> torch.Tensor:
    grid = _host_float64(values).reshape(-1)
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
    The problems are drawn and solved on the CPU, where every tensor of the result is (the grids may be
    tensors on any device: they are settings, not data).
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
