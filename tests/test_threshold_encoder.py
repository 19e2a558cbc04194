"""Threshold encoder: the Triton kernels (interpreted) and the torch reference against float64 closed forms.

The independent reference is `closed_form` below: numpy float64, written from SPEC section 6's formulas.

Test problems live on a grid so the comparison is exact at the discontinuities: x - b_dec in multiples of 1/4,
W_enc in multiples of 1/8, b_enc in multiples of 1/32, so every pre-activation z is a multiple of 1/32 below 8
in magnitude, exactly representable in bf16 (8-bit significand), fp16 and fp32 and computed exactly by an fp32
accumulator. theta sits half-way between grid points and the window half-width e/2 is a multiple of 1/32, so
no z is within 1/64 of theta or of a window edge: H(z - theta) and K((z - theta)/e) are unambiguous in every
dtype, and codes and l0 must match exactly. Only the gradients (random upstream g) carry rounding, with
tolerances per dtype.
"""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from atoms.kernels import dispatch
from atoms.kernels import threshold_encoder as te
from atoms.kernels.threshold_encoder import (
    EncoderOutput,
    ThresholdEncoder,
    threshold_encode,
    threshold_encode_reference,
)

# Largest |error| of a gradient entry, as a fraction of the magnitude of the terms it sums (closed_form's
# "scale"). Grid inputs and g are exact in every dtype, so the error is rounding of results: fp32 / fp64 sums
# of at most 40 terms; bf16 / fp16 at most two roundings (unit 2^-9 / 2^-12) of a GEMM output and of the
# intermediate summed into b_dec's gradient (grad_xc rows in the reference, the b_enc column sum in the kernel
# path), so 2^-8 / 2^-11, allowed twice over.
GRAD_TOL = {torch.float32: 1e-5, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10, torch.float64: 1e-12}


def grid_problem(seed, batch_shape, d, n, dtype, with_b_dec, half_width_32nds):
    """Inputs on the grid of the module docstring, plus a random upstream gradient for codes and for l0."""
    rng = np.random.default_rng(seed)
    x = rng.integers(-2, 3, size=(*batch_shape, d)) / 4
    b_dec = rng.integers(-1, 2, size=d) / 4 if with_b_dec else None
    if b_dec is not None:
        x = x + b_dec  # keeps x - b_dec on the 1/4 grid within [-1/2, 1/2]
    W = rng.integers(-2, 3, size=(d, n)) / 8
    b = rng.integers(-4, 5, size=n) / 32
    theta = (rng.integers(0, 6, size=n) + 0.5) / 32
    g = rng.standard_normal((*batch_shape, n))
    gl = rng.standard_normal(batch_shape)

    def t(a):
        return None if a is None else torch.tensor(a, dtype=dtype)

    return {
        "x": t(x),
        "W_enc": t(W),
        "b_enc": t(b),
        "b_dec": t(b_dec),
        # float32, as training keeps it; float64 alongside float64 inputs (the reference's gradient-check
        # mode)
        "threshold": torch.tensor(theta, dtype=torch.float64 if dtype == torch.float64 else torch.float32),
        "bandwidth": half_width_32nds / 16,
        "g": t(g),
        "gl": torch.tensor(gl, dtype=torch.float32),
    }


def closed_form(p, return_l0=True):
    """float64 numpy codes, l0 and the five gradients of sum(g * codes) + sum(gl * l0) (gl = 0 without l0).

    Also returns, under "scale", each gradient evaluated on absolute values (|g|, |W|, |x - b_dec|, |gl|, same
    masks): the magnitude a rounding error is proportional to, as in the usual error bound of a sum or GEMM.
    """
    if not return_l0:
        p = {**p, "gl": torch.zeros_like(p["gl"])}
    f = {k: (v.double().numpy() if isinstance(v, torch.Tensor) else v) for k, v in p.items()}
    x, W, b, theta, e = f["x"], f["W_enc"], f["b_enc"], f["threshold"], f["bandwidth"]
    d = W.shape[0]
    xc = (x - f["b_dec"] if f["b_dec"] is not None else x).reshape(-1, d)
    g, gl = f["g"].reshape(xc.shape[0], -1), f["gl"].reshape(-1)
    z = xc @ W + b
    on = z > theta
    window = np.abs(z - theta) <= e / 2

    def grads(xc, W, g, gl, sign):
        grad_z = g * on
        grad_xc = grad_z @ W.T
        return {
            "x": grad_xc.reshape(x.shape),
            "W_enc": xc.T @ grad_z,
            "b_enc": grad_z.sum(0),
            "b_dec": -sign * grad_xc.sum(0),
            "threshold": -sign * (1 / e) * (window * (theta * g + gl[:, None])).sum(0),
        }

    return {
        "codes": (z * on).reshape(f["g"].shape),
        "l0": on.sum(1).reshape(f["gl"].shape),
        **grads(xc, W, g, gl, 1),
        "scale": grads(np.abs(xc), np.abs(W), np.abs(g), np.abs(gl), -1),
    }


def run(fn, p, *, return_l0=True, x_grad=True):
    """Forward and backward of `fn`: codes, l0 and the gradients of the tensor inputs (x's if `x_grad`)."""
    names = ("x", "W_enc", "b_enc", "b_dec", "threshold")
    # detach, not clone: a new leaf that keeps the input's strides
    leaves = {k: p[k].detach().requires_grad_(k != "x" or x_grad) for k in names if p[k] is not None}
    out = fn(
        leaves["x"],
        leaves["W_enc"],
        leaves["b_enc"],
        leaves["threshold"],
        b_dec=leaves.get("b_dec"),
        bandwidth=p["bandwidth"],
        return_l0=return_l0,
    )
    if return_l0:
        loss = (out.codes.double() * p["g"].double()).sum() + (out.l0.double() * p["gl"].double()).sum()
        codes, l0 = out
    else:
        loss = (out.double() * p["g"].double()).sum()
        codes, l0 = out, None
    loss.backward()
    grads = {k: v.grad for k, v in leaves.items() if v.requires_grad}
    return {"codes": codes.detach(), "l0": None if l0 is None else l0.detach(), **grads}


def assert_matches(got, want, dtype, return_l0=True):
    assert got["codes"].dtype == dtype
    np.testing.assert_array_equal(got["codes"].double().numpy(), want["codes"])
    if return_l0:
        assert got["l0"].dtype == torch.float32
        np.testing.assert_array_equal(got["l0"].numpy(), want["l0"])
    for name in ("x", "W_enc", "b_enc", "b_dec", "threshold"):
        if name not in got:
            continue
        g, w, scale = got[name].double().numpy(), want[name], want["scale"][name]
        assert g.shape == w.shape, name
        # Results below the dtype's smallest normal round to multiples of the subnormal spacing: two such
        # roundings add up to one spacing of absolute error whatever the magnitude (fp16: 2^-24 = 6e-8).
        finfo = torch.finfo(dtype)
        spacing = finfo.smallest_normal * finfo.eps
        err = (np.maximum(np.abs(g - w) - spacing, 0.0) / np.maximum(scale, 1e-30)).max()
        assert err <= GRAD_TOL[dtype], f"{name}: error {err:.2e} of the magnitude of its terms"


@pytest.fixture
def interpret(monkeypatch):
    """Run the Triton kernels through the interpreter, with every kernel output poisoned before the launch."""
    monkeypatch.setenv("ATOMS_KERNELS", "interpret")

    def poisoned(shape, dtype, device):
        if dtype.is_floating_point:
            return torch.full(shape, float("nan"), dtype=dtype, device=device)
        return torch.full(shape, 0xFF, dtype=dtype, device=device)  # 0xFF: every element "on" and "in window"

    monkeypatch.setattr(te, "_empty", poisoned)


shapes = st.fixed_dictionaries(
    {
        "seed": st.integers(0, 2**31),
        "batch_shape": st.one_of(
            st.tuples(st.integers(1, 40)), st.tuples(st.integers(1, 3), st.integers(1, 9))
        ),
        "d": st.integers(1, 40),
        "n": st.integers(1, 70),
        "with_b_dec": st.booleans(),
        "half_width_32nds": st.integers(1, 3),
    }
)


# ------------------------------------------------------------------------------------------------------------
# Triton kernels through the interpreter
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shape=shapes, return_l0=st.booleans(), x_grad=st.booleans())
def test_kernels_match_closed_form(interpret, dtype, shape, return_l0, x_grad):
    p = grid_problem(dtype=dtype, **shape)
    assert dispatch.backend(p["x"]) == "interpret"
    got = run(threshold_encode, p, return_l0=return_l0, x_grad=x_grad)
    assert_matches(got, closed_form(p, return_l0), dtype, return_l0)


@pytest.mark.parametrize(
    ("batch_shape", "d", "n"),
    [((1,), 1, 1), ((1,), 17, 33), ((33,), 16, 32), ((16,), 3, 64)],
    ids=["1x1x1", "single-row", "one-past-blocks", "exact-blocks"],
)
def test_kernels_edge_shapes(interpret, batch_shape, d, n):
    # The interpreter tiles are 16 x 32 (forward) and 8 x 32 (backward), BLOCK_K 16.
    p = grid_problem(
        seed=1, batch_shape=batch_shape, d=d, n=n, dtype=torch.float32, with_b_dec=True, half_width_32nds=2
    )
    assert_matches(run(threshold_encode, p), closed_form(p), torch.float32)


def test_kernels_take_strided_inputs(interpret):
    # SAE code often passes W_enc as a view W_dec.T (unit stride along d), and x may be a slice: the launcher
    # passes strides to the kernel instead of copying (no b_dec, so x itself reaches the kernel).
    p = grid_problem(
        seed=5, batch_shape=(19,), d=21, n=37, dtype=torch.float32, with_b_dec=False, half_width_32nds=3
    )
    want = run(threshold_encode, p)
    wide = torch.zeros(19, 42)
    wide[:, ::2] = p["x"]
    strided = {**p, "x": wide[:, ::2], "W_enc": p["W_enc"].T.contiguous().T}
    assert not strided["x"].is_contiguous() and strided["W_enc"].stride() == (1, 21)
    got = run(threshold_encode, strided)
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, rtol=1e-6, atol=1e-6)


def test_kernel_accumulates_bf16_in_fp32(interpret):
    # Continuous data, d = 300: products of bf16 values summed in fp32, then converted once to bf16. That
    # conversion rounds to nearest on a GPU but truncates under triton 3.9's interpreter (its fp32 -> bf16
    # cast takes no rounding mode), so the bound is one bf16 ulp, 2^-7 relative. A bf16 accumulator (300
    # roundings) or the interpreter's raw-bits bf16 dot (triton issue 11584) misses it.
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, 300, generator=gen).bfloat16()
    W = (torch.randn(300, 40, generator=gen) / 300**0.5).bfloat16()
    b = torch.zeros(40, dtype=torch.bfloat16)
    theta = torch.full((40,), 1e-3)
    codes = threshold_encode(x, W, b, theta)
    z = x.double() @ W.double()
    clear = (z - theta.double()).abs() > 1e-2  # far from the jump in the bf16 rounding of z as well
    err = (codes.double() - z * (z > theta.double()))[clear].abs()
    assert bool((err <= 2.0**-7 * z.abs()[clear] + 1e-6).all())


def test_kernel_gradient_with_expanded_upstream(interpret):
    # codes.sum().backward() hands backward a stride-0 (expanded) gradient; the kernel reads it by strides.
    p = grid_problem(
        seed=3, batch_shape=(21,), d=13, n=45, dtype=torch.float32, with_b_dec=False, half_width_32nds=1
    )
    x = p["x"].clone().requires_grad_()
    threshold = p["threshold"].clone().requires_grad_()
    threshold_encode(x, p["W_enc"], p["b_enc"], threshold, bandwidth=p["bandwidth"]).sum().backward()
    want = closed_form({**p, "g": torch.ones_like(p["g"]), "gl": torch.zeros_like(p["gl"])})
    np.testing.assert_allclose(x.grad.double().numpy(), want["x"], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(threshold.grad.double().numpy(), want["threshold"], rtol=1e-6, atol=1e-6)


def test_kernel_rejects_float64(interpret):
    x = torch.randn(4, 3, dtype=torch.float64)
    with pytest.raises(TypeError, match="ATOMS_KERNELS=torch"):
        threshold_encode(
            x,
            torch.randn(3, 5, dtype=torch.float64),
            torch.zeros(5, dtype=torch.float64),
            torch.full((5,), 0.1),
        )


# ------------------------------------------------------------------------------------------------------------
# Torch reference (the CPU path)
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@settings(max_examples=25, deadline=None)
@given(shape=shapes, return_l0=st.booleans(), x_grad=st.booleans())
def test_reference_matches_closed_form(dtype, shape, return_l0, x_grad):
    # x_grad=False takes the reference's training path: b_dec's gradient through a GEMV, not through grad_x.
    p = grid_problem(dtype=dtype, **shape)
    got = run(threshold_encode_reference, p, return_l0=return_l0, x_grad=x_grad)
    assert_matches(got, closed_form(p, return_l0), dtype, return_l0)


def test_reference_gradcheck():
    # Finite differences of float64 autograd for x, W_enc, b_enc, b_dec (theta's pseudo-gradient is not a
    # derivative: it is checked against its closed form above). Grid inputs keep every z at least 1/64 from
    # theta, far beyond gradcheck's 1e-6 steps, so the mask does not move.
    p = grid_problem(
        seed=7, batch_shape=(2, 3), d=5, n=7, dtype=torch.float64, with_b_dec=True, half_width_32nds=1
    )
    inputs = tuple(p[k].clone().requires_grad_() for k in ("x", "W_enc", "b_enc", "b_dec"))

    def f(x, W, b, b_dec):
        return tuple(threshold_encode_reference(x, W, b, p["threshold"], b_dec=b_dec, return_l0=True))

    assert torch.autograd.gradcheck(f, inputs)


def test_cpu_takes_the_reference_by_default(monkeypatch):
    monkeypatch.delenv("ATOMS_KERNELS", raising=False)
    x = torch.randn(3, 4)
    assert dispatch.backend(x) == "torch"
    monkeypatch.setenv("ATOMS_KERNELS", "torch")
    assert dispatch.backend(x) == "torch"
    monkeypatch.setenv("ATOMS_KERNELS", "interpret")
    assert dispatch.backend(x) == "interpret"
    monkeypatch.setenv("ATOMS_KERNELS", "cuda")
    with pytest.raises(ValueError, match="not a known kernel backend"):
        dispatch.backend(x)


# ------------------------------------------------------------------------------------------------------------
# nn.Module and input checks
# ------------------------------------------------------------------------------------------------------------


def test_module_matches_functional_and_keeps_threshold_trainable():
    torch.manual_seed(0)
    enc = ThresholdEncoder(6, 10, bandwidth=0.5, threshold_init=0.1)
    assert dict(enc.named_parameters()).keys() == {"W_enc", "b_enc", "b_dec", "threshold"}
    assert enc.W_enc.shape == (6, 10) and enc.threshold.dtype == torch.float32
    x = torch.randn(4, 6)
    with torch.no_grad():
        enc.threshold[0] = -1.0  # an optimiser overshoot: forward clamps to min_threshold
    out = enc(x, return_l0=True)
    assert isinstance(out, EncoderOutput)
    theta = enc.threshold.detach().clamp(min=enc.min_threshold)
    want = threshold_encode(x, enc.W_enc, enc.b_enc, theta, b_dec=enc.b_dec, bandwidth=0.5, return_l0=True)
    torch.testing.assert_close(out.codes, want.codes)
    (out.codes.sum() + out.l0.sum()).backward()
    # The straight-through clamp hands the raw parameter the pseudo-gradient of the clamped value.
    theta_leaf = theta.clone().requires_grad_()
    w2 = threshold_encode(x, enc.W_enc, enc.b_enc, theta_leaf, b_dec=enc.b_dec, bandwidth=0.5, return_l0=True)
    (w2.codes.sum() + w2.l0.sum()).backward()
    torch.testing.assert_close(enc.threshold.grad, theta_leaf.grad)


def _args(**over):
    a = {
        "x": torch.randn(4, 3),
        "W_enc": torch.randn(3, 5),
        "b_enc": torch.zeros(5),
        "threshold": torch.full((5,), 0.1),
    }
    a.update(over)
    return a


@pytest.mark.parametrize(
    ("over", "kw", "error", "match"),
    [
        ({"x": torch.randn(4, 2)}, {}, ValueError, r"x must be \(\.\.\., 3\)"),
        ({"W_enc": torch.randn(3)}, {}, ValueError, "W_enc must be 2-D"),
        ({"b_enc": torch.zeros(4)}, {}, ValueError, r"b_enc must have shape \(5,\)"),
        ({}, {"b_dec": torch.zeros(2)}, ValueError, r"b_dec must have shape \(3,\)"),
        (
            {"threshold": torch.tensor([0.1, 0.0, 0.1, -1.0, 0.1])},
            {},
            ValueError,
            r"positive and finite; 2 entries",
        ),
        ({"threshold": torch.full((5,), float("nan"))}, {}, ValueError, "positive and finite"),
        ({"threshold": torch.full((5,), 0.1, dtype=torch.float64)}, {}, TypeError, "keep it in float32"),
        ({"W_enc": torch.ones(3, 5, dtype=torch.int64)}, {}, TypeError, "W_enc has dtype torch.int64"),
        ({"x": torch.randint(0, 3, (4, 3))}, {}, TypeError, "use float32, bfloat16 or float16"),
        ({"x": torch.randn(0, 3)}, {}, ValueError, "empty input"),
        ({}, {"bandwidth": 0.0}, ValueError, "bandwidth must be a positive finite number"),
        ({"x": np.zeros((4, 3))}, {}, TypeError, "torch.as_tensor"),
    ],
)
@pytest.mark.parametrize("fn", [threshold_encode, threshold_encode_reference], ids=["dispatch", "reference"])
def test_bad_input_is_named(fn, over, kw, error, match):
    a = _args(**over)
    with pytest.raises(error, match=match):
        fn(a["x"], a["W_enc"], a["b_enc"], a["threshold"], **kw)


def test_imports_and_runs_without_triton():
    # Triton has Linux wheels only; elsewhere the module must import and run the reference.
    code = (
        "import sys, os, torch; sys.modules['triton'] = None\n"
        "from atoms.kernels import threshold_encoder as te, dispatch\n"
        "assert not dispatch.HAS_TRITON\n"
        "c = te.threshold_encode(torch.ones(2, 3), torch.ones(3, 4), torch.zeros(4), torch.full((4,), 0.5))\n"
        "assert c.shape == (2, 4) and bool((c == 3).all())\n"
        "os.environ['ATOMS_KERNELS'] = 'interpret'\n"
        "try:\n"
        "    dispatch.backend(c)\n"
        "except ValueError as e:\n"
        "    assert 'needs Triton' in str(e)\n"
        "else:\n"
        "    raise SystemExit('no error')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "ATOMS_KERNELS"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
