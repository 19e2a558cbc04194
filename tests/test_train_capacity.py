"""train_step on the sparse path's Triton kernels with a capacity: overflow redone exactly, the capacity
following the fullest row, the capacity in checkpoints; GraphedTrainStep's refusals off CUDA.

ATOMS_KERNELS=interpret sends CPU tensors through the Triton kernels in Triton's interpreter (slow: the
problems are tiny). Without it the CPU takes the torch path, which is exact and ignores the capacity.
"""

from __future__ import annotations

import math

import pytest
import torch
from test_sparse_step import assert_close

from atoms import train as train_module
from atoms.errors import BadInputError
from atoms.kernels import dispatch
from atoms.train import (
    GraphedTrainStep,
    TrainConfig,
    TrainState,
    make_optimizer,
    next_capacity,
    train,
    train_step,
)
from atoms.tsae import TSAE, SparseAutoencoder

D, N_ATOMS, BATCH = 6, 64, 24
CONFIG = {"lr": 1e-2, "batch_size": BATCH, "lr_warmup_steps": 0, "sparsity_warmup_steps": 0}

needs_interpreter = pytest.mark.skipif(
    not dispatch.HAS_TRITON or dispatch.triton_version() < (3, 7),
    reason="Triton's interpreter is missing, or before 3.7 fails with NumPy >= 2.4 (kernels/dispatch.py)",
)


@pytest.fixture
def interpret(monkeypatch):
    monkeypatch.setenv("ATOMS_KERNELS", "interpret")


def replay_uncaptured(patch: pytest.MonkeyPatch) -> None:
    """GraphedTrainStep on CPU tensors: its recorded step run eagerly at each replay instead of a graph."""

    def run_uncaptured(self):
        for group in self.optimizer.param_groups:
            group["capturable"] = False  # a CPU Adam cannot be capturable
        return type("Eager", (), {"replay": staticmethod(self._record_step)})()

    patch.setattr(train_module, "_check_capturable", lambda *args: None)
    patch.setattr(GraphedTrainStep, "_capture", run_uncaptured)


def _model() -> TSAE:
    # Thresholds at which rows select 15-30 of the 64 latents: the capacity formula lands inside its clamps.
    return TSAE(D, N_ATOMS, threshold_init=0.4, bandwidth=0.05, seed=3)


def _batch(seed: int) -> torch.Tensor:
    return torch.randn(BATCH, D, generator=torch.Generator().manual_seed(seed))


def _selected(model: TSAE, x: torch.Tensor) -> torch.Tensor:
    """(batch,) entries each row selects (active or in theta's window), from the dense pre-activations."""
    with torch.no_grad():
        u = model.scale_rows(x).double()
        z = (u - model.b_dec.double()) @ model.W_enc.double() + model.b_enc.double()
        theta = model.threshold.double()
        return ((z > theta) | ((z - theta).abs() <= model.bandwidth / 2)).sum(1)


def _spy(patch: pytest.MonkeyPatch) -> list[int | None]:
    """The capacities training_loss is called with, from now on."""
    calls = []
    loss = SparseAutoencoder.training_loss

    def spy(self, *args, **kwargs):
        calls.append(kwargs.get("capacity"))
        return loss(self, *args, **kwargs)

    patch.setattr(SparseAutoencoder, "training_loss", spy)
    return calls


def _step(capacity: int | None, sparse: bool = True):
    """One train_step from the same model and batch; the model, the state, the stats and the capacities
    training_loss was called with."""
    model = _model()
    state = TrainState.start(model, TrainConfig(**CONFIG, sparse=sparse))
    state.capacity = capacity
    with pytest.MonkeyPatch.context() as patch:
        calls = _spy(patch)
        stats = train_step(model, make_optimizer(model, state.config), _batch(0), state)
    return model, state, stats, calls


@needs_interpreter
def test_overflow_redoes_the_step_exactly(interpret):
    """A capacity below the fullest row: the step is redone sized exactly, and the model after it equals
    the one after a step with capacity=None bit for bit (the same kernels on the same entries), and the
    dense step's to rounding."""
    needed = int(_selected(_model(), _batch(0)).max())
    assert needed > 4
    small, state, stats, calls = _step(capacity=4)
    assert calls == [4, None]
    exact, exact_state, exact_stats, exact_calls = _step(capacity=None)
    assert exact_calls == [None]
    for a, b in zip(small.parameters(), exact.parameters(), strict=True):
        assert torch.equal(a, b)
    assert stats == exact_stats
    assert state.capacity == exact_state.capacity == next_capacity(needed, N_ATOMS)
    dense, _, dense_stats, _ = _step(capacity=None, sparse=False)
    for a, b in zip(small.parameters(), dense.parameters(), strict=True):
        assert_close(a, b, 2e-5, "parameters after the step")
    assert stats.loss == pytest.approx(dense_stats.loss, rel=1e-5) and stats.l0 == dense_stats.l0


@needs_interpreter
def test_capacity_follows_the_fullest_row(interpret, monkeypatch):
    """training_loss exposes the rows' counts (true counts) and the dropped entries; every sparse step on
    the Triton path sets the capacity to the fullest row plus 25% in multiples of 16, and the next step
    passes it; a capacity that fits needs no redo."""
    model = _model()
    x = _batch(0)
    out = model.training_loss(x, sparse=True, capacity=N_ATOMS)
    assert torch.equal(out.counts.long(), _selected(model, x)) and int(out.dropped.sum()) == 0
    state = TrainState.start(model, TrainConfig(**CONFIG, sparse=True))
    optimizer = make_optimizer(model, state.config)
    calls = _spy(monkeypatch)
    for seed in (1, 2):
        needed = int(_selected(model, _batch(seed)).max())
        train_step(model, optimizer, _batch(seed), state)
        assert state.capacity == min(N_ATOMS, 16 * math.ceil(1.25 * needed / 16))
        assert 16 <= state.capacity < N_ATOMS  # the formula at work, not its clamps
    first = next_capacity(int(_selected(_model(), _batch(1)).max()), N_ATOMS)
    assert calls == [None, first]  # sized exactly once, then the capacity it set; no redo
    assert next_capacity(0, N_ATOMS) == 16 and next_capacity(60, N_ATOMS) == N_ATOMS


def test_the_torch_path_ignores_the_capacity():
    """CPU tensors without the interpreter: exact CSR codes, nothing to check, the capacity stays None."""
    model = _model()
    out = model.training_loss(_batch(0), sparse=True, capacity=2)
    assert out.dropped is None and out.counts is None
    _, state, _, calls = _step(capacity=None)
    assert calls == [None] and state.capacity is None


def test_capacity_in_the_state_dict():
    state = TrainState.start(_model(), TrainConfig(**CONFIG))
    state.capacity = 48
    saved = state.state_dict()
    fresh = TrainState.start(_model(), TrainConfig(**CONFIG))
    fresh.load_state_dict(saved)
    assert fresh.capacity == 48
    del saved["capacity"]  # a checkpoint written before the capacity existed
    fresh.load_state_dict(saved)
    assert fresh.capacity is None


@needs_interpreter
def test_resume_on_the_triton_path_is_exact(interpret, tmp_path):
    """Interrupted after step 3 (checkpoints every 2) and resumed: the capacity comes back with the
    checkpoint, and the weights equal the uninterrupted run's bit for bit."""
    x = torch.randn(4 * BATCH, D, generator=torch.Generator().manual_seed(7))
    cfg = TrainConfig(**CONFIG, steps=4, sparse=True, checkpoint_every=2, fit_input_scale=False)
    reference = _model()
    expected = train(reference, x, cfg, progress=False)

    def interrupt(stats):
        if stats.step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(_model(), x, cfg, tmp_path, progress=False, callback=interrupt)
    saved = torch.load(tmp_path / "step_000000002.pt", weights_only=True)["state"]
    assert isinstance(saved["capacity"], int) and saved["capacity"] >= 16
    resumed = _model()
    got = train(resumed, x, cfg, tmp_path, progress=False)
    assert torch.equal(got.loss, expected.loss)
    for a, b in zip(resumed.parameters(), reference.parameters(), strict=True):
        assert torch.equal(a, b)


def test_graphed_step_needs_a_cuda_model():
    model = _model()
    state = TrainState.start(model, TrainConfig(**CONFIG))
    with pytest.raises(BadInputError, match=r"must be on a CUDA device; it is on cpu.*train_step"):
        GraphedTrainStep(model, make_optimizer(model, state.config), state, _batch(0))


@needs_interpreter
def test_graphed_step_uncaptured_equals_train_step(interpret, monkeypatch):
    """GraphedTrainStep's recorded step (device ramps, device controller, counters, stats rows, read), run
    eagerly through the interpreter instead of replayed from a graph (no CUDA here): the same stats, state
    and parameters as train_step, bit for bit. The capture itself is checked by tests/test_graphed_step.py."""
    replay_uncaptured(monkeypatch)
    batches = [_batch(seed) for seed in range(7)]
    cfg = TrainConfig(
        **{**CONFIG, "lr_warmup_steps": 3, "sparsity_warmup_steps": 2},
        **{"target_l0": 10.0, "target_l0_damping": 0.5, "target_l0_smoothing": 0.5},
        dead_window=48,
        sparse=True,
        log_every=3,
    )
    eager, graphed = _model(), _model()
    eager_state, state = TrainState.start(eager, cfg), TrainState.start(graphed, cfg)
    optimizer = make_optimizer(eager, cfg)
    expected = [train_step(eager, optimizer, x, eager_state) for x in batches]
    step = GraphedTrainStep(graphed, make_optimizer(graphed, cfg), state, batches[0])
    got = [stats for x in batches for stats in step(x)] + step.read()
    assert got == expected
    for name in ("step", "tokens_seen", "coefficient", "l0", "l0_error"):
        assert getattr(state, name) == getattr(eager_state, name), name
    assert torch.equal(state.tokens_since_fired, eager_state.tokens_since_fired)
    for a, b in zip(graphed.parameters(), eager.parameters(), strict=True):
        assert torch.equal(a, b)
