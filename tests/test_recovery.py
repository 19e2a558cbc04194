"""basis_pursuit, certificates, ERC and the phase transition against independent numpy/scipy references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import optimize, stats
from scipy.linalg import hadamard

from atoms import recovery, synth
from atoms.errors import BadInputError, IllConditionedError
from atoms.recovery import (
    basis_pursuit,
    certify_codes,
    classify,
    cvxpy_problem,
    donoho_tanner_curve,
    dual_certificate,
    erc,
    erc_of_atoms,
    phase_transition,
    wilson_interval,
)


def dirac_hadamard_np(n: int) -> np.ndarray:
    return np.vstack([np.eye(n), hadamard(n) / np.sqrt(n)])


def planted(n_samples: int, n_atoms: int, k: int, nonneg: bool, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    X = np.zeros((n_samples, n_atoms))
    for row in X:
        values = rng.uniform(0.5, 2.0, k) * (1 if nonneg else rng.choice([-1, 1], k))
        row[rng.choice(n_atoms, k, replace=False)] = values
    return X


def numpy_coherence(W: np.ndarray) -> float:
    U = W / np.linalg.norm(W, axis=1, keepdims=True)
    G = np.abs(U @ U.T)
    np.fill_diagonal(G, 0.0)
    return float(G.max())


# Dirac-Hadamard n = 32: mu = 1/sqrt(32) ~ 0.177, so every K <= 3 is below (1 + 1/mu)/2 ~ 3.3.
W_DH = dirac_hadamard_np(32)


@pytest.mark.parametrize("nonneg", [False, True])
def test_three_solvers_agree_far_below_the_coherence_bound(nonneg):
    X = planted(4, W_DH.shape[0], 2, nonneg, seed=1)
    M = X @ W_DH
    results = {
        solver: basis_pursuit(
            W_DH, M, nonneg=nonneg, solver=solver, k=2 if solver == "omp" else None, true_codes=X
        )
        for solver in ("cvxpy", "linprog", "omp")
    }
    for solver, res in results.items():
        assert res.counts == {"recovered": 4, "flagged": 0, "failed": 0}, (solver, res.reasons)
        assert res.codes.dtype == torch.float64 and res.codes.shape == (4, 64)
        np.testing.assert_allclose(res.codes.numpy(), X, atol=1e-6)
        # Residuals recomputed here, independently of the toolkit.
        resid = np.linalg.norm(res.codes.numpy() @ W_DH - M, axis=1) / np.linalg.norm(M, axis=1)
        np.testing.assert_allclose(res.residuals.numpy(), resid, rtol=1e-6, atol=1e-14)
    np.testing.assert_allclose(results["cvxpy"].codes.numpy(), results["linprog"].codes.numpy(), atol=1e-6)


def test_synth_planted_codes_are_recovered():
    W = synth.dirac_hadamard(16)
    codes = synth.planted_codes(3, W.shape[0], 2, 0.5, 1.5, True, seed=0)
    res = basis_pursuit(W, codes.values @ W, nonneg=True, solver="linprog", true_codes=codes.values)
    assert res.counts["recovered"] == 3
    for code in codes.values:
        assert dual_certificate(W, code, nonneg=True).ok


def test_cvxpy_problem_is_built_once_and_reused(monkeypatch):
    W = np.random.default_rng(7).standard_normal((12, 6))
    import cvxpy  # atoms.recovery imports it on first use, so patch the module itself

    built = []
    original = cvxpy.Problem

    def counting_problem(*args, **kwargs):
        built.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(cvxpy, "Problem", counting_problem)
    X = planted(3, 12, 1, False, seed=2)
    basis_pursuit(W, X @ W, solver="cvxpy")
    first = cvxpy_problem(W)
    basis_pursuit(torch.from_numpy(W.copy()), X[:1] @ W, solver="cvxpy")
    assert cvxpy_problem(W.copy()) is first
    assert len(built) == 1
    assert cvxpy_problem(W, nonneg=True) is not first
    assert len(built) == 2


def test_classify_bands_with_constructed_residuals():
    errors = [1e-7, 1e-4, 1e-2, 1e-7, 1e-7, float("nan"), 1e-7]
    residuals = [1e-9, 1e-9, 1e-9, 5e-3, 1e-4, 1e-9, 1e-9]
    statuses = ["optimal"] * 6 + ["optimal_inaccurate"]
    decisions, reasons = classify(errors, residuals, statuses)
    assert decisions == ["recovered", "flagged", "failed", "failed", "flagged", "failed", "flagged"]
    assert "whatever the status says" in reasons[3]
    assert "no dual certificate" in reasons[6]
    # Only "optimal" (a certificate checked) recovers; a rival code of no larger l1 norm fails whatever the
    # bands say; the evidence note ends each reason.
    statuses = ["uncertified", "converged", "tied", "beaten", "optimal"]
    decisions, reasons = classify([0.0] * 5, [0.0] * 5, statuses, [f"note {i}" for i in range(5)])
    assert decisions == ["flagged", "flagged", "failed", "failed", "recovered"]
    assert "same l1 norm" in reasons[2] and "smaller l1 norm" in reasons[3]
    assert all(reason.endswith(f"(note {i})") for i, reason in enumerate(reasons))
    # The band edges: 1e-5 itself is flagged, 1e-3 itself is still flagged, just above is failed.
    assert classify([1e-5, 1e-3, 1.0001e-3], [0, 0, 0], ["optimal"] * 3)[0] == [
        "flagged",
        "flagged",
        "failed",
    ]


def test_optimal_status_with_large_residual_is_failed():
    # OMP stopped after 1 step on 3-sparse codes: its status is honest but the residual decides.
    X = planted(2, 64, 3, False, seed=4)
    res = basis_pursuit(W_DH, X @ W_DH, solver="omp", k=1, true_codes=X)
    assert res.decisions == ["failed", "failed"]
    assert all(r > 1e-3 for r in res.residuals.tolist())


def test_zero_measurement_gives_zero_code():
    res = basis_pursuit(W_DH, np.zeros(32), solver="linprog", true_codes=np.zeros(64))
    assert res.codes.abs().max() == 0 and res.decisions == ["recovered"]


@pytest.mark.parametrize("nonneg", [False, True])
def test_dual_certificate_on_recovered_instances_checked_with_numpy(nonneg):
    X = planted(3, 64, 3, nonneg, seed=5)
    res = basis_pursuit(W_DH, X @ W_DH, nonneg=nonneg, solver="linprog", true_codes=X)
    assert res.counts["recovered"] == 3
    for code in X:
        cert = dual_certificate(W_DH, code, nonneg=nonneg)
        L = np.flatnonzero(code)
        assert cert.ok, cert.reason
        # Minimum-norm solution of W_L y = sign(delta_L), by numpy's lstsq on the underdetermined system.
        y = np.linalg.lstsq(W_DH[L], np.sign(code[L]), rcond=None)[0]
        np.testing.assert_allclose(cert.y.numpy(), y, atol=1e-10)
        off = np.delete(W_DH, L, axis=0) @ y
        assert cert.max_off_support == pytest.approx(off.max() if nonneg else np.abs(off).max(), abs=1e-10)
        assert cert.max_off_support < 1
        assert sorted(cert.support.tolist()) == L.tolist()


def test_dual_certificate_refutes_a_failing_instance():
    # Atom 0 = (e1 + e2)/sqrt(2): the code e1 + e2 has l1 norm 2 but sqrt(2) * atom 0 reaches the same m with
    # l1 norm 1.41, so basis pursuit must not return it, and no certificate can exist (<d_0, y> = sqrt(2)).
    W = np.eye(4)
    W = np.vstack([(W[1] + W[2]) / np.sqrt(2), W])
    code = np.array([0.0, 0.0, 1.0, 1.0, 0.0])
    cert = dual_certificate(W, code)
    assert not cert.ok and cert.max_off_support == pytest.approx(np.sqrt(2))
    assert "not < 1" in cert.reason
    res = basis_pursuit(W, code @ W, solver="linprog", true_codes=code)
    assert res.decisions == ["failed"]


TWIN_3X2 = {"duplicate": 1.0, "antipode": -1.0}


def rival_checked_in_numpy(W: np.ndarray, code: np.ndarray, truth: np.ndarray) -> bool:
    """A returned code that proves the true code is not the unique minimiser: it reaches the same m, with an
    l1 norm no larger (to 1e-9), and lies apart from the true code (relative distance over 1e-3)."""
    m = truth @ W
    feasible = np.linalg.norm(code @ W - m) <= 1e-8 * np.linalg.norm(m)
    no_larger = np.abs(code).sum() <= np.abs(truth).sum() * (1 + 1e-9)
    return feasible and no_larger and np.linalg.norm(code - truth) > 1e-3 * np.linalg.norm(truth)


@pytest.mark.parametrize("twin", TWIN_3X2.values(), ids=TWIN_3X2.keys())
@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"use_true_codes": False},
        {"solver": "linprog"},
        {"solver": "cvxpy"},
        {"solver": "omp", "k": 2},
    ],
    ids=["batched", "batched-solve", "linprog", "cvxpy", "omp"],
)
def test_a_non_unique_minimiser_is_failed_by_every_solver(twin, kwargs):
    """Issue 15 item 1: W = [e1, twin e1, e2], code (1, 0, 0.5). Every (1 - t, t twin, 0.5), t in [0, 1], has
    the same image and l1 norm. The batched solver proves nothing, HiGHS's vertex happens to be the true
    code, and OMP finds it too; before, each was called recovered. Now no answer is certified (atom 1 reaches
    |<d_1, y>| = 1), and a second minimiser apart from the true code is found and returned: failed."""
    W = np.array([[1.0, 0.0], [twin, 0.0], [0.0, 1.0]])
    code = np.array([[1.0, 0.0, 0.5]])
    result = basis_pursuit(W, code @ W, true_codes=code, **kwargs)
    assert result.statuses == ["tied"] and result.decisions == ["failed"], result.reasons
    assert rival_checked_in_numpy(W, result.codes[0].numpy(), code[0])
    assert not dual_certificate(W, code[0]).ok


def test_an_uncertified_fallback_answer_is_flagged_with_its_reason(monkeypatch):
    """A HiGHS answer (the batched solver proves nothing in two iterations) that matches the true code is
    recovered only with a certificate checked on it: with the check made to find none, it is flagged, and
    the reason says who answered and why it is not certified; nothing rivals the (unique) true code."""
    import functools

    from atoms.batched_recovery import certify, solve_batched

    def finds_nothing(*args, **kwargs):
        return certify(*args, **kwargs)._replace(status=["unsolved"] * args[2].shape[0])

    X = planted(3, 64, 3, False, seed=12)
    monkeypatch.setattr(recovery, "solve_batched", functools.partial(solve_batched, max_iter=2))
    monkeypatch.setattr(recovery, "certify", finds_nothing)
    result = basis_pursuit(W_DH, X @ W_DH, true_codes=X, use_true_codes=False)
    assert bool(result.proof.fallback.all()) and result.statuses == ["uncertified"] * 3
    assert result.decisions == ["flagged"] * 3
    assert all("HiGHS fallback: 'optimal', uncertified: no dual certificate" in r for r in result.reasons)
    monkeypatch.undo()
    certified = basis_pursuit(W_DH, X @ W_DH, true_codes=X, use_true_codes=False, solver="linprog")
    assert (
        certified.decisions == ["recovered"] * 3
        and "certificate of uniqueness checked" in certified.evidence[0]
    )


def test_certify_codes_checks_answers_from_anywhere():
    """certify_codes: the planted codes on Dirac-Hadamard (far below the coherence bound) are certified,
    scaled or not; a code off its refit, a NaN code and a non-unique code (a duplicated atom) are not; a zero
    m counts with the zero code only."""
    X = planted(3, 64, 2, False, seed=13)
    M = X @ W_DH
    assert certify_codes(W_DH, M, X).tolist() == [True] * 3
    assert certify_codes(W_DH, 1e4 * M, 1e4 * X).tolist() == [True] * 3
    off = X.copy()
    off[0, np.flatnonzero(X[0])[0]] *= 1.01
    off[1] = np.nan
    assert certify_codes(W_DH, M, off).tolist() == [False, False, True]
    twins = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    assert certify_codes(twins, np.array([1.0, 0.5]), np.array([[1.0, 0.0, 0.5]])).tolist() == [False]
    assert certify_codes(W_DH, np.zeros((2, 32)), np.vstack([np.zeros(64), X[0]])).tolist() == [True, False]


def test_certified_fractions_counts_only_certified_recoveries():
    """Issue 15 item 1 through the metrics: the duplicate-atom code (1, 0, 0.5) is no basis-pursuit recovery
    (before: bp_recovered 1 of 1, through the batched solver's HiGHS fallback); a bp_solver callable that
    calls every answer recovered counts only those whose certificate checks here."""
    from atoms.dictionary import Dictionary
    from atoms.metrics import certified_fractions, to_sparse

    twins = Dictionary(np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]))
    code = (np.array([[0, 2]]), np.array([[1.0, 0.5]]))
    assert certified_fractions(twins, *code, spark_lower=2.0).bp_failed == 1

    def says_recovered(W_dec, m, *, nonneg, true_codes):
        result = basis_pursuit(W_dec, m, nonneg=nonneg, solver="linprog", true_codes=true_codes)
        return result._replace(decisions=["recovered"] * len(result.decisions))

    lying = certified_fractions(twins, *code, spark_lower=2.0, bp_solver=says_recovered)
    assert (lying.bp_recovered, lying.bp_flagged) == (0, 1)
    X = planted(3, 64, 2, False, seed=14)
    honest = certified_fractions(Dictionary(W_DH), *to_sparse(X), spark_lower=4.0, bp_solver=says_recovered)
    assert honest.bp_recovered == 3


def test_dual_certificate_dependent_support():
    W = np.vstack([np.eye(3), np.eye(3)[0]])
    cert = dual_certificate(W, np.array([1.0, 0.0, 0.0, 1.0]))
    assert not cert.ok and "linearly dependent" in cert.reason


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 3))
def test_erc_below_tropp_coherence_bound(seed, K):
    rng = np.random.default_rng(seed)
    W = W_DH[rng.permutation(64)]
    mu = numpy_coherence(W)
    L = rng.choice(64, K, replace=False)
    value = erc(W, L)
    # Independent reference: numpy's pseudo-inverse (fine in a test; the toolkit itself uses lstsq).
    off = np.delete(np.arange(64), L)
    reference = np.abs(np.linalg.pinv(W[L].T) @ W[off].T).sum(axis=0).max()
    assert value == pytest.approx(reference, rel=1e-9, abs=1e-12)
    assert value <= K * mu / (1 - (K - 1) * mu) + 1e-12
    assert value < 1  # K <= 3 < (1 + 1/mu) / 2


def test_erc_gaussian_matches_tropp_bound():
    W = np.random.default_rng(0).standard_normal((30, 200))
    W /= np.linalg.norm(W, axis=1, keepdims=True)
    mu = numpy_coherence(W)
    for K in (1, 2):
        value = erc(W, list(range(K)))
        assert value <= K * mu / (1 - (K - 1) * mu) + 1e-12


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 47))
def test_erc_of_atoms_matches_least_squares(seed, k):
    # The QR form against numpy's SVD-based lstsq, up to supports one short of d = 48.
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((160, 48))
    L = rng.choice(160, k, replace=False)
    off = np.delete(np.arange(160), L)
    coef, *_ = np.linalg.lstsq(W[L].T, W[off].T, rcond=None)
    reference = np.abs(coef).sum(axis=0).max()
    value = erc_of_atoms(torch.from_numpy(W), torch.from_numpy(L))
    cond = np.linalg.cond(W[L].T)
    assert value == pytest.approx(reference, rel=1e-12 * cond, abs=1e-12)


def test_erc_of_atoms_rejects_a_dependent_support():
    W = torch.from_numpy(np.vstack([W_DH[:5], 3 * W_DH[2]]))
    with pytest.raises(IllConditionedError, match="span only rank 1"):
        erc_of_atoms(W, torch.tensor([2, 5]))


def wilson_scipy(k: int, n: int) -> tuple[float, float]:
    ci = stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    return ci.low, ci.high


def test_wilson_interval_matches_scipy():
    low, high = wilson_interval(torch.tensor([0, 3, 7, 10]), 10)
    for k, lo, hi in zip([0, 3, 7, 10], low.tolist(), high.tolist(), strict=True):
        ref = wilson_scipy(k, 10)
        assert lo == pytest.approx(ref[0], abs=1e-12) and hi == pytest.approx(ref[1], abs=1e-12)


def test_phase_transition_tiny_grid():
    pt = phase_transition(n=20, deltas=[0.5], rhos=[0.1, 0.9], trials=6, seed=3)
    assert pt.successes.shape == (1, 2)
    assert (pt.successes + pt.flagged + pt.failures == 6).all()
    assert pt.measurements.tolist() == [10] and pt.sparsities.tolist() == [[1, 9]]
    assert ((pt.ci_low <= pt.rates) & (pt.rates <= pt.ci_high)).all()
    for k, lo, hi in zip(
        pt.successes.flatten().tolist(), pt.ci_low.flatten(), pt.ci_high.flatten(), strict=True
    ):
        ref = wilson_scipy(k, 6)
        assert float(lo) == pytest.approx(ref[0], abs=1e-12) and float(hi) == pytest.approx(ref[1], abs=1e-12)
    # Far below the curve (k = 1) recovery is certain; far above it (k = 9 of m = 10) it is hopeless.
    assert pt.successes[0, 0] == 6 and pt.successes[0, 1] == 0
    assert float(pt.curve[0]) == pytest.approx(0.3857, abs=1e-3)


def dmm_curve(delta: float, sides: int) -> float:
    """Donoho-Maleki-Montanari (PNAS 2009, eq. for rho_MSE): an independent formula for the same transition.

    rho(delta) = max_z [1 - (sides/delta) E_z] / [1 + z^2 - sides E_z], E_z = (1 + z^2) Phi(-z) - z phi(z).
    """

    def neg(z: float) -> float:
        e = (1 + z * z) * stats.norm.cdf(-z) - z * stats.norm.pdf(z)
        return -(1 - sides * e / delta) / (1 + z * z - sides * e)

    return -optimize.minimize_scalar(neg, bounds=(0, 20), method="bounded", options={"xatol": 1e-12}).fun


@pytest.mark.parametrize("nonneg", [False, True])
def test_donoho_tanner_curve_matches_the_amp_formula(nonneg):
    deltas = [0.1, 0.3, 0.5, 0.7, 0.9]
    curve = donoho_tanner_curve(deltas, nonneg)
    for delta, rho in zip(deltas, curve.tolist(), strict=True):
        assert rho == pytest.approx(dmm_curve(delta, 1 if nonneg else 2), abs=1e-6)
    assert (curve.diff() > 0).all()


def test_donoho_tanner_curve_reference_values():
    # Donoho-Tanner weak thresholds at delta = 0.5, as commonly quoted: rho_W ~ 0.3848 for the cross-polytope
    # (signed l1; Donoho-Tanner, J. AMS 2009) and ~ 0.558 for the simplex (non-negative; Donoho-Tanner, PNAS
    # 2005). Two independent formulas give 0.38569 and 0.55823 here: the statistical dimension (Amelunxen,
    # Lotz, McCoy, Tropp 2014) and the minimax threshold of Donoho-Maleki-Montanari (PNAS 2009), which they
    # show equals the Donoho-Tanner weak threshold; the quoted 0.3848 is within 0.001 of it.
    assert float(donoho_tanner_curve([0.5])[0]) == pytest.approx(0.3848, abs=0.01)
    assert float(donoho_tanner_curve([0.5], nonneg=True)[0]) == pytest.approx(0.558, abs=0.01)
    assert float(donoho_tanner_curve([1.0])[0]) == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: basis_pursuit(W_DH, np.ones(31)), BadInputError, "last dimension 31"),
        (lambda: basis_pursuit(W_DH, np.full(32, np.nan)), BadInputError, "non-finite"),
        (lambda: basis_pursuit(W_DH, np.ones((2, 2, 32))), BadInputError, r"pass \(batch, d\)"),
        (lambda: basis_pursuit(W_DH, np.ones(32), solver="lasso"), BadInputError, "solver must be"),
        (lambda: basis_pursuit(W_DH, np.ones(32), k=2), BadInputError, "only applies to solver='omp'"),
        (
            lambda: basis_pursuit(W_DH, np.ones(32), solver="cvxpy", cvxpy_solver="NOPE"),
            BadInputError,
            "not installed",
        ),
        (lambda: basis_pursuit(W_DH, np.ones(32), solver="omp", k=0), BadInputError, "k must be an int in"),
        (
            lambda: basis_pursuit(W_DH, np.ones((2, 32)), true_codes=np.ones(64)),
            BadInputError,
            "one code per",
        ),
        (lambda: basis_pursuit(np.ones(5), np.ones(5)), BadInputError, "2-D"),
        (lambda: dual_certificate(W_DH, np.zeros(64)), BadInputError, "zero code"),
        (lambda: certify_codes(W_DH, np.ones((2, 32)), np.ones((2, 63))), BadInputError, "one code of 64"),
        (lambda: dual_certificate(W_DH, -np.eye(64)[0], nonneg=True), BadInputError, "negative entries"),
        (lambda: erc(W_DH, [1, 1]), BadInputError, "distinct indices"),
        (lambda: erc(W_DH, [64]), BadInputError, "distinct indices"),
        (lambda: erc(W_DH, []), BadInputError, "non-empty"),
        (lambda: erc(W_DH[:3], [0, 1, 2]), BadInputError, "covers every atom"),
        (lambda: erc(np.vstack([W_DH[:2], W_DH[:1]]), [0, 2]), IllConditionedError, "linearly independent"),
        (lambda: donoho_tanner_curve([0.0, 0.5]), BadInputError, r"in \(0, 1\]"),
        (lambda: wilson_interval(torch.tensor([3]), 2), BadInputError, "successes must lie in"),
        (lambda: wilson_interval(torch.tensor([0]), 0), BadInputError, "trials must be an int"),
        (lambda: phase_transition(n=1), BadInputError, "n \\(the number of atoms\\)"),
        (lambda: phase_transition(n=10, trials=0), BadInputError, "trials must be"),
        (lambda: phase_transition(n=10, rhos=[1.5]), BadInputError, "rhos must be"),
    ],
)
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()
