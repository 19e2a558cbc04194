"""Training to convergence: `atoms.train.train` stopped by the plateau rule on held-out reconstruction.

`fit_to_plateau` evaluates the model on validation rows (kept out of its training rows) every
`rule.eval_every` steps, feeds the loss and mean L0 to `atoms.convergence.PlateauRule`, and stops when the
rule declares a plateau, when `config.steps` run out, or at a wall-clock deadline; the result says which. The
evaluations are written beside the checkpoints (atomically) so an interrupted run resumes with the rule's
history and ends exactly as an uninterrupted one; a run that already stopped is loaded, not trained further.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from atoms.convergence import Convergence, PlateauRule
from atoms.errors import BadInputError
from atoms.train import StepStats, TrainConfig, TrainResult, latest_checkpoint, train
from atoms.tsae import as_sae

__all__ = ["Evaluation", "FitResult", "fit_to_plateau", "validation_loss"]

EVALUATIONS_FILE = "evaluations.json"
# Validation rows per forward pass: (chunk, n_atoms) temporaries stay small.
_CHUNK = 4096


class Evaluation(NamedTuple):
    """One held-out evaluation during training."""

    step: int
    recon_loss: float
    """Mean reconstruction loss on the validation rows, in the model's loss norm."""
    l0: float
    """Mean active latents per validation row."""


class FitResult(NamedTuple):
    """What `fit_to_plateau` returns."""

    result: TrainResult
    """The per-step history (atoms.train)."""
    convergence: Convergence
    """The plateau rule's decision at the end, with its reason."""
    evaluations: list[Evaluation]
    """Every validation evaluation, in step order."""
    stopped_by: str
    """"plateau", "steps" (config.steps ran out) or "deadline"."""


@torch.no_grad()
def validation_loss(model: nn.Module, rows: torch.Tensor) -> tuple[float, float]:
    """(mean reconstruction loss, mean L0) of `model` on raw activation rows (n, d), in chunks."""
    sae = as_sae(model)
    total = l0 = 0.0
    for s in range(0, rows.shape[0], _CHUNK):
        chunk = rows[s : s + _CHUNK]
        out = sae.training_loss(chunk, sparse=False)
        total += float(out.recon_loss) * chunk.shape[0]
        l0 += float(out.l0) * chunk.shape[0]
    return total / rows.shape[0], l0 / rows.shape[0]


def _read_evaluations(folder: Path, up_to: int) -> tuple[list[Evaluation], dict[str, Any] | None]:
    path = folder / EVALUATIONS_FILE
    if not path.is_file():
        return [], None
    saved = json.loads(path.read_text())
    evaluations = [Evaluation(*e) for e in saved["evaluations"] if e[0] <= up_to]
    stopped = saved.get("stopped")
    return evaluations, stopped if stopped is not None and stopped["step"] == up_to else None


def _write_evaluations(folder: Path, evaluations: list[Evaluation], stopped: dict[str, Any] | None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / EVALUATIONS_FILE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"evaluations": [list(e) for e in evaluations], "stopped": stopped}))
    os.replace(tmp, path)


def _checkpoint_step(folder: Path | None) -> int:
    found = latest_checkpoint(folder) if folder is not None and folder.is_dir() else None
    return int(found.stem.split("_")[1]) if found is not None else 0


def fit_to_plateau(
    model: nn.Module,
    activations: torch.Tensor,
    validation: torch.Tensor,
    config: TrainConfig,
    rule: PlateauRule,
    *,
    checkpoint_dir: str | Path | None = None,
    deadline: float | None = None,
    callback: Callable[[StepStats], None] | None = None,
) -> FitResult:
    """Train `model` on activations (n, d) until the plateau rule holds on `validation` (m, d), at most
    config.steps steps, or until time.perf_counter() passes `deadline`.

    The rule's target L0, when it has one, should be config.target_l0. With `checkpoint_dir` the run
    resumes (checkpoints and evaluations) and a finished one is returned as it ended.
    """
    if validation.ndim != 2 or validation.shape[0] < 1:
        raise BadInputError(f"validation must be a non-empty (m, d) tensor, got {tuple(validation.shape)}.")
    folder = Path(checkpoint_dir) if checkpoint_dir is not None else None
    resumed = _checkpoint_step(folder)
    evaluations, stopped = _read_evaluations(folder, resumed) if folder is not None else ([], None)
    tracker = rule.tracker()
    for e in evaluations:
        tracker.update(e.step, e.recon_loss, e.l0)
    if stopped is not None:
        config = replace(config, steps=resumed)  # the run already ended here: load it, train no further
    validation = validation.to(as_sae(model).W_dec.device)
    why = {"stopped_by": "steps"}

    def stop(stats: StepStats) -> bool:
        if rule.due(stats.step):
            loss, l0 = validation_loss(model, validation)
            evaluations.append(Evaluation(stats.step, loss, l0))
            decision = tracker.update(stats.step, loss, l0)
            if decision.converged:
                why["stopped_by"] = "plateau"
        if why["stopped_by"] == "steps" and deadline is not None and time.perf_counter() > deadline:
            why["stopped_by"] = "deadline"
        done = why["stopped_by"] != "steps" or stats.step == config.steps
        if folder is not None and (rule.due(stats.step) or done):
            record = {"step": stats.step, "by": why["stopped_by"]} if done else None
            _write_evaluations(folder, evaluations, record)
        return why["stopped_by"] != "steps"

    result = train(
        model, activations, config, checkpoint_dir=folder, progress=False, callback=callback, stop=stop
    )
    if stopped is not None:
        why["stopped_by"] = stopped["by"]
    convergence = tracker.finalize()
    if why["stopped_by"] == "deadline" and not convergence.converged:
        convergence = convergence._replace(reason=convergence.reason.replace("budget", "time budget", 1))
    return FitResult(result, convergence, evaluations, why["stopped_by"])
