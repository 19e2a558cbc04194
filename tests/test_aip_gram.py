"""kernels/aip_gram.py: the Triton kernel through the interpreter against a dense float64 numpy reference and
the torch reference, exact bin edges and thresholds, dispatch and bad input
(ahead-of-time compilation: tests/test_kernels_aot.py).

Tolerances. Every path computes the cosines of the *stored* rows, so the reference is numpy float64 on the
stored values (bfloat16 and float16 upcast exactly). A dot product whose every term passes through at most
k roundings of unit roundoff u is off by at most about k u sum_j |a_j b_j| <= k u |a| |b|, in any order of
summation. The interpreter sums each 16-wide d chunk with numpy (`np.matmul(..., dtype=float32)`) and adds
it to the accumulator, so k <= d + ceil(d / 16); u = 2**-53 for float64 atoms and 2**-24 for the others
(bfloat16 and float16 products are exact in float32; the interpreter upcasts bfloat16 tiles before tl.dot,
kernels/dispatch.py); |a| |b| <= (1 + 2**-7)**2 for unit rows rounded to bfloat16 or float16. tol(dtype, d)
is that bound with k + 2. A |cos| within tol of a bin edge or a threshold may land on either side; the
histogram and count checks allow exactly that and no more (cumulative counts bracketed by the reference
shifted by -tol and +tol). Exactly representable cosines (test_exact_edges_and_strict_thresholds) must land
exactly.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from atoms.kernels import aip_gram as ag
from atoms.kernels.aip_gram import gram_reduce, gram_reduce_reference

# Unit roundoff of the sums: float64 for float64 atoms, float32 for the others.
UNIT_ROUNDOFF = {
    torch.float64: 2.0**-53,
    torch.float32: 2.0**-24,
    torch.bfloat16: 2.0**-24,
    torch.float16: 2.0**-24,
}
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


def tol(dtype: torch.dtype, d: int) -> float:
    roundings = d + -(-d // 16) + 2
    return roundings * UNIT_ROUNDOFF[dtype] * (1 + 2.0**-7) ** 2


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@contextmanager
def backend_env(mode: str):
    with mock.patch.dict(os.environ, {"ATOMS_KERNELS": mode}):
        yield


def _poisoned(shape, dtype, device):
    if dtype.is_floating_point:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.full(shape, torch.iinfo(dtype).max, dtype=dtype, device=device)


@contextmanager
def interpreted(banded: bool = False):
    """The Triton kernel in the interpreter, its outputs poisoned (NaN / int max): an unwritten partial
    maximum turns the atom's maximum into NaN, an unwritten partner index falls outside [0, n). `banded`
    shrinks the partial-maxima budget so the walk runs in bands of one group row (2 x 16 atoms) each."""
    with backend_env("interpret"), mock.patch.object(ag, "_empty", _poisoned):
        if banded:
            with mock.patch.object(ag, "PARTIAL_BYTES", 1):
                yield
        else:
            yield


def unit_rows(W: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(W / np.linalg.norm(W, axis=1, keepdims=True))


def check(stats, stored: torch.Tensor, bins: int, thresholds) -> None:
    """Every output of gram_reduce against the dense float64 Gram of the stored rows."""
    n, d = stored.shape
    t = tol(stored.dtype, d)
    U = stored.double().numpy()
    G = U @ U.T
    A = np.abs(G)
    np.fill_diagonal(A, -np.inf)
    row_max = A.max(axis=1) if n > 1 else np.zeros(1)
    pairs = np.abs(G[np.triu_indices(n, 1)])

    assert stats.max_per_atom.dtype == compute_dtype(stored.dtype) == stats.max_abs_cos.dtype
    assert stats.partner.dtype == stats.histogram.dtype == stats.counts_above.dtype == torch.int64
    np.testing.assert_allclose(stats.max_per_atom.double().numpy(), row_max, rtol=0, atol=t)
    assert float(stats.max_abs_cos) == pytest.approx(row_max.max(), abs=t)
    p = stats.partner.numpy()
    if n == 1:
        assert p.tolist() == [-1]
    else:
        assert ((p >= 0) & (p < n) & (p != np.arange(n))).all(), p
        # Ties: the partner only has to reach the maximum, within the error of both entries.
        assert (A[np.arange(n), p] >= row_max - 2 * t).all()

    np.testing.assert_array_equal(stats.edges.numpy(), np.arange(bins + 1) / bins)
    counts = stats.histogram.numpy()
    assert counts.shape == (bins,) and (counts >= 0).all() and counts.sum() == n * (n - 1) // 2
    below = np.cumsum(counts)[:-1]  # pairs below each interior edge
    inner = np.arange(1, bins) / bins
    lo = (pairs[None, :] < inner[:, None] - t).sum(axis=1)
    hi = (pairs[None, :] < inner[:, None] + t).sum(axis=1)
    assert (lo <= below).all() and (below <= hi).all()

    assert stats.counts_above.shape == (len(thresholds),)
    for count, limit in zip(stats.counts_above.tolist(), thresholds, strict=True):
        assert (pairs > limit + t).sum() <= count <= (pairs > limit - t).sum()


@st.composite
def problems(draw):
    """n not a multiple of the interpreter's 16-wide tiles (several tiles and tile groups, skipped
    programs), single atoms and pairs, d not a power of two; Gaussian atoms, or small-integer atoms with
    exact ties, duplicates, antiparallel pairs and |cos| on bin edges."""
    n = draw(st.integers(1, 50))
    d = draw(st.integers(1, 40))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if draw(st.booleans()):
        W = rng.standard_normal((n, d))
    else:
        W = rng.integers(-2, 3, size=(n, d)).astype(np.float64)
        W[(W == 0).all(axis=1), 0] = 1.0
    dtype = draw(st.sampled_from(DTYPES))
    bins = draw(st.sampled_from([1, 3, 10, 100, 128]))
    thresholds = draw(st.lists(st.floats(-0.5, 1.2), max_size=3))
    return unit_rows(W).to(dtype), bins, thresholds


@settings(max_examples=40, deadline=None)
@given(problem=problems(), banded=st.booleans())
@example(problem=(unit_rows(np.ones((1, 3))).float(), 100, [0.5]), banded=False)
@example(problem=(unit_rows(np.eye(2, 5) + 0.5).to(torch.bfloat16), 10, [0.0, 0.4]), banded=True)
def test_kernel_matches_dense_float64(problem, banded):
    stored, bins, thresholds = problem
    with interpreted(banded):
        stats = gram_reduce(stored, bins=bins, thresholds=thresholds)
    check(stats, stored, bins, thresholds)


@settings(max_examples=15, deadline=None)
@given(problem=problems(), tile=st.integers(1, 20))
def test_reference_matches_dense_float64(problem, tile):
    stored, bins, thresholds = problem
    check(
        gram_reduce_reference(stored, bins=bins, thresholds=thresholds, tile=tile), stored, bins, thresholds
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_single_atom_and_two_atoms(dtype):
    with interpreted():
        one = gram_reduce(unit_rows(np.array([[3.0, 4.0, 0.0]])).to(dtype), bins=5, thresholds=(0.0, -1.0))
        two = gram_reduce(unit_rows(np.array([[1.0, 0.0], [1.0, 1.0]])).to(dtype), bins=4, thresholds=(0.7,))
    assert float(one.max_abs_cos) == 0.0 and one.max_per_atom.tolist() == [0.0]
    assert one.partner.tolist() == [-1] and one.histogram.tolist() == [0] * 5
    assert one.counts_above.tolist() == [0, 0]
    c = 2**-0.5  # cos 45 degrees, bin 2 of 4
    assert two.max_per_atom.double().numpy() == pytest.approx([c, c], abs=2**-7)
    assert two.partner.tolist() == [1, 0]
    assert two.histogram.tolist() == [0, 0, 1, 0] and two.counts_above.tolist() == [1]


# Rows with entries in {0, +-1/2, +-1}: every product and sum is exact, so every |cos| is exactly 0, 1/2 or 1,
# on the edges of 2 and 4 bins, and equal cosines are exact ties. Four copies of the seven patterns (28 atoms,
# two 16-wide tiles) put ties in both merge inputs: atom 16 reaches |cos| 1 with 2 and 9 (column maxima of
# tile 0) and with 23 (row maxima of tile 1).
EXACT = np.array(
    [
        [1.0, 0.0, 0.0, 0.0],
        [0.5, 0.5, 0.5, 0.5],
        [0.0, 1.0, 0.0, 0.0],
        [-0.5, 0.5, -0.5, 0.5],
        [0.5, 0.5, 0.5, 0.5],
        [0.0, 0.0, 0.0, -1.0],
        [0.5, -0.5, -0.5, 0.5],
    ]
    * 4
)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("bins", "banded"), [(2, False), (4, True), (5, False)])
def test_exact_edges_and_strict_thresholds(dtype, bins, banded):
    """|cos| on an edge goes to the bin above it (as numpy.histogram), |cos| = 1 to the last bin, thresholds
    are strict, and among exact ties the partner is the lowest index (the kernel's deterministic order)."""
    stored = torch.from_numpy(EXACT).to(dtype)
    G = EXACT @ EXACT.T
    pairs = np.abs(G[np.triu_indices(len(EXACT), 1)])
    edges = np.arange(bins + 1) / bins
    limits = (0.0, 0.25, 0.5, 1.0)
    A = np.abs(G)
    np.fill_diagonal(A, -1.0)
    with interpreted(banded):
        kernel = gram_reduce(stored, bins=bins, thresholds=limits)
    for stats in (kernel, gram_reduce_reference(stored, bins=bins, thresholds=limits, tile=5)):
        np.testing.assert_array_equal(stats.histogram.numpy(), np.histogram(pairs, bins=edges)[0])
        assert stats.counts_above.tolist() == [int((pairs > t).sum()) for t in limits]
        np.testing.assert_array_equal(stats.max_per_atom.double().numpy(), A.max(axis=1))
    assert kernel.partner.tolist() == A.argmax(axis=1).tolist()  # argmax: the first maximal index


def test_float32_bin_of_a_product_that_rounds_up():
    """A float32 |cos| v with v * bins just below an integer k that float32 multiplication rounds up to k:
    the bin is floor of the exact product, k - 1 (the kernel's fma correction), as in float64."""
    bins, v = next(
        (b, v)
        for b in range(3, 200)
        for k in range(1, b)
        for v in [np.nextafter(np.float32(k / b), np.float32(0))]
        if np.float32(v) * np.float32(b) >= k > float(v) * b
    )
    k = int(np.float32(v) * np.float32(bins))
    # Rows (1, 0) and (v, w): the kernel's dot is exactly 1 * v + 0 * w = v.
    w = np.float32(np.sqrt(1 - float(v) ** 2))
    stored = torch.tensor([[1.0, 0.0], [float(v), float(w)]], dtype=torch.float32)
    with interpreted():
        stats = gram_reduce(stored, bins=bins)
    assert stats.max_per_atom.tolist() == [float(v), float(v)]
    assert stats.histogram.nonzero().flatten().tolist() == [k - 1]
    assert gram_reduce_reference(stored, bins=bins).histogram.nonzero().flatten().tolist() == [k - 1]


def test_float32_threshold_is_compared_as_float64():
    """t = 0.3 lies between two float32 values: float32(0.3) > 0.3 counts, the float32 below it does not."""
    above = float(np.float32(0.3))
    below = float(np.nextafter(np.float32(0.3), np.float32(0)))
    assert below < 0.3 < above
    # Pairs (0, 1) = above and (0, 2) = below; (1, 2) = above * below ~ 0.09 is far from the threshold.
    stored = torch.tensor(
        [[1.0, 0.0, 0.0], [above, np.sqrt(1 - above**2), 0.0], [below, 0.0, np.sqrt(1 - below**2)]],
        dtype=torch.float32,
    )
    with interpreted():
        kernel = gram_reduce(stored, thresholds=(0.3, above, below))
    assert kernel.counts_above.tolist() == [1, 0, 1]
    assert gram_reduce_reference(stored, thresholds=(0.3, above, below)).counts_above.tolist() == [1, 0, 1]


@pytest.mark.parametrize("fp64_dot", [True, False], ids=["dmma", "fma-triton-3.4"])
def test_float64_products_without_a_float64_dot(fp64_dot, monkeypatch):
    """Triton 3.4 has no float64 tl.dot: the kernel multiplies and sums instead (kernels/compat.py). Both
    forms against the dense float64 reference, on several tiles and d chunks."""
    monkeypatch.setattr(ag, "has_fp64_dot", lambda: fp64_dot)
    rng = np.random.default_rng(11)
    stored = unit_rows(rng.standard_normal((40, 37)))
    with interpreted(False):
        stats = gram_reduce(stored, bins=20, thresholds=(0.3,))
    check(stats, stored, 20, (0.3,))


@pytest.mark.parametrize("banded", [False, True], ids=["one-launch", "three-bands"])
def test_several_tiles_in_every_direction(banded):
    """n = 70 spans 5 tiles of 16 (3 groups of 2 x 2 tiles, 24 programs of which 9 are skipped), d = 37
    three d chunks; in one launch, or in three bands of one group row whose partial maxima are merged. The
    result equals the torch reference up to float32 summation order."""
    rng = np.random.default_rng(7)
    stored = unit_rows(rng.standard_normal((70, 37))).float()
    with interpreted(banded), mock.patch.object(ag, "launch", wraps=ag.launch) as launches:
        kernel = gram_reduce(stored, bins=50, thresholds=(0.2, 0.4))
    assert launches.call_count == (3 if banded else 1)
    check(kernel, stored, 50, (0.2, 0.4))
    reference = gram_reduce_reference(stored, bins=50, thresholds=(0.2, 0.4), tile=16)
    torch.testing.assert_close(
        kernel.max_per_atom, reference.max_per_atom, rtol=0, atol=tol(torch.float32, 37)
    )


@pytest.mark.parametrize(("mode", "runs_kernel"), [("auto", False), ("torch", False), ("interpret", True)])
def test_dispatch(mode, runs_kernel):
    stored = unit_rows(np.random.default_rng(1).standard_normal((20, 6))).float()
    with backend_env(mode), mock.patch.object(ag, "_launch", wraps=ag._launch) as launched:
        stats = gram_reduce(stored.numpy(), bins=10)  # a numpy array is accepted
    assert launched.called == runs_kernel
    check(stats, stored, 10, ())


def test_many_bins_run_the_reference():
    stored = unit_rows(np.random.default_rng(2).standard_normal((9, 4))).float()
    bins = ag.MAX_KERNEL_BINS + 1
    with interpreted(), mock.patch.object(ag, "_launch", wraps=ag._launch) as launched:
        stats = gram_reduce(stored, bins=bins)
    assert not launched.called
    check(stats, stored, bins, ())


def test_reference_computes_half_types_in_float32():
    """bfloat16 atoms are multiplied with float32 sums, not rounded back to 8 bits (as in the kernel)."""
    stored = unit_rows(np.random.default_rng(3).standard_normal((30, 24))).to(torch.bfloat16)
    stats = gram_reduce_reference(stored, tile=7)
    assert stats.max_per_atom.dtype == torch.float32
    check(stats, stored, 100, ())


@pytest.mark.parametrize("mode", ["torch", "interpret"])
@pytest.mark.parametrize(
    ("unit", "kwargs", "match"),
    [
        (torch.ones(4, 3, dtype=torch.int64), {}, r"unit must be a floating \(n, d\) torch tensor"),
        (torch.ones(4), {}, r"unit must be a floating \(n, d\)"),
        (torch.ones(0, 3), {}, r"at least one atom of dimension >= 1, got shape \(0, 3\)"),
        (torch.eye(3), {"bins": 0}, r"bins must be a positive int, got 0"),
        (torch.eye(3), {"tile": 0}, r"tile must be a positive int"),
        (torch.eye(3), {"precision": "tf32"}, r"'ieee' or 'tf32x3', got 'tf32'; plain TF32"),
        ([[1.0, 0.0]], {}, r"unit must be a floating \(n, d\) torch tensor.*got list"),
    ],
)
def test_bad_input(mode, unit, kwargs, match):
    with backend_env(mode), pytest.raises(ValueError, match=match):
        gram_reduce(unit, **kwargs)
