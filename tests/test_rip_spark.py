"""rip_constant and spark against independent numpy references, known frames and their bounds."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.linalg import hadamard

from atoms import synth
from atoms.errors import BadInputError
from atoms.rip import rip_constant
from atoms.uniqueness import spark, spark_lower_bounds


def unit_rows(W: np.ndarray) -> np.ndarray:
    return W / np.linalg.norm(W, axis=1, keepdims=True)


def brute_rip(W: np.ndarray, K: int) -> float:
    """delta_K by a plain loop over supports with numpy's spectral norm."""
    U = unit_rows(W)
    best = 0.0
    for S in itertools.combinations(range(U.shape[0]), K):
        G = U[list(S)] @ U[list(S)].T
        best = max(best, np.linalg.norm(G - np.eye(K), 2))
    return best


def brute_spark(W: np.ndarray) -> float:
    """Smallest k with a rank-deficient k-subset of rows, by numpy's matrix_rank; inf if none."""
    n = W.shape[0]
    for k in range(1, n + 1):
        for S in itertools.combinations(range(n), k):
            if np.linalg.matrix_rank(W[list(S)], tol=1e-9 * np.linalg.norm(W[list(S)], 2)) < k:
                return float(k)
    return math.inf


def numpy_coherence(W: np.ndarray) -> float:
    U = unit_rows(W)
    G = np.abs(U @ U.T)
    np.fill_diagonal(G, 0.0)
    return float(G.max())


def numpy_babel(W: np.ndarray, k: int) -> float:
    U = unit_rows(W)
    G = np.abs(U @ U.T)
    np.fill_diagonal(G, -np.inf)
    return float(np.sort(G, axis=1)[:, ::-1][:, :k].sum(axis=1).max())


def equal_correlation_frame(n: int, d: int, mu: float) -> np.ndarray:
    """n <= d unit vectors with every pairwise inner product +mu: rows of the Cholesky factor of the Gram."""
    G = (1 - mu) * np.eye(n) + mu * np.ones((n, n))
    L = np.linalg.cholesky(G)
    return np.hstack([L, np.zeros((n, d - n))])


def dirac_hadamard_np(n: int) -> np.ndarray:
    return np.vstack([np.eye(n), hadamard(n) / np.sqrt(n)])


small_dicts = st.tuples(st.integers(4, 9), st.integers(2, 6), st.integers(0, 10_000))


@settings(max_examples=25, deadline=None)
@given(small_dicts, st.integers(1, 4))
def test_rip_exact_matches_brute_force_and_stays_under_bounds(shape, K):
    n, d, seed = shape
    K = min(K, n)
    W = np.random.default_rng(seed).standard_normal((n, d))
    res = rip_constant(W, K)
    assert res.kind == "exact"
    assert res.n_supports == math.comb(n, K)
    assert res.value == pytest.approx(brute_rip(W, K), abs=1e-10)
    # The reported support attains the value.
    U = unit_rows(W)[list(res.support)]
    assert np.linalg.norm(U @ U.T - np.eye(K), 2) == pytest.approx(res.value, abs=1e-10)
    mu = numpy_coherence(W)
    assert res.gershgorin_upper == pytest.approx((K - 1) * mu, abs=1e-12)
    if K > 1:
        assert res.babel_upper == pytest.approx(numpy_babel(W, K - 1), abs=1e-12)
    assert res.value <= res.babel_upper + 1e-12
    assert res.babel_upper <= res.gershgorin_upper + 1e-12


@pytest.mark.parametrize(("n", "K", "mu"), [(4, 4, 0.2), (6, 3, 0.3), (5, 5, 0.1)])
def test_gershgorin_is_tight_on_equal_correlation_frames(n, K, mu):
    W = equal_correlation_frame(n, 8, mu)
    res = rip_constant(W, K)
    assert res.value == pytest.approx((K - 1) * mu, abs=1e-12)
    assert res.gershgorin_upper == pytest.approx(res.value, abs=1e-12)


def test_gershgorin_tight_frame_from_synth():
    W = synth.gershgorin_tight_frame(4, 0.15, d=7).numpy()
    mu = numpy_coherence(W)
    assert mu == pytest.approx(0.15, abs=1e-12)
    # Any K <= 4 of the planted atoms reach (K - 1) mu; Gershgorin caps every other support there.
    for K in (2, 3, 4):
        res = rip_constant(W, K)
        assert res.value == pytest.approx((K - 1) * mu, abs=1e-10) == pytest.approx(res.gershgorin_upper)
        assert brute_rip(W, K) == pytest.approx(res.value, abs=1e-10)


@pytest.mark.parametrize(("n", "K"), [(60, 3), (30, 4)])
def test_lower_bound_mode_is_flagged_and_finds_a_planted_support(n, K):
    rng = np.random.default_rng(3)
    W = unit_rows(rng.standard_normal((n, 30)))
    # Plant K atoms with pairwise cosine 0.8, far above the rest: the worst K-support, delta_K = 0.8 (K - 1).
    W[:K] = equal_correlation_frame(K, 30, 0.8) @ np.linalg.qr(rng.standard_normal((30, 30)))[0]
    exact = rip_constant(W, K)
    bound = rip_constant(W, K, max_supports=1000, samples=500)
    assert exact.kind == "exact" and bound.kind == "lower_bound"
    assert bound.value <= exact.value + 1e-12
    assert bound.support == tuple(range(K))
    assert bound.value == pytest.approx(exact.value, abs=1e-12)
    assert exact.value == pytest.approx(0.8 * (K - 1), abs=1e-12)


def test_lower_bound_without_plant_stays_below_exact():
    W = np.random.default_rng(5).standard_normal((25, 8))
    exact = rip_constant(W, 3)
    bound = rip_constant(W, 3, max_supports=100, samples=200, seed=1)
    assert bound.kind == "lower_bound"
    assert 0 < bound.value <= exact.value + 1e-12


def test_rip_k1_is_zero():
    res = rip_constant(np.random.default_rng(0).standard_normal((5, 3)), 1)
    assert res.value == 0.0 and res.kind == "exact"


@pytest.mark.parametrize(
    ("W", "K", "match"),
    [
        (np.ones((4, 3)), 0, "K must be an int >= 1"),
        (np.ones((4, 3)), 2.5, "K must be an int"),
        (np.ones((4, 3)), 5, "exceeds the number of atoms"),
        (np.ones(4), 1, "2-D"),
        (np.array([[1.0, np.nan], [0.0, 1.0]]), 1, "non-finite"),
        (np.array([[1.0, 0.0], [0.0, 0.0]]), 1, "zero atoms"),
        (np.ones((3, 2), dtype=np.int64), 1, "floating dtype"),
    ],
)
def test_rip_bad_input(W, K, match):
    with pytest.raises(BadInputError, match=match):
        rip_constant(W, K)


def test_rip_lower_bound_needs_something_to_evaluate():
    with pytest.raises(BadInputError, match="nothing to evaluate"):
        rip_constant(
            np.random.default_rng(0).standard_normal((20, 5)), 3, max_supports=10, samples=0, greedy_seeds=0
        )


@pytest.mark.parametrize(("n", "expected"), [(4, 4.0), (8, 6.0)])
def test_spark_dirac_hadamard(n, expected):
    # [I, H/sqrt(n)]: a dependent set is the support of x and of Hx for some x != 0, and ||x||_0 ||Hx||_0 >= n
    # (Donoho-Stark). For Sylvester-Hadamard the extremal supports are subgroups of Z_2^p (sizes powers of 2),
    # so the spark is min {a + b : a b >= n, a, b powers of 2}: 2 sqrt(n) = 4 for n = 4, but 2 + 4 = 6 for
    # n = 8 (2 sqrt(8) = 5.66 is not attained).
    W = dirac_hadamard_np(n)
    np.testing.assert_allclose(synth.dirac_hadamard(n).numpy(), W, atol=1e-12)
    milp = spark(W, method="milp")
    enum = spark(W, method="enumerate")
    assert milp.kind == enum.kind == "exact"
    assert milp.value == enum.value == expected
    assert milp.method == "milp" and "confirmed" in milp.note
    assert np.linalg.matrix_rank(W[list(milp.support)]) < len(milp.support)


@pytest.mark.parametrize("d", [3, 5])
def test_spark_simplex_etf(d):
    W = synth.simplex_etf(d)
    assert numpy_coherence(W.numpy()) == pytest.approx(1 / d, abs=1e-12)
    auto = spark(W)
    assert auto.value == d + 1 and auto.kind == "exact"
    assert spark(W, method="milp").value == d + 1


def test_spark_gaussian_is_d_plus_one():
    W = synth.gaussian_dictionary(9, 5, seed=0)
    for method in ("milp", "enumerate", "auto"):
        assert spark(W, method=method).value == 6
    assert brute_spark(np.asarray(W)) == 6


def test_spark_duplicate_and_antiparallel_atoms():
    W = np.random.default_rng(0).standard_normal((7, 4))
    W[5] = 2.5 * W[1]
    for method in ("milp", "enumerate", "auto"):
        res = spark(W, method=method)
        assert res.value == 2 and set(res.support) == {1, 5}
    W[5] = -W[1]
    assert spark(W, method="milp").value == 2


def test_spark_near_duplicate_is_not_trusted_to_the_solver_tolerance():
    # Atoms 0 and 1 differ by 1e-7 relative: HiGHS accepts {0, 1} within its feasibility tolerance, but the
    # SVD check (sigma_min / sigma_max ~ 5e-8 > tol = 1e-9) rejects it, a cut excludes it, the search goes on.
    W = np.random.default_rng(2).standard_normal((8, 4))
    W[1] = W[0] + 1e-7 * np.random.default_rng(3).standard_normal(4)
    assert spark(W, method="milp").value == spark(W, method="enumerate").value == 5
    assert spark(W, method="milp", tol=1e-5).value == 2


@pytest.mark.parametrize("seed", [1, 2])
def test_spark_circuit_through_a_near_duplicate_pair(seed):
    # {0, 1} is nearly dependent (not at tol) and {0, 1, 2, 3} is an exact circuit through it. Excluding the
    # rejected {0, 1} must not exclude its supersets; where HiGHS stays inconclusive, enumeration settles it.
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((8, 5))
    W[1] = W[0] + 1e-7 * rng.standard_normal(5)
    W[2] = W[0] + 2 * W[1] + W[3]
    res = spark(W, method="milp")
    assert res.kind == "exact" and res.value == brute_spark(W) == 4
    assert set(res.support) == {0, 1, 2, 3}
    assert "enumerat" in res.note


def test_spark_independent_atoms_is_inf():
    res = spark(np.random.default_rng(0).standard_normal((4, 6)))
    assert res.value == math.inf and res.method == "rank"


@settings(max_examples=20, deadline=None)
@given(st.integers(5, 8), st.integers(3, 5), st.integers(0, 3), st.integers(0, 10_000))
def test_spark_milp_equals_enumeration_with_planted_dependencies(n, d, planted, seed):
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((n, d))
    if planted:
        # Atom 0 becomes a combination of `planted` others: a dependent set of planted + 1 atoms.
        others = rng.choice(np.arange(1, n), size=planted, replace=False)
        W[0] = rng.standard_normal(planted) @ W[others]
    milp = spark(W, method="milp")
    enum = spark(W, method="enumerate")
    bounds = spark(W, method="bounds")
    reference = brute_spark(W)
    assert milp.kind == enum.kind == "exact"
    assert milp.value == enum.value == reference
    # The MILP's own answer, confirmed by enumeration, not one the enumeration check had to replace.
    if reference < math.inf:
        assert milp.method == "milp" and "confirmed" in milp.note, milp.note
    assert bounds.lower <= reference <= bounds.upper
    if planted:
        assert milp.value <= planted + 1


def test_spark_lower_bounds_match_numpy():
    W = dirac_hadamard_np(8)
    coh, bab = spark_lower_bounds(W)
    mu = numpy_coherence(W)
    assert coh == math.ceil(1 + 1 / mu - 1e-9)
    assert bab == min(k for k in range(2, 17) if numpy_babel(W, k - 1) >= 1 - 1e-9)
    assert max(coh, bab) <= 6


def test_spark_time_limit_returns_bounds():
    W = np.random.default_rng(1).standard_normal((40, 20))
    res = spark(W, method="milp", time_limit=0.3)
    assert res.kind == "bounds" and res.value is None
    assert res.lower <= 21 <= res.upper
    assert res.seconds < 5


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"method": "guess"}, "method must be"),
        ({"time_limit": 0}, "time_limit must be a positive"),
        ({"tol": 2.0}, "tol must be a float in"),
    ],
)
def test_spark_bad_input(kwargs, match):
    with pytest.raises(BadInputError, match=match):
        spark(np.random.default_rng(0).standard_normal((5, 3)), **kwargs)


def test_spark_rejects_nan_atoms():
    W = np.random.default_rng(0).standard_normal((5, 3))
    W[2, 1] = np.nan
    with pytest.raises(BadInputError, match="non-finite"):
        spark(torch.from_numpy(W))
