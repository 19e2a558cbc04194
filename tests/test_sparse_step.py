"""The sparse training path (kernels/sparse_step.py) against the dense one it replaces.

The dense path is the threshold encoder's torch reference (itself tested against float64 closed forms in
test_threshold_encoder.py) followed by `codes @ W_dec + b_dec`, with autograd. Problems live on the grid of
test_threshold_encoder.py: every pre-activation is a multiple of 1/32 and no z is within 1/64 of theta or of a
window edge, so both paths select the same entries in every dtype and only rounding of sums separates them.
Hypothesis draws the shapes, the threshold levels (hence L0, from none to all latents active) and the window's
half-width (hence how many entries sit inside it).
"""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from atoms.aip import AIP
from atoms.kernels.sparse_step import SparseCodes, mean_squared_error, sparse_autoencode
from atoms.kernels.threshold_encoder import threshold_encode_reference
from atoms.train import (
    SPARSE_MAX_DENSITY,
    TrainConfig,
    TrainState,
    make_optimizer,
    train,
    train_step,
    use_sparse_path,
)
from atoms.tsae import TSAE, ReLUSAE

# |sparse - dense| over the magnitude of the compared tensor: both sum the same terms in another order.
TOL = {torch.float64: 1e-12, torch.float32: 2e-5}
NAMES = ("u", "W_enc", "b_enc", "W_dec", "b_dec", "threshold")


def grid_problem(seed, batch, d, n, dtype, theta_level, half_width_32nds):
    """Inputs on the 1/32 grid; theta half-way between grid points around `theta_level` (in 32nds)."""
    rng = np.random.default_rng(seed)
    b_dec = rng.integers(-1, 2, size=d) / 4
    u = rng.integers(-2, 3, size=(batch, d)) / 4 + b_dec
    W_enc = rng.integers(-2, 3, size=(d, n)) / 8
    b_enc = rng.integers(-4, 5, size=n) / 32
    W_dec = rng.standard_normal((n, d))
    theta = (theta_level + rng.integers(0, 4, size=n) + 0.5) / 32
    tensors = [torch.tensor(a, dtype=dtype, requires_grad=True) for a in (u, W_enc, b_enc, W_dec, b_dec)]
    threshold = torch.tensor(theta, dtype=torch.float32, requires_grad=True)
    return (*tensors, threshold), half_width_32nds / 16  # bandwidth e = 2 * half-width


def dense_path(u, W_enc, b_enc, W_dec, b_dec, threshold, bandwidth):
    if threshold is None:
        codes = torch.relu(torch.addmm(b_enc, u - b_dec, W_enc))
        return codes @ W_dec + b_dec, (codes > 0).sum(-1).float(), codes.sum(0), codes
    codes, l0 = threshold_encode_reference(
        u, W_enc, b_enc, threshold, b_dec=b_dec, bandwidth=bandwidth, return_l0=True
    )
    return codes @ W_dec + b_dec, l0, codes.sum(0), codes


def objective(u, u_hat, l0, column_sums, W_dec, weights):
    """A loss that sends a gradient through every output: squared error, an L0 and an L1-style term."""
    recon = (u - u_hat).pow(2).sum(-1).mean()
    return recon + weights[0] * l0.to(u.dtype).mean() + weights[1] * (W_dec.norm(dim=1) @ column_sums)


def gradients(loss, tensors):
    present = [t for t in tensors if t is not None]
    grads = iter(torch.autograd.grad(loss, present, allow_unused=True))
    out = []
    for t in tensors:
        g = None if t is None else next(grads)
        out.append(None if t is None else torch.zeros_like(t) if g is None else g)
    return out


def assert_close(actual, expected, tol, what):
    actual, expected = actual.detach(), expected.detach()
    scale = max(1.0, float(expected.abs().max())) if expected.numel() else 1.0
    err = float((actual.double() - expected.double()).abs().max()) if expected.numel() else 0.0
    assert err <= tol * scale, f"{what}: max |sparse - dense| = {err:.3g}, allowed {tol * scale:.3g}"


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    batch=st.integers(1, 40),
    d=st.integers(1, 12),
    n=st.integers(1, 48),
    theta_level=st.integers(0, 8),
    half_width=st.integers(1, 4),
    dtype=st.sampled_from([torch.float64, torch.float32]),
    jump=st.booleans(),
    weights=st.tuples(st.floats(0, 2), st.floats(0, 2)),
)
def test_sparse_equals_dense(seed, batch, d, n, theta_level, half_width, dtype, jump, weights):
    """u_hat, l0, codes, column sums and the gradient in u and in every parameter, JumpReLU and ReLU."""
    tensors, bandwidth = grid_problem(seed, batch, d, n, dtype, theta_level, half_width)
    u, W_enc, b_enc, W_dec, b_dec, threshold = tensors
    threshold = threshold if jump else None
    tensors = (u, W_enc, b_enc, W_dec, b_dec, threshold)

    sparse = sparse_autoencode(u, W_enc, b_enc, W_dec, b_dec, threshold, bandwidth)
    dense = dense_path(u, W_enc, b_enc, W_dec, b_dec, threshold, bandwidth)
    for name, a, b in zip(("u_hat", "l0", "column_sums"), sparse[:3], dense[:3], strict=True):
        assert_close(a, b, TOL[dtype], name)
    assert torch.equal(sparse.codes.to_dense(), dense[3].detach())
    assert torch.equal(sparse.codes.fired(), (dense[3] != 0).any(0))

    g_sparse = gradients(objective(u, *sparse[:3], W_dec, weights), tensors)
    g_dense = gradients(objective(u, *dense[:3], W_dec, weights), tensors)
    for name, a, b in zip(NAMES, g_sparse, g_dense, strict=True):
        if a is not None:
            assert_close(a, b, TOL[dtype], f"gradient in {name}")


def test_window_entries_reach_theta_only_through_the_window():
    """A latent whose z sits just under theta is inactive, yet its theta gets the L0 pseudo-gradient; one far
    below gets nothing. Planted: z = 0.5 with theta = 0.55, e = 0.2 (inside) and theta = 0.9 (outside)."""
    u = torch.ones(1, 1, dtype=torch.float64)
    W_enc = torch.tensor([[0.5, 0.5]], dtype=torch.float64, requires_grad=True)
    zeros = torch.zeros(2, dtype=torch.float64)
    W_dec = torch.ones(2, 1, dtype=torch.float64)
    theta = torch.tensor([0.55, 0.9], requires_grad=True)
    out = sparse_autoencode(u, W_enc, zeros, W_dec, torch.zeros(1, dtype=torch.float64), theta, 0.2)
    assert out.l0.tolist() == [0.0]
    (grad,) = torch.autograd.grad(out.l0.sum(), theta)
    assert grad.tolist() == pytest.approx([-1 / 0.2, 0.0])


def test_nan_reaches_the_loss_as_on_the_dense_path():
    u = torch.tensor([[float("nan"), 1.0]])
    W_enc, W_dec = torch.eye(2), torch.eye(2)
    zeros = torch.zeros(2)
    out = sparse_autoencode(u, W_enc, zeros, W_dec, zeros, torch.full((2,), 0.5), 0.01)
    dense = dense_path(u, W_enc, zeros, W_dec, zeros, torch.full((2,), 0.5), 0.01)[0]
    assert torch.isnan(out.u_hat[0, 0]) and torch.isnan(dense[0, 0])


def test_nothing_of_size_batch_by_n_atoms_is_saved_for_backward():
    batch, d, n = 64, 8, 96
    tensors, bandwidth = grid_problem(0, batch, d, n, torch.float32, 4, 2)
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = sparse_autoencode(*tensors[:5], tensors[5], bandwidth)
        mean_squared_error(out.u_hat, tensors[0].detach())
    assert saved, "the hook saw nothing: the test would pass vacuously"
    assert all(np.prod(shape) < batch * n for shape in saved), saved
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        saved.clear()
        dense = dense_path(*tensors, bandwidth)[0]
        (tensors[0].detach() - dense).pow(2).sum()
    assert any(np.prod(shape) >= batch * n for shape in saved), "the check cannot see a dense save"


def test_mean_squared_error_matches_autograd():
    p = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    t = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    ours = mean_squared_error(p, t)
    reference = (p - t).pow(2).sum(-1).mean()
    assert float(ours.detach()) == pytest.approx(float(reference.detach()), rel=1e-14)
    expected = torch.autograd.grad(reference, (p, t))
    for a, b in zip(torch.autograd.grad(ours, (p, t)), expected, strict=True):
        assert torch.allclose(a, b, rtol=1e-14, atol=0)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a: {**a, "u": a["u"].float()}, "dtype"),
        (lambda a: {**a, "W_dec": a["W_dec"][:, :-1]}, "W_dec must have shape"),
        (lambda a: {**a, "threshold": a["threshold"][:-1]}, "threshold must be"),
        (lambda a: {**a, "u": a["u"][:0]}, "no rows"),
        (lambda a: {**a, "bandwidth": 0.0}, "bandwidth"),
    ],
)
def test_bad_input_names_the_problem(change, message):
    tensors, bandwidth = grid_problem(0, 4, 3, 5, torch.float64, 2, 1)
    args = dict(zip(NAMES, tensors, strict=True), bandwidth=bandwidth)
    args = change(args)
    with pytest.raises((ValueError, TypeError), match=message):
        sparse_autoencode(
            args["u"],
            args["W_enc"],
            args["b_enc"],
            args["W_dec"],
            args["b_dec"],
            args["threshold"],
            args["bandwidth"],
        )


def test_sparse_codes_round_trip():
    dense = torch.tensor([[0.0, 2.0, 0.0], [0.0, 0.0, 0.0], [1.0, 0.0, 3.0]])
    crow = torch.tensor([0, 1, 1, 3])
    codes = SparseCodes(crow, torch.tensor([1, 0, 2]), torch.tensor([2.0, 1.0, 3.0]), 3)
    assert torch.equal(codes.to_dense(), dense)
    assert codes.fired().tolist() == [True, True, True]


# --- the models and the trainer -----------------------------------------------------------------------------


def models(dtype):
    gen = torch.Generator().manual_seed(3)
    fit = torch.randn(512, 6, generator=gen, dtype=torch.float64)
    aip = AIP.fit(fit @ torch.randn(6, 6, generator=gen, dtype=torch.float64))
    yield TSAE(6, 20, aip, dtype=dtype, bandwidth=0.05, threshold_init=0.3, seed=1)
    yield TSAE(6, 20, aip, loss_norm="euclidean", dtype=dtype, bandwidth=0.05, threshold_init=0.3, seed=1)
    yield ReLUSAE(6, 20, dtype=dtype, seed=1)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_training_loss_and_adam_step_equal_on_both_paths(dtype):
    """The loss, every gradient and the parameters after one trainer step (Adam, decoder projection and
    constraint), dense against sparse, for the TSAE in both loss norms and the ReLU SAE."""
    x = torch.randn(300, 6, generator=torch.Generator().manual_seed(4), dtype=torch.float64) * 3
    for model in models(dtype):
        results = []
        for sparse in (False, True):
            copy = type(model)(**model.config(), **({"aip": model.aip} if isinstance(model, TSAE) else {}))
            copy.load_state_dict(model.state_dict())
            config = TrainConfig(batch_size=300, lr_warmup_steps=0, sparsity_warmup_steps=0, sparse=sparse)
            state = TrainState.start(copy, config)
            out = copy.training_loss(x, 0.1, sparse=sparse)
            grads = torch.autograd.grad(out.loss, list(copy.parameters()))
            stats = train_step(copy, make_optimizer(copy, config), x, state)
            assert stats.sparse == sparse
            results.append((out, grads, [p.detach().clone() for p in copy.parameters()]))
        (dense, g_dense, p_dense), (sparse_out, g_sparse, p_sparse) = results
        what = f"{type(model).__name__} {model.loss_norm} {dtype}"
        for name in ("loss", "recon_loss", "l0_loss", "l0"):
            assert_close(getattr(sparse_out, name), getattr(dense, name), TOL[dtype], f"{what} {name}")
        assert torch.equal(sparse_out.fired, dense.fired)
        for a, b in zip(g_sparse, g_dense, strict=True):
            assert_close(a, b, TOL[dtype], f"{what} gradient")
        for a, b in zip(p_sparse, p_dense, strict=True):
            # Adam divides by sqrt(v) + eps: a first step moves each entry by about lr, whatever the
            # gradient's rounding, so the parameters agree to the gradients' relative error times lr.
            assert_close(a, b, TOL[dtype], f"{what} parameters after a step")


def test_the_trainer_chooses_the_path_from_the_previous_l0():
    model = TSAE(6, 40, threshold_init=1e-3, seed=2, dtype=torch.float64)
    x = torch.randn(256, 6, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    config = TrainConfig(batch_size=64, steps=3, lr_warmup_steps=0, sparsity_warmup_steps=0)
    state = TrainState.start(model, config)
    cpu = torch.device("cpu")
    assert not use_sparse_path(config, state, 40, cpu)  # no L0 measured yet
    for device in ("cpu", "cuda"):
        state.l0 = SPARSE_MAX_DENSITY[device] * 40
        assert use_sparse_path(config, state, 40, torch.device(device))
        state.l0 = SPARSE_MAX_DENSITY[device] * 40 + 0.1
        assert not use_sparse_path(config, state, 40, torch.device(device))
    forced = TrainConfig(sparse=True)
    assert use_sparse_path(forced, TrainState.start(model, forced), 40, cpu)

    with torch.no_grad():
        model.threshold.fill_(10.0)  # nothing fires: L0 = 0 after the first, dense step
    result = train(model, x, config, progress=False)
    assert result.sparse.tolist() == [False, True, True]


def test_whitening_once_equals_whitening_every_step():
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(400, 6, generator=gen, dtype=torch.float64)
    x = x @ torch.randn(6, 6, generator=gen, dtype=torch.float64)
    aip = AIP.fit(x)
    runs = []
    for whiten_once in (False, True):
        model = TSAE(6, 24, aip, dtype=torch.float64, threshold_init=0.05, seed=3)
        config = TrainConfig(batch_size=100, steps=6, lr_warmup_steps=0, whiten_once=whiten_once)
        runs.append((train(model, x, config, progress=False), model))
    (a, model_a), (b, model_b) = runs
    assert torch.allclose(a.loss, b.loss, rtol=1e-10, atol=0)
    for p, q in zip(model_a.parameters(), model_b.parameters(), strict=True):
        assert torch.allclose(p, q, rtol=1e-9, atol=1e-12)
    rows = model_a.scale_rows(x[:10])
    assert torch.allclose(rows, model_a._scaled(x[:10]), rtol=1e-14, atol=0)
