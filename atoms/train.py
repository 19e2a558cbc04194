"""The trainer shared by the TSAE and the ReLU SAE: a step function, a loop, checkpoints that resume exactly.

Usable from other code at two levels: `train_step(model, optimizer, batch, state)` inside a loop of one's own
(with `make_optimizer` and `TrainState.start`), or `train(model, activations, config)` for the whole run.

Each step: the learning rate and the sparsity coefficient ramp up linearly over their warm-up steps; the loss
is back-propagated; the gradient component along each decoder row is removed (SAELens does the same: it would
only change the row's norm); Adam (beta1 = 0, the JumpReLU paper's choice) steps; decoder rows go back to unit
norm and thresholds back above their floor (`model.constrain_`). Then the dead-latent counters and, with
`target_l0`, the coefficient controller update.

Exact resume: a checkpoint holds the model and optimizer state, the step, the controller's coefficient, the
dead-latent counters, the position in the data (epoch, offset and the shuffling generator's state at the start
of the epoch, or the number of batches taken from an iterator) and the history. Everything a step reads comes
from that state, so a run interrupted at any step and resumed from its latest checkpoint ends with the same
weights, bit for bit, as an uninterrupted run (on the same device and torch build).
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from atoms.errors import BadInputError, as_float_tensor
from atoms.tsae import SparseAutoencoder

__all__ = [
    "StepStats",
    "TrainConfig",
    "TrainResult",
    "TrainState",
    "latest_checkpoint",
    "make_optimizer",
    "train",
    "train_step",
]

CHECKPOINT_FORMAT = "atoms.train"
CHECKPOINT_VERSION = 1
# Fields that may change between an interrupted run and its resumption without changing any step's arithmetic.
_RESUMABLE_CHANGES = ("steps", "checkpoint_every", "keep_checkpoints", "log_every")
# StepStats fields that TrainResult returns as per-step tensors.
_HISTORY = ("loss", "recon_loss", "sparsity_loss", "l0", "dead", "coefficient", "lr")


@dataclass
class TrainConfig:
    """Hyperparameters of a training run; the defaults follow the JumpReLU paper where it gives one."""

    lr: float = 2e-4
    """Adam learning rate after warm-up."""
    batch_size: int = 4096
    """Activation vectors per step (when training from a tensor; an iterator sets its own batch sizes)."""
    steps: int = 10_000
    """Optimizer steps in the run."""
    lr_warmup_steps: int = 1000
    """The learning rate rises linearly from lr / lr_warmup_steps at step 1 to lr at this step (0: none)."""
    sparsity_warmup_steps: int = 1000
    """The sparsity coefficient rises linearly over these steps, as the learning rate does; 0 disables it."""
    sparsity_coefficient: float | None = None
    """lambda: the L0 coefficient of a TSAE, the L1 coefficient of a ReLU SAE; None uses the model's own."""
    target_l0: float | None = None
    """If set, lambda adapts towards this mean L0 per sample after the sparsity warm-up: each step multiplies
    it by exp(target_l0_gain * clip((l0 - target_l0) / target_l0, -1, 1)), an integral controller on log
    lambda whose only fixed point is mean l0 = target_l0; the clip bounds a step's change to a factor
    exp(target_l0_gain)."""
    target_l0_gain: float = 0.01
    """Gain of the target-L0 controller (per step, on log lambda)."""
    betas: tuple[float, float] = (0.0, 0.999)
    """Adam betas; beta1 = 0 as in the JumpReLU paper."""
    eps: float = 1e-8
    """Adam epsilon."""
    seed: int = 0
    """Seed of the generator that shuffles a tensor of activations (a fresh permutation every epoch)."""
    fit_input_scale: bool = True
    """On a fresh start, measure the model's input scale on up to input_scale_samples vectors (the first batch
    of an iterator) so its inputs have unit mean squared norm; False keeps the model's input_scale."""
    input_scale_samples: int = 65_536
    """Random vectors the input scale is measured on, when training from a tensor."""
    dead_window: int = 1_000_000
    """A latent is dead if it fired on none of the last dead_window training vectors."""
    checkpoint_every: int = 1000
    """Steps between checkpoints (when a checkpoint directory is given); the last step is always saved."""
    keep_checkpoints: int = 2
    """Checkpoints kept on disk; older ones are deleted after a newer one is written."""
    log_every: int = 100
    """Steps between progress lines (when progress is on)."""

    def __post_init__(self) -> None:
        checks = [
            ("lr", self.lr > 0, "a positive float"),
            ("batch_size", isinstance(self.batch_size, int) and self.batch_size >= 1, "an int >= 1"),
            ("steps", isinstance(self.steps, int) and self.steps >= 0, "an int >= 0"),
            (
                "lr_warmup_steps",
                isinstance(self.lr_warmup_steps, int) and self.lr_warmup_steps >= 0,
                "an int >= 0",
            ),
            (
                "sparsity_warmup_steps",
                isinstance(self.sparsity_warmup_steps, int) and self.sparsity_warmup_steps >= 0,
                "an int >= 0",
            ),
            (
                "sparsity_coefficient",
                self.sparsity_coefficient is None or self.sparsity_coefficient >= 0,
                "None or a float >= 0",
            ),
            ("target_l0", self.target_l0 is None or self.target_l0 > 0, "None or a float > 0"),
            ("target_l0_gain", self.target_l0_gain > 0, "a float > 0"),
            ("betas", len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "two floats in [0, 1)"),
            ("eps", self.eps > 0, "a float > 0"),
        ]
        for name in (
            "input_scale_samples",
            "dead_window",
            "checkpoint_every",
            "keep_checkpoints",
            "log_every",
        ):
            value = getattr(self, name)
            checks.append((name, isinstance(value, int) and value >= 1, "an int >= 1"))
        for name, ok, wanted in checks:
            value = getattr(self, name)
            finite = not isinstance(value, float) or math.isfinite(value)
            if not (ok and finite):
                raise BadInputError(f"TrainConfig.{name} must be {wanted}, got {value!r}.")
        self.betas = (float(self.betas[0]), float(self.betas[1]))


class StepStats(NamedTuple):
    """What one training step reports."""

    step: int
    """Steps completed, this one included."""
    loss: float
    recon_loss: float
    sparsity_loss: float
    """The sparsity penalty at the coefficient used in this step."""
    l0: float
    """Mean number of active latents per vector in the batch."""
    dead: int
    """Latents that fired on none of the last dead_window training vectors."""
    coefficient: float
    """The (warmed-up) sparsity coefficient used in this step."""
    lr: float
    """The (warmed-up) learning rate used in this step."""


class TrainResult(NamedTuple):
    """A finished run: per-step histories (steps,) as float64 tensors (int64 for dead), and the end state."""

    loss: torch.Tensor
    recon_loss: torch.Tensor
    sparsity_loss: torch.Tensor
    l0: torch.Tensor
    dead: torch.Tensor
    coefficient: torch.Tensor
    lr: torch.Tensor
    final_coefficient: float
    """lambda at the end (after any target-L0 adaptation, before warm-up scaling)."""
    dead_latents: torch.Tensor
    """(n_atoms,) bool: latents dead at the end."""


@dataclass
class TrainState:
    """Everything a step reads besides the model, optimizer and batch; `start` builds the initial one."""

    config: TrainConfig
    coefficient: float
    """lambda before warm-up scaling: the controller's state."""
    tokens_since_fired: torch.Tensor
    """(n_atoms,) int64: training vectors since each latent last fired."""
    step: int = 0
    tokens_seen: int = 0

    @classmethod
    def start(cls, model: SparseAutoencoder, config: TrainConfig) -> TrainState:
        """The state before the first step of `model` under `config`."""
        coef = (
            config.sparsity_coefficient
            if config.sparsity_coefficient is not None
            else model.sparsity_coefficient
        )
        if config.target_l0 is not None and coef == 0:
            raise BadInputError(
                "target_l0 adapts lambda multiplicatively, which cannot move it from 0; give the model or "
                "the config a sparsity coefficient > 0."
            )
        counters = torch.zeros(model.n_atoms, dtype=torch.int64, device=model.W_dec.device)
        return cls(config=config, coefficient=float(coef), tokens_since_fired=counters)

    def dead_latents(self) -> torch.Tensor:
        """(n_atoms,) bool: latents that fired on none of the last dead_window training vectors."""
        return self.tokens_since_fired >= self.config.dead_window

    def state_dict(self) -> dict[str, Any]:
        return {
            "coefficient": self.coefficient,
            "tokens_since_fired": self.tokens_since_fired.cpu(),
            "step": self.step,
            "tokens_seen": self.tokens_seen,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.coefficient = float(state["coefficient"])
        self.tokens_since_fired = state["tokens_since_fired"].to(self.tokens_since_fired.device)
        self.step = int(state["step"])
        self.tokens_seen = int(state["tokens_seen"])


def make_optimizer(model: SparseAutoencoder, config: TrainConfig) -> torch.optim.Adam:
    """Adam over the model's parameters with the config's betas and eps (train_step sets the lr each step)."""
    return torch.optim.Adam(model.parameters(), lr=config.lr, betas=config.betas, eps=config.eps)


def _ramp(step: int, warmup: int) -> float:
    """Linear warm-up factor of 0-based `step`: (step + 1) / warmup capped at 1 (no step is wasted at 0)."""
    return 1.0 if warmup == 0 else min(1.0, (step + 1) / warmup)


def train_step(
    model: SparseAutoencoder,
    optimizer: torch.optim.Optimizer,
    batch: torch.Tensor | np.ndarray,
    state: TrainState,
) -> StepStats:
    """One optimizer step on raw activations `batch` (batch, d); updates `state` in place, returns stats."""
    cfg = state.config
    lr = cfg.lr * _ramp(state.step, cfg.lr_warmup_steps)
    for group in optimizer.param_groups:
        group["lr"] = lr
    coefficient = state.coefficient * _ramp(state.step, cfg.sparsity_warmup_steps)

    out = model(batch, coefficient=coefficient)
    optimizer.zero_grad(set_to_none=True)
    out.loss.backward()
    model.project_decoder_grad_()
    optimizer.step()
    model.constrain_()

    with torch.no_grad():
        n = out.codes.shape[0]
        fired = (out.codes != 0).any(dim=0)
        state.tokens_since_fired += n
        state.tokens_since_fired[fired] = 0
    l0 = float(out.l0)
    if cfg.target_l0 is not None and state.step >= cfg.sparsity_warmup_steps:
        error = max(-1.0, min(1.0, (l0 - cfg.target_l0) / cfg.target_l0))
        state.coefficient *= math.exp(cfg.target_l0_gain * error)
    state.step += 1
    state.tokens_seen += n
    return StepStats(
        step=state.step,
        loss=float(out.loss.detach()),
        recon_loss=float(out.recon_loss.detach()),
        sparsity_loss=float(out.l0_loss.detach()),
        l0=l0,
        dead=int(state.dead_latents().sum()),
        coefficient=coefficient,
        lr=lr,
    )


# ------------------------------------------------------------------------------------------------------------
# Data sources with a resumable position
# ------------------------------------------------------------------------------------------------------------


class _TensorBatches:
    """Shuffled batches of a (n, d) tensor, a new permutation per epoch; the last partial batch is dropped."""

    def __init__(self, x: torch.Tensor, batch_size: int, seed: int) -> None:
        if x.shape[0] < batch_size:
            raise BadInputError(
                f"activations hold {x.shape[0]} vectors, fewer than batch_size = {batch_size}; lower the "
                "batch size or pass more activations."
            )
        self.x, self.batch_size = x, batch_size
        self.gen = torch.Generator().manual_seed(seed)
        self.epoch = -1
        self._new_epoch()

    def _new_epoch(self) -> None:
        # The state *before* drawing the permutation is what a checkpoint needs to redraw the same one.
        self.epoch_state = self.gen.get_state()
        self.perm = torch.randperm(self.x.shape[0], generator=self.gen)
        self.epoch += 1
        self.offset = 0

    def sample(self, k: int, seed: int) -> torch.Tensor:
        """Up to k random vectors (a separate generator: the shuffling sequence is untouched)."""
        idx = torch.randperm(self.x.shape[0], generator=torch.Generator().manual_seed(seed))[:k]
        return self.x[idx]

    def next(self) -> torch.Tensor:
        if self.offset + self.batch_size > self.x.shape[0]:
            self._new_epoch()
        idx = self.perm[self.offset : self.offset + self.batch_size]
        self.offset += self.batch_size
        return self.x[idx]

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "tensor", "epoch": self.epoch, "offset": self.offset, "generator": self.epoch_state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["kind"] != "tensor":
            raise BadInputError(
                "the checkpoint was trained from an iterator of batches; resume with one too."
            )
        self.gen.set_state(state["generator"])
        self._new_epoch()
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])


class _IteratorBatches:
    """Batches from an iterable; the position is the number taken, and resuming skips that many."""

    def __init__(self, batches: Iterable[torch.Tensor | np.ndarray]) -> None:
        self.it: Iterator = iter(batches)
        self.taken = 0
        self._first: torch.Tensor | np.ndarray | None = None

    def _pull(self) -> torch.Tensor | np.ndarray:
        try:
            return next(self.it)
        except StopIteration:
            raise BadInputError(
                f"the batch iterator ended after {self.taken} batches, before config.steps; pass more "
                "batches (e.g. cycle over the shards) or fewer steps."
            ) from None

    def sample(self, k: int, seed: int) -> torch.Tensor | np.ndarray:
        """The first batch, kept so that `next` still returns it."""
        if self._first is None:
            self._first = self._pull()
        return self._first

    def next(self) -> torch.Tensor | np.ndarray:
        batch, self._first = (self._first, None) if self._first is not None else (self._pull(), None)
        self.taken += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "iterator", "taken": self.taken}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["kind"] != "iterator":
            raise BadInputError(
                "the checkpoint was trained from a tensor of activations; resume with the same one."
            )
        for _ in range(int(state["taken"])):
            self.next()


def _source(
    activations: Any, model: SparseAutoencoder, config: TrainConfig
) -> _TensorBatches | _IteratorBatches:
    if isinstance(activations, (torch.Tensor, np.ndarray)):
        x = as_float_tensor(activations, "activations", ndim_min=2, d=model.d)
        if x.ndim != 2:
            raise BadInputError(
                f"activations must be (n, d), got shape {tuple(x.shape)}; reshape with x.reshape(-1, d)."
            )
        return _TensorBatches(x, config.batch_size, config.seed)
    if isinstance(activations, Iterable):
        return _IteratorBatches(activations)
    raise BadInputError(
        f"activations must be a (n, d) tensor or array, or an iterable of (batch, d) batches; got "
        f"{type(activations).__name__}."
    )


# ------------------------------------------------------------------------------------------------------------
# Checkpoints
# ------------------------------------------------------------------------------------------------------------


def latest_checkpoint(checkpoint_dir: str | Path) -> Path | None:
    """The checkpoint with the most steps in `checkpoint_dir` (files step_<steps>.pt), or None."""
    found = sorted(Path(checkpoint_dir).glob("step_*.pt"))
    return found[-1] if found else None


def _save_checkpoint(
    checkpoint_dir: Path,
    model: SparseAutoencoder,
    optimizer: torch.optim.Optimizer,
    state: TrainState,
    source: _TensorBatches | _IteratorBatches,
    history: list[StepStats],
) -> Path:
    """Write step_<step>.pt atomically (temporary file, fsync, os.replace); drop all but the newest few."""
    payload = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "config": asdict(state.config),
        "model_class": type(model).__name__,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "state": state.state_dict(),
        "data": source.state_dict(),
        "history": [tuple(s) for s in history],
    }
    path = checkpoint_dir / f"step_{state.step:09d}.pt"
    tmp = checkpoint_dir / f".{path.name}.tmp"
    with open(tmp, "wb") as f:
        torch.save(payload, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    for old in sorted(checkpoint_dir.glob("step_*.pt"))[: -state.config.keep_checkpoints]:
        old.unlink()
    return path


def _load_checkpoint(
    path: Path,
    model: SparseAutoencoder,
    optimizer: torch.optim.Optimizer,
    state: TrainState,
    source: _TensorBatches | _IteratorBatches,
) -> list[StepStats]:
    """Restore everything `_save_checkpoint` wrote; returns the history so far."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise BadInputError(
            f"checkpoint {path} is unreadable ({e}); delete it to resume from an older one."
        ) from e
    if payload.get("format") != CHECKPOINT_FORMAT or payload.get("version") != CHECKPOINT_VERSION:
        raise BadInputError(f"{path} is not a checkpoint written by atoms.train; use another checkpoint_dir.")
    saved = payload["config"]
    current = asdict(state.config)
    changed = [
        f"{k}: {saved.get(k)!r} -> {current[k]!r}"
        for k in current
        if k not in _RESUMABLE_CHANGES and _normalise(saved.get(k)) != _normalise(current[k])
    ]
    if changed or payload["model_class"] != type(model).__name__:
        raise BadInputError(
            f"checkpoint {path} belongs to a different run (model {payload['model_class']} vs "
            f"{type(model).__name__}; changed settings: {changed}). Resume with the same model and settings "
            f"(only {_RESUMABLE_CHANGES} may change), or use a fresh checkpoint_dir."
        )
    try:
        model.load_state_dict(payload["model"])
    except RuntimeError as e:
        raise BadInputError(
            f"checkpoint {path} does not fit this model ({e}); resume with the same model."
        ) from e
    optimizer.load_state_dict(payload["optimizer"])
    state.load_state_dict(payload["state"])
    source.load_state_dict(payload["data"])
    return [StepStats(*s) for s in payload["history"]]


def _normalise(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


# ------------------------------------------------------------------------------------------------------------
# The loop
# ------------------------------------------------------------------------------------------------------------


def train(
    model: SparseAutoencoder,
    activations: torch.Tensor | np.ndarray | Iterable[torch.Tensor | np.ndarray],
    config: TrainConfig | None = None,
    checkpoint_dir: str | Path | None = None,
    progress: bool = True,
    callback: Callable[[StepStats], None] | None = None,
) -> TrainResult:
    """Train `model` for config.steps steps on raw activations; returns the per-step history.

    activations: a (n, d) tensor or array, shuffled by a seeded generator, or an iterable of (batch, d)
    batches. Batches go to the model's device. With `checkpoint_dir`, the run resumes from the latest
    checkpoint there and saves one every config.checkpoint_every steps and at the end; an iterator must then
    replay the same batches from its start on every call (its first `taken` batches are skipped).
    `callback(stats)` runs after each step (and after that step's checkpoint); an exception it raises stops
    the run, resumable from the last checkpoint.
    """
    if not isinstance(model, SparseAutoencoder):
        raise BadInputError(f"train takes a TSAE or ReLUSAE, got {type(model).__name__}.")
    config = TrainConfig() if config is None else config
    source = _source(activations, model, config)
    optimizer = make_optimizer(model, config)
    state = TrainState.start(model, config)
    history: list[StepStats] = []
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    resume = latest_checkpoint(ckpt_dir) if ckpt_dir is not None and ckpt_dir.is_dir() else None
    if resume is not None:
        history = _load_checkpoint(resume, model, optimizer, state, source)
        if progress:
            print(f"resumed from {resume} at step {state.step}", file=sys.stderr)
    elif config.fit_input_scale:
        model.fit_input_scale(source.sample(config.input_scale_samples, config.seed + 1))
    if ckpt_dir is not None:
        ckpt_dir.mkdir(parents=True, exist_ok=True)

    while state.step < config.steps:
        stats = train_step(model, optimizer, source.next(), state)
        history.append(stats)
        if ckpt_dir is not None and (state.step % config.checkpoint_every == 0 or state.step == config.steps):
            _save_checkpoint(ckpt_dir, model, optimizer, state, source, history)
        if progress and (state.step % config.log_every == 0 or state.step == config.steps):
            print(
                f"step {stats.step}/{config.steps}  loss {stats.loss:.4g}  recon {stats.recon_loss:.4g}  "
                f"l0 {stats.l0:.1f}  dead {stats.dead}  lambda {stats.coefficient:.3g}",
                file=sys.stderr,
            )
        if callback is not None:
            callback(stats)

    columns = {
        name: torch.tensor(
            [getattr(s, name) for s in history], dtype=torch.int64 if name == "dead" else torch.float64
        )
        for name in _HISTORY
    }
    return TrainResult(
        **columns,
        final_coefficient=state.coefficient,
        dead_latents=state.dead_latents().cpu(),
    )
