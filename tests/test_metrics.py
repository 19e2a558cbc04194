"""atoms.metrics against hand-computed cases and independent float64 numpy/scipy references.

References: R^2 and whitening from numpy sums and a numpy Cholesky with scipy's triangular solve; per-sample
coherence from a dense numpy Gram (under an AIP, from S = C^{-1} by numpy.linalg.solve: cos_jl = S_jl /
sqrt(S_jj S_ll) for the whitened coordinate axes); q* from numpy.quantile(method="inverted_cdf") evaluated on
many q; ERC by numpy.linalg.lstsq; the spark bounds from a brute-force numpy babel function; the window from
the idealised encoder z = m~ @ unit^T run directly.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import scipy.linalg
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.linalg import hadamard

from atoms import metrics
from atoms.aip import AIP
from atoms.dictionary import Dictionary
from atoms.errors import BadInputError
from atoms.metrics import (
    R2Accumulator,
    certified_fractions,
    neuron_codes,
    neuron_dictionary,
    per_sample_coherence,
    q_star,
    r2,
    to_sparse,
    tsae_window,
    unit_codes,
)
from atoms.recovery import basis_pursuit

SQ2 = math.sqrt(2.0)


def np_r2(x: np.ndarray, x_hat: np.ndarray) -> float:
    return 1.0 - ((x - x_hat) ** 2).sum() / ((x - x.mean(axis=0)) ** 2).sum()


def np_whiten(C: np.ndarray, x: np.ndarray) -> np.ndarray:
    L = np.linalg.cholesky(C)
    return scipy.linalg.solve_triangular(L, x.T, lower=True).T


def densify(indices: torch.Tensor, values: torch.Tensor, n_atoms: int) -> np.ndarray:
    out = np.zeros((indices.shape[0], n_atoms))
    for i, (row_i, row_v) in enumerate(zip(indices.tolist(), values.tolist(), strict=True)):
        for j, v in zip(row_i, row_v, strict=True):
            if j >= 0:
                out[i, j] += v
    return out


def np_sample_coherence(G: np.ndarray, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mus, l0s = [], []
    for row in codes:
        L = np.flatnonzero(row)
        sub = np.abs(G[np.ix_(L, L)])
        np.fill_diagonal(sub, 0.0)
        mus.append(sub.max() if len(L) >= 2 else 0.0)
        l0s.append(len(L))
    return np.array(mus), np.array(l0s)


def np_bound(K: np.ndarray) -> np.ndarray:
    K = np.asarray(K, dtype=np.float64)
    with np.errstate(divide="ignore"):
        return np.where(K >= 1, 1.0 / (2.0 * K - 1.0), np.inf)


def sparse_codes(rng: np.random.Generator, n: int, n_atoms: int, k: int, nonneg: bool = True) -> np.ndarray:
    codes = np.zeros((n, n_atoms))
    for row in codes:
        kk = rng.integers(0, k + 1)
        vals = rng.uniform(0.5, 1.5, kk)
        row[rng.choice(n_atoms, kk, replace=False)] = vals if nonneg else vals * rng.choice([-1, 1], kk)
    return codes


# ------------------------------------------------------------------------------------------------------------
# R^2
# ------------------------------------------------------------------------------------------------------------


def test_r2_exact_reconstruction_mean_predictor_and_numpy_reference():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 7)) @ rng.standard_normal((7, 7)) + 3.0
    assert r2(x, x) == 1.0
    assert r2(torch.from_numpy(x).float(), torch.from_numpy(x).float()) == 1.0
    mean = np.broadcast_to(x.mean(axis=0), x.shape).copy()
    assert abs(r2(x, mean)) < 1e-13
    noisy = x + 0.3 * rng.standard_normal(x.shape)
    assert r2(x, noisy) == pytest.approx(np_r2(x, noisy), rel=1e-13)
    worse = x + 5.0 * rng.standard_normal(x.shape)
    assert r2(x, worse) < 0


def test_r2_aip_matches_numpy_whitening_and_euclidean_on_prewhitened_data():
    rng = np.random.default_rng(1)
    n, d = 400, 6
    x = rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) + 1.0
    noisy = x + 0.2 * rng.standard_normal(x.shape)
    aip = AIP.fit(x)
    C = x.T @ x / n
    expected = np_r2(np_whiten(C, x), np_whiten(C, noisy))
    assert r2(x, noisy, aip) == pytest.approx(expected, rel=1e-12)
    assert abs(r2(x, noisy, aip) - r2(x, noisy)) > 1e-3  # the two norms differ on non-white data

    # Data whose second moment is exactly I: the fitted AIP is the identity, both R^2 agree.
    q, _ = np.linalg.qr(rng.standard_normal((n, d)))
    z = q * math.sqrt(n)
    z_hat = z + 0.1 * rng.standard_normal(z.shape)
    white = AIP.fit(z)
    assert np.allclose(white.cholesky.numpy(), np.eye(d), atol=1e-12)
    assert r2(z, z_hat, white) == pytest.approx(r2(z, z_hat), rel=1e-12)


@settings(max_examples=30, deadline=None)
@given(
    cuts=st.lists(st.integers(1, 59), max_size=6, unique=True),
    seed=st.integers(0, 2**16),
    use_aip=st.booleans(),
)
def test_accumulator_over_any_batching_equals_one_shot(cuts, seed, use_aip):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((60, 4)) * [1.0, 10.0, 0.1, 3.0] + 1e4  # a large mean: no cancellation allowed
    x_hat = x + rng.standard_normal(x.shape)
    aip = AIP.fit(x) if use_aip else None
    whole = r2(x, x_hat, aip)
    edges = [0, *sorted(cuts), 60]
    parts = [R2Accumulator(aip).update(x[a:b], x_hat[a:b]) for a, b in itertools.pairwise(edges)]
    merged = parts[0]
    for p in parts[1:]:
        merged = merged.merge(p)
    streamed = R2Accumulator(aip)
    for a, b in itertools.pairwise(edges):
        streamed.update(x[a:b], x_hat[a:b])
    assert merged.count == streamed.count == 60
    for acc in (merged, streamed):
        assert acc.value() == pytest.approx(whole, rel=1e-12, abs=1e-12)
    if not use_aip:
        assert whole == pytest.approx(np_r2(x, x_hat), rel=1e-9)


def test_accumulator_merge_with_an_empty_one_and_bad_merges():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((50, 3))
    acc = R2Accumulator().update(x, 0.5 * x)
    assert R2Accumulator().merge(acc).value() == acc.value() == pytest.approx(np_r2(x, 0.5 * x), rel=1e-13)
    with pytest.raises(BadInputError, match="same width d in the same norm"):
        acc.merge(R2Accumulator(AIP.fit(x)))
    with pytest.raises(BadInputError, match="same width d"):
        acc.merge(R2Accumulator().update(x[:, :2], x[:, :2]))
    with pytest.raises(BadInputError, match="expects an R2Accumulator"):
        acc.merge(3)
    with pytest.raises(BadInputError, match="last dimension 2 but 3 was expected"):
        acc.update(x[:, :2], x[:, :2])


@pytest.mark.parametrize(
    ("x", "x_hat", "match"),
    [
        (np.full((3, 2), np.nan), np.zeros((3, 2)), "x holds 6 non-finite values"),
        (np.ones((3, 2)), np.array([[np.inf, 0.0]] * 3), "x_hat holds 3 non-finite"),
        (np.ones((3, 2)), np.ones((4, 2)), r"x has shape \(3, 2\) but x_hat \(4, 2\)"),
        (np.ones((3, 2)), np.ones((3, 3)), "last dimension 3 but 2 was expected"),
        (np.zeros((0, 2)), np.zeros((0, 2)), "x is empty"),
        (np.ones(3), np.ones(3), "needs at least 2 dimension"),
        (np.ones((3, 2), dtype=np.int64), np.ones((3, 2)), "floating dtype is required"),
        (np.ones((3, 2)), np.zeros((3, 2)), "variance is 0 and R\\^2 is undefined"),
    ],
)
def test_r2_bad_input(x, x_hat, match):
    with pytest.raises(BadInputError, match=match):
        r2(x, x_hat)


def test_r2_accumulator_without_samples_and_bad_aip():
    with pytest.raises(BadInputError, match="no samples yet"):
        R2Accumulator().value()
    with pytest.raises(BadInputError, match=r"aip must be an atoms\.AIP"):
        R2Accumulator("aip")


# ------------------------------------------------------------------------------------------------------------
# Sparse codes
# ------------------------------------------------------------------------------------------------------------


def test_to_sparse_hand_case_and_round_trip():
    dense = torch.tensor([[0.0, -3.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0], [2.0, 0.0, 0.0, 0.5]])
    idx, vals = to_sparse(dense)
    assert idx.tolist() == [[1, 2], [-1, -1], [0, 3]]
    assert vals.tolist() == [[-3.0, 1.0], [0.0, 0.0], [2.0, 0.5]]
    assert vals.dtype == torch.float32
    idx, vals = to_sparse(dense, k_max=6)  # wider than n_atoms: padded
    assert idx.shape == (3, 6) and idx[:, 2:].eq(-1).all() and vals[:, 2:].eq(0).all()
    assert np.array_equal(densify(idx, vals, 4), dense.numpy())
    idx, vals = to_sparse(np.zeros((2, 5)))
    assert idx.tolist() == [[-1], [-1]]
    rng = np.random.default_rng(3)
    codes = sparse_codes(rng, 40, 12, 5, nonneg=False)
    idx, vals = to_sparse(codes)
    assert np.array_equal(densify(idx, vals, 12), codes)
    assert (vals.abs()[:, :-1] >= vals.abs()[:, 1:]).all()  # by decreasing |value|


def test_to_sparse_never_drops_entries():
    dense = np.array([[1.0, 2.0, 3.0], [1.0, 0.0, 0.0], [4.0, 5.0, 0.0]])
    with pytest.raises(BadInputError, match=r"2 rows of codes_dense have more than k_max = 1.*row 0 has 3"):
        to_sparse(dense, k_max=1)
    with pytest.raises(BadInputError, match="k_max must be an int >= 1"):
        to_sparse(dense, k_max=0)
    with pytest.raises(BadInputError, match="pass \\(n, n_atoms\\)"):
        to_sparse(np.ones((2, 2, 2)))


THREE = np.array([[1.0, 0.0], [0.0, 1.0], [1 / SQ2, 1 / SQ2]])  # e1, e2 and their bisector


def test_per_sample_coherence_hand_case():
    D = Dictionary(THREE)
    idx = torch.tensor([[0, 1, -1], [0, 2, -1], [0, 1, 2], [1, -1, -1], [-1, -1, -1], [2, 0, 1]])
    vals = torch.tensor([[1.0, 2, 0], [1, 1, 0], [1, 1, 1], [3, 0, 0], [0, 0, 0], [1, 1, 0]])
    mu, l0 = per_sample_coherence(D, idx, vals)
    assert l0.tolist() == [2, 2, 3, 1, 0, 2]
    assert mu.dtype == torch.float64 and l0.dtype == torch.int64
    np.testing.assert_allclose(mu.numpy(), [0.0, 1 / SQ2, 1 / SQ2, 0.0, 0.0, 1 / SQ2], atol=1e-15)


def test_per_sample_coherence_under_an_aip_matches_a_dense_numpy_gram():
    rng = np.random.default_rng(4)
    d, n_atoms = 6, 15
    x = rng.standard_normal((200, d)) @ rng.standard_normal((d, d))
    aip = AIP.fit(x)
    W = rng.standard_normal((n_atoms, d))
    codes = sparse_codes(rng, 80, n_atoms, 5)
    S = np.linalg.solve(x.T @ x / 200, np.eye(d))
    G = W @ S @ W.T
    G = G / np.sqrt(np.outer(np.diag(G), np.diag(G)))
    mu, l0 = per_sample_coherence(Dictionary(W, aip), *to_sparse(codes))
    mu_ref, l0_ref = np_sample_coherence(G, codes)
    np.testing.assert_allclose(mu.numpy(), mu_ref, atol=1e-12)
    assert np.array_equal(l0.numpy(), l0_ref)


@pytest.mark.parametrize(
    ("indices", "values", "match"),
    [
        ([[0, -1]], [[1.0, 0.5]], r"indices\[0, 1\] is padding \(-1\) but values\[0, 1\] = 0.5 is not 0"),
        ([[0, 3]], [[1.0, 1.0]], r"indices\[0, 1\] = 3 is out of range for 3 atoms"),
        ([[0, -2]], [[1.0, 0.0]], r"indices\[0, 1\] = -2 is out of range"),
        ([[1, 1]], [[1.0, 1.0]], "sample 0 lists atom 1 more than once"),
        ([[0.0, 1.0]], [[1.0, 1.0]], "indices has dtype torch.float64.*to_sparse"),
        ([[0, 1]], [[1.0, 1.0, 1.0]], r"values has shape \(1, 3\) but indices \(1, 2\)"),
        ([[0, 1]], [[1.0, np.nan]], "values holds 1 non-finite values"),
        (np.zeros((0, 2), dtype=np.int64), np.zeros((0, 2)), r"indices must be \(n, k\) with n >= 1"),
        ([0, 1], [1.0, 1.0], r"indices must be \(n, k\)"),
    ],
)
def test_sparse_codes_bad_input(indices, values, match):
    with pytest.raises(BadInputError, match=match):
        per_sample_coherence(Dictionary(THREE), np.asarray(indices), np.asarray(values))


def test_bad_dictionary_argument():
    with pytest.raises(
        BadInputError, match=r"dictionary must be an atoms\.Dictionary.*Dictionary\(W_dec, aip\)"
    ):
        per_sample_coherence(THREE, np.array([[0]]), np.array([[1.0]]))


def test_unit_codes_turn_raw_codes_into_whitened_unit_codes():
    rng = np.random.default_rng(5)
    d, n_atoms = 5, 9
    x = rng.standard_normal((100, d)) @ rng.standard_normal((d, d))
    aip = AIP.fit(x)
    W = rng.standard_normal((n_atoms, d)) * rng.uniform(0.1, 10.0, (n_atoms, 1))
    D = Dictionary(W, aip)
    codes = sparse_codes(rng, 20, n_atoms, 4, nonneg=False)
    C = x.T @ x / 100
    m_white = np_whiten(C, codes @ W)
    dense = unit_codes(D, codes)
    np.testing.assert_allclose(dense.numpy() @ D.unit.numpy(), m_white, atol=1e-10)
    idx, vals = to_sparse(codes)
    sparse = unit_codes(D, vals, idx)
    np.testing.assert_allclose(densify(idx, sparse, n_atoms), dense.numpy(), rtol=1e-14)
    with pytest.raises(BadInputError, match="last dimension 4 but 9 was expected"):
        unit_codes(D, codes[:, :4])


# ------------------------------------------------------------------------------------------------------------
# q*
# ------------------------------------------------------------------------------------------------------------


def test_q_star_hand_cases():
    # Sorted mu: 0, .1, .2, .3, .5; sorted K: 1, 2, 2, 3, 3 -> bounds 1, 1/3, 1/3, 1/5, 1/5.
    # Breakpoints j = 1..5: 0 < 1, .1 < 1/3, .2 < 1/3, .3 >= 1/5, .5 >= 1/5 -> q* = 3/5.
    mu = torch.tensor([0.5, 0.0, 0.3, 0.1, 0.2], dtype=torch.float64)
    l0 = torch.tensor([3, 2, 1, 3, 2])
    q = q_star(mu, l0)
    assert q.value == pytest.approx(0.6) and q.form == "quantile"
    assert q.detail["breakpoint"] == 3 and q.detail["mu_q"] == 0.2 and q.detail["K_q"] == 2
    assert q.detail["first_failure_mu_q"] == 0.3 and q.detail["first_failure_K_q"] == 3
    # Per sample: (.5, 3) no, (0, 2) yes, (.3, 1) yes, (.1, 3) yes, (.2, 2) yes -> 4/5.
    p = q_star(mu, l0, form="per_sample")
    assert p.value == pytest.approx(0.8) and p.detail["satisfied"] == 4
    assert p.detail["single_atom_supports"] == 1 and p.detail["empty_supports"] == 0
    # Empty supports count as satisfied; a first breakpoint that fails gives q* = 0.
    assert q_star(np.zeros(3), np.array([0, 0, 4]), form="per_sample").value == 1.0
    none = q_star(np.array([0.9, 0.95]), np.array([2, 2]))
    assert none.value == 0.0 and none.detail["mu_q"] is None and none.detail["first_failure_K_q"] == 2
    # Strict inequality: mu exactly at 1/(2K - 1) fails.
    assert q_star(np.array([1 / 3]), np.array([2]), form="per_sample").value == 0.0
    assert q_star(np.array([1 / 3]), np.array([2])).value == 0.0


def brute_quantile_q_star(mu: np.ndarray, l0: np.ndarray) -> float:
    """sup over q: on ((j-1)/n, j/n] both quantiles are constant, so test the midpoint of each interval."""
    n = len(mu)
    best = 0.0
    for j in range(1, n + 1):
        q = (j - 0.5) / n
        mu_q = np.quantile(mu, q, method="inverted_cdf")
        K_q = np.quantile(l0, q, method="inverted_cdf")
        if mu_q < np_bound(K_q):
            best = max(best, j / n)
    return best


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 40),
    seed=st.integers(0, 2**16),
    ties=st.booleans(),
)
def test_q_star_quantile_matches_brute_force_numpy(n, seed, ties):
    rng = np.random.default_rng(seed)
    l0 = rng.integers(0, 7, n)
    mu = rng.uniform(0, 0.6, n) * (l0 >= 2)
    if ties:
        mu = np.round(mu, 1)
    q = q_star(mu, l0)
    assert q.value == brute_quantile_q_star(mu, l0)
    # The condition holds exactly on [0, q*]: check on a fine grid away from the breakpoints.
    grid = np.linspace(0, 1, 997)[1:-1]
    grid = grid[np.abs(grid * n - np.round(grid * n)) > 1e-9]
    holds = np.array(
        [
            np.quantile(mu, g, method="inverted_cdf") < np_bound(np.quantile(l0, g, method="inverted_cdf"))
            for g in grid
        ]
    )
    assert np.array_equal(holds, grid < q.value)
    per = q_star(mu, l0, form="per_sample")
    assert per.value == np.mean(mu < np_bound(l0))


@pytest.mark.parametrize(
    ("mu", "l0", "kwargs", "match"),
    [
        (np.array([0.1, 0.2]), np.array([2]), {}, r"same length.*\(2,\) and \(1,\)"),
        (np.array([0.1]), np.array([2.0]), {}, "l0_i must be an integer"),
        (np.array([-0.1]), np.array([2]), {}, "must be >= 0"),
        (np.array([0.1]), np.array([-1]), {}, "must be >= 0"),
        (np.array([np.nan]), np.array([2]), {}, "mu_i holds 1 non-finite"),
        (np.zeros(0), np.zeros(0, dtype=np.int64), {}, "mu_i is empty"),
        (np.array([0.1]), np.array([2]), {"form": "median"}, "form must be 'quantile' or 'per_sample'"),
    ],
)
def test_q_star_bad_input(mu, l0, kwargs, match):
    with pytest.raises(BadInputError, match=match):
        q_star(mu, l0, **kwargs)


# ------------------------------------------------------------------------------------------------------------
# Neurons baseline
# ------------------------------------------------------------------------------------------------------------


def relu_activations(seed: int, n: int = 150, d: int = 6) -> np.ndarray:
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) + 0.3
    return np.maximum(z, 0.0) + 0.05 * rng.standard_normal((n, d)) * (z > 0)


def test_neurons_euclidean_closed_form():
    x = relu_activations(6)
    d = x.shape[1]
    idx, vals = neuron_codes(x)
    D = neuron_dictionary(d)
    assert D.coherence() == 0.0
    mu, l0 = per_sample_coherence(D, idx, vals)
    assert mu.eq(0).all()
    assert np.array_equal(l0.numpy(), (x != 0).sum(axis=1))
    assert q_star(mu, l0).value == 1.0
    assert q_star(mu, l0, form="per_sample").value == 1.0
    x_hat = densify(idx, vals, d) @ np.eye(d)
    assert r2(x, x_hat) == 1.0
    assert np.array_equal(densify(*neuron_codes(x), d), x)


def test_neurons_under_the_aip_match_the_whitened_gram_reference():
    x = relu_activations(7)
    n, d = x.shape
    aip = AIP.fit(x)
    D = neuron_dictionary(d, aip)
    idx, vals = neuron_codes(x)
    mu, l0 = per_sample_coherence(D, idx, vals)
    S = np.linalg.solve(x.T @ x / n, np.eye(d))  # Gram of the whitened axes L^{-1} e_j
    G = S / np.sqrt(np.outer(np.diag(S), np.diag(S)))
    mu_ref, l0_ref = np_sample_coherence(G, x)
    np.testing.assert_allclose(mu.numpy(), mu_ref, atol=1e-12)
    assert np.array_equal(l0.numpy(), l0_ref)
    assert q_star(mu, l0, form="per_sample").value == np.mean(mu_ref < np_bound(l0_ref))
    assert q_star(mu, l0).value == brute_quantile_q_star(mu_ref, l0_ref)
    assert q_star(mu, l0, form="per_sample").value < 1.0  # whitened axes are not orthogonal
    x_hat = unit_codes(D, vals, idx)
    assert r2(x, densify(idx, x_hat, d) @ D.unit.numpy() @ aip.cholesky.numpy().T, aip) == pytest.approx(1.0)


# ------------------------------------------------------------------------------------------------------------
# Certified fractions
# ------------------------------------------------------------------------------------------------------------

# THREE = e1, e2, b = (e1 + e2)/sqrt(2): spark 3, mu = 1/sqrt(2), coherence bound ceil(1 + sqrt 2) = 3.
#   code     l0  spark (l0 < 1.5)  ERC                                  basis pursuit
#   e1 + e2  2   no                ||pinv[e1 e2] b||_1 = sqrt 2: fails  m = sqrt2 b, l1 sqrt 2 < 2: fails
#   b        1   yes               |<b, e1>| = 1/sqrt 2: passes         recovered
#   2 e1     1   yes               1/sqrt 2: passes                     recovered
#   0        0   yes               empty support: passes                recovered (m = 0)
#   e1 + b   2   no                e2 = -e1 + sqrt2 b: 1 + sqrt 2:      l1 at the vertices {e1, b}: 2,
#                                  fails                                {e1, e2}: 1 + sqrt 2,
#                                                                       {e2, b}: 2 + sqrt 2; recovered
THREE_CODES = (
    torch.tensor([[0, 1], [2, -1], [0, -1], [-1, -1], [0, 2]]),
    torch.tensor([[1.0, 1.0], [1.0, 0.0], [2.0, 0.0], [0.0, 0.0], [1.0, 1.0]]),
)


def wilson(k: int, n: int) -> tuple[float, float]:
    z = 1.959963984540054
    p = k / n
    center = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return center - half, center + half


@pytest.mark.parametrize("solver", ["linprog", "cvxpy"])
def test_certified_fractions_hand_case(solver):
    cert = certified_fractions(Dictionary(THREE), *THREE_CODES, erc_samples=5, bp_samples=5, bp_solver=solver)
    assert cert.n == 5 and cert.spark_lower == 3.0 and cert.spark_source in ("coherence", "babel")
    assert cert.spark_count == 3 and cert.spark_fraction == 0.6
    assert cert.erc_rows.tolist() == [0, 1, 2, 3, 4] and cert.erc_count == 3
    np.testing.assert_allclose(
        cert.erc_values.numpy(), [SQ2, 1 / SQ2, 1 / SQ2, 0.0, 1 + SQ2], rtol=1e-12, atol=1e-15
    )
    assert (cert.bp_recovered, cert.bp_flagged, cert.bp_failed) == (4, 0, 1)
    assert cert.bp_fraction == 0.8 and cert.bp_solver == solver
    np.testing.assert_allclose(cert.erc_interval, wilson(3, 5), rtol=1e-12)
    np.testing.assert_allclose(cert.bp_interval, wilson(4, 5), rtol=1e-12)


def test_certified_fractions_decides_codes_denser_than_d_without_a_solver(monkeypatch):
    """12 atoms in d = 4: a code on 5 atoms has dependent atoms, so it is never the unique l1 minimiser. It
    counts as failed (ERC +inf) with a warning, and basis pursuit only sees the sparse samples; cvxpy agrees
    that the dense code is not recovered."""
    rng = np.random.default_rng(3)
    W = rng.standard_normal((12, 4))
    dic = Dictionary(W)
    indices = torch.tensor([[0, 1, 2, 3, 4], [5, -1, -1, -1, -1]])
    values = torch.tensor([[1.0, 0.5, 0.7, 0.3, 0.9], [2.0, 0, 0, 0, 0]], dtype=torch.float64)
    seen = []

    def spy(*args, **kwargs):
        seen.append(args[1].shape[0])
        return basis_pursuit(*args, **kwargs)

    monkeypatch.setattr(metrics, "basis_pursuit", spy)
    with pytest.warns(UserWarning, match=r"1 of 2 samples have more than d = 4 active atoms"):
        cert = certified_fractions(dic, indices, values, nonneg=True, codes_of="unit")
    assert seen == [1]  # the sparse sample alone went to the solver
    assert (cert.bp_recovered, cert.bp_failed, cert.bp_flagged) == (1, 1, 0)
    assert math.isinf(cert.erc_values[0])
    assert cert.erc_values[1] == pytest.approx(np_erc(dic.unit.numpy(), np.array([5])), rel=1e-12)
    dense = torch.zeros(12, dtype=torch.float64)
    dense[:5] = values[0]
    reference = basis_pursuit(dic.unit, dense @ dic.unit, nonneg=True, solver="cvxpy", true_codes=dense)
    assert reference.decisions != ["recovered"]


def test_certified_fractions_reads_raw_codes_when_told_and_warns_when_it_must_guess():
    """Atoms of norm 2 and 0.5: a code of the raw atoms is a different code of the unit ones. codes_of='raw'
    equals converting with unit_codes first; codes_of=None warns that it reads them as unit codes."""
    rng = np.random.default_rng(4)
    W = rng.standard_normal((10, 6))
    W /= np.linalg.norm(W, axis=1, keepdims=True)
    W[:5] *= 2.0
    W[5:] *= 0.5
    dic = Dictionary(W)
    indices = torch.tensor([[0, 7, -1], [2, 5, 9]])
    raw = torch.tensor([[1.0, 3.0, 0.0], [0.5, 1.0, 2.0]], dtype=torch.float64)
    kwargs = {"erc_samples": 2, "nonneg": True, "spark_lower": 3.0}
    by_raw = certified_fractions(dic, indices, raw, codes_of="raw", **kwargs)
    unit = metrics.unit_codes(dic, raw, indices)
    by_hand = certified_fractions(dic, indices, unit, codes_of="unit", **kwargs)
    assert by_raw.bp_recovered == by_hand.bp_recovered and torch.equal(by_raw.erc_values, by_hand.erc_values)
    with pytest.warns(UserWarning, match=r"raw atoms have norms 0.5 to 2.*codes_of='raw'"):
        certified_fractions(dic, indices, raw, **kwargs)
    with pytest.raises(BadInputError, match="codes_of must be 'unit'"):
        certified_fractions(dic, indices, raw, codes_of="whitened", **kwargs)


def np_babel(U: np.ndarray, k: int) -> float:
    G = np.abs(U @ U.T)
    np.fill_diagonal(G, -np.inf)
    return float(np.sort(G, axis=1)[:, ::-1][:, :k].sum(axis=1).max())


def np_spark_lower(W: np.ndarray) -> float:
    U = W / np.linalg.norm(W, axis=1, keepdims=True)
    G = np.abs(U @ U.T)
    np.fill_diagonal(G, 0.0)
    coh = math.ceil(1 + 1 / G.max() - 1e-9)
    ks = [k for k in range(1, len(U)) if np_babel(U, k) >= 1 - 1e-9]
    bab = ks[0] + 1 if ks else math.inf
    return max(coh, bab)


def np_erc(U: np.ndarray, support: np.ndarray) -> float:
    if len(support) == 0:
        return 0.0
    off = np.setdiff1d(np.arange(len(U)), support)
    coef = np.linalg.lstsq(U[support].T, U[off].T, rcond=None)[0]
    return float(np.abs(coef).sum(axis=0).max())


def test_certified_fractions_against_direct_computation_on_a_dirac_hadamard_subsample():
    n = 8
    W = np.vstack([np.eye(n), hadamard(n) / math.sqrt(n)])  # mu = 1/sqrt 8, coherence bound 4
    rng = np.random.default_rng(8)
    codes = sparse_codes(rng, 60, 2 * n, 3, nonneg=False)
    idx, vals = to_sparse(codes)
    cert = certified_fractions(Dictionary(W), idx, vals, erc_samples=25, bp_samples=10, seed=3)
    l0 = (codes != 0).sum(axis=1)
    assert cert.spark_lower == np_spark_lower(W) == 4.0
    assert cert.spark_count == int((l0 < cert.spark_lower / 2).sum())
    assert cert.erc_n == 25 and len(set(cert.erc_rows.tolist())) == 25
    assert set(cert.bp_rows.tolist()) <= set(cert.erc_rows.tolist())
    ref = [np_erc(W, np.flatnonzero(codes[i])) for i in cert.erc_rows.tolist()]
    np.testing.assert_allclose(cert.erc_values.numpy(), ref, rtol=1e-10)
    assert cert.erc_count == sum(v < 1 for v in ref)
    # Tropp: ERC < 1 implies basis pursuit recovers; every sampled support with ERC < 1 must be recovered.
    rows = cert.bp_rows.tolist()
    direct = basis_pursuit(W, codes[rows] @ W, solver="linprog", true_codes=codes[rows])
    assert cert.bp_recovered == direct.counts["recovered"] and cert.bp_failed == direct.counts["failed"]
    erc_of = dict(zip(cert.erc_rows.tolist(), ref, strict=True))
    for row, decision in zip(rows, direct.decisions, strict=True):
        if erc_of[row] < 1:
            assert decision == "recovered"
    again = certified_fractions(Dictionary(W), idx, vals, erc_samples=25, bp_samples=10, seed=3)
    assert torch.equal(again.erc_rows, cert.erc_rows) and torch.equal(again.bp_rows, cert.bp_rows)


def test_certified_fractions_given_bound_custom_solver_and_edge_cases():
    calls = []

    def solver(W_dec, m, *, nonneg, true_codes):
        calls.append((W_dec, m, nonneg, true_codes))
        return basis_pursuit(W_dec, m, nonneg=nonneg, solver="omp", true_codes=true_codes)

    D = Dictionary(THREE)
    cert = certified_fractions(
        D, *THREE_CODES, spark_lower=math.inf, erc_samples=0, bp_samples=5, bp_solver=solver, nonneg=True
    )
    assert cert.spark_source == "given" and cert.spark_count == 5
    assert cert.erc_n == 0 and math.isnan(cert.erc_fraction) and all(math.isnan(v) for v in cert.erc_interval)
    assert len(calls) == 1 and cert.bp_n == 5 and cert.bp_solver == "solver"
    W_dec, m, nonneg, true_codes = calls[0]
    # The solver sees the unit atoms, m = code @ unit and the codes (row 2: atom 0 beside padding, intact).
    rows = cert.bp_rows.tolist()
    expected = densify(*THREE_CODES, 3)[rows]
    assert nonneg and torch.equal(W_dec, D.unit) and np.array_equal(true_codes.numpy(), expected)
    np.testing.assert_allclose(m.numpy(), expected @ D.unit.numpy(), rtol=1e-15)
    # Two copies of one atom: a support holding both is dependent, so its ERC is +inf (fails).
    dup = Dictionary(np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]))
    cert = certified_fractions(dup, np.array([[0, 1]]), np.array([[1.0, 1.0]]), bp_samples=0)
    assert cert.erc_values.tolist() == [math.inf] and cert.erc_count == 0 and math.isnan(cert.bp_fraction)
    # A support holding every (independent) atom: ERC is a max over no atom, 0.
    full = certified_fractions(Dictionary(np.eye(2)), np.array([[0, 1]]), np.array([[1.0, 2.0]]))
    assert full.erc_values.tolist() == [0.0] and full.bp_recovered == 1


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"spark_lower": 0.5}, "spark_lower must be a proven lower bound"),
        ({"spark_lower": True}, "spark_lower must be a proven lower bound"),
        ({"erc_samples": -1}, "erc_samples must be an int >= 0"),
        ({"bp_samples": 1.5}, "bp_samples must be an int >= 0"),
        ({"bp_solver": 3}, "bp_solver must be 'batched', 'linprog'"),
        ({"bp_solver": lambda W, m, **kw: basis_pursuit(W, m)}, "returned no per-sample decisions"),
    ],
)
def test_certified_fractions_bad_input(kwargs, match):
    with pytest.raises(BadInputError, match=match):
        certified_fractions(Dictionary(THREE), *THREE_CODES, **kwargs)


# ------------------------------------------------------------------------------------------------------------
# TSAE window
# ------------------------------------------------------------------------------------------------------------

# a0 = e1, a1 = e2, a2 = (0.1 e1 + e3)/sqrt(1.01): eps = eps_0 = eps_2 = 0.1/sqrt(1.01), eps_1 = 0.
WINDOW_ATOMS = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.1, 0.0, 1.0], [0.0, 0.0, -1.0]])
EPS = 0.1 / math.sqrt(1.01)


def test_tsae_window_hand_case():
    atoms = WINDOW_ATOMS[:3]
    codes = (torch.tensor([[0, 1], [2, -1], [0, 2]]), torch.tensor([[1.0, 0.5], [0.8, 0.0], [0.6, 1.0]]))
    tau = torch.tensor([0.3, 0.3, 0.75])
    w = tsae_window(Dictionary(atoms), codes, tau)
    assert (w.K, w.dmin, w.dmax) == (2, 0.5, 1.0)
    assert w.eps == pytest.approx(EPS, rel=1e-14)
    assert w.global_lower == pytest.approx(2 * EPS) and w.global_upper == pytest.approx(0.5 - EPS)
    assert w.global_nonempty and w.atoms_in_global == pytest.approx(2 / 3)
    np.testing.assert_allclose(w.lower.numpy(), [2 * EPS, 0.0, 2 * EPS], atol=1e-15)
    np.testing.assert_allclose(w.upper.numpy(), [0.6 - EPS, 0.5, 0.8 - EPS], atol=1e-15)
    assert (w.n_firing, w.n_silent) == (3, 0)
    assert w.atom_nonempty == 1.0 and w.atom_contains == pytest.approx(2 / 3)
    assert w.samples_active_ok == pytest.approx(1 / 3)  # only sample 0 avoids atom 2
    # Each sample's own |L_i| and dmax_i suffice, e.g. sample 1 = 0.8 a2: 0.75 < 0.8 on a2, and off it
    # 0.3 > EPS * 1 * 0.8 (a0), 0.3 > 0 (a1).
    assert w.samples_certified == 1.0 and w.sample_certified.tolist() == [True, True, True]
    dense = tsae_window(Dictionary(atoms), densify(*codes, 3), tau)
    assert dense.samples_certified == w.samples_certified and torch.equal(dense.upper, w.upper)


def test_tsae_window_silent_atom_and_per_sample_failure():
    # Atom 3 = -e3 never fires (upper end +inf); |cos(a2, a3)| = 1/sqrt(1.01) = 10 EPS = eps_2 = eps_3.
    codes = (torch.tensor([[0, 1], [2, -1]]), torch.tensor([[1.0, 0.5], [0.8, 0.0]]))
    tau = torch.tensor([0.3, 0.3, 2.0, 2.0])
    w = tsae_window(Dictionary(WINDOW_ATOMS), codes, tau)
    assert (w.n_firing, w.n_silent) == (3, 1) and math.isinf(float(w.upper[3]))
    assert w.eps == pytest.approx(10 * EPS) and not w.global_nonempty
    # K = 2, dmax = 1: atom 2's window (20 EPS, 0.8 - 10 EPS) is empty; atoms 0 and 1 hold 0.3.
    np.testing.assert_allclose(w.lower.numpy(), [2 * EPS, 0.0, 20 * EPS, 20 * EPS], atol=1e-15)
    assert w.atom_nonempty == pytest.approx(2 / 3) and w.atom_contains == pytest.approx(2 / 3)
    # Sample 0 = e1 + 0.5 e2: on-support 0.3 < 1 - EPS and 0.3 < 0.5; off-support 2.0 > 10 EPS * 2 * 1 = 1.99
    # (atoms 2, 3). Sample 1 = 0.8 a2 fails on its own atom: 2.0 > 0.8.
    assert w.sample_certified.tolist() == [True, False] and w.samples_certified == 0.5


def idealised_supports(U: np.ndarray, codes: np.ndarray, tau: np.ndarray) -> np.ndarray:
    """Whether the encoder z = m~ @ U^T, fired where z >= tau, finds each sample's support exactly."""
    z = (codes @ U) @ U.T
    return ((z >= tau) == (codes > 0)).all(axis=1)


@pytest.mark.parametrize(
    ("sign", "code", "tau", "certified"),
    [
        # On-support side, tight: z_0 = 0.6 - EPS when cos(a0, a1) = -EPS; the bound is 0.6 - EPS (|L| - 1) 1.
        (-1.0, [0.6, 1.0], [0.55, 0.1], False),
        (-1.0, [0.6, 1.0], [0.45, 0.1], True),
        # Off-support side, tight: z_1 = EPS for the code e1 when cos(a0, a1) = EPS; the bound is EPS |L| 1.
        (1.0, [1.0, 0.0], [0.5, 0.9 * EPS], False),
        (1.0, [1.0, 0.0], [0.5, 1.1 * EPS], True),
    ],
)
def test_tsae_window_per_sample_bounds_are_tight(sign, code, tau, certified):
    atoms = np.array([[1.0, 0.0, 0.0], [0.1 * sign, 0.0, 1.0]])
    D = Dictionary(atoms)
    codes = np.array([code])
    w = tsae_window(D, codes, np.array(tau))
    assert w.sample_certified.tolist() == [certified]
    assert idealised_supports(D.unit.numpy(), codes, np.array(tau)).tolist() == [certified]


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), k=st.integers(1, 4), scale=st.floats(0.05, 1.0))
def test_certified_samples_are_recovered_by_the_idealised_encoder(seed, k, scale):
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((12, 30))
    D = Dictionary(W)
    codes = sparse_codes(rng, 40, 12, k)
    tau = rng.uniform(0.1, 0.6, 12) * scale
    w = tsae_window(D, codes, tau)
    recovered = idealised_supports(D.unit.numpy(), codes, tau)
    assert recovered[w.sample_certified.numpy()].all()
    if w.global_nonempty and ((tau > w.global_lower) & (tau < w.global_upper)).all():
        assert w.samples_certified == 1.0


@pytest.mark.parametrize(
    ("codes", "tau", "match"),
    [
        (
            (np.array([[0]]), np.array([[-1.0]])),
            np.ones(4),
            "is negative; theorem 4's window assumes non-negative",
        ),
        ((np.array([[0]]), np.array([[1.0]])), np.ones(3), r"pass one threshold per atom, shape \(4,\)"),
        ((np.array([[-1]]), np.array([[0.0]])), np.ones(4), "every code is zero"),
        ([np.array([[0]]), np.array([[1.0]])], np.ones(4), "codes must be a tuple"),
        (
            (np.array([[0]]), np.array([[1.0]])),
            np.array([1.0, np.nan, 1.0, 1.0]),
            "threshold holds 1 non-finite",
        ),
    ],
)
def test_tsae_window_bad_input(codes, tau, match):
    with pytest.raises(BadInputError, match=match):
        tsae_window(Dictionary(WINDOW_ATOMS), codes, tau)


def test_public_names():
    assert set(metrics.__all__) <= set(dir(metrics))
