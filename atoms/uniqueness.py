"""The spark of a dictionary: the smallest number of linearly dependent atoms (SPEC section 4, theorem 2).

Exact by mixed-integer programming (`scipy.optimize.milp`, HiGHS) or by enumeration for small cases; otherwise
bounds: coherence (spark >= 1 + 1/mu), babel (spark >= min{k : mu1(k - 1) >= 1}) and rank + 1 from above.
Computing the spark is NP-hard (Tillmann-Pfetsch 2014); the result always says which of these it is.

A support is called dependent when its unit atoms, as columns, have sigma_min <= tol * sigma_max (or there are
more of them than the rank). Every support a solver returns is re-checked this way: a solver status is never
trusted.
"""

from __future__ import annotations

import itertools
import math
import time
from typing import Literal, NamedTuple

import numpy as np
import torch
from scipy.optimize import Bounds, LinearConstraint, milp

from atoms.dictionary import Dictionary
from atoms.errors import BadInputError
from atoms.kernels.progress import Progress

__all__ = ["SparkResult", "spark", "spark_lower_bounds"]

# Integer bounds from float inequalities: a bound like 1 + 1/mu for an exact ETF may land at d + 1 + 1e-15;
# this slack keeps ceil() from rounding it up to d + 2.
_SLACK = 1e-9
# Enumeration is chosen by method="auto" when at most this many subsets must be checked.
_AUTO_ENUMERATION_SUBSETS = 50_000
# Supports checked per batched SVD.
_CHUNK = 4096
# Re-solves of one MILP subproblem after it returned a support that failed the SVD check.
_MAX_CUTS = 25


class SparkResult(NamedTuple):
    """spark(D) or bounds on it.

    value: the exact spark (math.inf when the atoms are independent), or None when only bounds are known.
    lower, upper: bounds (both equal to `value` when exact).  kind: "exact" or "bounds".
    method: "rank", "bounds", "milp" or "enumerate": how the value or the bounds were obtained.
    support: a dependent set of `upper` atoms (a witness), or None when none was identified.
    note: how far the value was checked, or why only bounds were returned.
    """

    value: float | None
    lower: float
    upper: float
    kind: Literal["exact", "bounds"]
    method: str
    seconds: float
    support: tuple[int, ...] | None
    note: str = ""


def _dependent(A: np.ndarray, support: list[int] | tuple[int, ...], tol: float) -> bool:
    """Whether the columns A[:, support] are linearly dependent: sigma_min <= tol * sigma_max by SVD."""
    if len(support) > A.shape[0]:
        return True
    s = np.linalg.svd(A[:, list(support)], compute_uv=False)
    return bool(s[-1] <= tol * s[0])


def _numeric_rank(A: np.ndarray, tol: float) -> int:
    s = np.linalg.svd(A, compute_uv=False)
    return int((s > tol * s[0]).sum())


def spark_lower_bounds(
    D: torch.Tensor | np.ndarray | Dictionary, *, progress: Progress = False
) -> tuple[float, float]:
    """The two classical lower bounds on spark(D) for unit-normalised atoms: (coherence, babel).

    coherence: ceil(1 + 1/mu) (Donoho-Elad 2003); math.inf when mu = 0 (orthogonal atoms).
    babel: min{k : mu1(k - 1) >= 1} (Tropp 2004); math.inf when mu1(n_atoms - 1) < 1, since then the Gram
    is strictly diagonally dominant and the atoms are independent.
    Cost: two walks over the Gram in tiles, memory O(tile x n_atoms) at most (the coherence walk, skipped when
    a Dictionary has it cached, and one Babel walk, `Dictionary.babel_crossing`). `progress`: False, True (a
    tqdm bar on stderr per walk) or a hook(done, total) called through each walk.
    """
    dic = D if isinstance(D, Dictionary) else Dictionary(D)
    n = dic.n_atoms
    if n == 1:
        return math.inf, math.inf
    mu = dic.coherence(progress=progress)
    coh = math.inf if mu == 0 else float(math.ceil((1 + 1 / mu) * (1 - _SLACK)))
    # mu1 is non-decreasing in k: the smallest k - 1 in [1, n - 1] with mu1(k - 1) >= 1.
    crossing = dic.babel_crossing(1 - _SLACK, progress=progress)
    return coh, (math.inf if crossing is None else float(crossing + 1))


def _enumerate(
    A: np.ndarray, max_size: int, tol: float, deadline: float
) -> tuple[int | None, tuple[int, ...] | None]:
    """Smallest k <= max_size with a dependent k-subset, checking every subset of each size by batched SVD.

    Returns (k, support), or (None, None) when every subset of up to `max_size` atoms is independent (with
    max_size = rank, the spark is then rank + 1). When the deadline passes, raises TimeoutError whose
    argument is the largest size fully checked.
    """
    At = torch.from_numpy(A.T.copy())
    n = A.shape[1]
    for k in range(2, max_size + 1):
        combos = itertools.combinations(range(n), k)
        while True:
            flat = np.fromiter(
                itertools.chain.from_iterable(itertools.islice(combos, _CHUNK)), dtype=np.int64
            )
            if flat.size == 0:
                break
            subsets = torch.from_numpy(flat.reshape(-1, k))
            s = torch.linalg.svdvals(At[subsets])
            hit = (s[:, -1] <= tol * s[:, 0]).nonzero().flatten()
            # The batched SVD screens; the per-support check decides, as for the MILP.
            for i in hit.tolist():
                support = tuple(int(j) for j in subsets[i])
                if _dependent(A, support, tol):
                    return k, support
            if time.perf_counter() > deadline:
                raise TimeoutError(k - 1)
    return None, None


class _MilpOutcome(NamedTuple):
    best: int
    support: tuple[int, ...] | None
    proven: bool
    note: str


def _milp(A: np.ndarray, lower: int, upper: int, tol: float, deadline: float) -> _MilpOutcome:
    """Search for a dependent set smaller than `upper` by one MILP per column i.

    Subproblem i: minimise sum_j z_j over x in R^N, z in {0, 1}^N with A x = 0, x_i = 1, -z_j <= x_j <= z_j.
    Big-M = 1 is exact, by normalisation: a minimal dependent set S has a null vector x supported on S; scale
    it so max_j |x_j| = 1, attained at some i in S. Then x is feasible for subproblem i with objective |S|,
    and every feasible point of any subproblem is a non-zero null vector whose support is dependent. Hence
    min_i (optimum of subproblem i) = spark, with no big-M approximation. Each subproblem also carries
    sum z <= best - 1 (only improvements are sought) and sum z >= lower (a proven bound).
    """
    d, n = A.shape
    eye = np.eye(n)
    rows = [
        LinearConstraint(np.hstack([A, np.zeros((d, n))]), 0.0, 0.0),
        LinearConstraint(np.hstack([eye, -eye]), -np.inf, 0.0),
        LinearConstraint(np.hstack([-eye, -eye]), -np.inf, 0.0),
    ]
    cost = np.concatenate([np.zeros(n), np.ones(n)])
    integrality = np.concatenate([np.zeros(n), np.ones(n)])
    best, witness, proven, note = upper, None, True, ""
    for i in range(n):
        if best <= lower:
            break
        lb = np.concatenate([-np.ones(n), np.zeros(n)])
        ub = np.ones(2 * n)
        lb[i] = ub[i] = 1.0
        lb[n + i] = 1.0
        cuts: list[LinearConstraint] = []
        for _ in range(_MAX_CUTS):
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                return _MilpOutcome(best, witness, False, f"time limit reached in subproblem {i} of {n}")
            size = LinearConstraint(cost[None, :], lower, best - 1)
            res = milp(
                cost,
                integrality=integrality,
                bounds=Bounds(lb, ub),
                constraints=[*rows, size, *cuts],
                options={"time_limit": remaining, "mip_rel_gap": 0.0},
            )
            if res.x is None:
                # Status 2 (infeasible) proves no dependent set smaller than `best` has its largest entry at
                # i; anything else (time or iteration limit, numerical trouble) proves nothing.
                if res.status != 2:
                    proven, note = False, f"subproblem {i}: {res.message}"
                break
            support = tuple(int(j) for j in np.flatnonzero(res.x[n:] > 0.5))
            if _dependent(A, support, tol):
                best, witness = len(support), support
                if res.status != 0:
                    proven, note = False, f"subproblem {i}: {res.message}"
                break
            # The solver's A x = 0 held only to its own feasibility tolerance. Exclude exactly this support
            # (sum_{j in S} z_j - sum_{j not in S} z_j <= |S| - 1; its supersets stay allowed) and retry.
            row = np.zeros(2 * n)
            row[n:] = -1.0
            row[[n + j for j in support]] = 1.0
            cuts.append(LinearConstraint(row[None, :], -np.inf, len(support) - 1))
        else:
            proven = False
            note = (
                f"subproblem {i}: {_MAX_CUTS} supports in a row were dependent only within the solver's "
                "feasibility tolerance (nearly dependent atoms); raise tol to count them as dependent"
            )
    return _MilpOutcome(best, witness, proven, note)


def spark(
    D: torch.Tensor | np.ndarray | Dictionary,
    *,
    method: Literal["auto", "milp", "enumerate", "bounds"] = "auto",
    time_limit: float = 60.0,
    tol: float = 1e-9,
) -> SparkResult:
    """spark(D): the smallest number of linearly dependent atoms (math.inf if the atoms are independent).

    D: (n_atoms, d) tensor/array (rows are atoms) or a `Dictionary`; atoms are unit-normalised (scaling an
    atom does not change the spark, and it conditions the MILP).
    method: "milp" (one `scipy.optimize.milp` per atom, see `_milp`; when at most 50,000 smaller subsets
    exist they are then enumerated, which confirms or corrects the MILP, and `note` says which), "enumerate"
    (every k-subset for k = 2, 3, ... by batched SVD), "bounds" (coherence, babel, rank + 1 only), or "auto":
    exact from the rank or from matching bounds when possible, enumeration when at most 50,000 subsets need
    checking, else MILP.
    time_limit: seconds for the whole search; when it runs out the result has kind "bounds".
    tol: a set of atoms is dependent when sigma_min <= tol * sigma_max of its columns.
    D on any device: the searches run on a float64 CPU copy (scipy's MILP and numpy's SVD).
    """
    start = time.perf_counter()
    if method not in ("auto", "milp", "enumerate", "bounds"):
        raise BadInputError(f"method must be 'auto', 'milp', 'enumerate' or 'bounds', got {method!r}.")
    if not (isinstance(time_limit, (int, float)) and time_limit > 0):
        raise BadInputError(f"time_limit must be a positive number of seconds, got {time_limit!r}.")
    if not (isinstance(tol, float) and 0 < tol < 1):
        raise BadInputError(f"tol must be a float in (0, 1), e.g. 1e-9, got {tol!r}.")
    deadline = start + time_limit
    dic = D if isinstance(D, Dictionary) else Dictionary(D)
    A = dic.unit.T.contiguous().cpu().numpy()
    n = A.shape[1]

    def result(value, lower, upper, kind, how, support=None, note="") -> SparkResult:
        # Any rank + 1 atoms are dependent, so the first rank + 1 witness the upper bound when no smaller
        # dependent set is known.
        if support is None and upper == rank + 1:
            support = tuple(range(rank + 1))
        return SparkResult(value, lower, upper, kind, how, time.perf_counter() - start, support, note)

    rank = _numeric_rank(A, tol)
    if rank == n:
        return result(math.inf, math.inf, math.inf, "exact", "rank")
    upper = rank + 1
    coh, bab = spark_lower_bounds(dic)
    # Both bounds are theorems, so they cannot exceed rank + 1 when rank < n_atoms; min() only guards against
    # a rank decision at the tolerance edge. Spark >= 2 always holds here: zero atoms were rejected.
    lower = min(max(coh, bab, 2.0), float(upper))
    if method == "bounds":
        return result(None, lower, float(upper), "bounds", "bounds", note="coherence, babel and rank only")
    if method == "auto" and lower == upper:
        return result(float(upper), lower, float(upper), "exact", "bounds", note="lower bound = rank + 1")
    if method == "auto":
        subsets = sum(math.comb(n, k) for k in range(2, rank + 1))
        method = "enumerate" if subsets <= _AUTO_ENUMERATION_SUBSETS else "milp"
    if method == "enumerate":
        try:
            k, support = _enumerate(A, rank, tol, deadline)
        except TimeoutError as done:
            checked = float(done.args[0])
            note = f"time limit reached; every subset of up to {checked:.0f} atoms is independent"
            return result(None, max(lower, checked + 1), float(upper), "bounds", "enumerate", note=note)
        if k is None:
            return result(float(upper), float(upper), float(upper), "exact", "enumerate")
        return result(float(k), float(k), float(k), "exact", "enumerate", support)
    out = _milp(A, int(lower), upper, tol, deadline)
    settled = _enumerate_below(A, out.best, tol, deadline)
    if settled is None:
        if out.proven:
            note = "smaller supports excluded by the solver's proofs alone (too many to enumerate)"
            return result(
                float(out.best), float(out.best), float(out.best), "exact", "milp", out.support, note
            )
        return result(None, lower, float(out.best), "bounds", "milp", out.support, out.note)
    k, support = settled
    milp_said = "the MILP agrees" if out.proven else f"the MILP was inconclusive ({out.note})"
    if k is None:
        note = f"{milp_said}; confirmed by enumerating every smaller subset"
        how = "milp" if out.proven else "enumerate"
        return result(float(out.best), float(out.best), float(out.best), "exact", how, out.support, note)
    note = f"the MILP gave {out.best} ({milp_said}), but enumeration found a dependent set of {k}; kept"
    return result(float(k), float(k), float(k), "exact", "enumerate", support, note)


def _enumerate_below(
    A: np.ndarray, best: int, tol: float, deadline: float
) -> tuple[int | None, tuple[int, ...] | None] | None:
    """Enumerate every subset smaller than `best` when there are at most 50,000 of them and time remains.

    The MILP's claim that nothing smaller exists rests on solver statuses (infeasible, optimal); with nearly
    dependent atoms HiGHS has been seen to call a non-minimal support optimal, or to keep returning supports
    that fail the SVD check. Enumeration, when affordable, settles it. Returns `_enumerate`'s answer for sizes
    below `best`, or None when enumeration is too large or runs out of time.
    """
    if sum(math.comb(A.shape[1], k) for k in range(2, best)) > _AUTO_ENUMERATION_SUBSETS:
        return None
    try:
        return _enumerate(A, best - 1, tol, deadline)
    except TimeoutError:
        return None
