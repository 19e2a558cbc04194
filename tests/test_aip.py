"""Tests of atoms.aip against independent float64 references (numpy, scipy), never against aip itself."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import scipy.optimize
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from atoms.aip import AIP, Angles, SecondMoment, _sample_pairs, euclidean_angles
from atoms.errors import BadInputError, IllConditionedError

FAST = settings(deadline=None, max_examples=25)


def activations(n: int, d: int, seed: int, spread: float = 10.0, offset: float = 0.0) -> np.ndarray:
    """(n, d) float64 Gaussian activations with a random covariance of condition number spread**2."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    scales = np.logspace(0, np.log10(spread), d)
    return rng.standard_normal((n, d)) @ (q * scales) + offset


def rel(a, b) -> float:
    """Relative Frobenius error of a against b; absolute when b is zero (a one-sample covariance)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    scale = np.linalg.norm(b)
    return float(np.linalg.norm(a - b) / (scale if scale > 0 else 1.0))


def invertible(d: int, seed: int) -> np.ndarray:
    """A generic invertible map with singular values spread over [0.3, 3], far from a scaled rotation."""
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.standard_normal((d, d)))
    v, _ = np.linalg.qr(rng.standard_normal((d, d)))
    return (u * np.geomspace(0.3, 3.0, d)) @ v.T


# --- SecondMoment -------------------------------------------------------------------------------------------


@FAST
@given(d=st.integers(1, 7), n=st.integers(1, 60), seed=st.integers(0, 2**31), center=st.booleans())
def test_second_moment_matches_numpy(d, n, seed, center):
    x = activations(n, d, seed, offset=5.0)
    m = SecondMoment(d, center=center).update(torch.from_numpy(x))
    expected = np.cov(x, rowvar=False, bias=True).reshape(d, d) if center else x.T @ x / n
    assert m.count == n
    assert m.matrix.dtype == torch.float64 and m.matrix.shape == (d, d)
    assert rel(m.matrix, expected) < 1e-12
    assert rel(m.mean, x.mean(axis=0)) < 1e-12


SHARD = st.tuples(
    st.sampled_from([torch.float32, torch.bfloat16, torch.float64]),
    st.lists(st.integers(1, 4), min_size=1, max_size=3),  # leading shape: (b,), (b, t) or (b, t, s)
    st.integers(0, 2**31),
)


@settings(deadline=None, max_examples=40)
@given(
    d=st.integers(1, 6),
    center=st.booleans(),
    shards=st.lists(SHARD, min_size=1, max_size=5),
    order=st.randoms(use_true_random=False),
)
def test_merge_equals_single_pass_in_any_order(d, center, shards, order):
    data = []
    for dtype, lead, seed in shards:
        g = torch.Generator().manual_seed(seed)
        data.append((torch.randn(*lead, d, generator=g, dtype=torch.float64) * 3 + 7).to(dtype))
    # Reference: one pass over the same (already rounded) values, in float64 numpy.
    flat = np.concatenate([t.to(torch.float64).reshape(-1, d).numpy() for t in data])
    single = SecondMoment(d, center).update(torch.from_numpy(flat))

    parts = [SecondMoment(d, center).update(t) for t in data]
    order.shuffle(parts)
    merged = parts[0]
    for p in parts[1:]:
        merged = merged.merge(p)
    merged = merged.merge(SecondMoment(d, center))  # merging an empty moment changes nothing

    sequential = SecondMoment(d, center)
    for i in order.sample(range(len(data)), len(data)):
        sequential.update(data[i])

    reference = (
        np.cov(flat, rowvar=False, bias=True).reshape(d, d) if center else flat.T @ flat / flat.shape[0]
    )
    # A centred moment is a difference of terms of size |mean|^2: its rounding error scales with that, not
    # with the covariance itself (three nearly equal samples have a covariance of rounding size).
    floor = float(np.sum(flat.mean(axis=0) ** 2)) if center else 0.0
    for m in (merged, sequential):
        assert m.count == flat.shape[0]
        matrix, single_matrix = np.asarray(m.matrix), np.asarray(single.matrix)
        assert np.linalg.norm(matrix - single_matrix) <= 1e-12 * (np.linalg.norm(single_matrix) + floor)
        assert rel(m.mean, single.mean) < 1e-12
        assert np.linalg.norm(matrix - reference) <= 1e-11 * (np.linalg.norm(reference) + floor)


def test_merge_returns_new_object_and_keeps_inputs():
    a = SecondMoment(3).update(torch.ones(4, 3))
    b = SecondMoment(3).update(torch.zeros(2, 3))
    c = a.merge(b)
    assert c is not a and c is not b
    assert (a.count, b.count, c.count) == (4, 2, 6)


def test_second_moment_save_load_round_trip(tmp_path):
    x = activations(50, 5, 1, offset=2.0)
    for center in (False, True):
        m = SecondMoment(5, center).update(torch.from_numpy(x[:30]))
        m.save(tmp_path / "m.safetensors")
        loaded = SecondMoment.load(tmp_path / "m.safetensors")
        assert (loaded.d, loaded.center, loaded.count) == (5, center, 30)
        assert torch.equal(loaded.matrix, m.matrix) and torch.equal(loaded.mean, m.mean)
        m.update(torch.from_numpy(x[30:]))
        loaded.update(torch.from_numpy(x[30:]))
        assert torch.equal(loaded.matrix, m.matrix)


def test_load_rejects_wrong_files(tmp_path):
    AIP.fit(torch.from_numpy(activations(40, 3, 0))).save(tmp_path / "aip.safetensors")
    with pytest.raises(BadInputError, match=r"does not hold a SecondMoment .*SecondMoment\.save"):
        SecondMoment.load(tmp_path / "aip.safetensors")
    SecondMoment(3).update(torch.ones(2, 3)).save(tmp_path / "m.safetensors")
    with pytest.raises(BadInputError, match=r"does not hold a AIP .*AIP\.save"):
        AIP.load(tmp_path / "m.safetensors")
    save_file({"foo": torch.zeros(3)}, str(tmp_path / "foo.safetensors"))
    with pytest.raises(BadInputError, match=r"missing entries \['mean', 'm2'"):
        SecondMoment.load(tmp_path / "foo.safetensors")
    (tmp_path / "text.safetensors").write_text("not a tensor file")
    with pytest.raises(BadInputError, match="not a readable safetensors file"):
        AIP.load(tmp_path / "text.safetensors")
    with pytest.raises(BadInputError, match="does not exist"):
        SecondMoment.load(tmp_path / "missing.safetensors")
    meta = {"format": "SecondMoment", "d": "4", "center": "False", "count": "2"}
    save_file({"mean": torch.zeros(3, dtype=torch.float64), "m2": torch.zeros(3, 3, dtype=torch.float64)},
              str(tmp_path / "bad.safetensors"), metadata=meta)  # fmt: skip
    with pytest.raises(BadInputError, match=r"inconsistent: d = 4"):
        SecondMoment.load(tmp_path / "bad.safetensors")


@pytest.mark.parametrize(
    ("x", "match"),
    [
        (torch.tensor([[1.0, float("nan"), 0.0, 0.0]]), r"1 non-finite values \(1 NaN, 0 Inf\)"),
        (torch.tensor([[1.0, float("inf"), 0.0, 0.0]]), r"1 non-finite values \(0 NaN, 1 Inf\)"),
        (torch.zeros(0, 4), r"empty .*pass at least one vector"),
        (
            torch.ones(3, 4, dtype=torch.int64),
            r"dtype torch.int64; a floating dtype is required.*x.float\(\)",
        ),
        (torch.ones(3, 5), r"last dimension 5 but 4 was expected"),
        ([[1.0, 2.0, 3.0, 4.0]], r"must be a torch tensor or numpy array, got list"),
    ],
)
def test_update_rejects_bad_batches(x, match):
    with pytest.raises(BadInputError, match=match):
        SecondMoment(4).update(x)


def test_second_moment_misuse_messages():
    with pytest.raises(BadInputError, match="positive int"):
        SecondMoment(0)
    with pytest.raises(BadInputError, match=r"no samples yet; call update"):
        _ = SecondMoment(3).matrix
    with pytest.raises(BadInputError, match=r"cannot merge .*d=3.*d=4"):
        SecondMoment(3).merge(SecondMoment(4))
    with pytest.raises(BadInputError, match=r"same center setting"):
        SecondMoment(3).merge(SecondMoment(3, center=True))


# --- AIP: whitening and the inner product ------------------------------------------------------------------


@FAST
@given(d=st.integers(1, 8), extra=st.integers(0, 100), seed=st.integers(0, 2**31), center=st.booleans())
def test_whitened_activations_have_identity_moment(d, extra, seed, center):
    n = 3 * d + 2 + extra
    x = activations(n, d, seed, offset=1.0)
    aip = AIP.fit(torch.from_numpy(x), center=center)
    assert aip.n_samples == n and aip.center is center and aip.ridge == 0.0
    z = aip.whiten(torch.from_numpy(x)).numpy()
    if center:
        z = z - z.mean(axis=0)
    np.testing.assert_allclose(z.T @ z / n, np.eye(d), atol=1e-10)


@FAST
@given(d=st.integers(1, 8), seed=st.integers(0, 2**31), center=st.booleans())
def test_inner_norm_cosine_match_numpy_solve(d, seed, center):
    x = activations(10 * d + 5, d, seed, offset=2.0)
    C = np.cov(x, rowvar=False, bias=True).reshape(d, d) if center else x.T @ x / x.shape[0]
    aip = AIP.fit(torch.from_numpy(x), center=center)
    rng = np.random.default_rng(seed + 1)
    u, v = rng.standard_normal((2, 6, d))
    expected = np.einsum("nd,nd->n", u, np.linalg.solve(C, v.T).T)
    nu = np.sqrt(np.einsum("nd,nd->n", u, np.linalg.solve(C, u.T).T))
    nv = np.sqrt(np.einsum("nd,nd->n", v, np.linalg.solve(C, v.T).T))
    got = aip.inner(torch.from_numpy(u), torch.from_numpy(v))
    assert got.dtype == torch.float64 and got.shape == (6,)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-10, atol=1e-10 * float((nu * nv).max()))
    np.testing.assert_allclose(aip.norm(u).numpy(), nu, rtol=1e-10)
    np.testing.assert_allclose(aip.cosine(u, v).numpy(), expected / (nu * nv), atol=1e-10)
    # Broadcasting: one vector against many.
    np.testing.assert_allclose(aip.inner(u[:1], v).numpy(), u[0] @ np.linalg.solve(C, v.T), rtol=1e-10)
    np.testing.assert_allclose(aip.metric().numpy(), np.linalg.solve(C, np.eye(d)), rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize(
    ("dtype", "out"),
    [
        (torch.float64, torch.float64),
        (torch.float32, torch.float32),
        (torch.bfloat16, torch.float32),
        (torch.float16, torch.float32),
    ],
)
def test_whiten_dtypes_and_unwhiten(dtype, out):
    x = activations(200, 6, 3)
    aip = AIP.fit(torch.from_numpy(x))
    L = np.linalg.cholesky(x.T @ x / 200)
    batch = torch.from_numpy(x[:12]).reshape(3, 4, 6).to(dtype)
    z = aip.whiten(batch)
    assert z.dtype == out and z.shape == (3, 4, 6)
    xb = batch.to(torch.float64).reshape(-1, 6).numpy()
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    np.testing.assert_allclose(
        z.reshape(-1, 6).double().numpy(), np.linalg.solve(L, xb.T).T, rtol=tol, atol=tol
    )
    back = aip.unwhiten(z)
    assert back.dtype == out
    np.testing.assert_allclose(back.reshape(-1, 6).double().numpy(), xb, rtol=tol, atol=tol)


def test_whiten_returns_row_major_rows():
    """Row slices of whitened atoms are the Gram tiles of atoms.Dictionary: a column-major result (what a
    right-hand triangular solve gives) makes every tile a strided matrix and each tile GEMM slower."""
    x = torch.from_numpy(activations(200, 6, 3))
    z = AIP.fit(x).whiten(x[:50])
    assert z.is_contiguous(), z.stride()


# --- AIP: the least-squares view of SPEC section 1 ---------------------------------------------------------


@pytest.mark.parametrize(("n_atoms", "d", "c", "seed"), [(6, 3, 1.0, 0), (7, 4, 2.5, 1), (9, 4, 0.3, 2)])
def test_least_squares_property(n_atoms, d, c, seed):
    """S = c (D D^T)^{-1} minimises ||c I - D^T S D||_F over symmetric S, and D^T S D is a projector.

    The scale c is fixed: minimising over c as well is trivial (c = 0, S = 0). For every c the minimiser is
    the same matrix scaled by c, so checking several c covers "S = (D D^T)^{-1} up to scale".
    """
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((n_atoms, d))  # rows are atoms; the paper's D is W.T
    D = W.T
    iu = np.triu_indices(d)

    def sym(params):
        S = np.zeros((d, d))
        S[iu] = params
        return S + np.triu(S, 1).T

    def residual(params):
        return (c * np.eye(n_atoms) - D.T @ sym(params) @ D).ravel()

    fit = scipy.optimize.least_squares(
        residual, rng.standard_normal(iu[0].size), xtol=1e-15, ftol=1e-15, gtol=1e-15
    )
    S_opt = sym(fit.x)

    S = AIP.from_dictionary(torch.from_numpy(W)).metric().numpy()
    np.testing.assert_allclose(c * S, S_opt, rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(S, np.linalg.solve(D @ D.T, np.eye(d)), rtol=1e-10)
    objective = np.linalg.norm(c * np.eye(n_atoms) - D.T @ (c * S) @ D) ** 2
    assert objective == pytest.approx(c**2 * (n_atoms - d), rel=1e-10)
    assert objective <= np.linalg.norm(residual(fit.x)) ** 2 * (1 + 1e-10)

    P = D.T @ S @ D
    np.testing.assert_allclose(P, P.T, atol=1e-12)
    np.testing.assert_allclose(P @ P, P, atol=1e-12)
    assert np.trace(P) == pytest.approx(d, rel=1e-12)


# --- AIP: invariance under an invertible linear map --------------------------------------------------------


def _pairwise_euclidean_cos(W: np.ndarray) -> np.ndarray:
    U = W / np.linalg.norm(W, axis=1, keepdims=True)
    return U @ U.T


@settings(deadline=None, max_examples=15)
@given(d=st.integers(3, 7), ratio=st.integers(1, 3), seed=st.integers(0, 2**31), center=st.booleans())
def test_aip_cosines_invariant_under_invertible_map(d, ratio, seed, center):
    x = activations(20 * d, d, seed)
    W = np.random.default_rng(seed + 1).standard_normal((ratio * d + 1, d))
    A = invertible(d, seed + 2)
    x2, W2 = x @ A.T, W @ A.T  # row layout of m -> A m

    for aip, aip2 in [
        (AIP.fit(torch.from_numpy(x), center=center), AIP.fit(torch.from_numpy(x2), center=center)),
        (AIP.from_dictionary(torch.from_numpy(W)), AIP.from_dictionary(torch.from_numpy(W2))),
    ]:
        cos = aip.cosine(torch.from_numpy(W)[:, None], torch.from_numpy(W)[None]).numpy()
        cos2 = aip2.cosine(torch.from_numpy(W2)[:, None], torch.from_numpy(W2)[None]).numpy()
        assert np.abs(cos - cos2).max() < 1e-9
        a, a2 = aip.angles(W), aip2.angles(W2)
        np.testing.assert_allclose(a.cosines.numpy(), a2.cosines.numpy(), atol=1e-9)

    assert np.abs(_pairwise_euclidean_cos(W) - _pairwise_euclidean_cos(W2)).max() > 1e-3
    e, e2 = euclidean_angles(W), euclidean_angles(W2)
    assert np.abs(e.cosines.numpy() - e2.cosines.numpy()).max() > 1e-3


# --- AIP: angles --------------------------------------------------------------------------------------------


def _reference_angles(x: np.ndarray, C: np.ndarray, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    Sx = np.linalg.solve(C, x.T).T
    num = np.einsum("nd,nd->n", x[i], Sx[j])
    den = np.sqrt(np.einsum("nd,nd->n", x[i], Sx[i]) * np.einsum("nd,nd->n", x[j], Sx[j]))
    return num / den


def test_angles_all_pairs_match_reference():
    x = activations(300, 5, 4)
    C = x.T @ x / 300
    aip = AIP.fit(torch.from_numpy(x))
    a = aip.angles(torch.from_numpy(x[:12]))
    assert isinstance(a, Angles)
    i, j = np.triu_indices(12, 1)
    cos = _reference_angles(x[:12], C, i, j)
    deg = np.degrees(np.arccos(cos))
    np.testing.assert_allclose(a.cosines.numpy(), cos, atol=1e-12)
    np.testing.assert_allclose(a.degrees.numpy(), deg, atol=1e-8)
    assert a.mean == pytest.approx(deg.mean(), abs=1e-8)
    assert a.median == pytest.approx(np.median(deg), abs=1e-8)
    assert a.mean_abs_cos == pytest.approx(np.abs(cos).mean(), abs=1e-12)

    e = euclidean_angles(x[:12])
    U = x[:12] / np.linalg.norm(x[:12], axis=1, keepdims=True)
    np.testing.assert_allclose(e.cosines.numpy(), (U @ U.T)[i, j], atol=1e-12)


def test_angles_explicit_pairs_large_n():
    """n > 4096 takes the gathered-rows path instead of a dense Gram."""
    x = activations(5000, 3, 5)
    C = x.T @ x / 5000
    aip = AIP.fit(torch.from_numpy(x))
    rng = np.random.default_rng(0)
    i = rng.integers(0, 5000, 500)
    j = (i + rng.integers(1, 5000, 500)) % 5000
    a = aip.angles(torch.from_numpy(x), pairs=(torch.from_numpy(i), j))
    np.testing.assert_allclose(a.cosines.numpy(), _reference_angles(x, C, i, j), atol=1e-12)


def test_pair_sampler():
    i, j = _sample_pairs(10, None, 0)
    assert i.numel() == 45 and bool((i < j).all())
    for n, k in [(2100, None), (10, 45), (50, 300), (100_000, 5000)]:
        i, j = _sample_pairs(n, k, 3)
        want = 100_000 if k is None else k
        assert i.numel() == want and bool((i != j).all())
        assert bool(((i >= 0) & (i < n) & (j >= 0) & (j < n)).all())
        unordered = torch.minimum(i, j) * n + torch.maximum(i, j)
        assert torch.unique(unordered).numel() == want
    a = _sample_pairs(100_000, 5000, 3)
    assert all(torch.equal(p, q) for p, q in zip(a, _sample_pairs(100_000, 5000, 3), strict=True))
    assert not torch.equal(a[0], _sample_pairs(100_000, 5000, 4)[0])


def test_aip_and_euclidean_angles_share_pairs():
    """With C = I the AIP is Euclidean, so equal seeds must give identical samples."""
    x = torch.from_numpy(activations(2100, 3, 6))
    aip = AIP.from_moment(torch.eye(3, dtype=torch.float64))
    assert aip.n_samples is None and aip.condition_number == 1.0
    for pairs in (None, 500):
        a, e = aip.angles(x, pairs=pairs, seed=7), euclidean_angles(x, pairs=pairs, seed=7)
        assert a.degrees.numel() == (100_000 if pairs is None else 500)
        np.testing.assert_allclose(a.cosines.numpy(), e.cosines.numpy(), atol=1e-14)


@pytest.mark.parametrize(
    ("pairs", "match"),
    [
        (46, r"pairs=46 but 10 vectors have 45 distinct pairs"),
        (0, r"pass 1 <= pairs <= 45"),
        (([0, 1], [1, 1]), r"compare a vector with itself at positions \[1\]"),
        (([0, 10], [1, 2]), r"outside \[0, 10\) at positions \[1\]"),
        (([0.0], [1.0]), r"two 1-D integer index arrays"),
        (([], []), r"two 1-D integer index arrays|is empty"),
        ("all", r"None, an int, or a tuple"),
    ],
)
def test_angles_rejects_bad_pairs(pairs, match):
    with pytest.raises(BadInputError, match=match):
        euclidean_angles(torch.randn(10, 3), pairs=pairs)


def test_angles_reject_zero_rows_and_wrong_shape():
    aip = AIP.from_moment(torch.eye(3, dtype=torch.float64))
    x = torch.randn(5, 3, dtype=torch.float64)
    x[2] = 0
    with pytest.raises(BadInputError, match=r"1 zero vectors \(rows \[2\]\).*Drop those rows"):
        aip.angles(x)
    with pytest.raises(BadInputError, match=r"must be \(n, d\).*reshape"):
        euclidean_angles(torch.randn(2, 5, 3))
    with pytest.raises(BadInputError, match="at least 2 vectors"):
        aip.angles(torch.randn(1, 3))
    with pytest.raises(BadInputError, match=r"zero vectors.*needs a direction"):
        aip.cosine(torch.zeros(3), torch.ones(3))


# --- AIP: save/load -----------------------------------------------------------------------------------------


def test_aip_save_load_round_trip(tmp_path):
    x = torch.from_numpy(activations(100, 4, 7))
    for aip in (
        AIP.fit(x, center=True, ridge=1e-3),
        AIP.from_dictionary(x[:10]),
        AIP.from_moment(torch.eye(4, dtype=torch.float64)),
    ):
        aip.save(tmp_path / "aip.safetensors")
        loaded = AIP.load(tmp_path / "aip.safetensors")
        assert torch.equal(loaded.cholesky, aip.cholesky)
        assert (loaded.d, loaded.ridge, loaded.n_samples, loaded.center) == (
            aip.d,
            aip.ridge,
            aip.n_samples,
            aip.center,
        )
        assert loaded.condition_number == aip.condition_number
        assert torch.equal(loaded.whiten(x), aip.whiten(x))


# --- AIP: ill-conditioned moments and the ridge ------------------------------------------------------------


def test_too_few_samples_raises_with_count_condition_and_ridge():
    x = torch.from_numpy(activations(5, 10, 8))
    with pytest.raises(IllConditionedError) as err:
        AIP.fit(x)
    msg = str(err.value)
    assert re.search(r"condition number (inf|\d\.\d+e\+\d+)", msg)
    assert "from 5 samples for d = 10; at least d samples are needed, 10*d advisable" in msg
    ridge = float(re.search(r"pass ridge=([0-9.e+-]+) to add \1 \* trace\(C\)/d \* I", msg).group(1))
    assert "which the report records" in msg
    # The suggested ridge is enough, and it is stored.
    aip = AIP.fit(x, ridge=ridge)
    assert aip.ridge == ridge and aip.condition_number <= 1e10


def test_dead_dimension_raises_and_ridge_fixes_it():
    x = activations(100, 6, 9)
    x[:, 2] = 0.0
    with pytest.raises(IllConditionedError, match=r"condition number .*from 100 samples for d = 6") as err:
        AIP.fit(torch.from_numpy(x))
    assert "Dimensions [2] are zero in every sample (dead)" in str(err.value)
    assert "ridge=" in str(err.value)

    aip = AIP.fit(torch.from_numpy(x), ridge=1e-6)
    C = x.T @ x / 100
    C_ridge = C + 1e-6 * np.trace(C) / 6 * np.eye(6)
    assert aip.ridge == 1e-6
    assert aip.condition_number == pytest.approx(np.linalg.cond(C_ridge), rel=1e-6)
    np.testing.assert_allclose(aip.metric().numpy(), np.linalg.solve(C_ridge, np.eye(6)), rtol=1e-6)


def test_max_condition_threshold():
    C = np.diag([1.0, 1e-6, 1e-12])
    with pytest.raises(IllConditionedError, match=r"condition number 1e\+12 .*unknown number of samples"):
        AIP.from_moment(torch.from_numpy(C))
    aip = AIP.from_moment(torch.from_numpy(C), max_condition=1e13)
    assert aip.condition_number == pytest.approx(1e12, rel=1e-9)


def test_from_dictionary_rank_deficient():
    W = torch.from_numpy(np.random.default_rng(0).standard_normal((3, 8)))
    with pytest.raises(IllConditionedError, match=r"3 atoms for d = 8.*rank at most 3 < 8.*ridge="):
        AIP.from_dictionary(W)
    aip = AIP.from_dictionary(W, ridge=1e-2)
    C = W.numpy().T @ W.numpy()
    C_ridge = C + 1e-2 * np.trace(C) / 8 * np.eye(8)
    assert aip.ridge == 1e-2 and aip.n_samples is None
    np.testing.assert_allclose(aip.metric().numpy(), np.linalg.solve(C_ridge, np.eye(8)), rtol=1e-8)


def test_aip_bad_arguments():
    x = torch.from_numpy(activations(50, 4, 10))
    aip = AIP.fit(x)
    with pytest.raises(BadInputError, match=r"last dimension 3 but 4 was expected"):
        aip.whiten(torch.ones(2, 3))
    with pytest.raises(BadInputError, match=r"1 non-finite values"):
        aip.inner(torch.tensor([1.0, math.nan, 0, 0]), torch.ones(4))
    with pytest.raises(BadInputError, match=r"ridge must be a finite number >= 0, got -1"):
        AIP.fit(x, ridge=-1.0)
    with pytest.raises(BadInputError, match=r"not symmetric .*\(C \+ C.T\) / 2"):
        AIP.from_moment(torch.tensor([[1.0, 0.5], [0.0, 1.0]]))
    with pytest.raises(BadInputError, match=r"square \(d, d\) matrix"):
        AIP.from_moment(torch.ones(2, 3))
    with pytest.raises(
        IllConditionedError,
        match=r"C has trace 0 \(from 10 samples for d = 3.*every vector behind it is zero.*no ridge",
    ):
        AIP.fit(torch.zeros(10, 3))
    with pytest.raises(BadInputError, match=r"dtype torch.int32; a floating dtype is required"):
        AIP.fit(torch.ones(10, 3, dtype=torch.int32))
    with pytest.raises(BadInputError, match=r"no samples yet"):
        AIP.from_moment(SecondMoment(3))


# --- AIP.fit on a stream of batches -------------------------------------------------------------------------


@pytest.mark.parametrize("center", [False, True])
def test_fit_streams_any_iterable_of_batches(center):
    """A DataLoader (of a tensor, or of a TensorDataset's 1-tuples), a generator of arrays of uneven sizes and
    a list of batches all give the AIP of their concatenation: numpy's Cholesky factor of the float64
    moment."""
    x = torch.from_numpy(activations(1000, 6, 11, offset=3.0)).float()
    x64 = x.double().numpy()
    C = x64.T @ x64 / len(x64)
    if center:
        C -= np.outer(x64.mean(0), x64.mean(0))
    reference = np.linalg.cholesky(C)

    def generator():
        for batch in x.split([1, 17, 300, 682]):
            yield batch.numpy()

    streams = {
        "DataLoader": torch.utils.data.DataLoader(x, batch_size=64),
        "TensorDataset": torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=100),
        "generator": generator(),
        "list": list(x.split(128)),
    }
    whole = AIP.fit(x, center=center)
    assert rel(whole.cholesky, reference) < 1e-12
    for name, stream in streams.items():
        aip = AIP.fit(stream, center=center)
        assert aip.n_samples == 1000 and aip.center == center, name
        assert rel(aip.cholesky, reference) < 1e-12, name
        assert rel(aip.cholesky, whole.cholesky) < 1e-12, name


def test_fit_stream_bad_input(tmp_path):
    x = torch.from_numpy(activations(50, 4, 12))
    with pytest.raises(
        BadInputError,
        match=r"iterable of \(batch, d\) ones \(a DataLoader.*got PosixPath.*SecondMoment batch by batch.*"
        r"AIP.from_moment",
    ):
        AIP.fit(tmp_path / "acts.safetensors")
    with pytest.raises(BadInputError, match=r"activations yielded no batches"):
        AIP.fit(iter([]))
    with pytest.raises(BadInputError, match=r"activations batch 1 has last dimension 3 but 4 was expected"):
        AIP.fit([x, x[:, :3]])
    with pytest.raises(BadInputError, match=r"activations batch 2 holds 1 non-finite"):
        AIP.fit([x, x, torch.where(torch.arange(200).reshape(50, 4) == 6, math.nan, x)])
