"""The sparse step's Triton path (kernels/sparse_triton.py) against the dense path, in Triton's interpreter.

ATOMS_KERNELS=interpret runs the same kernels a CUDA device compiles, one program at a time on the CPU, with
small blocks so that tiny shapes span several programs, loop iterations and tiles reserving slots in one row.
The problems are test_sparse_step.py's grid problems (no z within 1/64 of theta or of a window edge), so the
dense threshold encoder + decoder and the sparse path select the same entries and only rounding of sums
separates them. Every buffer a kernel writes is allocated poisoned (NaN, or the integer maximum), so a slot
a kernel leaves unwritten, or a padding slot that leaks into a sum, fails the comparison.

The last test is marked `gpu`: a whole sparse step (forward, backward, Adam) captured in a CUDA graph and
replayed against eager steps; it skips without a CUDA device.
"""

import copy

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_sparse_step import NAMES, assert_close, dense_path, gradients, grid_problem, models, objective

from atoms.kernels import dispatch, sparse_gather, sparse_select, sparse_triton
from atoms.kernels.sparse_step import SparseCodes, mean_squared_error, sparse_autoencode
from atoms.kernels.sparse_triton import CapacityOverflowError, PaddedCodes

pytestmark = pytest.mark.skipif(not dispatch.HAS_TRITON, reason="Triton is not installed (Linux wheels only)")

# fp32: the same terms summed in another order (the kernels accumulate in fp32). bf16: outputs rounded to
# bf16 (2^-8 relative), one ulp more where the interpreter truncates instead of rounding (NOTES.md).
TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2}


def _poisoned(shape, dtype, device):
    if dtype.is_floating_point:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.full(shape, torch.iinfo(dtype).max, dtype=dtype, device=device)


@pytest.fixture(autouse=True)
def interpreted(request, monkeypatch):
    """Kernels interpreted, buffers poisoned, and a record of the kernels launched (they must really run).
    The GPU test runs the compiled kernels as they are."""
    if request.node.get_closest_marker("gpu"):
        return None
    if dispatch.triton_version() < (3, 7):
        pytest.skip("Triton's interpreter before 3.7 fails with NumPy >= 2.4 (kernels/dispatch.py)")
    monkeypatch.setenv("ATOMS_KERNELS", "interpret")
    launched = []
    for module in (sparse_select, sparse_gather):
        monkeypatch.setattr(module, "_empty", _poisoned)

        def spy(kernel, grid, mode, *args, _launch=module.launch, **meta):
            launched.append((getattr(kernel, "__name__", None) or kernel.fn.__name__, mode))
            return _launch(kernel, grid, mode, *args, **meta)

        monkeypatch.setattr(module, "launch", spy)
    return launched


def _problem(seed, batch, d, n, dtype, theta_level, half_width, jump):
    tensors, bandwidth = grid_problem(seed, batch, d, n, torch.float64, theta_level, half_width)
    tensors = [t.detach().to(dtype).requires_grad_() for t in tensors[:5]] + [tensors[5]]
    if not jump:
        tensors[5] = None
    return tensors, bandwidth


def _compare(tensors, bandwidth, capacity, dtype, weights=(0.5, 0.7)):
    """Every output and every gradient of the Triton path against the dense path; returns the codes."""
    u, W_enc, b_enc, W_dec, b_dec, threshold = tensors
    sparse = sparse_autoencode(u, W_enc, b_enc, W_dec, b_dec, threshold, bandwidth, capacity=capacity)
    dense = dense_path(u, W_enc, b_enc, W_dec, b_dec, threshold, bandwidth)
    assert isinstance(sparse.codes, PaddedCodes)
    assert int(sparse.codes.dropped) == 0
    for name, a, b in zip(("u_hat", "l0", "column_sums"), sparse[:3], dense[:3], strict=True):
        assert_close(a, b, TOL[dtype], name)
    assert torch.equal(sparse.codes.to_dense(), dense[3].detach())
    assert torch.equal(sparse.codes.fired(), (dense[3] != 0).any(0))
    g_sparse = gradients(objective(u, *sparse[:3], W_dec, weights), tensors)
    g_dense = gradients(objective(u, *dense[:3], W_dec, weights), tensors)
    for name, a, b in zip(NAMES, g_sparse, g_dense, strict=True):
        if a is not None:
            assert_close(a, b, TOL[dtype], f"gradient in {name}")
    return sparse.codes


def _selected_per_row(tensors, bandwidth):
    """(batch,) entries the dense path selects in each row: active, or (JumpReLU) in the window."""
    u, W_enc, b_enc, _, b_dec, threshold = (t.detach().double() if t is not None else None for t in tensors)
    z = (u - b_dec) @ W_enc + b_enc
    if threshold is None:
        return (z > 0).sum(1)
    return ((z > threshold) | ((z - threshold).abs() <= bandwidth / 2)).sum(1)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    seed=st.integers(0, 2**31),
    batch=st.integers(1, 20),
    d=st.integers(1, 8),
    n=st.integers(1, 40),
    theta_level=st.integers(0, 8),
    half_width=st.integers(1, 4),
    jump=st.booleans(),
    margin=st.one_of(st.none(), st.integers(0, 8)),
    weights=st.tuples(st.floats(0, 2), st.floats(0, 2)),
)
def test_triton_path_equals_dense(
    interpreted, seed, batch, d, n, theta_level, half_width, jump, margin, weights
):
    """u_hat, l0, column sums, codes and every gradient (u included), JumpReLU and ReLU, L0 from none to all
    latents (theta_level) and windows from narrow to wide (half_width); the capacity either sized by the
    path (None) or given: the fullest row's count plus a margin (0: exactly full rows)."""
    tensors, bandwidth = _problem(seed, batch, d, n, torch.float32, theta_level, half_width, jump)
    capacity = None if margin is None else max(1, int(_selected_per_row(tensors, bandwidth).max()) + margin)
    codes = _compare(tensors, bandwidth, capacity, torch.float32, weights)
    assert torch.equal(codes.counts.long(), _selected_per_row(tensors, bandwidth))
    kernels = {name for name, mode in interpreted}
    assert kernels >= {"_select_kernel", "_gather_sum_kernel", "_sampled_dot_kernel", "_segment_grads_kernel"}
    assert {mode for _, mode in interpreted} == {"interpret"}


@pytest.mark.parametrize("jump", [True, False], ids=["jumprelu", "relu"])
def test_bfloat16_equals_dense(jump):
    tensors, bandwidth = _problem(7, 19, 6, 37, torch.bfloat16, 3, 2, jump)
    _compare(tensors, bandwidth, 24, torch.bfloat16)


def test_rows_are_ascending_and_padding_is_zero():
    tensors, bandwidth = _problem(3, 17, 5, 40, torch.float32, 2, 3, True)
    u, W_enc, b_enc, W_dec, b_dec, threshold = tensors
    codes = sparse_autoencode(u, W_enc, b_enc, W_dec, b_dec, threshold, bandwidth, capacity=40).codes
    filled = torch.arange(40)[None, :] < codes.counts[:, None]
    assert bool(filled.any()) and not bool(filled.all())
    idx = codes.indices.long()
    assert bool(((idx[:, 1:] > idx[:, :-1]) | ~filled[:, 1:]).all())
    assert not bool(codes.indices[~filled].any()) and not bool(codes.values[~filled].any())


def test_overflow_is_counted_on_the_device_and_check_names_the_fix(interpreted):
    """Rows selecting more entries than the capacity: the counts stay true, `dropped` says how many entries
    are missing, the entries kept are correct ones, and check() raises naming the capacity needed; the same
    batch with capacity=None (sized with one sync) is exact."""
    tensors, bandwidth = _problem(11, 16, 6, 40, torch.float32, 0, 4, True)
    per_row = _selected_per_row(tensors, bandwidth)
    capacity = int(per_row.max()) - 2
    assert capacity >= 1
    u, W_enc, b_enc, W_dec, b_dec, threshold = tensors
    out = sparse_autoencode(u, W_enc, b_enc, W_dec, b_dec, threshold, bandwidth, capacity=capacity)
    codes = out.codes
    assert codes.dropped.device == u.device and codes.dropped.dtype == torch.int32
    assert int(codes.dropped) == int((per_row - capacity).clamp(min=0).sum()) > 0
    assert torch.equal(codes.counts.long(), per_row)
    dense_codes = dense_path(*tensors, bandwidth)[3].detach()
    kept = codes.to_dense()
    assert torch.equal(kept[kept != 0], dense_codes[kept != 0])
    with pytest.raises(CapacityOverflowError, match=f"capacity >= {int(per_row.max())}"):
        codes.check()
    # capacity=None: the first guess is short here, so the forward runs again with the fullest row's count.
    assert int(per_row.max()) > sparse_triton.default_capacity(40)
    interpreted.clear()
    _compare(tensors, bandwidth, None, torch.float32)
    assert [name for name, _ in interpreted].count("_select_kernel") == 2


def test_window_entries_reach_theta_only_through_the_window():
    """z = 0.5 with theta = 0.55, e = 0.2 (inside the window: inactive, yet theta gets the L0 term) and
    theta = 0.9 (outside: nothing)."""
    u = torch.ones(1, 1)
    W_enc = torch.tensor([[0.5, 0.5]], requires_grad=True)
    theta = torch.tensor([0.55, 0.9], requires_grad=True)
    out = sparse_autoencode(
        u, W_enc, torch.zeros(2), torch.ones(2, 1), torch.zeros(1), theta, 0.2, capacity=2
    )
    assert out.l0.tolist() == [0.0] and out.codes.counts.tolist() == [1]
    (grad,) = torch.autograd.grad(out.l0.sum(), theta)
    assert grad.tolist() == pytest.approx([-1 / 0.2, 0.0])


def test_nan_reaches_the_loss_as_on_the_dense_path():
    u = torch.tensor([[float("nan"), 1.0]])
    zeros = torch.zeros(2)
    out = sparse_autoencode(
        u, torch.eye(2), zeros, torch.eye(2), zeros, torch.full((2,), 0.5), 0.01, capacity=2
    )
    assert torch.isnan(out.u_hat[0, 0])


def test_nothing_of_size_batch_by_n_atoms_is_saved_for_backward():
    batch, n = 24, 40
    tensors, bandwidth = _problem(0, batch, 6, n, torch.float32, 4, 2, True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        out = sparse_autoencode(*tensors[:5], tensors[5], bandwidth, capacity=16)
        mean_squared_error(out.u_hat, tensors[0].detach())
    assert saved and all(np.prod(shape) < batch * n for shape in saved), saved


def test_bad_capacity_and_float64_fallback():
    tensors, bandwidth = _problem(0, 4, 3, 5, torch.float32, 2, 1, True)
    for capacity in (0, 2.5, True):
        with pytest.raises(ValueError, match="capacity must be a positive int"):
            sparse_autoencode(*tensors[:5], tensors[5], bandwidth, capacity=capacity)
    # float64 has no Triton path (no float64 tl.dot under Triton 3.4): the torch path, CSR codes.
    wide = [t.detach().double() for t in tensors[:5]]
    assert isinstance(sparse_autoencode(*wide, tensors[5], bandwidth).codes, SparseCodes)
    assert sparse_triton.default_capacity(5) == 5 and sparse_triton.default_capacity(16384) == 2048


def test_sae_training_loss_takes_the_triton_path_and_equals_dense(interpreted):
    """The SAEs' sparse pass (TSAE in both loss norms, ReLU SAE) on the interpreted kernels: loss, fired
    latents and every parameter gradient equal the dense pass's."""
    x = torch.randn(64, 6, generator=torch.Generator().manual_seed(4)) * 3
    for model in models(torch.float32):
        dense = model.training_loss(x, 0.1, sparse=False)
        g_dense = torch.autograd.grad(dense.loss, list(model.parameters()))
        interpreted.clear()
        sparse = model.training_loss(x, 0.1, sparse=True)
        assert "_select_kernel" in {name for name, _ in interpreted}
        g_sparse = torch.autograd.grad(sparse.loss, list(model.parameters()))
        what = f"{type(model).__name__} {model.loss_norm}"
        for name in ("loss", "recon_loss", "l0"):
            assert_close(getattr(sparse, name), getattr(dense, name), TOL[torch.float32], f"{what} {name}")
        assert torch.equal(sparse.fired, dense.fired)
        for a, b in zip(g_sparse, g_dense, strict=True):
            assert_close(a, b, TOL[torch.float32], f"{what} gradient")


# --- CUDA graph capture (GPU only) -------------------------------------------------------------------------


def _step(params, optimizer, x, capacity, coefficient):
    """One sparse training step: JumpReLU SAE, squared error + L0 penalty, Adam. Returns the codes."""
    W_enc, b_enc, W_dec, b_dec, theta = params
    out = sparse_autoencode(x, W_enc, b_enc, W_dec, b_dec, theta, 0.05, capacity=capacity)
    loss = mean_squared_error(out.u_hat, x) + coefficient * out.l0.mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=False)
    return out.codes


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the CUDA-graph test needs one")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_captured_sparse_step_replays_like_eager(dtype, monkeypatch):
    """Forward, backward and a capturable Adam step captured once and replayed on new batches: parameters
    after each replay equal an eager copy's (the path is deterministic: rows sorted after the atomics,
    per-latent sums without atomics), nothing overflows, and no host sync happens inside (capture fails on
    one)."""
    monkeypatch.setenv("ATOMS_KERNELS", "auto")  # Triton on CUDA tensors (the torch path would sync)
    gen = torch.Generator(device="cuda").manual_seed(0)
    batch, d, n = 512, 128, 2048
    init = [
        torch.randn(d, n, generator=gen, device="cuda") / d**0.5,
        torch.zeros(n, device="cuda"),
        torch.randn(n, d, generator=gen, device="cuda") / d**0.5,
        torch.zeros(d, device="cuda"),
    ]
    params = [torch.nn.Parameter(t.to(dtype)) for t in init] + [
        torch.nn.Parameter(torch.full((n,), 1.5, device="cuda"))
    ]
    optimizer = torch.optim.Adam(params, lr=1e-3, betas=(0.0, 0.999), capturable=True)
    batches = [torch.randn(batch, d, generator=gen, device="cuda").to(dtype) for _ in range(6)]
    capacity = 256

    static_x = batches[0].clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: compiles and autotunes the kernels, allocates Adam's state
        for x in batches[:3]:
            static_x.copy_(x)
            _step(params, optimizer, static_x, capacity, 1e-3)
    torch.cuda.current_stream().wait_stream(side)

    eager_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    eager_optimizer = torch.optim.Adam(eager_params, lr=1e-3, betas=(0.0, 0.999), capturable=True)
    eager_optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_codes = _step(params, optimizer, static_x, capacity, 1e-3)

    for x in batches[3:]:
        static_x.copy_(x)
        graph.replay()
        eager_codes = _step(eager_params, eager_optimizer, x.clone(), capacity, 1e-3)
        torch.cuda.synchronize()
        assert int(static_codes.dropped) == 0 and int(eager_codes.dropped) == 0
        assert torch.equal(static_codes.counts, eager_codes.counts)
        assert int(static_codes.counts.max()) > 0
        for p, q in zip(params, eager_params, strict=True):
            assert torch.allclose(p, q, rtol=1e-6, atol=1e-7), float((p - q).abs().max())
