"""Tests of atoms.train: schedules, constraints, the target-L0 controller, dead latents, exact resumption."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from atoms.aip import AIP
from atoms.errors import BadInputError
from atoms.train import (
    TrainConfig,
    TrainState,
    l0_control,
    latest_checkpoint,
    make_optimizer,
    train,
    train_step,
)
from atoms.tsae import TSAE, ReLUSAE

D, N_ATOMS = 16, 32


def planted(n: int, seed: int, k: int = 3) -> np.ndarray:
    """(n, D) activations: k-sparse non-negative codes in [1, 2] on N_ATOMS mixed random atoms."""
    rng = np.random.default_rng(seed)
    atoms = rng.standard_normal((N_ATOMS, D)) @ (np.eye(D) + 0.3 * rng.standard_normal((D, D)))
    codes = np.zeros((n, N_ATOMS))
    for i in range(n):
        codes[i, rng.choice(N_ATOMS, k, replace=False)] = rng.uniform(1.0, 2.0, k)
    return (codes @ atoms).astype(np.float32)


@pytest.fixture(scope="module")
def data():
    x = torch.tensor(planted(4096, seed=0))
    return x, AIP.fit(x)


def small(**kw) -> TrainConfig:
    base = {
        "lr": 1e-3,
        "batch_size": 128,
        "steps": 60,
        "lr_warmup_steps": 10,
        "sparsity_warmup_steps": 20,
        "checkpoint_every": 5,
        "log_every": 1000,
    }
    return TrainConfig(**{**base, **kw})


def test_loss_decreases_and_constraints_hold(data):
    x, aip = data
    for model in (TSAE(D, N_ATOMS, aip, seed=1), TSAE(D, N_ATOMS, seed=1), ReLUSAE(D, N_ATOMS, seed=1)):
        result = train(model, x, small(steps=60, lr=3e-3, sparsity_warmup_steps=1), progress=False)
        first, last = float(result.loss[:5].mean()), float(result.loss[-5:].mean())
        assert last < 0.3 * first, (type(model).__name__, first, last)
        norms = model.W_dec.detach().double().norm(dim=1)
        np.testing.assert_allclose(norms.numpy(), 1.0, rtol=2e-7)
        if isinstance(model, TSAE):
            assert float(model.threshold.detach().min()) > 0
        assert result.loss.shape == (60,) and result.loss.dtype == torch.float64
        assert result.dead.dtype == torch.int64 and result.dead_latents.shape == (N_ATOMS,)


def test_warmup_schedules_and_input_scale(data):
    x, aip = data
    model = TSAE(D, N_ATOMS, aip, l0_coefficient=0.004)
    cfg = small(steps=25, lr=2e-3, lr_warmup_steps=8, sparsity_warmup_steps=20)
    result = train(model, x, cfg, progress=False)
    steps = np.arange(25)
    np.testing.assert_allclose(result.lr.numpy(), 2e-3 * np.minimum(1, (steps + 1) / 8), rtol=1e-15)
    np.testing.assert_allclose(
        result.coefficient.numpy(), 0.004 * np.minimum(1, (steps + 1) / 20), rtol=1e-15
    )
    np.testing.assert_allclose(
        result.sparsity_loss.numpy(), result.coefficient.numpy() * result.l0.numpy(), rtol=1e-5
    )
    # The trainer measured the scale: E||x~||^2 on a random sample of x, close to d for the AIP fitted on x.
    assert model.input_scale == pytest.approx(1 / math.sqrt(D), rel=0.05)
    explicit = TSAE(D, N_ATOMS, aip, input_scale=0.5)
    train(explicit, x, small(steps=1, fit_input_scale=False), progress=False)
    assert explicit.input_scale == 0.5


def _l0_error(l0: float, target: float) -> float:
    return max(-1.0, min(1.0, math.log(l0 / target))) if l0 > 0 else -1.0


@pytest.mark.parametrize(("damping", "smoothing"), [(0.0, 1.0), (0.5, 0.2)])
def test_target_l0_controller(data, damping, smoothing):
    x, aip = data
    target, gain, warm, steps, lam = 4.0, 0.05, 10, 70, 0.03
    cfg = small(
        steps=steps,
        lr=1e-2,
        target_l0=target,
        target_l0_gain=gain,
        target_l0_damping=damping,
        target_l0_smoothing=smoothing,
        sparsity_warmup_steps=warm,
        sparsity_coefficient=lam,
    )
    result = train(TSAE(D, N_ATOMS, aip, seed=2), x, cfg, progress=False)
    # The controller's law replayed on the recorded l0: with e_t = clip(log(l0_t / T), -1, 1) filtered,
    # f_t = f_{t-1} + smoothing (e_t - f_{t-1}) (f = e at the first controlled step),
    # lambda' = lambda exp(gain f_t + damping (f_t - f_{t-1})), f_{t-1} = 0 at the first controlled step.
    ramp = np.minimum(1, (np.arange(steps) + 1) / warm)
    filtered = None
    for t in range(steps):
        assert result.coefficient[t] == pytest.approx(lam * ramp[t], rel=1e-12)
        if t >= warm:
            error = _l0_error(float(result.l0[t]), target)
            now = error if filtered is None else filtered + smoothing * (error - filtered)
            lam *= math.exp(gain * now + damping * (now - (filtered or 0.0)))
            filtered = now
    assert result.final_coefficient == pytest.approx(lam, rel=1e-12)
    # When the controller starts, about half the latents fire (16); it brings the mean L0 to the target.
    start, end = float(result.l0[warm - 5 : warm].mean()), float(result.l0[-10:].mean())
    assert start > 3 * target
    assert abs(end - target) < 0.2 * abs(start - target), (start, end)
    assert result.final_coefficient > 3 * 0.03


def test_l0_control_needs_a_target():
    with pytest.raises(BadInputError, match="target_l0"):
        l0_control(3.0, None, TrainConfig())


def test_dead_latents(data):
    x, aip = data
    model = TSAE(D, N_ATOMS, aip)
    with torch.no_grad():
        model.b_enc[[3, 11]] = -1e3  # these two can never fire
    cfg = small(steps=6, dead_window=384, lr=1e-6)
    result = train(model, x, cfg, progress=False)
    # 128 vectors a step: after 3 steps the never-firing latents have missed 384 vectors.
    assert result.dead.tolist() == [0, 0, 2, 2, 2, 2]
    assert result.dead_latents.nonzero().flatten().tolist() == [3, 11]


def test_train_step_in_a_loop_of_ones_own(data):
    x, _ = data
    model = ReLUSAE(D, N_ATOMS, l1_coefficient=0.01)
    cfg = TrainConfig(lr=1e-3, lr_warmup_steps=0, sparsity_warmup_steps=0)
    optimizer, state = make_optimizer(model, cfg), TrainState.start(model, cfg)
    assert optimizer.defaults["betas"] == (0.0, 0.999)
    stats = [train_step(model, optimizer, x[i * 64 : (i + 1) * 64], state) for i in range(3)]
    assert [s.step for s in stats] == [1, 2, 3] and state.tokens_seen == 192
    assert all(s.coefficient == 0.01 and s.lr == 1e-3 for s in stats)


def test_progress_lines(data, capsys):
    x, aip = data
    train(TSAE(D, N_ATOMS, aip), x, small(steps=4, log_every=2), progress=True)
    lines = capsys.readouterr().err.strip().splitlines()
    assert [line.split()[1] for line in lines] == ["2/4", "4/4"]


# --- checkpoints --------------------------------------------------------------------------------------------


class Interrupt(Exception):
    pass


def stop_at(step: int):
    def callback(stats):
        if stats.step == step:
            raise Interrupt

    return callback


def assert_same_run(a, b, model_a, model_b):
    for (name, p), (_, q) in zip(model_a.state_dict().items(), model_b.state_dict().items(), strict=True):
        if isinstance(p, torch.Tensor):
            assert torch.equal(p, q), name
        else:
            assert p == q, name
    for field in ("loss", "l0", "dead", "coefficient", "lr"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field
    assert a.final_coefficient == b.final_coefficient
    assert torch.equal(a.dead_latents, b.dead_latents)


RESUME_CONFIG = {"steps": 24, "batch_size": 256, "checkpoint_every": 4, "target_l0": 5.0, "dead_window": 1280}


@pytest.fixture(scope="module")
def uninterrupted(data):
    x, aip = data
    model = TSAE(D, N_ATOMS, aip, seed=4)
    return model, train(model, x, small(**RESUME_CONFIG), progress=False)


@pytest.mark.parametrize("interrupt_at", [3, 7, 19])
def test_resume_is_bitwise_identical(data, uninterrupted, tmp_path, interrupt_at):
    """Interrupted at step k (checkpoints every 4), restarted with a fresh model: the same final weights.

    4096 / 256 = 16 batches an epoch: interrupted at 19, the run resumes from the checkpoint taken exactly at
    the end of the first epoch and must reshuffle as the uninterrupted run did; target_l0 makes the
    controller's state part of the run.
    """
    x, aip = data
    cfg = small(**RESUME_CONFIG)
    with pytest.raises(Interrupt):
        train(TSAE(D, N_ATOMS, aip, seed=4), x, cfg, tmp_path, progress=False, callback=stop_at(interrupt_at))
    latest = latest_checkpoint(tmp_path)
    assert (latest.name if latest else None) == (
        f"step_{interrupt_at // 4 * 4:09d}.pt" if interrupt_at >= 4 else None
    )
    resumed = TSAE(D, N_ATOMS, aip, seed=4)
    got = train(resumed, x, cfg, checkpoint_dir=tmp_path, progress=False)
    reference, expected = uninterrupted
    assert_same_run(expected, got, reference, resumed)
    kept = sorted(p.name for p in tmp_path.iterdir())
    assert kept == ["step_000000020.pt", "step_000000024.pt"]  # keep_checkpoints = 2, no temporary files left


def test_resume_from_an_iterator_of_batches(tmp_path):
    def batches():
        rng = np.random.default_rng(5)
        while True:
            yield planted(int(rng.integers(50, 90)), seed=int(rng.integers(1 << 30)))

    cfg = small(steps=12, checkpoint_every=4)
    reference = ReLUSAE(D, N_ATOMS, seed=6)
    expected = train(reference, batches(), cfg, progress=False)
    with pytest.raises(Interrupt):
        train(ReLUSAE(D, N_ATOMS, seed=6), batches(), cfg, tmp_path, progress=False, callback=stop_at(10))
    resumed = ReLUSAE(D, N_ATOMS, seed=6)
    got = train(resumed, batches(), cfg, tmp_path, progress=False)
    assert_same_run(expected, got, reference, resumed)
    # A finished run resumes to itself without further steps.
    again = train(ReLUSAE(D, N_ATOMS, seed=6), batches(), cfg, tmp_path, progress=False)
    assert torch.equal(again.loss, expected.loss)


def test_resume_refuses_another_run(data, tmp_path):
    x, aip = data
    train(TSAE(D, N_ATOMS, aip), x, small(steps=5), checkpoint_dir=tmp_path, progress=False)
    with pytest.raises(BadInputError, match=r"different run .*lr: 0.001 -> 0.002.*fresh checkpoint_dir"):
        train(TSAE(D, N_ATOMS, aip), x, small(steps=10, lr=2e-3), checkpoint_dir=tmp_path, progress=False)
    with pytest.raises(BadInputError, match=r"model TSAE vs ReLUSAE"):
        train(ReLUSAE(D, N_ATOMS), x, small(steps=10), checkpoint_dir=tmp_path, progress=False)
    # More steps is a continuation, not another run.
    longer = train(TSAE(D, N_ATOMS, aip), x, small(steps=8), checkpoint_dir=tmp_path, progress=False)
    assert longer.loss.shape == (8,)


# --- bad input ----------------------------------------------------------------------------------------------


def test_bad_config_and_data(data):
    x, aip = data
    with pytest.raises(BadInputError, match=r"TrainConfig.batch_size must be an int >= 1, got 0"):
        TrainConfig(batch_size=0)
    with pytest.raises(BadInputError, match=r"TrainConfig.betas must be two floats in \[0, 1\)"):
        TrainConfig(betas=(0.9, 1.0))
    with pytest.raises(BadInputError, match=r"TrainConfig.target_l0 must be None or a float > 0, got -2"):
        TrainConfig(target_l0=-2)
    with pytest.raises(BadInputError, match=r"TrainConfig.lr must be a positive float, got nan"):
        TrainConfig(lr=float("nan"))
    model = TSAE(D, N_ATOMS, aip)
    with pytest.raises(BadInputError, match=r"cannot move it from 0"):
        train(model, x, small(target_l0=3, sparsity_coefficient=0.0), progress=False)
    with pytest.raises(BadInputError, match=r"100 vectors, fewer than batch_size = 128"):
        train(model, x[:100], small(), progress=False)
    with pytest.raises(BadInputError, match=r"last dimension 15 but 16 was expected"):
        train(model, x[:, :15], small(), progress=False)
    nan = x.clone()
    nan[7, 2] = float("nan")
    with pytest.raises(BadInputError, match=r"activations holds 1 non-finite"):
        train(model, nan, small(), progress=False)
    with pytest.raises(BadInputError, match=r"iterator ended after 2 batches"):
        train(model, [x[:64], x[64:128]], small(steps=5), progress=False)
    with pytest.raises(BadInputError, match=r"activations holds 1 non-finite"):
        train(model, [x[:64], nan[:64]], small(steps=5, fit_input_scale=False), progress=False)
    with pytest.raises(BadInputError, match=r"iterable of \(batch, d\) batches; got float"):
        train(model, 3.5, small(), progress=False)
