"""GraphedTrainStep (the training step captured in a CUDA graph) against eager train_step steps.

Every test here is marked `gpu` and skips without a CUDA device (`pytest -m gpu tests/test_graphed_step.py`);
tests/test_train_capacity.py checks on the CPU that a CPU model is refused.
"""

from __future__ import annotations

import copy

import pytest
import torch

from atoms.aip import AIP
from atoms.errors import BadInputError
from atoms.kernels.sparse_triton import CapacityOverflowError
from atoms.train import GraphedTrainStep, TrainConfig, TrainState, make_optimizer, train, train_step
from atoms.tsae import TSAE, ReLUSAE

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: CUDA graphs need one"),
]

BATCH, D, N_ATOMS, STEPS = 512, 64, 1024, 12


@pytest.fixture(autouse=True)
def triton_on_cuda(monkeypatch):
    monkeypatch.setenv("ATOMS_KERNELS", "auto")  # Triton on CUDA tensors (the torch path would sync)


def _batches(n: int) -> list[torch.Tensor]:
    gen = torch.Generator(device="cuda").manual_seed(0)
    mix = torch.eye(D, device="cuda") + 0.3 * torch.randn(D, D, generator=gen, device="cuda")
    return [torch.randn(BATCH, D, generator=gen, device="cuda") @ mix for _ in range(n)]


def _model(kind: str, data: torch.Tensor):
    # Threshold 0.2 at unit mean squared input norm: about 5% of the latents fire at the start.
    if kind == "tsae":
        model = TSAE(D, N_ATOMS, AIP.fit(data.cpu()), threshold_init=0.2, seed=1)
    else:
        model = ReLUSAE(D, N_ATOMS, l1_coefficient=0.02, seed=1)
    model.fit_input_scale(data.cpu())
    return model.cuda()


def _config(**kw) -> TrainConfig:
    base = {
        "lr": 1e-3,
        "batch_size": BATCH,
        "lr_warmup_steps": 4,
        "sparsity_warmup_steps": 6,
        "target_l0": 30.0,
        "target_l0_damping": 0.5,
        "target_l0_smoothing": 0.5,
        "dead_window": 2 * BATCH,
        "sparse": True,
        "log_every": 5,
    }
    return TrainConfig(**{**base, **kw})


@pytest.mark.parametrize("kind", ["tsae", "relu"])
def test_graphed_steps_equal_eager_steps(kind):
    """The same model, state and batches through STEPS eager train_steps and through the graph: per-step
    stats, controller state, dead-latent counters and parameters agree (the graph's Adam reads a device lr,
    its controller runs on the device: rounding apart, the same arithmetic). Stats come back every
    log_every = 5 steps and on read()."""
    batches = _batches(STEPS)
    base, cfg = _model(kind, torch.cat(batches)), _config()

    eager = copy.deepcopy(base)
    eager_state = TrainState.start(eager, cfg)
    eager_optimizer = make_optimizer(eager, cfg)
    expected = [train_step(eager, eager_optimizer, x, eager_state) for x in batches]

    graphed = copy.deepcopy(base)
    state = TrainState.start(graphed, cfg)
    step = GraphedTrainStep(graphed, make_optimizer(graphed, cfg), state, batches[0])
    got, returned = [], []
    for x in batches:
        stats = step(x)
        returned.append(len(stats))
        got += stats
    got += step.read()
    assert returned == [0, 0, 0, 0, 5, 0, 0, 0, 0, 5, 0, 0]

    assert [s.step for s in got] == list(range(1, STEPS + 1)) and all(s.sparse for s in got)
    for a, b in zip(got, expected, strict=True):
        assert a.lr == pytest.approx(b.lr, rel=1e-12) and a.dead == b.dead
        assert a.coefficient == pytest.approx(b.coefficient, rel=1e-6)
        for name in ("loss", "recon_loss", "sparsity_loss", "l0"):
            assert getattr(a, name) == pytest.approx(getattr(b, name), rel=1e-4, abs=1e-6), (a.step, name)
    assert state.step == eager_state.step and state.tokens_seen == eager_state.tokens_seen
    assert state.coefficient == pytest.approx(eager_state.coefficient, rel=1e-6)
    assert state.l0_error == pytest.approx(eager_state.l0_error, rel=1e-5, abs=1e-7)
    assert torch.equal(state.tokens_since_fired, eager_state.tokens_since_fired)
    for (name, p), q in zip(graphed.named_parameters(), eager.parameters(), strict=True):
        assert torch.allclose(p, q, rtol=1e-4, atol=1e-5), (name, float((p - q).abs().max()))


def test_overflow_raises_at_the_read_and_shapes_are_fixed():
    batches = _batches(3)
    model, cfg = _model("tsae", torch.cat(batches)), _config(log_every=2)
    state = TrainState.start(model, cfg)
    step = GraphedTrainStep(model, make_optimizer(model, cfg), state, batches[0], capacity=1)
    with pytest.raises(BadInputError, match="captured for batches of shape"):
        step(batches[0][:10])
    assert step(batches[0]) == []
    with pytest.raises(CapacityOverflowError, match=r"capacity of 1 a row in steps 1-2 .* capacity >= \d+"):
        step(batches[1])
    assert state.step == 2  # the steps were applied; the state says so


def test_train_with_cuda_graph_follows_eager_training():
    """`train` with TrainConfig(cuda_graph=True) on a CUDA model: the same per-step stats as the eager loop
    to rounding, on the graph's replays (tests/test_train_graph_loop.py checks the loop itself on CPU)."""
    data = torch.cat(_batches(4))
    base = _model("tsae", data)
    results = {}
    for graph in (False, True):
        cfg = _config(steps=STEPS, cuda_graph=graph, fit_input_scale=False)
        results[graph] = train(copy.deepcopy(base), data, cfg, progress=False)
    for name in ("loss", "l0", "coefficient"):
        got, expected = getattr(results[True], name), getattr(results[False], name)
        assert torch.allclose(got, expected, rtol=1e-4, atol=1e-6), name
