"""Per-sample support Grams (kernels/support_gram.py): the Triton kernel through the interpreter, both torch
paths, a dense numpy float64 reference and bad input (ahead-of-time compilation: tests/test_kernels_aot.py).

Tolerances. Every path computes float64 dot products of the *stored* values (fp32/fp16/bf16 products are
exact in float64), so against the numpy reference on the same stored values the only difference is the
order of a float64 sum over d: |err| <= d * 2**-53 per entry for unit rows; the tests allow 4 d 2**-53
for every dtype. What a low-precision `unit` costs is the rounding of the atoms themselves: with unit
roundoff eps (2**-53 float64, 2**-24 float32, 2**-11 float16, 2**-8 bfloat16) each row moves by at most
eps in norm, so each |cos| and each maximum moves by at most 2 eps + eps**2 from the float64 atoms'.
float16 also flushes entries below 2**-14 to subnormals (absolute error 2**-25 each): + 2 sqrt(d) 2**-25.
"""

import os
from contextlib import contextmanager
from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from atoms.kernels import support_gram as sg
from atoms.kernels.support_gram import support_coherence, support_coherence_reference

EPS = {torch.float64: 2.0**-53, torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
SUBNORMAL_STEP = {torch.float16: 2.0**-25}  # the others' subnormals lie far below these tolerances


@contextmanager
def backend_env(mode: str):
    with mock.patch.dict(os.environ, {"ATOMS_KERNELS": mode}):
        yield


def _nan_empty(shape, dtype, device):
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


@contextmanager
def interpreted():
    """Run the Triton kernel in the interpreter with every output poisoned: an unwritten element stays NaN."""
    with backend_env("interpret"), mock.patch.object(sg, "_empty", _nan_empty):
        yield


def numpy_reference(unit64: np.ndarray, indices: np.ndarray, values: np.ndarray | None):
    """Dense float64 reference, sample by sample: (max_abs_cos, support_size, grams)."""
    batch, k = indices.shape
    best = np.zeros(batch)
    size = np.zeros(batch, dtype=np.int64)
    grams = np.zeros((batch, k, k))
    for b in range(batch):
        on = indices[b] >= 0
        if values is not None:
            on &= values[b] != 0
        pos = np.flatnonzero(on)
        rows = unit64[indices[b, pos]]
        g = rows @ rows.T
        grams[b][np.ix_(pos, pos)] = g
        size[b] = pos.size
        if pos.size >= 2:
            best[b] = np.abs(g[~np.eye(pos.size, dtype=bool)]).max()
    return best, size, grams


def reference_of(unit: torch.Tensor, indices: torch.Tensor, values: torch.Tensor | None):
    """numpy_reference on the stored values of torch inputs (bf16 has no numpy dtype: upcast, exactly)."""
    return numpy_reference(
        unit.double().numpy(), indices.numpy(), None if values is None else values.float().numpy()
    )


def random_unit(n_atoms: int, d: int, rng: np.random.Generator) -> torch.Tensor:
    w = rng.standard_normal((n_atoms, d))
    return torch.from_numpy(w / np.linalg.norm(w, axis=1, keepdims=True))


@st.composite
def problems(draw):
    """Awkward shapes: k not a power of two (several 16-wide kernel blocks in the interpreter), single
    samples, d not a multiple of the 16-wide d chunks, padding anywhere, zero values, empty supports."""
    n_atoms = draw(st.integers(2, 70))
    d = draw(st.integers(1, 40))
    batch = draw(st.integers(1, 4))
    k = draw(st.integers(0, min(n_atoms, 40)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    unit = random_unit(n_atoms, d, rng)
    indices = np.stack([rng.permutation(n_atoms)[:k] for _ in range(batch)])
    indices[rng.random((batch, k)) < draw(st.sampled_from([0.0, 0.3, 1.0]))] = -1
    values = None
    if draw(st.booleans()):
        values = rng.standard_normal((batch, k)).astype(np.float32)
        values[rng.random((batch, k)) < 0.3] = 0.0
    return unit, torch.from_numpy(indices), None if values is None else torch.from_numpy(values)


DTYPES = st.sampled_from([torch.float64, torch.float32, torch.float16, torch.bfloat16])


def assert_matches(out, expected, d: int, grams: bool) -> None:
    tol = 4 * max(d, 1) * 2.0**-53
    best, size, gram = expected
    assert out.max_abs_cos.dtype == torch.float64 and out.support_size.dtype == torch.int64
    np.testing.assert_allclose(out.max_abs_cos.numpy(), best, rtol=0, atol=tol)
    np.testing.assert_array_equal(out.support_size.numpy(), size)
    if grams:
        assert out.grams.dtype == torch.float64
        np.testing.assert_allclose(out.grams.numpy(), gram, rtol=0, atol=tol)
    else:
        assert out.grams is None


@settings(max_examples=30, deadline=None)
@given(problem=problems(), dtype=DTYPES, return_grams=st.booleans())
def test_kernel_matches_references(problem, dtype, return_grams):
    unit, indices, values = problem
    stored = unit.to(dtype)
    expected = reference_of(stored, indices, values)
    with interpreted():
        out = support_coherence(stored, indices, values, return_grams=return_grams)
    assert_matches(out, expected, unit.shape[1], return_grams)
    ref = support_coherence_reference(stored, indices, values, return_grams=return_grams)
    assert_matches(ref, expected, unit.shape[1], return_grams)
    # Against the float64 atoms before rounding to `dtype`: the bound of the module docstring.
    exact = reference_of(unit, indices, values)
    eps = EPS[dtype]
    atol = 2 * eps + eps**2 + 2 * unit.shape[1] ** 0.5 * SUBNORMAL_STEP.get(dtype, 0.0) + 1e-13
    np.testing.assert_allclose(out.max_abs_cos.numpy(), exact[0], rtol=0, atol=atol)


@settings(max_examples=25, deadline=None)
@given(problem=problems(), dtype=DTYPES, chunk_bytes=st.sampled_from([1, 4096, sg.CHUNK_BYTES]))
def test_torch_paths_agree(problem, dtype, chunk_bytes):
    """Both torch branches forced: the cached full Gram and the chunked gather + bmm."""
    unit, indices, values = problem
    stored = unit.to(dtype)
    expected = reference_of(stored, indices, values)
    for cached_atoms in (0, 10**6):
        out = support_coherence_reference(
            stored,
            indices,
            values,
            return_grams=True,
            cached_gram_atoms=cached_atoms,
            chunk_bytes=chunk_bytes,
        )
        assert_matches(out, expected, unit.shape[1], grams=True)


@pytest.mark.parametrize("fp64_dot", [True, False], ids=["dmma", "fma-triton-3.4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_kernel_several_blocks(dtype, fp64_dot, monkeypatch):
    """k = 40 spans three 16-wide blocks in the interpreter (six block pairs, mirrored Gram stores) and
    d = 37 three 16-wide chunks; padding and zero values fall in every block. Both float64 products: the
    float64 tl.dot, and the multiply-and-sum that Triton 3.4 (no float64 dot) compiles instead."""
    monkeypatch.setattr(sg, "has_fp64_dot", lambda: fp64_dot)
    rng = np.random.default_rng(3)
    unit = random_unit(90, 37, rng).to(dtype)
    indices = torch.from_numpy(np.stack([rng.permutation(90)[:40] for _ in range(3)]))
    indices[0, 30:] = -1
    indices[1, ::7] = -1
    values = torch.from_numpy(rng.standard_normal((3, 40)))
    values[2, 10:20] = 0.0
    with interpreted():
        out = support_coherence(unit, indices, values, return_grams=True)
    assert_matches(out, reference_of(unit, indices, values), 37, grams=True)


def test_default_backend_on_cpu_is_the_torch_reference():
    rng = np.random.default_rng(0)
    unit = random_unit(30, 12, rng).float()
    indices = torch.tensor([[3, 7, -1, 12], [0, -1, -1, -1]])
    with backend_env("auto"):
        out = support_coherence(unit, indices, return_grams=True)
    expected = numpy_reference(unit.double().numpy(), indices.numpy(), None)
    assert_matches(out, expected, 12, grams=True)


def test_known_geometry():
    """Orthonormal atoms have coherence 0; an atom and its copy at another index have |cos| 1; a pair at
    a known angle gives its cosine; fewer than two active atoms give 0."""
    c = 0.6
    unit = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [c, 0.8, 0.0]])
    indices = torch.tensor([[0, 1, 2], [0, 3, -1], [4, 0, -1], [2, -1, -1], [-1, -1, -1], [1, 0, 4]])
    values = torch.tensor([[1.0, 1, 1], [1, 1, 0], [2, -1, 0], [1, 0, 0], [0, 0, 0], [0.5, 0.0, 0.0]])
    for run in (interpreted, lambda: backend_env("torch")):
        with run():
            out = support_coherence(unit, indices, values)
        torch.testing.assert_close(
            out.max_abs_cos, torch.tensor([0.0, 1.0, c, 0.0, 0.0, 0.0], dtype=torch.float64)
        )
        assert out.support_size.tolist() == [3, 2, 2, 1, 0, 1]


def test_numpy_inputs_and_int32_indices():
    rng = np.random.default_rng(1)
    unit = random_unit(20, 9, rng).numpy()
    indices = np.array([[4, 9, 2], [1, -1, 5]], dtype=np.int32)
    expected = numpy_reference(unit, indices.astype(np.int64), None)
    with interpreted():
        out = support_coherence(unit, indices, return_grams=True)
    assert_matches(out, expected, 9, grams=True)
    assert_matches(support_coherence_reference(unit, indices, return_grams=True), expected, 9, grams=True)


def test_gram_cache_follows_the_tensor():
    """The cached Gram is reused for the same tensor and rebuilt after an in-place change."""
    rng = np.random.default_rng(2)
    unit = random_unit(10, 4, rng)
    indices = torch.tensor([[0, 1]])
    first = support_coherence_reference(unit, indices).max_abs_cos
    assert sg._GRAM_CACHE.get(unit) is sg._GRAM_CACHE.get(unit)
    unit[1] = unit[0]
    assert support_coherence_reference(unit, indices).max_abs_cos.item() == pytest.approx(1.0, abs=1e-15)
    assert first.item() < 1.0


@pytest.mark.parametrize("mode", ["torch", "interpret"])
@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (
            {"indices": torch.tensor([[1, 4, -1, 4]])},
            ValueError,
            r"sample 0 lists atom 4 more than once.*set the",
        ),
        ({"indices": torch.tensor([[0, 1], [2, 2]])}, ValueError, r"sample 1 lists atom 2 more than once"),
        ({"indices": torch.tensor([[0, 8]])}, ValueError, r"indices\[0, 1\] = 8 is out of range for 8 atoms"),
        (
            {"indices": torch.tensor([[0, -2]])},
            ValueError,
            r"indices\[0, 1\] = -2 is out of range.*-1 marking",
        ),
        (
            {"indices": torch.tensor([[0.0, 1.0]])},
            TypeError,
            r"indices has dtype torch.float32.*indices.long",
        ),
        ({"indices": torch.tensor([0, 1])}, ValueError, r"indices must be \(batch, k\).*indices\[None\]"),
        ({"unit": torch.ones(8, 3, dtype=torch.int64)}, TypeError, r"unit has dtype torch.int64.*unit.float"),
        ({"unit": torch.ones(8)}, ValueError, r"unit must be a non-empty \(n_atoms, d\)"),
        ({"unit": torch.full((8, 3), float("nan"))}, ValueError, r"8 rows with NaN/Inf.*pass finite"),
        ({"values": torch.ones(1, 3)}, ValueError, r"values has shape \(1, 3\) but indices \(1, 2\)"),
        ({"unit": [[1.0]]}, TypeError, r"unit must be a torch tensor or a numpy array, got list"),
    ],
)
def test_bad_input(mode, kwargs, error, match):
    args = {"unit": torch.eye(8, 3), "indices": torch.tensor([[0, 1]]), "values": None, **kwargs}
    with backend_env(mode), pytest.raises(error, match=match):
        support_coherence(args["unit"], args["indices"], args["values"])


def test_padding_may_repeat_and_zero_values_still_count_as_listed():
    """-1 may repeat; a listed atom twice is an error even when one copy has value 0."""
    unit = torch.eye(4)
    out = support_coherence_reference(unit, torch.tensor([[-1, 2, -1, 3]]))
    assert out.support_size.tolist() == [2]
    with pytest.raises(ValueError, match="sample 0 lists atom 2 more than once"):
        support_coherence_reference(unit, torch.tensor([[2, 2]]), torch.tensor([[1.0, 0.0]]))
