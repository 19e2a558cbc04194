"""threshold_encode under torch.compile and torch.autocast, its custom ops, and its validation switch.

The problems and checks are test_threshold_encoder's: inputs on a grid where every pre-activation is exact in
bf16, fp16 and fp32, so codes and l0 must equal the float64 closed form exactly, and gradients must be within
its per-dtype tolerances. "torch" runs the default CPU path (the torch reference), "interpret" the Triton
kernels through Triton's interpreter, inside the same custom op.
"""

import os
from collections.abc import Callable, Iterator

import pytest
import torch
from test_threshold_encoder import assert_matches, closed_form, grid_problem, run

from atoms.kernels import threshold_encoder as te
from atoms.kernels.threshold_encoder import threshold_encode, threshold_encode_reference

MODES = ["torch", "interpret"]
GRADIENTS = ("x", "W_enc", "b_enc", "b_dec", "threshold")


def problem(dtype: torch.dtype = torch.float32, batch_shape: tuple[int, ...] = (3, 7)) -> dict:
    # n = 45 is no multiple of 4 (the kernels' packed state has a ragged last byte) nor of the tiles.
    return grid_problem(
        seed=3, batch_shape=batch_shape, d=19, n=45, dtype=dtype, with_b_dec=True, half_width_32nds=2
    )


@pytest.fixture
def launches(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> set[str]:
    """Sets ATOMS_KERNELS to the test's mode (its parameter); the set fills with the modes `launch` runs
    kernels in."""
    monkeypatch.setenv("ATOMS_KERNELS", request.param)
    modes: set[str] = set()
    launch = te.launch

    def spy(kernel, grid, mode, *args, **meta):
        modes.add(mode)
        return launch(kernel, grid, mode, *args, **meta)

    monkeypatch.setattr(te, "launch", spy)
    return modes


def kernels_expected(fn: Callable = threshold_encode) -> set[str]:
    """What `launches` must hold: interpreted kernels for threshold_encode under "interpret", else none."""
    return {"interpret"} if os.environ["ATOMS_KERNELS"] == "interpret" and fn is threshold_encode else set()


@pytest.fixture
def fresh_dynamo() -> Iterator[None]:
    """Compiled code keeps the backend it was traced with (`threshold_encoder._mode`): no test may inherit
    another test's compiled graph."""
    torch.compiler.reset()
    yield
    torch.compiler.reset()


def in_autocast(fn: Callable, dtype: torch.dtype) -> Callable:
    """`fn` called inside torch.autocast on the CPU; `run` takes the backward outside it, as training does."""

    def wrapped(*args, **kwargs):
        with torch.autocast("cpu", dtype=dtype):
            return fn(*args, **kwargs)

    return wrapped


@pytest.mark.parametrize("launches", MODES, indirect=True)
def test_fullgraph_compile_matches_closed_form(launches, fresh_dynamo):
    # fullgraph=True fails on any graph break: a host sync (the threshold check's bool() of a tensor), an op
    # without a fake implementation, an autograd.Function dynamo cannot trace. Two batch shapes: the second
    # recompiles with a symbolic batch size, which the fake implementations must handle. Inductor (the default
    # backend) compiles the surrounding graph and its backward and calls the custom ops.
    compiled = torch.compile(threshold_encode, fullgraph=True)
    for batch_shape in ((3, 7), (5, 4)):
        p = problem(batch_shape=batch_shape)
        assert_matches(run(compiled, p), closed_form(p), torch.float32)
    assert launches == kernels_expected()


def test_fullgraph_compile_under_autocast(fresh_dynamo):
    p = problem()
    got = run(in_autocast(torch.compile(threshold_encode, fullgraph=True), torch.bfloat16), p)
    assert_matches(got, closed_form(p), torch.bfloat16)


@pytest.mark.parametrize("launches", MODES, indirect=True)
@pytest.mark.parametrize("fn", [threshold_encode, threshold_encode_reference], ids=["dispatch", "reference"])
def test_autocast_computes_in_its_dtype_with_fp32_master_weights(launches, fn):
    # fp32 activations and parameters, bf16 autocast: codes in bf16 (the GEMM's dtype), l0 in float32, and
    # every gradient back in its parameter's own dtype (fp32), with bf16 rounding.
    p = problem()
    got = run(in_autocast(fn, torch.bfloat16), p)
    assert_matches(got, closed_form(p), torch.bfloat16)
    assert {got[name].dtype for name in GRADIENTS} == {torch.float32}
    assert launches == kernels_expected(fn)


@pytest.mark.parametrize("launches", MODES, indirect=True)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_activations_with_fp32_weights_compute_in_fp32(launches, dtype):
    # Outside autocast nothing is computed in less precision than the parameters hold: fp32 codes, fp32
    # gradients, exact on the grid. x needs no gradient, as in SAE training.
    p = problem()
    got = run(threshold_encode, {**p, "x": p["x"].to(dtype)}, x_grad=False)
    assert_matches(got, closed_form(p), torch.float32)
    assert launches == kernels_expected()


def test_validate_false_skips_the_threshold_check():
    x, W, b = torch.ones(2, 3), torch.ones(3, 4), torch.zeros(4)
    theta = torch.tensor([0.5, 0.0, 0.5, 0.5])
    with pytest.raises(ValueError, match="positive and finite"):
        threshold_encode(x, W, b, theta)
    codes = threshold_encode(x, W, b, theta, validate=False)
    assert bool((codes == 3).all())


@pytest.mark.parametrize("mode", MODES)
def test_custom_ops_pass_opcheck(mode):
    # torch.library.opcheck: schema, fake implementation against the real one (shapes, dtypes, strides),
    # autograd registration, and tracing through AOTAutograd with dynamic shapes.
    gen = torch.Generator().manual_seed(0)
    xc, W = torch.randn(9, 5, generator=gen), torch.randn(5, 11, generator=gen)
    bias, theta = torch.randn(11, generator=gen), torch.full((11,), 0.2)
    for t in (xc, W, bias, theta):
        t.requires_grad_()
    for want_l0 in (True, False):
        torch.library.opcheck(te._encode_op, (xc, W, bias, theta, 0.5, want_l0, mode))
    state = te._encode_op(xc, W, bias, theta, 0.5, True, mode)[2]
    g, gl = torch.randn(9, 11, generator=gen), torch.randn(9, generator=gen)
    for upstream_l0 in (gl, None):
        torch.library.opcheck(te._encode_backward_op, (g, upstream_l0, state, theta.detach(), mode))
