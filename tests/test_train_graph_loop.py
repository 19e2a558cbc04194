"""`train(..., TrainConfig(cuda_graph=True))`: the loop through GraphedTrainStep, its checkpoints, resume and
rollback on a capacity overflow, against the eager loop.

No CUDA here, so the graph is replaced by its recorded step run eagerly through Triton's interpreter (as in
tests/test_train_capacity.py): what is checked is the loop around it (stats arriving a period at a time,
stop and callback, checkpoints, resume, rollback). The capture itself is tests/test_graphed_step.py's.
"""

from __future__ import annotations

import pytest
import torch
from test_train_capacity import CONFIG, D, _model, needs_interpreter, replay_uncaptured

from atoms import train as train_module
from atoms.errors import BadInputError
from atoms.train import GraphedTrainStep, TrainConfig, train

pytestmark = needs_interpreter

STEPS = 7


@pytest.fixture
def uncaptured(monkeypatch):
    """GraphedTrainStep on CPU tensors: the recorded step replayed eagerly, through the interpreter."""
    monkeypatch.setenv("ATOMS_KERNELS", "interpret")
    replay_uncaptured(monkeypatch)


def _activations() -> torch.Tensor:
    return torch.randn(4 * CONFIG["batch_size"], D, generator=torch.Generator().manual_seed(7))


def _config(**kw) -> TrainConfig:
    base = {**CONFIG, "steps": STEPS, "sparse": True, "fit_input_scale": False, "log_every": 3}
    return TrainConfig(**{**base, "target_l0": 20.0, "dead_window": 48, **kw})


def _run(graph: bool, checkpoint_dir=None, **kw):
    model, seen = _model(), []
    result = train(
        model,
        _activations(),
        _config(cuda_graph=graph, **kw),
        checkpoint_dir,
        progress=False,
        callback=lambda stats: seen.append(stats.step),
    )
    return model, result, seen


def _assert_same_run(a, b) -> None:
    (model_a, result_a, _), (model_b, result_b, _) = a, b
    for name in ("loss", "recon_loss", "l0", "dead", "coefficient", "lr"):
        assert torch.equal(getattr(result_a, name), getattr(result_b, name)), name
    for p, q in zip(model_a.parameters(), model_b.parameters(), strict=True):
        assert torch.equal(p, q)


def test_training_through_the_graph_equals_eager_training(uncaptured, tmp_path):
    """Stats come a period (log_every = 3) at a time, and at checkpoints (every 5) and the end; the
    callback still sees every step in order, and the run equals the eager one bit for bit."""
    eager = _run(False)
    graphed = _run(True, tmp_path, checkpoint_every=5)
    _assert_same_run(graphed, eager)
    assert graphed[2] == list(range(1, STEPS + 1))
    assert sorted(p.name for p in tmp_path.glob("step_*.pt")) == ["step_000000005.pt", "step_000000007.pt"]


def test_an_interrupted_graphed_run_resumes_exactly(uncaptured, tmp_path):
    def interrupt(stats):
        if stats.step == 6:
            raise KeyboardInterrupt

    cfg = _config(cuda_graph=True, checkpoint_every=5)
    with pytest.raises(KeyboardInterrupt):
        train(_model(), _activations(), cfg, tmp_path, progress=False, callback=interrupt)
    assert [p.name for p in tmp_path.glob("step_*.pt")] == ["step_000000005.pt"]
    _assert_same_run(_run(True, tmp_path, checkpoint_every=5), _run(False))


def test_stop_ends_the_period_it_falls_in(uncaptured):
    """stop is asked on each step's stats as they arrive; the steps already taken stay in the history."""
    model = _model()
    asked = []

    def stop(stats):
        asked.append(stats.step)
        return stats.step == 2

    result = train(model, _activations(), _config(cuda_graph=True), progress=False, stop=stop)
    assert asked == [1, 2] and result.loss.numel() == 3


def test_an_overflow_rolls_back_and_redoes_the_steps(uncaptured, monkeypatch):
    """A graph captured with 1 slot a row overflows at its first read; each rollback doubles the capacity
    until the rows fit, and the run ends as the eager one."""
    capacities = []
    init = GraphedTrainStep.__init__

    def spy(self, *args, capacity=None, **kwargs):
        init(self, *args, capacity=1 if capacity is None else capacity, **kwargs)
        capacities.append(self.capacity)

    monkeypatch.setattr(GraphedTrainStep, "__init__", spy)
    _assert_same_run(_run(True), _run(False))
    assert capacities[:3] == [1, 2, 4] and capacities == sorted(capacities) and len(capacities) >= 5


def test_cuda_graph_refuses_what_it_cannot_replay(monkeypatch):
    monkeypatch.setenv("ATOMS_KERNELS", "interpret")
    x = _activations()
    with pytest.raises(BadInputError, match="model must be on a CUDA device"):
        train(_model(), x, _config(cuda_graph=True), progress=False)
    monkeypatch.setattr(train_module, "_check_capturable", lambda *args: None)
    with pytest.raises(BadInputError, match="needs the activations as one"):
        train(_model(), iter([x[:24]] * STEPS), _config(cuda_graph=True), progress=False)
