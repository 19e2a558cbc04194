"""atoms.dictionary and kernels/aip_gram.py against dense float64 numpy references.

The references build the full Gram matrix with numpy (and x^T C^{-1} y with numpy.linalg.solve for the AIP),
which the tiled code never does. Tolerances: the tiled and the dense products sum in different orders, so a
|cos| within TOL of a bin edge or threshold may land on either side; checks allow exactly that and no more.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import scipy.linalg
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from atoms.aip import AIP
from atoms.dictionary import Dictionary, babel, coherence, welch_bound
from atoms.errors import AtomsError, BadInputError
from atoms.kernels.aip_gram import (
    babel_crossing_reference,
    babel_reference,
    gram_reduce_reference,
    near_duplicate_pairs_reference,
)

TOL = 1e-12
AIP_TOL = 1e-10  # the dense reference's own error grows with cond(C); random_spd keeps cond(C) below ~10


def dense_reference(W: np.ndarray, C: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Cosine matrix (n, n) and norms (n,) of the rows of W, Euclidean or under x^T C^{-1} y."""
    M = W @ W.T if C is None else W @ np.linalg.solve(C, W.T)
    norms = np.sqrt(np.diag(M))
    return M / np.outer(norms, norms), norms


def off_diagonal_abs(G: np.ndarray) -> np.ndarray:
    A = np.abs(G)
    np.fill_diagonal(A, -np.inf)
    return A


def upper_pairs(G: np.ndarray) -> np.ndarray:
    return np.abs(G[np.triu_indices(G.shape[0], 1)])


def babel_dense(G: np.ndarray, k: int) -> float:
    return float(np.sort(off_diagonal_abs(G), axis=1)[:, -k:].sum(axis=1).max())


def random_spd(d: int, rng: np.random.Generator) -> np.ndarray:
    A = rng.standard_normal((d, d))
    return A @ A.T + d * np.eye(d)


def check_against_dense(D: Dictionary, G: np.ndarray, tol: float, thresholds: list[float], k: int) -> None:
    """Every statistic of D against the dense cosine matrix G."""
    n = G.shape[0]
    A = off_diagonal_abs(G)
    row_max = A.max(axis=1)

    assert D.coherence() == pytest.approx(row_max.max(), abs=tol)
    values, partner = D.max_coherence()
    assert values.dtype == torch.float64 and partner.dtype == torch.int64
    np.testing.assert_allclose(values.numpy(), row_max, rtol=0, atol=tol)
    p = partner.numpy()
    assert (p != np.arange(n)).all() and (p >= 0).all() and (p < n).all()
    # Ties allowed: the partner only has to reach the maximum.
    np.testing.assert_array_less(row_max - tol, np.abs(G[np.arange(n), p]) + tol / 2)

    counts, edges = D.cos_histogram()
    assert counts.dtype == torch.int64 and edges.dtype == torch.float64
    np.testing.assert_allclose(edges.numpy(), np.linspace(0, 1, 101), rtol=0, atol=1e-15)
    assert int(counts.sum()) == n * (n - 1) // 2
    pairs = upper_pairs(G)
    # Cumulative counts below each interior edge, bracketed by the reference shifted by -tol and +tol.
    below = np.cumsum(counts.numpy())[:-1]
    inner = edges.numpy()[1:-1]
    lo = (pairs[None, :] < inner[:, None] - tol).sum(axis=1)
    hi = (pairs[None, :] < inner[:, None] + tol).sum(axis=1)
    assert (lo <= below).all() and (below <= hi).all()

    for t in thresholds:
        found = D.near_duplicates(t)
        assert all(i < j for i, j, _ in found)
        assert [(i, j) for i, j, _ in found] == sorted({(i, j) for i, j, _ in found})
        for i, j, c in found:
            assert c == pytest.approx(G[i, j], abs=tol) and abs(G[i, j]) > t - tol
        assert (pairs > t + tol).sum() <= len(found) <= (pairs > t - tol).sum()

    assert D.babel(k) == pytest.approx(babel_dense(G, k), abs=tol * k)
    assert D.babel(1) == pytest.approx(D.coherence(), rel=1e-14)


@st.composite
def dictionaries(draw: st.DrawFn) -> np.ndarray:
    """Gaussian atoms of mixed scale, or small-integer atoms: exact ties, duplicates, |cos| = 1 and 0.5."""
    n = draw(st.integers(2, 30))
    d = draw(st.integers(1, 6))
    if draw(st.booleans()):
        W = draw(hnp.arrays(np.float64, (n, d), elements=st.integers(-2, 2).map(float)))
        W[(W == 0).all(axis=1), 0] = 1.0
        return W
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    return rng.standard_normal((n, d)) * rng.uniform(0.01, 100.0, size=(n, 1))


thresholds = st.lists(st.floats(0.0, 0.99), min_size=1, max_size=2)
tiles = st.integers(2, 9) | st.just(1024)  # tile = 1 (every tile 1 x 1) is in test_tile_edges


@settings(max_examples=30, deadline=None)
@given(W=dictionaries(), tile=tiles, limits=thresholds, data=st.data())
def test_euclidean_statistics_match_dense(W, tile, limits, data):
    D = Dictionary(W, tile=tile)
    G, norms = dense_reference(W)
    np.testing.assert_allclose(D.norms.numpy(), norms, rtol=1e-14)
    np.testing.assert_allclose(D.raw.numpy(), W, rtol=0, atol=0)
    k = data.draw(st.integers(1, W.shape[0] - 1))
    check_against_dense(D, G, TOL, limits, k)


@settings(max_examples=20, deadline=None)
@given(W=dictionaries(), tile=tiles, limits=thresholds, seed=st.integers(0, 2**32 - 1), data=st.data())
def test_aip_statistics_match_solve_reference(W, tile, limits, seed, data):
    C = random_spd(W.shape[1], np.random.default_rng(seed))
    D = Dictionary(torch.from_numpy(W), AIP.from_moment(torch.from_numpy(C)), tile=tile)
    G, norms = dense_reference(W, C)
    np.testing.assert_allclose(D.norms.numpy(), norms, rtol=AIP_TOL)
    np.testing.assert_allclose(D.unit.numpy() @ D.unit.numpy().T, G, rtol=0, atol=AIP_TOL)
    k = data.draw(st.integers(1, W.shape[0] - 1))
    check_against_dense(D, G, AIP_TOL, limits, k)


@pytest.mark.parametrize(("n", "tile"), [(23, 7), (24, 8), (2, 1), (2, 7), (3, 2), (40, 1)])
def test_tile_edges(n, tile):
    W = np.random.default_rng(n * 100 + tile).standard_normal((n, 3))
    check_against_dense(Dictionary(W, tile=tile), dense_reference(W)[0], TOL, [0.5], n - 1)


def test_histogram_equals_numpy_histogram():
    W = np.random.default_rng(1).standard_normal((200, 10))
    pairs = upper_pairs(dense_reference(W)[0])
    D = Dictionary(W, tile=13)
    for bins in (100, 7):
        counts, edges = D.cos_histogram(bins)
        e = edges.numpy()
        assert np.abs(pairs[:, None] - e[None, :]).min() > 1e-9  # no pair on an edge: exact equality is fair
        np.testing.assert_array_equal(counts.numpy(), np.histogram(pairs, bins=e)[0])


def test_histogram_puts_parallel_and_antiparallel_atoms_in_last_bin():
    W = np.array([[1.0, 0.0], [-3.0, 0.0], [0.0, 2.0], [0.0, 1.0]])
    counts, _ = Dictionary(W).cos_histogram(bins=4)
    assert counts.tolist() == [4, 0, 0, 2]


def test_counts_above_thresholds_and_float32_kernel():
    W = np.random.default_rng(2).standard_normal((57, 4))
    G = dense_reference(W)[0]
    unit = torch.from_numpy(W / np.linalg.norm(W, axis=1, keepdims=True))
    limits = (0.0, 0.3, 0.8)
    stats = gram_reduce_reference(unit, thresholds=limits, tile=10)
    pairs = upper_pairs(G)
    assert stats.counts_above.tolist() == [int((pairs > t).sum()) for t in limits]
    low = gram_reduce_reference(unit.float(), thresholds=limits, tile=10)
    assert low.max_per_atom.dtype == torch.float32
    np.testing.assert_allclose(low.max_per_atom.numpy(), off_diagonal_abs(G).max(axis=1), atol=1e-6)


def test_single_atom_has_no_pairs():
    D = Dictionary(np.array([[3.0, 4.0]]))
    assert D.coherence() == 0.0
    values, partner = D.max_coherence()
    assert values.tolist() == [0.0] and partner.tolist() == [-1]
    assert int(D.cos_histogram()[0].sum()) == 0
    assert D.near_duplicates(0.0) == []
    with pytest.raises(BadInputError, match=r"1 <= k <= n_atoms - 1 = 0"):
        D.babel(1)


def test_gram_of_subset_and_whole():
    W = np.random.default_rng(3).standard_normal((12, 5))
    G = dense_reference(W)[0]
    D = Dictionary(W)
    np.testing.assert_allclose(D.gram().numpy(), G, atol=TOL)
    idx = [4, 0, 11, 4]
    np.testing.assert_allclose(D.gram(idx).numpy(), G[np.ix_(idx, idx)], atol=TOL)
    np.testing.assert_allclose(D.gram(torch.tensor(idx)).numpy(), G[np.ix_(idx, idx)], atol=TOL)


def test_gram_refuses_large_dense_matrix():
    D = Dictionary(np.random.default_rng(4).standard_normal((4097, 2)))
    with pytest.raises(BadInputError, match=r"4097 x 4097.*limited to 4096.*coherence\(\)"):
        D.gram()
    assert D.gram(np.arange(4096)).shape == (4096, 4096)
    with pytest.raises(BadInputError, match=r"outside \[0, 4096\]"):
        D.gram([0, 5000])
    with pytest.raises(BadInputError, match=r"1-D sequence of atom indices"):
        D.gram([0.5, 1.0])


def test_parameters_that_require_grad_are_detached():
    W = torch.randn(30, 4, dtype=torch.float32, requires_grad=True)
    D = Dictionary(W, tile=8)
    assert not D.unit.requires_grad and not D.raw.requires_grad
    G = dense_reference(W.detach().double().numpy())[0]
    assert D.coherence() == pytest.approx(off_diagonal_abs(G).max(), abs=TOL)
    assert not babel_reference(torch.nn.functional.normalize(W, dim=1), 2, tile=8).requires_grad


def test_module_functions_accept_arrays_tensors_and_dictionaries():
    rng = np.random.default_rng(5)
    W = rng.standard_normal((15, 4))
    C = random_spd(4, rng)
    aip = AIP.from_moment(C)
    G_e, G_a = dense_reference(W)[0], dense_reference(W, C)[0]
    assert coherence(W) == pytest.approx(off_diagonal_abs(G_e).max(), abs=TOL)
    assert coherence(torch.from_numpy(W).float()) == pytest.approx(off_diagonal_abs(G_e).max(), abs=1e-6)
    assert coherence(W, aip) == pytest.approx(off_diagonal_abs(G_a).max(), abs=AIP_TOL)
    assert babel(W, 3, aip) == pytest.approx(babel_dense(G_a, 3), abs=AIP_TOL)
    D = Dictionary(W, aip)
    assert coherence(D) == D.coherence() and babel(D, 3, aip) == D.babel(3)
    with pytest.raises(BadInputError, match=r"not both"):
        coherence(Dictionary(W), aip)


def test_aip_fit_on_activations_matches_solve_reference():
    rng = np.random.default_rng(6)
    X = rng.standard_normal((500, 6)) @ rng.standard_normal((6, 6))
    W = rng.standard_normal((20, 6))
    D = Dictionary(W, AIP.fit(X), tile=6)
    G = dense_reference(W, X.T @ X / X.shape[0])[0]
    check_against_dense(D, G, AIP_TOL, [0.4], 5)


def test_welch_bound_formula_and_etfs():
    assert welch_bound(3, 2) == pytest.approx(0.5)
    assert welch_bound(16, 4) == pytest.approx(np.sqrt(12 / 60))
    assert welch_bound(5, 5) == 0.0 and welch_bound(1, 1) == 0.0 and welch_bound(2, 7) == 0.0
    for d in range(1, 9):
        assert welch_bound(d + 1, d) == pytest.approx(1 / d, rel=1e-15)
        # Simplex ETF: the d + 1 centred basis vectors of R^(d+1), written in a basis of their span.
        E = np.eye(d + 1) - 1 / (d + 1)
        basis = np.linalg.svd(E)[2][:d]
        assert coherence(E @ basis.T) == pytest.approx(welch_bound(d + 1, d), abs=TOL)
    n = 16  # Dirac-Hadamard [I, H/sqrt(n)]: coherence 1/sqrt(n)
    DH = np.vstack([np.eye(n), scipy.linalg.hadamard(n) / np.sqrt(n)])
    assert coherence(DH) == pytest.approx(1 / np.sqrt(n), abs=TOL)
    assert coherence(DH) >= welch_bound(2 * n, n)


@pytest.mark.parametrize("args", [(0, 3), (3, 0), (-1, 2), (True, 2), (3.0, 2)])
def test_welch_bound_rejects_bad_sizes(args):
    with pytest.raises(BadInputError, match=r"n_atoms|must be an int"):
        welch_bound(*args)


def test_bad_atoms_are_named():
    rng = np.random.default_rng(7)
    W = rng.standard_normal((20, 3))
    zero = W.copy()
    zero[3] = 0.0
    zero[11] *= 1e-14
    with pytest.raises(BadInputError, match=r"zero atoms: rows \[3, 11\] \(2 atoms\).*Drop those rows"):
        Dictionary(zero)
    nan = W.copy()
    nan[2, 1] = np.nan
    with pytest.raises(BadInputError, match=r"1 with NaN, 0 with Inf\) at rows \[2\].*re-initialise"):
        Dictionary(nan)
    inf = W.copy()
    inf[7, 0] = -np.inf
    with pytest.raises(BadInputError, match=r"0 with NaN, 1 with Inf\) at rows \[7\]"):
        Dictionary(torch.from_numpy(inf))
    many = W.copy()
    many[:12, 0] = np.nan
    with pytest.raises(BadInputError, match=r"\[0, 1, 2, 3, 4, 5, 6, 7, 8, 9\] and more \(12 atoms\)"):
        Dictionary(many)
    # A zero atom under an AIP is named with the AIP norm.
    with pytest.raises(BadInputError, match=r"AIP norm 0"):
        Dictionary(zero, AIP.from_moment(np.eye(3)))


@pytest.mark.parametrize(
    ("W", "message"),
    [
        (np.ones((4, 3), dtype=np.int64), r"dtype torch.int64; a floating dtype is required"),
        (np.ones(3), r"shape \(3,\); a dictionary is a 2-D \(n_atoms, d\).*W\[None, :\]"),
        (np.ones((2, 3, 4)), r"shape \(2, 3, 4\); a dictionary is a 2-D"),
        (np.ones((0, 3)), r"empty"),
        ([[1.0, 2.0]], r"torch tensor or numpy array"),
    ],
)
def test_bad_arrays(W, message):
    with pytest.raises(BadInputError, match=message):
        Dictionary(W)


def test_bad_arguments():
    W = np.random.default_rng(8).standard_normal((6, 3))
    D = Dictionary(W)
    with pytest.raises(BadInputError, match=r"d = 3 but the AIP has d = 4"):
        Dictionary(W, AIP.from_moment(np.eye(4)))
    with pytest.raises(BadInputError, match=r"aip must be an atoms.AIP"):
        Dictionary(W, np.eye(3))
    with pytest.raises(BadInputError, match=r"tile must be >= 1"):
        Dictionary(W, tile=0)
    for k in (0, 6, -1):
        with pytest.raises(BadInputError, match=r"1 <= k <= n_atoms - 1 = 5"):
            D.babel(k)
    with pytest.raises(BadInputError, match=r"k must be an int"):
        D.babel(2.0)
    for t in (1.0, -0.1, float("nan")):
        with pytest.raises(BadInputError, match=r"threshold must be a number in \[0, 1\)"):
            D.near_duplicates(t)
    with pytest.raises(BadInputError, match=r"bins must be >= 1"):
        D.cos_histogram(0)
    with pytest.raises(ValueError, match=r"more than max_pairs=3 atom pairs have \|cos\| > 0.0; raise"):
        D.near_duplicates(0.0, max_pairs=3)
    assert issubclass(BadInputError, AtomsError)


class LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an aten op returns while active."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        sizes = [t.numel() for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        self.largest = max([self.largest, *sizes])
        return out


class MatmulOperands(TorchDispatchMode):
    """Records the (shape, stride) of every 2-D operand of the matrix products run while active."""

    PRODUCTS = frozenset({torch.ops.aten.mm.default, torch.ops.aten.mm.out, torch.ops.aten.addmm.default})

    def __init__(self) -> None:
        super().__init__()
        self.operands: list[tuple[tuple[int, ...], tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.PRODUCTS:
            self.operands += [(tuple(a.shape), a.stride()) for a in args if isinstance(a, torch.Tensor)]
        return func(*args, **(kwargs or {}))


def test_tile_products_take_dense_operands_from_a_column_major_unit():
    """A row slice of a column-major (n, d) matrix has strides (1, n): BLAS reads it with a leading dimension
    of n instead of its own rows, which made the 16384 x 2304 walk 1.65x the GEMM floor instead of 1.38x.
    Every product of every walk must get row-major (r, c) or transposed-row-major operands, strides (c, 1)
    or (1, r)."""
    n, d, tile = 130, 5, 40
    unit = torch.nn.functional.normalize(torch.randn(n, d, dtype=torch.float64), dim=1).T.contiguous().T
    assert unit.stride() == (1, n)
    with MatmulOperands() as mode:
        gram_reduce_reference(unit, thresholds=(0.5,), tile=tile)
        near_duplicate_pairs_reference(unit, 0.99, tile=tile)
        babel_reference(unit, 3, tile=tile)
        babel_crossing_reference(unit, 1.0, tile=tile)
    assert mode.operands
    loose = [
        (shape, stride) for shape, stride in mode.operands if stride not in {(shape[1], 1), (1, shape[0])}
    ]
    assert not loose, loose


def test_no_op_builds_more_than_a_tile():
    # Structural check at the aten level: every tensor any op returns (including temporaries inside torch
    # functions) is counted, whatever Python code produced it. n * n = 16900 would be the dense Gram.
    n, d, tile, k = 130, 5, 40, 12
    unit = torch.nn.functional.normalize(torch.randn(n, d, dtype=torch.float64), dim=1)
    with LargestTensor() as mode:
        gram_reduce_reference(unit, thresholds=(0.5,), tile=tile)
        near_duplicate_pairs_reference(unit, 0.99, tile=tile)
        babel_reference(unit, k, tile=tile)
    assert mode.largest <= max(tile * (tile + k), n * d)


MEMORY_SCRIPT = """
import sys, torch
from atoms.dictionary import Dictionary

def status_kib(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))

torch.set_num_threads(1)  # three of these run at once; one thread each avoids oversubscribing the cores
D = Dictionary(torch.randn(6144, 32, dtype=torch.float64), tile=512)
statistic = {
    "coherence": D.coherence,
    "babel": lambda: D.babel(16),
    "near_duplicates": lambda: D.near_duplicates(0.6),
}
base = status_kib("VmRSS")
statistic[sys.argv[1]]()
print(status_kib("VmHWM") - base)
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads VmRSS and VmHWM from Linux /proc")
def test_memory_stays_far_below_a_dense_gram():
    # Bytes as the OS counts them: peak RSS (VmHWM) minus the RSS just before the statistic, each statistic in
    # a fresh process (a heap that an earlier call already grew hides a later call's growth: seen here).
    # VmHWM covers the whole process life, so the difference can only overstate: a conservative check.
    # A dense 6144 x 6144 float64 Gram is 288 MiB (float32: 144); 512 x 512 tiles measured 10-30 MiB, so
    # 96 MiB separates them in a few seconds. Tile memory grows with tile^2, not with n_atoms or d (rows
    # enter the product as views): the default tile = 1024 measured 50-115 MiB at 8192 and 16384 atoms, far
    # under the 1 GiB for 16384 x 2304. This check caught heap fragmentation in near_duplicates that
    # grew RSS by one tile per tile (500 MiB at 8192 atoms), which the structural test above cannot see.
    runs = {
        name: subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(MEMORY_SCRIPT), name], stdout=subprocess.PIPE, text=True
        )
        for name in ("coherence", "babel", "near_duplicates")
    }
    for name, run in runs.items():
        out, _ = run.communicate(timeout=300)
        assert run.returncode == 0, f"{name} failed"
        extra_mib = int(out.strip()) / 1024
        assert extra_mib < 96, f"{name} of 6144 atoms used {extra_mib:.0f} MiB beyond the dictionary"
