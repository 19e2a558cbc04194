"""Training of the experiment's SAEs: their settings, the plateau rule, the wall-clock budget, the record.

A layer trains the features (`ReLUSAE`, Euclidean) and the atoms (`TSAE` under the AIP) at every target L0
of the frontier, `seeds` times at the main one (`runs`); each trains to the plateau rule on the fit tokens
less a validation part (`split_fit`), resumes from its checkpoints, and stops at its share of the budget.
"""

from __future__ import annotations

import itertools
import time
from pathlib import Path
from typing import Any

import torch

from atoms.aip import AIP
from atoms.convergence import PlateauRule
from atoms.experiment_config import ExperimentConfig
from atoms.experiment_definitions import Keys
from atoms.experiment_progress import Progress
from atoms.fit import FitResult, fit_to_plateau
from atoms.train import StepStats, TrainConfig, TrainResult
from atoms.tsae import TSAE, ReLUSAE, SparseAutoencoder

__all__ = [
    "KIND_WEIGHT",
    "METRICS_SECONDS",
    "TRAINING",
    "Budget",
    "encode",
    "fit_sae",
    "new_sae",
    "plateau_rule",
    "runs",
    "split_fit",
    "train_config",
    "training_record",
]

# Training-curve points kept per run for the figure.
CURVE_POINTS = 60
# Wall seconds the budget sets aside per trained SAE for its metrics (encoding, q*, certified fractions,
# intervals): measured about 4 s at 2304 x 576 with 16384 held-out tokens on 2 shared CPU cores, since ERC
# solves by QR (it was 18-20 s); twice that is set aside so a slower machine still ends within the budget.
METRICS_SECONDS = 8.0
# Rows per chunk when encoding activations through an SAE: (chunk, n_atoms) float32 temporaries stay small.
ENCODE_CHUNK = 2048

_VALIDATION = Keys(
    {
        "step": "Steps at which the validation loss was evaluated.",
        "recon_loss": "Validation reconstruction loss at those steps (fit tokens held out of training).",
        "l0": "Mean validation L0 at those steps.",
    }
)
_CURVE = Keys(
    {
        "step": "Steps at which the training curve is sampled.",
        "recon_loss": "Reconstruction loss at those steps.",
        "l0": "Mean training-batch l0 at those steps.",
    }
)
_CONVERGENCE = Keys(
    {
        "converged": "Whether the plateau rule held when training stopped.",
        "reason": "Why the training counts as converged or not, in words.",
        "stopped_by": "What stopped the training: the plateau rule, the step limit or the budget.",
        "validation": _VALIDATION,
    }
)
TRAINING = Keys(
    {
        "steps": "Optimizer steps of the SAE.",
        "max_steps": "Most optimizer steps the run was allowed (ExperimentConfig.steps).",
        "batch_size": "Training vectors per step.",
        "tokens_seen": "Training vectors seen (steps x batch size).",
        "epochs": "Passes over the fit tokens (tokens_seen / fit_tokens).",
        "lr": "Adam learning rate after warm-up.",
        "target_l0": "Mean L0 the target-L0 controller aimed at.",
        "coefficient": "Sparsity coefficient lambda (L0 for the TSAE, L1 for the ReLU SAE).",
        "input_scale": "Scale s putting the SAE's inputs at unit mean squared norm.",
        "final_recon_loss": "Reconstruction loss of the last step (at unit mean squared norm).",
        "final_l0": "Mean l0 of the last training batch.",
        "sparse_steps": "Steps that took the sparse training path (atoms.kernels.sparse_step).",
        "seconds": "Wall seconds of the training when it ran.",
        "curve": _CURVE,
        "convergence": _CONVERGENCE,
    }
)
"""A trained dictionary's "training" record."""


def new_sae(
    kind: str, d: int, n_atoms: int, aip: AIP, config: ExperimentConfig, seed: int
) -> SparseAutoencoder:
    """An untrained SAE of `kind`: "atoms" a TSAE under the AIP, else (features) a Euclidean ReLU SAE."""
    if kind == "atoms":
        return TSAE(
            d,
            n_atoms,
            aip,
            bandwidth=config.bandwidth,
            threshold_init=config.threshold_init,
            l0_coefficient=config.l0_coefficient,
            seed=seed,
        )
    return ReLUSAE(d, n_atoms, l1_coefficient=config.l1_coefficient, seed=seed)


def _curve(result: TrainResult) -> dict[str, list[float]]:
    """At most CURVE_POINTS points, each the mean over a bin of consecutive steps (its last step labels it).

    Means rather than single steps: a run whose loss alternates between odd and even steps, sampled every
    ~4 steps, would otherwise show jumps where the sampling switches parity."""
    n = result.loss.numel()
    edges = torch.linspace(0, n, min(n, CURVE_POINTS) + 1).round().long().unique()
    bins = list(itertools.pairwise(edges.tolist()))
    return _CURVE.build(
        step=[b for _, b in bins],
        recon_loss=[float(result.recon_loss[a:b].mean()) for a, b in bins],
        l0=[float(result.l0[a:b].mean()) for a, b in bins],
    )


# A frontier point (a sparsity other than main_l0) gets this share of the budget a verdict row's training
# gets: the verdict table rests on the main sparsity's seeds, the frontier only plots R^2 against L0.
FRONTIER_SHARE = 0.25
# Time each kind needs to plateau, relative to the TSAE: at the main job's settings the ReLU SAE took 5,700
# steps against the TSAE's 3,500, at the same steps per second (docs/l0_controller.md).
KIND_WEIGHT = {"atoms": 1.0, "features": 1.6}


def budget_weight(config: ExperimentConfig, kind: str, target: float) -> float:
    """The share of the budget a training of `kind` at `target` mean L0 gets, relative to a main-sparsity
    TSAE seed's."""
    return KIND_WEIGHT[kind] * (1.0 if target == config.main_l0 else FRONTIER_SHARE)


class Budget:
    """The run's wall-clock budget, shared by the SAE trainings still to run in proportion to their
    weights, after setting aside the metrics still to compute."""

    def __init__(self, minutes: float | None) -> None:
        self.end = None if minutes is None else time.perf_counter() + 60.0 * minutes
        self.trainings = 1
        """Trainings still to run (`plan` sets it once the run knows them)."""
        self.weight = 1.0
        """Their weights' sum (`budget_weight`)."""
        self.unmeasured = 1
        """Trainings whose metrics are still to compute: a layer computes them after all its trainings."""

    def plan(self, weights: list[float]) -> None:
        """The trainings still to run, by their weights."""
        self.trainings, self.weight, self.unmeasured = len(weights), float(sum(weights)), len(weights)

    def measured(self, trainings: int) -> None:
        """A layer computed the metrics of `trainings` trainings: their reserve is free again."""
        self.unmeasured = max(0, self.unmeasured - trainings)

    def share(self, weight: float = 1.0) -> float | None:
        """Seconds a training of `weight` would get if it started now: its weight's part of the time left once
        METRICS_SECONDS is set aside for each training whose metrics are still to compute; None without a
        budget."""
        if self.end is None:
            return None
        spare = self.end - time.perf_counter() - METRICS_SECONDS * self.unmeasured
        return max(0.0, spare) * weight / max(weight, self.weight)

    def deadline(self, weight: float = 1.0) -> float | None:
        """The deadline of the next training, of `weight` (a training that stops early leaves its unused
        time to the ones after it)."""
        share = self.share(weight)
        self.trainings = max(0, self.trainings - 1)
        self.weight = max(0.0, self.weight - weight)
        return None if share is None else time.perf_counter() + share


def plateau_rule(config: ExperimentConfig, target: float) -> PlateauRule:
    """The rule that stops a training at `target` mean L0 (atoms.convergence.PlateauRule)."""
    return PlateauRule(
        eval_every=config.eval_every,
        window=config.plateau_window,
        rel_tol=config.plateau_tol,
        l0_tol=config.l0_tol,
        target_l0=target,
        min_steps=config.min_steps,
    )


def fit_sae(
    model: SparseAutoencoder,
    train_x: torch.Tensor,
    val_x: torch.Tensor,
    tc: TrainConfig,
    rule: PlateauRule,
    folder: Path,
    deadline: float | None,
    bars: Progress,
    label: str,
) -> tuple[FitResult, float]:
    """Train to the plateau rule (or resume, or load the finished run); returns (fit, seconds)."""
    update = bars.task(label, tc.steps)
    start = time.perf_counter()

    def tick(stats: StepStats) -> None:
        if stats.step >= tc.steps:
            return  # the last step: the line that ends the task says why it stopped
        update(completed=stats.step, description=f"{label}  recon {stats.recon_loss:.3f}  l0 {stats.l0:.0f}")

    fit = fit_to_plateau(
        model, train_x, val_x, tc, rule, checkpoint_dir=folder, deadline=deadline, callback=tick
    )
    steps = int(fit.result.loss.numel())
    update(total=steps, completed=steps, description=f"{label}: stopped by {fit.stopped_by} at step {steps}")
    return fit, time.perf_counter() - start


@torch.no_grad()
def encode(model: SparseAutoencoder, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes (n, n_atoms) float32 and reconstructions (n, d) float32 of activations x, on the CPU."""
    codes, recon = [], []
    for s in range(0, x.shape[0], ENCODE_CHUNK):
        out = model(x[s : s + ENCODE_CHUNK])
        codes.append(out.codes.float().cpu())
        recon.append(out.x_hat.float().cpu())
    return torch.cat(codes), torch.cat(recon)


def training_record(
    model: SparseAutoencoder, fit: FitResult, tc: TrainConfig, n_fit: int, target: float, seconds: float
) -> dict[str, Any]:
    """The "training" record of a fitted SAE (TRAINING); n_fit: the training rows it drew batches from."""
    result = fit.result
    steps = int(result.loss.numel())
    validation = _VALIDATION.build(
        step=[e.step for e in fit.evaluations],
        recon_loss=[e.recon_loss for e in fit.evaluations],
        l0=[e.l0 for e in fit.evaluations],
    )
    return TRAINING.build(
        steps=steps,
        max_steps=tc.steps,
        batch_size=tc.batch_size,
        tokens_seen=steps * tc.batch_size,
        epochs=steps * tc.batch_size / n_fit,
        lr=tc.lr,
        target_l0=target,
        coefficient=result.final_coefficient,
        input_scale=model.input_scale,
        final_recon_loss=float(result.recon_loss[-1]),
        final_l0=float(result.l0[-1]),
        sparse_steps=int(result.sparse.sum()),
        seconds=seconds,
        curve=_curve(result),
        convergence=_CONVERGENCE.build(
            converged=fit.convergence.converged,
            reason=fit.convergence.reason,
            stopped_by=fit.stopped_by,
            validation=validation,
        ),
    )


def train_config(
    config: ExperimentConfig, n_fit: int, steps: int, batch_size: int, target: float | None
) -> TrainConfig:
    """The TrainConfig of one SAE: n_fit training rows, `steps` at most, `target` mean L0 (None: none)."""
    return TrainConfig(
        lr=config.lr,
        betas=(config.adam_beta1, TrainConfig.betas[1]),
        batch_size=batch_size,
        steps=steps,
        lr_warmup_steps=config.lr_warmup_steps,
        sparsity_warmup_steps=config.sparsity_warmup_steps,
        target_l0=target,
        target_l0_gain=config.target_l0_gain,
        target_l0_damping=config.target_l0_damping,
        target_l0_smoothing=config.target_l0_smoothing,
        seed=config.seed,
        dead_window=n_fit,
        # Every fifth evaluation: a resumed run replays at most that many evaluation intervals.
        checkpoint_every=5 * config.eval_every,
        input_scale_samples=min(n_fit, 16_384),
    )


def split_fit(x: torch.Tensor, config: ExperimentConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(training rows, validation rows) of the fit tokens x (n, d): a seeded random validation_fraction, at
    most validation_rows."""
    order = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(config.seed + 4))
    n_val = max(1, min(config.validation_rows, round(config.validation_fraction * x.shape[0])))
    return x[order[n_val:]], x[order[:n_val]]


def runs(config: ExperimentConfig) -> list[tuple[str, float, int]]:
    """(kind, target L0, seed index) of every SAE a layer trains: every sparsity once, main_l0 per seed.

    In the order the budget should serve them: the main sparsity's seeds first (the verdict table's rows;
    atoms, the paper's subject, before features), then the frontier's other points. A training that
    plateaus early leaves its unused share to the ones after it (`Budget`).
    """
    main = [(kind, config.main_l0, s) for kind in ("atoms", "features") for s in range(config.seeds)]
    others = [t for t in config.l0_targets if t != config.main_l0]
    return main + [(kind, target, 0) for kind in ("atoms", "features") for target in others]
