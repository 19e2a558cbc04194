"""The synthetic frames are what they claim, checked against independent dense float64 numpy computations."""

from __future__ import annotations

import math
from itertools import combinations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, find, given, settings
from hypothesis import strategies as st

from atoms import strategies, synth
from atoms.errors import BadInputError

FAST = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def gram(w: torch.Tensor) -> np.ndarray:
    a = w.numpy()
    return a @ a.T


def coherence(w: torch.Tensor) -> float:
    """Dense reference: largest |cos| over distinct rows, rows normalised here rather than trusted."""
    a = w.numpy() / np.linalg.norm(w.numpy(), axis=1, keepdims=True)
    g = np.abs(a @ a.T)
    np.fill_diagonal(g, 0.0)
    return float(g.max())


def welch(n_atoms: int, d: int) -> float:
    return math.sqrt((n_atoms - d) / (d * (n_atoms - 1)))


def assert_unit_float64(w: torch.Tensor) -> None:
    assert w.dtype == torch.float64
    assert w.ndim == 2
    np.testing.assert_allclose(np.linalg.norm(w.numpy(), axis=1), 1.0, atol=1e-12)


def assert_etf(w: torch.Tensor) -> None:
    """Unit rows, tight (W^T W = (N/d) I), equiangular, coherence equal to the Welch bound, all to 1e-12."""
    n_atoms, d = w.shape
    assert_unit_float64(w)
    a = w.numpy()
    np.testing.assert_allclose(a.T @ a, (n_atoms / d) * np.eye(d), atol=1e-12)
    off = np.abs(gram(w)[~np.eye(n_atoms, dtype=bool)])
    np.testing.assert_allclose(off, welch(n_atoms, d), atol=1e-12)
    assert abs(coherence(w) - welch(n_atoms, d)) < 1e-12


@pytest.mark.parametrize("d", [1, 2, 3, 5, 16])
@pytest.mark.parametrize("seed", [None, 7])
def test_simplex_etf(d, seed):
    w = synth.simplex_etf(d, seed)
    assert w.shape == (d + 1, d)
    assert_etf(w)
    off = gram(w)[~np.eye(d + 1, dtype=bool)]
    np.testing.assert_allclose(off, -1.0 / d, atol=1e-12)  # the simplex: every cosine is -1/d, not just |cos|


@pytest.mark.parametrize(
    ("v", "k", "shape"),
    [(4, 2, (16, 6)), (8, 2, (64, 28)), (16, 2, (256, 120)), (7, 3, (28, 7)), (15, 3, (120, 35))],
)
@pytest.mark.parametrize("seed", [None, 3])
def test_steiner_etf(v, k, shape, seed):
    w = synth.steiner_etf(v, k, seed)
    assert tuple(w.shape) == shape
    assert_etf(w)
    assert abs(coherence(w) - (k - 1) / (v - 1)) < 1e-12


def test_steiner_etf_canonical_is_sparse():
    w = synth.steiner_etf(8, 2)
    assert np.all(np.count_nonzero(w.numpy(), axis=1) == 7)  # r = v - 1 blocks through each point


@pytest.mark.parametrize(
    ("v", "k", "message"),
    [
        (6, 2, r"v a power of two >= 4"),
        (2, 2, r"v a power of two >= 4"),
        (8, 3, r"v = 2\^m - 1"),
        (3, 3, r"v = 2\^m - 1"),
        (9, 4, r"k=2 and k=3"),
        (8.0, 2, r"v must be an int"),
    ],
)
def test_steiner_etf_rejects_unsupported(v, k, message):
    with pytest.raises(BadInputError, match=message):
        synth.steiner_etf(v, k)


@pytest.mark.parametrize("n", [2, 4, 8, 64])
def test_dirac_hadamard(n):
    w = synth.dirac_hadamard(n)
    assert w.shape == (2 * n, n)
    assert_unit_float64(w)
    np.testing.assert_array_equal(w.numpy()[:n], np.eye(n))
    assert abs(coherence(w) - 1.0 / math.sqrt(n)) < 1e-12
    np.testing.assert_allclose(w.numpy().T @ w.numpy(), 2.0 * np.eye(n), atol=1e-12)
    rotated = synth.dirac_hadamard(n, seed=1)
    np.testing.assert_allclose(gram(rotated), gram(w), atol=1e-12)
    assert not np.allclose(rotated.numpy()[:n], np.eye(n))


@pytest.mark.parametrize(
    ("n", "message"), [(6, r"power of two \(Sylvester Hadamard matrix\); pass n = 4 or 8"), (1, r"n >= 2")]
)
def test_dirac_hadamard_rejects(n, message):
    with pytest.raises(BadInputError, match=message):
        synth.dirac_hadamard(n)


def test_gaussian_dictionary_seeds():
    w = synth.gaussian_dictionary(20, 5, seed=3)
    assert w.shape == (20, 5)
    assert_unit_float64(w)
    np.testing.assert_array_equal(w.numpy(), synth.gaussian_dictionary(20, 5, seed=3).numpy())
    assert not np.allclose(w.numpy(), synth.gaussian_dictionary(20, 5, seed=4).numpy())
    same = [synth.gaussian_dictionary(4, 3, torch.Generator().manual_seed(9)) for _ in range(2)]
    np.testing.assert_array_equal(same[0].numpy(), same[1].numpy())
    from_numpy = synth.gaussian_dictionary(4, 3, np.random.default_rng(3))
    np.testing.assert_array_equal(from_numpy.numpy(), synth.gaussian_dictionary(4, 3, 3).numpy())


@pytest.mark.parametrize(
    ("seed", "message"),
    [(-1, r"seed=-1 is negative"), (1.5, r"seed must be a non-negative int"), (None, r"pass e.g. seed=0")],
)
def test_bad_seed(seed, message):
    with pytest.raises(BadInputError, match=message):
        synth.gaussian_dictionary(4, 3, seed)


@pytest.mark.parametrize(
    ("n_atoms", "d", "mu"),
    [
        (8, 2, 0.95),  # near the optimum cos(pi/8) = 0.924 of the circle
        (16, 4, 0.7),  # needs the decoherence descent
        (32, 8, 0.42),
        (64, 16, 0.3),
        (40, 20, 0.9),  # above the random dictionary's coherence: planted at once
        (5, 8, 0.0),  # n_atoms <= d: orthonormal start
        (5, 8, 0.3),
        (10, 3, 1.0),  # an exact duplicate pair
    ],
)
def test_dictionary_with_coherence(n_atoms, d, mu):
    w = synth.dictionary_with_coherence(n_atoms, d, mu, seed=0)
    assert w.shape == (n_atoms, d)
    assert_unit_float64(w)
    assert abs(coherence(w) - mu) < 1e-9


def test_dictionary_with_coherence_rejects_unreachable():
    with pytest.raises(synth.UnreachableCoherenceError, match=r"below the Welch bound 0\.447214"):
        synth.dictionary_with_coherence(16, 4, 0.44, seed=0)
    # Above the Welch bound 0.696 but below the best packing cos(pi/32) = 0.9952 of 32 lines in the plane.
    with pytest.raises(synth.UnreachableCoherenceError, match=r"least coherence reached 0\.99[5-9]"):
        synth.dictionary_with_coherence(32, 2, 0.99, seed=0, max_tries=1, max_iter=300)
    with pytest.raises(BadInputError, match=r"mu=1.5 is not a coherence"):
        synth.dictionary_with_coherence(8, 4, 1.5, seed=0)
    with pytest.raises(BadInputError, match=r"n_atoms=1 is too small"):
        synth.dictionary_with_coherence(1, 4, 0.5, seed=0)


@pytest.mark.parametrize("cos", [0.999, 0.9999999, 1.0])
def test_near_duplicate_dictionary(cos):
    w = synth.near_duplicate_dictionary(12, 8, cos, seed=2, pair=(3, 7))
    assert_unit_float64(w)
    assert abs(gram(w)[3, 7] - cos) < 1e-12
    assert abs(coherence(w) - cos) < 1e-12
    base = synth.gaussian_dictionary(12, 8, seed=2).numpy()
    keep = np.arange(12) != 7
    np.testing.assert_array_equal(w.numpy()[keep], base[keep])  # only the moved atom changes


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"cos": 0.0}, r"cos=0.0 is outside \(0, 1\]"),
        ({"cos": 1.01}, r"outside \(0, 1\]"),
        ({"pair": (2, 2)}, r"two distinct atom indices"),
        ({"pair": (0, 12)}, r"in \[0, 12\)"),
        ({"d": 1}, r"d=1 is too small; pass d >= 2"),
    ],
)
def test_near_duplicate_rejects(kwargs, message):
    args = {"n_atoms": 12, "d": 8, "cos": 0.99, "seed": 0} | kwargs
    with pytest.raises(BadInputError, match=message):
        synth.near_duplicate_dictionary(**args)


@pytest.mark.parametrize(("n_atoms", "d"), [(2, 2), (7, 3), (12, 5)])
def test_twin_dictionary(n_atoms, d):
    w = synth.twin_dictionary(n_atoms, d, seed=3)
    assert w.shape == (n_atoms, d)
    assert_unit_float64(w)
    base, pairs = n_atoms - n_atoms // 2, n_atoms // 2
    # Exact twins, bit for bit: the second half is the first pairs of the first half times +-1.
    ratio = w[base:] / w[:pairs]
    assert torch.all((ratio == 1.0).all(dim=1) | (ratio == -1.0).all(dim=1))
    # The base atoms are distinct lines (Gaussian), so the twins are the only pairs at |cos| 1.
    g = np.abs(gram(w[:base]))
    np.fill_diagonal(g, 0.0)
    assert g.max() < 1 - 1e-6
    assert abs(coherence(w) - 1.0) < 1e-15


def test_twin_dictionary_draws_duplicates_and_antipodes():
    signs = torch.cat(
        [
            (synth.twin_dictionary(8, 3, seed)[4:, 0] / synth.twin_dictionary(8, 3, seed)[:4, 0])
            for seed in range(3)
        ]
    )
    assert set(signs.tolist()) == {-1.0, 1.0}
    with pytest.raises(BadInputError, match=r"d=1 is too small; pass d >= 2"):
        synth.twin_dictionary(4, 1, seed=0)


def delta_k_bruteforce(w: torch.Tensor, k: int) -> float:
    """Exact restricted isometry constant: max over all k-subsets of the largest |eigenvalue - 1| of G_SS."""
    g = gram(w)
    return max(
        float(np.abs(np.linalg.eigvalsh(g[np.ix_(s, s)]) - 1.0).max())
        for s in combinations(range(w.shape[0]), k)
    )


@pytest.mark.parametrize(
    ("K", "mu", "d", "n_atoms"),
    [(2, 0.3, None, None), (3, 0.0, None, None), (4, 0.2, 6, 6), (5, 0.9, 7, 5), (3, 0.5, 5, 9)],
)
def test_gershgorin_tight_frame(K, mu, d, n_atoms):
    w = synth.gershgorin_tight_frame(K, mu, d=d, n_atoms=n_atoms, seed=0)
    assert w.shape == (n_atoms or d or K, d or K)
    assert_unit_float64(w)
    planted = gram(w)[:K, :K]
    np.testing.assert_allclose(planted[~np.eye(K, dtype=bool)], mu, atol=1e-12)
    assert abs(np.abs(np.linalg.eigvalsh(planted) - 1.0).max() - (K - 1) * mu) < 1e-12
    assert abs(coherence(w) - mu) < 1e-12
    # Gershgorin's bound (K - 1) mu is attained over the whole dictionary, not just on the planted subset.
    assert abs(delta_k_bruteforce(w, K) - (K - 1) * mu) < 1e-12


@pytest.mark.parametrize(("K", "mu", "d", "n_atoms"), [(2, 0.9, None, None), (4, 0.3, 6, 6), (3, 0.45, 3, 4)])
def test_gershgorin_tight_frame_negative(K, mu, d, n_atoms):
    w = synth.gershgorin_tight_frame(K, mu, d=d, n_atoms=n_atoms, seed=0, negative=True)
    assert_unit_float64(w)
    planted = gram(w)[:K, :K]
    np.testing.assert_allclose(planted[~np.eye(K, dtype=bool)], -mu, atol=1e-12)
    # The smallest eigenvalue 1 - (K - 1) mu reaches Gershgorin's bound from below.
    assert abs(np.linalg.eigvalsh(planted).min() - (1 - (K - 1) * mu)) < 1e-12
    assert abs(coherence(w) - mu) < 1e-12
    assert abs(delta_k_bruteforce(w, K) - (K - 1) * mu) < 1e-12


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((3, 1.0), r"mu=1.0 is outside \[0, 1\)"),
        ((3, -0.1), r"outside \[0, 1\)"),
        ((4, 0.2, 3), r"need d >= K and n_atoms >= K"),
        ((4, 0.2, 6, 10), r"found only 0 of the 4 atoms past d=6"),
    ],
)
def test_gershgorin_rejects(args, message):
    with pytest.raises(BadInputError, match=message):
        synth.gershgorin_tight_frame(*args)


def test_gershgorin_negative_rejects_a_singular_gram():
    with pytest.raises(BadInputError, match=r"negative=True with K=3 needs mu < 1/\(K - 1\) = 0\.5"):
        synth.gershgorin_tight_frame(3, 0.5, negative=True)


def check_codes(
    codes: synth.Codes, n_samples: int, n_atoms: int, k: int, dmin: float, dmax: float, nonneg: bool
):
    values, support = codes.values.numpy(), codes.support.numpy()
    assert codes.values.dtype == torch.float64 and codes.support.dtype == torch.int64
    assert values.shape == (n_samples, n_atoms) and support.shape == (n_samples, k)
    assert np.all(np.count_nonzero(values, axis=1) == k)
    assert np.all(np.diff(support, axis=1) > 0)  # sorted, distinct
    np.testing.assert_array_equal(np.sort(np.nonzero(values)[1].reshape(n_samples, k), axis=1), support)
    magnitudes = np.abs(np.take_along_axis(values, support, axis=1))
    assert magnitudes.min() >= dmin and magnitudes.max() <= dmax
    if nonneg:
        assert values.min() >= 0.0


@given(
    n_atoms=st.integers(1, 20),
    data=st.data(),
    dmin=st.floats(1e-3, 10.0),
    ratio=st.floats(1.0, 100.0),
    nonneg=st.booleans(),
    edge=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**32 - 1),
)
@FAST
def test_planted_codes_properties(n_atoms, data, dmin, ratio, nonneg, edge, seed):
    k = data.draw(st.integers(1, n_atoms))
    n_samples = data.draw(st.integers(1, 10))
    dmax = dmin * ratio
    codes = synth.planted_codes(n_samples, n_atoms, k, dmin, dmax, nonneg, seed, edge=edge)
    check_codes(codes, n_samples, n_atoms, k, dmin, dmax, nonneg)
    again = synth.planted_codes(n_samples, n_atoms, k, dmin, dmax, nonneg, seed, edge=edge)
    np.testing.assert_array_equal(codes.values.numpy(), again.values.numpy())


def test_planted_codes_signs_edges_and_seeds():
    signed = synth.planted_codes(400, 30, 5, 0.5, 2.0, False, seed=0).values.numpy()
    assert (signed < 0).sum() > 800 and (signed > 0).sum() > 800  # about half of the 2000 non-zeros each
    snapped = synth.planted_codes(200, 30, 5, 0.5, 2.0, True, seed=0, edge=1.0).values.numpy()
    assert set(np.unique(snapped[snapped != 0])) == {0.5, 2.0}
    interior = synth.planted_codes(200, 30, 5, 0.5, 2.0, True, seed=0, edge=0.0).values.numpy()
    assert np.all((interior[interior != 0] > 0.5) & (interior[interior != 0] < 2.0))
    other = synth.planted_codes(200, 30, 5, 0.5, 2.0, True, seed=1).values.numpy()
    assert not np.array_equal(interior, other)
    counts = np.count_nonzero(synth.planted_codes(3000, 6, 2, 1.0, 1.0, True, seed=0).values.numpy(), axis=0)
    assert np.all(np.abs(counts - 1000) < 150)  # supports are uniform: each atom in 2/6 of the rows


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"k": 11}, r"k=11 non-zeros cannot fit in n_atoms=10"),
        ({"dmin": 2.0, "dmax": 1.0}, r"dmin=2.0 > dmax=1.0"),
        ({"dmin": 0.0}, r"dmin=0.0 must be > 0"),
        ({"dmin": -1.0, "nonneg": False}, r"dmin=-1.0 must be > 0"),
        ({"edge": 1.5}, r"edge=1.5 is a probability"),
        ({"n_samples": 0}, r"n_samples=0 is too small"),
        ({"k": 2.0}, r"k must be an int"),
        ({"nonneg": 1}, r"nonneg must be a bool"),
        ({"dmax": float("inf")}, r"dmax=inf is not finite"),
    ],
)
def test_planted_codes_rejects(kwargs, message):
    args = {
        "n_samples": 4,
        "n_atoms": 10,
        "k": 3,
        "dmin": 0.5,
        "dmax": 1.0,
        "nonneg": True,
        "seed": 0,
    } | kwargs
    with pytest.raises(BadInputError, match=message):
        synth.planted_codes(**args)


@given(strategies.dictionaries())
@FAST
def test_dictionaries_strategy_valid(w):
    assert_unit_float64(w)
    assert 2 <= w.shape[0] <= 32 and 2 <= w.shape[1] <= 16


@given(strategies.dictionaries(min_atoms=16, max_atoms=64, min_d=6, max_d=28, kinds=("steiner", "simplex")))
@settings(max_examples=10, deadline=None)
def test_dictionaries_strategy_frames_are_etfs(w):
    assert_etf(w)


@given(strategies.coherent_dictionaries())
@FAST
def test_coherent_dictionaries_drawn_mu(case):
    assert_unit_float64(case.dictionary)
    assert abs(coherence(case.dictionary) - case.mu) < 1e-9


@given(strategies.coherent_dictionaries(mu=0.5, max_atoms=24, min_d=4))
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_coherent_dictionaries_fixed_mu(case):
    assert case.mu == 0.5
    assert abs(coherence(case.dictionary) - 0.5) < 1e-9


@given(strategies.sparse_codes(12, k_max=3, nonneg=True), strategies.dtypes())
@FAST
def test_sparse_codes_and_dtypes(codes, dtype):
    assert 1 <= codes.support.shape[1] <= 3
    assert codes.values.shape[1] == 12 and codes.values.min() >= 0
    assert codes.values.to(dtype).dtype in (torch.float64, torch.float32, torch.bfloat16)


@given(strategies.dictionary_and_codes(max_atoms=16, k_max=3, nonneg=None))
@FAST
def test_dictionary_and_codes(case):
    assert_unit_float64(case.dictionary)
    n_samples, k = case.codes.support.shape
    assert k <= min(3, case.dictionary.shape[0])
    assert case.activations.shape == (n_samples, case.dictionary.shape[1])
    expected = case.codes.values.numpy() @ case.dictionary.numpy()
    np.testing.assert_allclose(case.activations.numpy(), expected, rtol=1e-12, atol=1e-12)


def test_strategies_shrink_to_small_cases():
    once = settings(database=None)
    # The shrinker reaches a local minimum: a Gaussian (2, 3) or the simplex (4, 3), never a large case.
    w = find(strategies.dictionaries(), lambda w: w.shape[1] >= 3, settings=once)
    assert w.shape[1] == 3 and w.shape[0] <= 4
    w = find(strategies.dictionaries(), lambda w: w.shape[0] >= 5, settings=once)
    assert w.shape[0] == 5 and w.shape[1] <= 4
    codes = find(strategies.sparse_codes(10), lambda c: c.support.shape[1] >= 2, settings=once)
    assert tuple(codes.support.shape) == (1, 2)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: strategies.dictionaries(min_atoms=5, max_atoms=3), r"min_atoms=5 > max_atoms=3"),
        (lambda: strategies.dictionaries(min_d=0), r"min_d=0 is too small"),
        (
            lambda: strategies.dictionaries(kinds=("gaussian", "fourier")),
            r"unknown dictionary kinds \['fourier'\]",
        ),
        (lambda: strategies.dictionaries(kinds="gaussian"), r"non-empty sequence of names"),
        (
            lambda: strategies.dictionaries(
                min_atoms=10, max_atoms=10, max_d=4, kinds=("simplex", "steiner")
            ),
            r"none of the kinds .* fits n_atoms in \[10, 10\]",
        ),
        (lambda: strategies.coherent_dictionaries(mu=1.5), r"mu=1.5 is not a coherence"),
        (lambda: strategies.coherent_dictionaries(min_atoms=1), r"needs a pair of atoms"),
        (lambda: strategies.sparse_codes(5, k_max=6), r"k_max=6 > n_atoms=5"),
        (lambda: strategies.sparse_codes(5, nonneg="yes"), r"nonneg must be True, False or None"),
        (lambda: strategies.dictionary_and_codes(k_max=0), r"k_max=0 is too small"),
    ],
)
def test_strategies_reject_bad_arguments(build, message):
    with pytest.raises(BadInputError, match=message):
        build()
