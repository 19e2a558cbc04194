"""The trainer shared by the TSAE and the ReLU SAE: a step function, a loop, checkpoints that resume exactly.

Usable from other code at two levels: `train_step(model, optimizer, batch, state)` inside a loop of one's own
(with `make_optimizer` and `TrainState.start`), or `train(model, activations, config)` for the whole run.
`model` is a TSAE, a ReLUSAE, or an SAE module of one's own with SAELens-style weights, trained in place
through `atoms.tsae.as_sae`: W_enc (d, n), b_enc (n,), W_dec (n, d), b_dec (d,), and threshold or
log_threshold (n,) for a JumpReLU SAE. Such a module stays on its raw activations (input scale 1); what it
lacks comes from the config (sparsity_coefficient, bandwidth) or the TSAE's defaults, and `TrainState.start`
folds its decoder norms into its encoder when they are not 1.

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

Distributed (torchrun, gloo or NCCL): every rank passes the same activations and `config.batch_size` is the
global batch. The global batches are drawn exactly as in one process; rank r of W trains on its contiguous
share of each (`atoms.distributed.shard`), so it reads only those rows. Each rank's gradient is weighted by
its share of the batch and summed over ranks, which gives the global batch's mean gradient; the loss, the
mean L0 the target-L0 controller reads and the dead-latent counts are reduced the same way, so the decoder
constraint, the thresholds and the controller update identically on every rank. Rank 0 alone writes
checkpoints; they hold the full model and optimizer state and a data position that does not depend on the
number of ranks, so a run resumes on any number of ranks. A 2-rank run equals the 1-process run with the same
global batch up to float rounding (the gradient is summed in another order).
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
import torch.distributed as dist
from torch import nn

from atoms.distributed import agree, comm_device, is_distributed, shard, world
from atoms.errors import BadInputError, as_float_tensor
from atoms.kernels.dispatch import backend
from atoms.kernels.sparse_triton import TRITON_DTYPES, CapacityOverflowError
from atoms.tsae import TSAE, SparseAutoencoder, TrainingLoss, as_sae

__all__ = [
    "GraphedTrainStep",
    "StepStats",
    "TrainConfig",
    "TrainResult",
    "TrainState",
    "l0_control",
    "latest_checkpoint",
    "make_optimizer",
    "next_capacity",
    "train",
    "train_step",
]

CHECKPOINT_FORMAT = "atoms.train"
CHECKPOINT_VERSION = 1
# Fields that may change between an interrupted run and its resumption without changing any step's arithmetic.
_RESUMABLE_CHANGES = ("steps", "checkpoint_every", "keep_checkpoints", "log_every", "cuda_graph")
# StepStats fields that TrainResult returns as per-step tensors.
_HISTORY = ("loss", "recon_loss", "sparsity_loss", "l0", "dead", "coefficient", "lr", "sparse")
# The sparse path is chosen when the previous step's mean L0 is at most this fraction of n_atoms, by the
# device type the model's weights are on. CPU: measured at 4096 x 576 x 2304 fp32 on 2 cores
# (benchmarks/test_train_step.py, docs/benchmarks.md) the sparse step took 57, 68, 104, 129, 191, 258 and
# 337 ms at L0 0.5, 1, 3, 5, 8, 12 and 16%, the dense one 211-230 ms at every L0: they cross near 10%, and
# 8% keeps a margin on the sparse side of it (1.1x there). CUDA: predicted, not yet measured
# (kernels/NOTES.md, "Sparse training step"): at 4096 x 2304 x 16384 bf16 the sparse step costs a fixed
# ~1.2 ms plus ~17 us per entry a row, the dense one 3.5-8.4 ms, so they cross at 135-420 entries a row,
# 0.8-2.6% of n_atoms; 1.5% until a GPU run measures it. Other devices run the torch path, as the CPU does.
SPARSE_MAX_DENSITY = {"cpu": 0.08, "cuda": 0.015}
# The sparse step's next capacity is the last step's fullest row times this (`next_capacity`): the fullest
# row's count moves little from one step to the next, and an overflow costs a redone loss and backward.
CAPACITY_MARGIN = 1.25
# `TrainConfig.whiten_once=None` whitens a tensor of activations up front when the copy is at most this.
WHITEN_ONCE_MAX_BYTES = 8 * 2**30
# Decoder rows further than this from unit norm are folded into the encoder before training. Rows that
# `constrain_` normalised stay within rounding of 1 (bfloat16: about 4e-3); a SAELens-style decoder,
# initialised at norm 0.1 and never normalised, is far outside.
UNIT_NORM_TOLERANCE = 1e-2


@dataclass
class TrainConfig:
    """Hyperparameters of a training run; the defaults follow the JumpReLU paper where it gives one."""

    lr: float = 2e-4
    """Adam learning rate after warm-up."""
    batch_size: int = 4096
    """Activation vectors per step, over all ranks together (when training from a tensor; an iterator sets its
    own batch sizes)."""
    steps: int = 10_000
    """Optimizer steps in the run."""
    lr_warmup_steps: int = 1000
    """The learning rate rises linearly from lr / lr_warmup_steps at step 1 to lr at this step (0: none)."""
    sparsity_warmup_steps: int = 1000
    """The sparsity coefficient rises linearly over these steps, as the learning rate does; 0 disables it."""
    sparsity_coefficient: float | None = None
    """lambda: the L0 coefficient of a JumpReLU SAE, the L1 coefficient of a ReLU SAE; None uses the model's
    own (for a module of one's own, the TSAE's default 1e-3 or the ReLU SAE's 5e-3, tuned for inputs at unit
    mean squared norm: set it, or target_l0, for activations on another scale)."""
    bandwidth: float | None = None
    """Bandwidth of the JumpReLU threshold pseudo-derivative for a module of one's own, in units of its
    pre-activations; None: the TSAE's default 0.001. A TSAE keeps its own (TSAE(bandwidth=...)); a ReLU SAE
    has no threshold to use it."""
    target_l0: float | None = None
    """If set, lambda adapts towards this mean L0 per sample after the sparsity warm-up, by a
    proportional-integral controller on log lambda (`l0_control`) of the error clip(log(l0 / target_l0), -1,
    1), smoothed: each step multiplies lambda by exp(target_l0_gain * f_t + target_l0_damping * (f_t -
    f_{t-1})), f the filtered error. Its only fixed point is a batch L0 at target_l0 (geometric mean)."""
    target_l0_gain: float = 0.01
    """Integral gain of the target-L0 controller (per step, on log lambda)."""
    target_l0_smoothing: float = 1.0
    """Weight of the newest error in the controller's filtered error (1: no smoothing). A batch's mean L0 is
    noisy (a ReLU SAE of 2304 latents at batch 512: +-20% step to step), and a proportional term would pass
    that noise on to lambda."""
    target_l0_damping: float = 0.0
    """Proportional gain of the target-L0 controller (0: the integral controller alone). It answers a change
    of the (smoothed) L0 at once instead of integrating it (docs/l0_controller.md compares settings)."""
    betas: tuple[float, float] = (0.0, 0.999)
    """Adam betas; beta1 = 0 as in the JumpReLU paper."""
    eps: float = 1e-8
    """Adam epsilon."""
    seed: int = 0
    """Seed of the generator that shuffles a tensor of activations (a fresh permutation every epoch)."""
    fit_input_scale: bool = True
    """On a fresh start, measure the model's input scale on up to input_scale_samples vectors (the first batch
    of an iterator) so its inputs have unit mean squared norm; False keeps the model's input_scale. A module
    of one's own keeps its raw activations (input scale 1) either way."""
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
    sparse: bool | None = None
    """The step's path: True the sparse one (`atoms.kernels.sparse_step`: after the encoder's GEMM only the
    active entries are touched), False the dense one, None chooses per step from the previous step's L0
    (`use_sparse_path`). Both give the same loss and gradients to rounding."""
    cuda_graph: bool = False
    """`train` only: run the steps through `GraphedTrainStep` (the whole step captured once in a CUDA graph
    and replayed: no host sync and no Python launches per step). Needs a CUDA model on the Triton sparse
    path, activations as one tensor (fixed batch shapes) and no torchrun. Stats come back every log_every
    steps (and at checkpoints and the end), so `stop` and `callback` see them then: a run that `stop` ends
    has also taken the rest of that period's steps, all in its history. A capacity overflow rolls the run
    back to the last read and redoes those steps with twice the capacity. Not yet run on a GPU."""
    whiten_once: bool | None = None
    """For an AIP-norm model trained from a tensor: whiten and scale all the activations once at the start
    (`SparseAutoencoder.scale_rows`, a copy of their size in the model's dtype on its device) instead of a
    triangular solve per batch. None: when that copy takes at most WHITEN_ONCE_MAX_BYTES."""

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
            ("bandwidth", self.bandwidth is None or self.bandwidth > 0, "None or a float > 0"),
            ("target_l0", self.target_l0 is None or self.target_l0 > 0, "None or a float > 0"),
            ("target_l0_gain", self.target_l0_gain > 0, "a float > 0"),
            ("target_l0_damping", self.target_l0_damping >= 0, "a float >= 0"),
            ("target_l0_smoothing", 0 < self.target_l0_smoothing <= 1, "a float in (0, 1]"),
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
    sparse: bool = False
    """Whether the step took the sparse path."""


class TrainResult(NamedTuple):
    """A finished run: per-step histories (steps,) as float64 tensors (int64 for dead), and the end state;
    every tensor on the model's device."""

    loss: torch.Tensor
    recon_loss: torch.Tensor
    sparsity_loss: torch.Tensor
    l0: torch.Tensor
    dead: torch.Tensor
    coefficient: torch.Tensor
    lr: torch.Tensor
    sparse: torch.Tensor
    """(steps,) bool: the steps that took the sparse path."""
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
    l0: float | None = None
    """The previous step's mean L0 (None before the first step): what chooses the next step's path."""
    l0_error: float | None = None
    """The target-L0 controller's filtered error (`l0_control`; None before its first step)."""
    capacity: int | None = None
    """Entry slots a row the next sparse step gives the Triton kernels (`next_capacity` of the last sparse
    step's fullest row; None before one: that step sizes them exactly, with one host sync). The torch path
    ignores it and leaves it None."""

    @classmethod
    def start(cls, model: nn.Module, config: TrainConfig) -> TrainState:
        """The state before the first step of `model` (a TSAE, a ReLUSAE or a module of one's own, see the
        module docstring) under `config`.

        If a decoder row's norm differs from 1 by more than UNIT_NORM_TOLERANCE, the decoder norms are first
        folded into the encoder (`fold_decoder_norms_`: the same reconstructions), as the trainer keeps rows
        at unit norm.
        """
        sae = _sae(model, config)
        coef = (
            config.sparsity_coefficient
            if config.sparsity_coefficient is not None
            else sae.sparsity_coefficient
        )
        if config.target_l0 is not None and coef == 0:
            raise BadInputError(
                "target_l0 adapts lambda multiplicatively, which cannot move it from 0; give the model or "
                "the config a sparsity coefficient > 0."
            )
        with torch.no_grad():
            off = float((sae.W_dec.float().norm(dim=1) - 1).abs().max())
        if off > UNIT_NORM_TOLERANCE:
            sae.fold_decoder_norms_()
        counters = torch.zeros(sae.n_atoms, dtype=torch.int64, device=sae.W_dec.device)
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
            "l0": self.l0,
            "l0_error": self.l0_error,
            "capacity": self.capacity,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.coefficient = float(state["coefficient"])
        self.tokens_since_fired = state["tokens_since_fired"].to(self.tokens_since_fired.device)
        self.step = int(state["step"])
        self.tokens_seen = int(state["tokens_seen"])
        self.l0 = state.get("l0")  # absent from checkpoints written before the sparse path
        self.l0_error = state.get("l0_error")  # absent before the filtered controller
        self.capacity = state.get("capacity")  # absent before the sync-free sparse step


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Adam:
    """Adam over the model's parameters with the config's betas and eps (train_step sets the lr each step).

    The fused implementation where every parameter allows it (floating, on the CPU or CUDA): one kernel for
    all parameters. Measured at (576, 2304), 2 CPU cores: 1.0 ms a step against 8.8 ms for the default
    for-each one, which was 3% of a dense step and would be 15% of a sparse one.
    """
    params = list(model.parameters())
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.Adam(params, lr=config.lr, betas=config.betas, eps=config.eps, fused=fused)


def _sae(model: nn.Module, config: TrainConfig) -> SparseAutoencoder:
    """The SAE a step computes with: `model` itself, or its `as_sae` adapter with the config's bandwidth."""
    sae = as_sae(model)
    if config.bandwidth is not None:
        if sae is model:
            raise BadInputError(
                f"TrainConfig.bandwidth is for SAE modules of one's own; a {type(model).__name__} has its "
                "own (TSAE(bandwidth=...)). Leave TrainConfig.bandwidth at None."
            )
        if isinstance(sae, TSAE):
            sae.bandwidth = config.bandwidth
    return sae


def _ramp(step: int, warmup: int) -> float:
    """Linear warm-up factor of 0-based `step`: (step + 1) / warmup capped at 1 (no step is wasted at 0)."""
    return 1.0 if warmup == 0 else min(1.0, (step + 1) / warmup)


def _all_reduce_step(
    model: nn.Module, n: int, local: list[float], fired: torch.Tensor
) -> tuple[int, torch.Tensor, list[float]]:
    """Under torchrun, from this rank's n rows, their `local` mean (loss, recon, sparsity, l0) and firing mask
    (n_atoms,): the global batch's size, firing mask and means, the same on every rank; the gradients become
    the global batch's mean gradient.

    Gradients are reduced by hand rather than by DistributedDataParallel. DDP divides the sum over ranks by
    the world size, which is the global batch's mean gradient only when every rank holds the same number of
    rows; weighting each rank's gradient by its share n_r / N is exact for any split (an iterator's batches
    need not divide evenly). It also keeps `train_step` a function of the bare model, and the backward pass is
    two matrix products, so DDP's overlap of communication with it would save little.
    """
    packed = torch.cat([torch.tensor([1.0, *local], dtype=torch.float64) * n, fired.double().cpu()])
    packed = packed.to(comm_device())
    dist.all_reduce(packed)
    packed = packed.cpu()
    total = int(packed[0])
    for p in model.parameters():
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        p.grad.mul_(n / total)
        dist.all_reduce(p.grad)
    return total, (packed[5:] > 0).to(fired.device), (packed[1:5] / total).tolist()


def _l0_error(l0: torch.Tensor, target: float) -> torch.Tensor:
    """clip(log(l0 / target), -1, 1) of a float64 tensor: symmetric in over- and undershoot; -1 where l0 is
    0 (or NaN)."""
    return torch.where(l0 > 0, torch.log(l0 / target).clamp(-1.0, 1.0), -1.0)


def _control_law(
    l0: torch.Tensor, filtered: torch.Tensor, controlled: torch.Tensor, config: TrainConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log of the factor lambda is multiplied by, the new filtered error) after a step of mean L0 `l0`;
    float64 0-dim tensors, device operations only, so `train_step` (on the host) and `GraphedTrainStep`
    (inside a CUDA graph) run the same law. `controlled`: whether `filtered` holds an earlier error."""
    error = _l0_error(l0, config.target_l0)
    before = torch.where(controlled, filtered, 0.0)
    now = torch.where(controlled, filtered + config.target_l0_smoothing * (error - filtered), error)
    return config.target_l0_gain * now + config.target_l0_damping * (now - before), now


def l0_control(l0: float, filtered: float | None, config: TrainConfig) -> tuple[float, float]:
    """One update of the target-L0 controller after a step of mean L0 `l0`: (the factor lambda is
    multiplied by, the new filtered error).

    e_t = clip(log(l0 / target_l0), -1, 1) is smoothed, f_t = f_{t-1} + target_l0_smoothing (e_t - f_{t-1})
    (f starts at the first error: `filtered` is None at the first controlled step), and lambda is multiplied
    by exp(target_l0_gain f_t + target_l0_damping (f_t - f_{t-1})), f_{t-1} = 0 at the first step: a
    proportional-integral controller on log lambda in velocity form.
    """
    if config.target_l0 is None:
        raise BadInputError("l0_control needs TrainConfig.target_l0; set it, or do not adapt lambda.")

    def scalar(value: float) -> torch.Tensor:
        return torch.tensor(value, dtype=torch.float64)

    log_factor, now = _control_law(
        scalar(l0), scalar(filtered or 0.0), torch.tensor(filtered is not None), config
    )
    return float(torch.exp(log_factor)), float(now)


def use_sparse_path(config: TrainConfig, state: TrainState, n_atoms: int, device: torch.device) -> bool:
    """Whether the next step on `device` takes the sparse path: `config.sparse` when set, else whether the
    previous step's mean L0 was at most SPARSE_MAX_DENSITY[device type] of n_atoms (the CPU's figure for
    other devices; the first step is dense: a fresh model's thresholds let most latents fire). Under
    torchrun the L0 is the global batch's, so every rank agrees."""
    if config.sparse is not None:
        return config.sparse
    max_density = SPARSE_MAX_DENSITY.get(device.type, SPARSE_MAX_DENSITY["cpu"])
    return state.l0 is not None and state.l0 <= max_density * n_atoms


class _ReadBack(NamedTuple):
    """What a step reads back of its loss, in one device->host transfer."""

    values: list[float]
    """The mean loss, reconstruction loss, sparsity loss and L0 of this rank's rows."""
    dropped: int
    """Selected entries that did not fit in the capacity (0 off the Triton path)."""
    needed: int | None
    """The fullest row's selected entries: the capacity the batch needed (None off the Triton path)."""


def _loss_and_backward(
    sae: SparseAutoencoder,
    optimizer: torch.optim.Optimizer,
    batch: torch.Tensor | np.ndarray,
    coefficient: float,
    sparse: bool,
    capacity: int | None,
    scaled: bool,
) -> tuple[TrainingLoss, _ReadBack]:
    """The step's loss and gradients (the old ones cleared), and their read-back."""
    out = sae.training_loss(batch, coefficient, sparse=sparse, scaled=scaled, capacity=capacity)
    optimizer.zero_grad(set_to_none=True)
    out.loss.backward()
    parts = [out.loss.detach(), out.recon_loss.detach(), out.l0_loss.detach(), out.l0]
    if out.counts is not None:
        parts += [out.dropped.sum(), out.counts.max()]
    # float64 holds every float32 and int32 exactly: the values are those float() of each would give.
    values = torch.stack([t.double() for t in parts]).tolist()
    if out.counts is None:
        return out, _ReadBack(values, 0, None)
    return out, _ReadBack(values[:4], int(values[4]), int(values[5]))


def next_capacity(needed: int, n_atoms: int, margin: float = CAPACITY_MARGIN) -> int:
    """Entry slots a row for the next sparse step after one whose fullest row selected `needed` entries:
    `margin` times that, in multiples of 16 (aligned rows, as `default_capacity`), at least 16 (a step where
    nothing fired would otherwise give 0), at most n_atoms."""
    return min(n_atoms, max(16, 16 * math.ceil(margin * needed / 16)))


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: torch.Tensor | np.ndarray,
    state: TrainState,
    *,
    scaled: bool = False,
) -> StepStats:
    """One optimizer step on raw activations `batch` (batch, d); updates `state` in place, returns stats.

    `model`: a TSAE, a ReLUSAE or a module of one's own (see the module docstring), with `optimizer` over its
    parameters (`make_optimizer`, or one's own) and `state` from `TrainState.start(model, config)`.
    Under torchrun each rank passes its own rows of the global batch (any split, at least one row each); the
    step and the returned stats are then those of the global batch, identical on every rank.
    `scaled`: the batch is already in the model's coordinates (`model.scale_rows`, for an AIP-norm model),
    so no whitening runs in the step.

    Host syncs: the loss, its parts and the mean L0 come back in one transfer (with the dead-latent count,
    the step's only reads). A sparse step on the Triton kernels (CUDA tensors) gives them
    `state.capacity` entry slots a row, which needs no sync; the entries that did not fit and the fullest
    row's count come back in the same transfer. If some did not fit, the loss and backward are redone sized
    exactly before the optimizer steps, and every such step sets `state.capacity` from the fullest row
    (`next_capacity`). The torch path (CPU tensors) is exact and ignores the capacity.
    """
    cfg = state.config
    sae = _sae(model, cfg)
    lr = cfg.lr * _ramp(state.step, cfg.lr_warmup_steps)
    for group in optimizer.param_groups:
        group["lr"] = lr
    coefficient = state.coefficient * _ramp(state.step, cfg.sparsity_warmup_steps)

    sparse = use_sparse_path(cfg, state, sae.n_atoms, sae.W_enc.device)
    out, read = _loss_and_backward(sae, optimizer, batch, coefficient, sparse, state.capacity, scaled)
    if read.dropped:
        # Some row selected more entries than the capacity: these gradients miss them. Redo the step sized
        # exactly (one more host sync, on this step only), so that no update is applied with entries missing.
        out, read = _loss_and_backward(sae, optimizer, batch, coefficient, sparse, None, scaled)
    if read.needed is not None:
        state.capacity = next_capacity(read.needed, sae.n_atoms)
    fired = out.fired
    if is_distributed():
        n, fired, (loss, recon, sparsity, l0) = _all_reduce_step(model, out.rows, read.values, fired)
    else:
        n, (loss, recon, sparsity, l0) = out.rows, read.values
    sae.project_decoder_grad_()
    optimizer.step()
    sae.constrain_()

    with torch.no_grad():
        state.tokens_since_fired += n
        state.tokens_since_fired.masked_fill_(fired, 0)  # a mask index would read the mask back
    if cfg.target_l0 is not None and state.step >= cfg.sparsity_warmup_steps:
        factor, state.l0_error = l0_control(l0, state.l0_error, cfg)
        state.coefficient *= factor
    state.step += 1
    state.tokens_seen += n
    state.l0 = l0
    return StepStats(
        step=state.step,
        loss=loss,
        recon_loss=recon,
        sparsity_loss=sparsity,
        l0=l0,
        dead=int(state.dead_latents().sum()),
        coefficient=coefficient,
        lr=lr,
        sparse=sparse,
    )


# ------------------------------------------------------------------------------------------------------------
# The step in a CUDA graph
# ------------------------------------------------------------------------------------------------------------

# GraphedTrainStep's default capacity is the probe batch's fullest row times this: overflow is checked only
# every log_every steps, and the steps in between are applied, so its margin is wider than train_step's.
GRAPHED_CAPACITY_MARGIN = 2.0
# Eager steps before capture, undone after: the first compiles and autotunes the Triton kernels and creates
# the optimizer's state; the others run the step as capture will record it.
_GRAPH_WARMUP_STEPS = 3


class GraphedTrainStep:
    """`train_step` on the sparse path, captured once in a CUDA graph and replayed per batch: no host sync
    and no kernel launches from Python in a step.

    `GraphedTrainStep(model, optimizer, state, example)` captures, for a model on a CUDA device (float32,
    bfloat16 or float16 parameters) and batches shaped like `example` (batch, d): the forward on the sparse
    path's Triton kernels with `capacity` entry slots a row, the loss with the sparsity coefficient and the
    learning rate as device tensors (warm-up ramps computed on the device from a step counter), the
    backward, the decoder-gradient projection, the optimizer's step (`optimizer`, an Adam such as
    `make_optimizer`'s, becomes capturable with a device-tensor lr), the constraint, the dead-latent
    counters (`state.tokens_since_fired`, updated in place) and the target-L0 controller (`l0_control`'s law
    on the device). Calling it with a batch copies the batch into the graph's input buffer and replays the
    graph: the step `train_step` takes with `config.sparse=True`, to rounding.

    Stats stay on the device, a row per step. Every `config.log_every` steps (of `state.step`), and on
    `read()`, they come back in one transfer as StepStats, and `state` is brought up to date (coefficient,
    controller, L0, capacity); steps and tokens are counted on the host as they go. Overflow is checked
    then too: if some row selected more entries than the capacity, `read` raises CapacityOverflowError
    naming the capacity needed. The steps since the previous check were already applied with those rows'
    extra entries missing, which is why the default capacity (None: measured on `example`) leaves twice the
    fullest row (GRAPHED_CAPACITY_MARGIN) where train_step, which redoes an overflowing step, leaves 1.25x.
    After an overflow, resume from a checkpoint with a new GraphedTrainStep of the capacity named.

    While one is in use, step the model only through it, and `read()` before reading `state` or saving a
    checkpoint. Batches are not checked for NaN (that reads them back); a NaN shows in the next read's loss.
    Copying a batch from pageable host memory waits for the device: pass batches on the device, or pinned.
    Not under torchrun.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        state: TrainState,
        example: torch.Tensor | np.ndarray,
        *,
        capacity: int | None = None,
        scaled: bool = False,
    ) -> None:
        """`example` (batch, d): a batch like those the step will take (raw activations, or with `scaled`
        already in the model's coordinates); it sets the batch shape, warms the step up (the warm-up's
        updates are undone) and, with capacity None, measures the capacity."""
        cfg = state.config
        sae = _sae(model, cfg)
        device = sae.W_dec.device
        _check_capturable(sae, optimizer, cfg)
        example = torch.as_tensor(example)
        if example.ndim != 2 or example.shape[1] != sae.d or example.shape[0] < 1:
            raise BadInputError(f"example must be a (batch, {sae.d}) batch, got {tuple(example.shape)}.")
        self.model, self.optimizer, self.state, self.sae, self.scaled = model, optimizer, state, sae, scaled
        # The graph's input buffer, in the dtype training_loss computes from (no conversion in the graph).
        dtype = sae.dtype if scaled else sae._compute_dtype
        self._x = example.to(device=device, dtype=dtype, copy=True)
        self.capacity = self._measure_capacity() if capacity is None else capacity

        def on_device(value: Any, dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(value, dtype=dtype, device=device)

        self._step = on_device(state.step, torch.int64)
        self._coefficient = on_device(state.coefficient, torch.float64)
        self._filtered = on_device(state.l0_error or 0.0, torch.float64)
        self._controlled = on_device(state.l0_error is not None, torch.bool)
        # float32: what the fused Adam kernel reads a tensor lr as.
        self._lr = on_device(cfg.lr, torch.float32)
        self._rows = torch.zeros(cfg.log_every, len(_GRAPHED_STATS), dtype=torch.float64, device=device)
        self._pending = on_device([0], torch.int64)  # the next stats row
        self._dropped = on_device(0, torch.int64)
        self._needed = on_device(0, torch.int64)
        self._unread = 0
        for group in optimizer.param_groups:
            group["capturable"], group["lr"] = True, self._lr
        for p, slots in optimizer.state.items():
            # A non-capturable Adam keeps its step count on the host; the captured step increments it.
            if isinstance(slots.get("step"), torch.Tensor) and slots["step"].device != p.device:
                slots["step"] = slots["step"].to(device=p.device, dtype=torch.float32)
        self._graph = self._capture()

    def _measure_capacity(self) -> int:
        with torch.no_grad():
            out = self.sae.training_loss(self._x, sparse=True, scaled=self.scaled, validate=False)
        return next_capacity(int(out.counts.max()), self.sae.n_atoms, GRAPHED_CAPACITY_MARGIN)

    def _device_state(self) -> list[torch.Tensor]:
        """Every tensor besides the parameters and the optimizer's state that a step writes."""
        return [
            self.state.tokens_since_fired,
            self._step,
            self._coefficient,
            self._filtered,
            self._controlled,
            self._rows,
            self._pending,
            self._dropped,
            self._needed,
        ]

    def _capture(self) -> torch.cuda.CUDAGraph:
        """Warm up on a side stream (as torch.cuda.graph requires), undo the warm-up, capture one step."""
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        written = [*params, *self._device_state()]
        saved = [t.detach().clone() for t in written]
        slots_before = {
            p: {k: v.clone() for k, v in self.optimizer.state[p].items() if isinstance(v, torch.Tensor)}
            for p in params
            if p in self.optimizer.state
        }
        current = torch.cuda.current_stream(self._x.device)
        side = torch.cuda.Stream(self._x.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            for _ in range(_GRAPH_WARMUP_STEPS):
                self._record_step()
                self._pending.zero_()  # log_every rows may be fewer than the warm-up steps
        current.wait_stream(side)
        with torch.no_grad():
            for t, value in zip(written, saved, strict=True):
                t.copy_(value)
            for p in params:
                before = slots_before.get(p, {})
                for k, v in self.optimizer.state[p].items():
                    # Adam's state starts at zero (moments and step count): a fresh slot goes back to that.
                    if isinstance(v, torch.Tensor) and k in before:
                        v.copy_(before[k])
                    elif isinstance(v, torch.Tensor):
                        v.zero_()
        # Grads set to None: the captured backward allocates them from the graph's pool and writes them.
        self.optimizer.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._record_step()
        return graph

    def _record_step(self) -> None:
        """The step, as device operations only (what the graph holds)."""
        cfg, sae = self.state.config, self.sae
        self.optimizer.zero_grad(set_to_none=True)
        step = self._step.double()
        lr = cfg.lr * _device_ramp(step, cfg.lr_warmup_steps)
        self._lr.copy_(lr)
        coefficient = self._coefficient * _device_ramp(step, cfg.sparsity_warmup_steps)
        out = sae.training_loss(
            self._x, coefficient, sparse=True, scaled=self.scaled, capacity=self.capacity, validate=False
        )
        out.loss.backward()
        sae.project_decoder_grad_()
        self.optimizer.step()
        sae.constrain_()
        with torch.no_grad():
            counters = self.state.tokens_since_fired
            counters.add_(out.rows).masked_fill_(out.fired, 0)
            if cfg.target_l0 is not None:
                self._control(out.l0.double(), step)
            dead = (counters >= cfg.dead_window).sum()
            parts = (out.loss, out.recon_loss, out.l0_loss, out.l0, dead, coefficient, lr)
            row = torch.stack([t.detach().double() for t in parts])
            self._rows.index_copy_(0, self._pending, row[None])
            self._pending.add_(1)
            self._dropped.add_(out.dropped.sum())
            torch.maximum(self._needed, out.counts.max().long(), out=self._needed)
            self._step.add_(1)

    def _control(self, l0: torch.Tensor, step: torch.Tensor) -> None:
        """`l0_control`'s law on the device, from the step's sparsity warm-up on."""
        log_factor, now = _control_law(l0, self._filtered, self._controlled, self.state.config)
        on = step >= self.state.config.sparsity_warmup_steps
        self._coefficient.copy_(torch.where(on, self._coefficient * torch.exp(log_factor), self._coefficient))
        self._filtered.copy_(torch.where(on, now, self._filtered))
        self._controlled.logical_or_(on)

    def __call__(self, batch: torch.Tensor | np.ndarray) -> list[StepStats]:
        """One step on `batch` (shaped like the example); the stats of the steps since the last read when
        this step ends a log_every period (`read`), else []."""
        batch = torch.as_tensor(batch)
        if batch.shape != self._x.shape:
            raise BadInputError(
                f"the graph was captured for batches of shape {tuple(self._x.shape)}, got "
                f"{tuple(batch.shape)}; build another GraphedTrainStep for another batch size."
            )
        self._x.copy_(batch, non_blocking=True)
        self._graph.replay()
        self.state.step += 1
        self.state.tokens_seen += self._x.shape[0]
        self._unread += 1
        return self.read() if self.state.step % self.state.config.log_every == 0 else []

    def read(self) -> list[StepStats]:
        """The stats of the steps since the last read (one device->host transfer); brings `state` up to date.

        Raises CapacityOverflowError if a row of those steps selected more entries than the capacity (the
        steps were applied; see the class docstring).
        """
        k = self._unread
        if k == 0:
            return []
        scalars = (self._dropped, self._needed, self._coefficient, self._filtered, self._controlled)
        tail = torch.stack([t.double() for t in scalars])
        values = torch.cat([self._rows[:k].flatten(), tail]).tolist()
        for t in (self._pending, self._dropped, self._needed):
            t.zero_()
        self._unread = 0
        width = len(_GRAPHED_STATS)
        rows = [dict(zip(_GRAPHED_STATS, values[i * width : (i + 1) * width], strict=True)) for i in range(k)]
        dropped, needed, coefficient, filtered, controlled = values[k * width :]
        first = self.state.step - k
        stats = [
            StepStats(step=first + i + 1, **{**row, "dead": int(row["dead"])}, sparse=True)
            for i, row in enumerate(rows)
        ]
        state = self.state
        state.coefficient, state.l0 = coefficient, stats[-1].l0
        state.l0_error = filtered if controlled else None
        state.capacity = next_capacity(int(needed), self.sae.n_atoms)
        if dropped:
            wanted = next_capacity(int(needed), self.sae.n_atoms, GRAPHED_CAPACITY_MARGIN)
            raise CapacityOverflowError(
                f"{int(dropped)} selected entries did not fit in the capacity of {self.capacity} a row in "
                f"steps {first + 1}-{state.step} (the fullest row selected {int(needed)}); those steps were "
                f"applied without them. Resume from a checkpoint before step {first + 1} with a "
                f"GraphedTrainStep of capacity >= {wanted}, or train with train_step, which redoes an "
                "overflowing step."
            )
        return stats


def _check_capturable(sae: SparseAutoencoder, optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> None:
    """Raise BadInputError naming what keeps this step out of a CUDA graph, if anything."""
    device = sae.W_dec.device
    if device.type != "cuda":
        raise BadInputError(
            f"GraphedTrainStep captures the step in a CUDA graph, so the model must be on a CUDA device; "
            f"it is on {device}. Use train_step on other devices."
        )
    problems = [
        (sae.dtype not in TRITON_DTYPES, f"parameters in {sae.dtype} (float64 has no Triton path)"),
        (backend(sae.W_dec) != "triton", "ATOMS_KERNELS forcing the torch path, which syncs"),
        (is_distributed(), "torchrun (the gradients' all-reduce reads the loss back)"),
        (cfg.sparse is False, "config.sparse=False (the graph runs the sparse path)"),
        ("capturable" not in optimizer.defaults, f"a {type(optimizer).__name__} (not capturable)"),
    ]
    for bad, what in problems:
        if bad:
            raise BadInputError(f"GraphedTrainStep cannot capture a step with {what}; use train_step.")


# StepStats fields of GraphedTrainStep's per-step rows, in column order.
_GRAPHED_STATS = ("loss", "recon_loss", "sparsity_loss", "l0", "dead", "coefficient", "lr")


def _device_ramp(step: torch.Tensor, warmup: int) -> torch.Tensor:
    """`_ramp` of the 0-based step held in a float64 0-dim device tensor, in float64 (the host's floats)."""
    return torch.ones_like(step) if warmup == 0 else ((step + 1) / warmup).clamp(max=1.0)


class _GraphedSteps:
    """`train`'s steps through a GraphedTrainStep, with a rollback point at every read.

    A capacity overflow is only seen at a read, after the steps since the previous one were applied with
    entries missing. So each successful read keeps a copy of everything those steps write (parameters,
    Adam's state, `state`, the data position; on the device, about three times the parameters' memory),
    and an overflow restores it, captures a new graph with twice the capacity (at most n_atoms, which cannot
    overflow) and lets the loop redo the steps: the run then equals one that never overflowed.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, state: TrainState, source, scaled):
        if not isinstance(source, _TensorBatches):
            raise BadInputError(
                "TrainConfig.cuda_graph needs the activations as one (n, d) tensor: a graph replays one "
                "batch shape, and an overflow rewinds the data, which an iterator cannot do. Pass a tensor, "
                "or set cuda_graph=False."
            )
        self.model, self.optimizer, self.state, self.source, self.scaled = (
            model,
            optimizer,
            state,
            source,
            scaled,
        )
        self.graph = self._capture(capacity=None)
        self._mark()

    def _capture(self, capacity: int | None) -> GraphedTrainStep:
        # A fixed sample (its own generator: the batch sequence is untouched) sets the shape and, with
        # capacity None, the capacity.
        example = self.source.sample(self.state.config.batch_size, self.state.config.seed + 2)
        return GraphedTrainStep(
            self.model, self.optimizer, self.state, example, capacity=capacity, scaled=self.scaled
        )

    def _mark(self) -> None:
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        self._params = [p.detach().clone() for p in params]
        self._slots = {
            p: {
                k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in self.optimizer.state[p].items()
            }
            for p in params
        }
        self._state, self._data = self.state.state_dict(), self.source.state_dict()

    def _rollback(self) -> None:
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        with torch.no_grad():
            for p, saved in zip(params, self._params, strict=True):
                p.copy_(saved)
        for p in params:
            # New tensors, not copies into the old ones: the graph that held those is replaced below. A
            # parameter without state at the mark (no step taken yet) gets none back.
            saved = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in self._slots[p].items()}
            if saved:
                self.optimizer.state[p] = saved
            else:
                self.optimizer.state.pop(p, None)
        self.state.load_state_dict(self._state)
        self.source.load_state_dict(self._data)
        self.graph = self._capture(capacity=min(2 * self.graph.capacity, self.graph.sae.n_atoms))

    def __call__(self, flush: bool) -> list[StepStats]:
        """One step; the stats of the steps since the last read when it read them (every log_every steps,
        and now if `flush`), else []. After an overflow: [], with the run rolled back to the last read."""
        try:
            stats = self.graph(self.source.next())
            if not stats and flush:
                stats = self.graph.read()
        except CapacityOverflowError:
            self._rollback()
            return []
        if stats:
            self._mark()
        return stats


# ------------------------------------------------------------------------------------------------------------
# Data sources with a resumable position
# ------------------------------------------------------------------------------------------------------------


class _TensorBatches:
    """Shuffled batches of a (n, d) tensor, a new permutation per epoch; the last partial batch is dropped.

    Under torchrun the permutation is the same on every rank; `next` returns this rank's share of the batch.
    """

    def __init__(self, x: torch.Tensor, batch_size: int, seed: int) -> None:
        if x.shape[0] < batch_size:
            raise BadInputError(
                f"activations hold {x.shape[0]} vectors, fewer than batch_size = {batch_size}; lower the "
                "batch size or pass more activations."
            )
        ranks = world()[1]
        if batch_size < ranks:
            raise BadInputError(
                f"batch_size = {batch_size} is the global batch, smaller than the {ranks} ranks; each rank "
                f"needs at least one row: use batch_size >= {ranks}."
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
        return self.x[idx[shard(self.batch_size)]]

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
    """Batches from an iterable; the position is the number taken, and resuming skips that many.

    Under torchrun every rank iterates over the same global batches and `next` returns this rank's share.
    """

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
        if not is_distributed():
            return batch
        ranks = world()[1]
        if len(batch) < ranks:
            raise BadInputError(
                f"batch {self.taken} has {len(batch)} rows for {ranks} ranks; each rank needs at least one "
                "row of every global batch: yield larger batches."
            )
        return batch[shard(len(batch))]

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
        if is_distributed():
            # Every rank draws the same permutation of the same rows: check that they hold the same data.
            probe = x[:: max(1, x.shape[0] // 1024)].to(torch.float64)
            agree(
                "the training activations",
                {"rows": x.shape[0], "d": x.shape[1], "checksum": float(probe.sum())},
                "Every rank must pass the same (n, d) activations (e.g. the same memory-mapped file); each "
                "trains only on its own rows of every batch.",
            )
        return _TensorBatches(x, config.batch_size, config.seed)
    if isinstance(activations, Iterable):
        return _IteratorBatches(activations)
    raise BadInputError(
        f"activations must be a (n, d) tensor or array, or an iterable of (batch, d) batches; got "
        f"{type(activations).__name__}."
    )


def _whiten_once(
    source: _TensorBatches | _IteratorBatches, sae: SparseAutoencoder, config: TrainConfig
) -> bool:
    """Replace a tensor source's rows by the model's coordinates u = s L^{-1} x when config.whiten_once asks
    (None: an AIP-norm model whose copy fits WHITEN_ONCE_MAX_BYTES); whether it did.

    A triangular solve per batch costs batch d^2 / 2 multiply-adds, an eighth of the encoder's GEMM at d =
    576 and n_atoms = 4d, and the input checks read the batch back each step; done once, every step skips
    both. Only for the AIP norm, whose loss needs u alone (the Euclidean norm needs the raw rows too).
    """
    if not isinstance(source, _TensorBatches) or sae.loss_norm != "aip" or config.whiten_once is False:
        return False
    size = source.x.shape[0] * sae.d * sae.W_dec.element_size()
    if config.whiten_once is None and size > WHITEN_ONCE_MAX_BYTES:
        return False
    source.x = sae.scale_rows(source.x)
    return True


# ------------------------------------------------------------------------------------------------------------
# Checkpoints
# ------------------------------------------------------------------------------------------------------------


def latest_checkpoint(checkpoint_dir: str | Path) -> Path | None:
    """The checkpoint with the most steps in `checkpoint_dir` (files step_<steps>.pt), or None."""
    found = sorted(Path(checkpoint_dir).glob("step_*.pt"))
    return found[-1] if found else None


def _save_checkpoint(
    checkpoint_dir: Path,
    model: nn.Module,
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
    model: nn.Module,
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


def _synchronise_start(model: nn.Module, state: TrainState, ckpt_dir: Path | None) -> None:
    """Under torchrun, before the first step: every rank at the same step, with rank 0's weights and scales.

    Broadcasting the weights (as DistributedDataParallel does) makes the ranks identical even if their models
    were built with different seeds; the step check catches a checkpoint_dir that not every rank can read.
    """
    agree(
        "the step to resume from",
        {"step": state.step},
        f"checkpoint_dir {ckpt_dir} must be one directory that every rank reads (a shared filesystem), "
        "holding the same checkpoints.",
    )
    device = comm_device()
    with torch.no_grad():
        for p in model.parameters():
            buffer = p.detach().to(device)
            dist.broadcast(buffer, src=0)
            p.copy_(buffer)
        sae = as_sae(model)
        scales = torch.tensor([sae.input_scale, sae.raw_scale], dtype=torch.float64, device=device)
        dist.broadcast(scales, src=0)
    sae.input_scale, sae.raw_scale = scales.tolist()


# ------------------------------------------------------------------------------------------------------------
# The loop
# ------------------------------------------------------------------------------------------------------------


def train(
    model: nn.Module,
    activations: torch.Tensor | np.ndarray | Iterable[torch.Tensor | np.ndarray],
    config: TrainConfig | None = None,
    checkpoint_dir: str | Path | None = None,
    progress: bool = True,
    callback: Callable[[StepStats], None] | None = None,
    stop: Callable[[StepStats], bool] | None = None,
) -> TrainResult:
    """Train `model` for config.steps steps on raw activations; returns the per-step history.

    model: a TSAE, a ReLUSAE or a module of one's own (see the module docstring); checkpoints hold its own
    state_dict.
    activations: a (n, d) tensor or array on any device, shuffled by a seeded generator, or an iterable of
    (batch, d) batches. Batches go to the model's device, where the result's tensors are. With
    `checkpoint_dir`, the run resumes from the latest checkpoint there and saves one every
    config.checkpoint_every steps and at the end; an iterator must then replay the same batches from its
    start on every call (its first `taken` batches are skipped).
    `callback(stats)` runs after each step (and after that step's checkpoint); an exception it raises stops
    the run, resumable from the last checkpoint. `stop(stats)`, asked after each step before its
    checkpoint, ends the run early when it returns True (e.g. a plateau rule, `atoms.fit`): that step is
    checkpointed and the result holds the steps so far. With `config.cuda_graph` the steps run through a
    GraphedTrainStep and their stats arrive a period at a time (`TrainConfig.cuda_graph`).

    Under torchrun (an initialised process group), call `train` on every rank with the same model
    construction, activations and config; see the module docstring. checkpoint_dir must be a directory every
    rank reads (rank 0 writes it), only rank 0 prints progress, and `callback` runs on every rank with the
    same (global) stats.
    """
    config = TrainConfig() if config is None else config
    sae = _sae(model, config)
    source = _source(activations, sae, config)
    optimizer = make_optimizer(model, config)
    state = TrainState.start(model, config)
    history: list[StepStats] = []
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    resume = latest_checkpoint(ckpt_dir) if ckpt_dir is not None and ckpt_dir.is_dir() else None
    rank = world()[0]
    if resume is not None:
        history = _load_checkpoint(resume, model, optimizer, state, source)
        if progress and rank == 0:
            print(f"resumed from {resume} at step {state.step}", file=sys.stderr)
    elif config.fit_input_scale and sae is model:
        sae.fit_input_scale(source.sample(config.input_scale_samples, config.seed + 1))
    if is_distributed():
        _synchronise_start(model, state, ckpt_dir)
    if ckpt_dir is not None and rank == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
    # After the input scale is fitted or restored: the rows are whitened at the scale the steps use.
    scaled = _whiten_once(source, sae, config)

    graphed = _GraphedSteps(model, optimizer, state, source, scaled) if config.cuda_graph else None

    def next_steps() -> list[StepStats]:
        """The next step's stats (a period's, or none yet, through the graph)."""
        if graphed is None:
            return [train_step(model, optimizer, source.next(), state, scaled=scaled)]
        at_checkpoint = ckpt_dir is not None and (state.step + 1) % config.checkpoint_every == 0
        return graphed(flush=at_checkpoint or state.step + 1 == config.steps)

    while state.step < config.steps:
        steps = next_steps()
        if not steps:
            continue
        stopping = False
        for stats in steps:
            history.append(stats)
            stopping = stopping or (stop is not None and bool(stop(stats)))
        last = stopping or state.step == config.steps
        if ckpt_dir is not None and (state.step % config.checkpoint_every == 0 or last):
            if rank == 0:
                _save_checkpoint(ckpt_dir, model, optimizer, state, source, history)
            if is_distributed():
                # No rank runs ahead of (or reports past) a checkpoint that is not yet on disk.
                dist.barrier()
        for stats in steps:
            if (
                progress
                and rank == 0
                and (stats.step % config.log_every == 0 or (stats.step == state.step and last))
            ):
                print(
                    f"step {stats.step}/{config.steps}  loss {stats.loss:.4g}  recon {stats.recon_loss:.4g}  "
                    f"l0 {stats.l0:.1f}  dead {stats.dead}  lambda {stats.coefficient:.3g}",
                    file=sys.stderr,
                )
            if callback is not None:
                callback(stats)
        if stopping:
            break

    device = model.W_dec.device
    columns = {
        name: torch.tensor(
            [getattr(s, name) for s in history],
            dtype={"dead": torch.int64, "sparse": torch.bool}.get(name, torch.float64),
            device=device,
        )
        for name in _HISTORY
    }
    return TrainResult(**columns, final_coefficient=state.coefficient, dead_latents=state.dead_latents())
