"""The capacity-vs-data sweep (SPEC theorem 5) on one layer: does a large enough dictionary fit its data?

TSAEs of n_atoms = m d for each multiple m of `sweep_multiples`, each trained on a random subset of the fit
tokens of each size in `sweep_tokens`, at the main sparsity; the R^2 on their own training vectors (with a
bootstrap interval) is what atoms.verdicts' jump rule reads.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from atoms.activations import Capture
from atoms.aip import AIP
from atoms.dictionary import Dictionary
from atoms.errors import BadInputError
from atoms.evidence import r2_statistic, seed_interval
from atoms.experiment_cache import CacheKeys
from atoms.experiment_config import ExperimentConfig
from atoms.experiment_definitions import Keys, each
from atoms.experiment_metrics import random_rows, sample_coherence
from atoms.experiment_progress import Progress
from atoms.experiment_training import encode, fit_sae, new_sae, plateau_rule, train_config
from atoms.metrics import q_star, r2

__all__ = ["SWEEP", "sweep"]

_CELL = Keys(
    {
        "multiple": "Dictionary size in multiples of d.",
        "n_atoms": "Dictionary size.",
        "tokens": "Training vectors available to the cell (a random subset of the fit tokens).",
        "r2_train_euclidean": "R^2 on the cell's own training vectors, Euclidean norm.",
        "r2_train_interval": each("95% bootstrap interval of r2_train_euclidean (low, high)."),
        "r2_train_aip": "R^2 on the cell's own training vectors, AIP norm.",
        "r2_heldout_euclidean": "R^2 on the held-out tokens, Euclidean norm.",
        "r2_heldout_aip": "R^2 on the held-out tokens, AIP norm.",
        "l0": "Mean l0 on the held-out tokens.",
        "q_star_quantile": "q* (quantile form, AIP) on q_samples held-out tokens.",
        "q_star_per_sample": "q* (per-sample form, AIP) on q_samples held-out tokens.",
        "steps": "Optimizer steps the cell trained (it stops at the plateau rule).",
        "converged": "Whether the cell's training converged by the plateau rule (on its own vectors).",
        "convergence_reason": "Why the cell's training counts as converged or not, in words.",
        "seconds": "Wall seconds of the cell when it ran.",
    }
)
SWEEP = Keys(
    {
        "layer": "Layer of the capacity-vs-data sweep.",
        "steps": "Optimizer steps of every sweep cell.",
        "batch_size": "Batch size of every sweep cell.",
        "cells": each(_CELL),
        "seconds": "Wall seconds of the sweep when it ran.",
    }
)
"""The results' "sweep" (null without --sweep)."""


def sweep(
    layer: int,
    config: ExperimentConfig,
    fit_cap: Capture,
    held_cap: Capture,
    work: Path,
    keys: CacheKeys,
    bars: Progress,
) -> dict[str, Any]:
    """The sweep's record (SWEEP); each cell's training resumes from its checkpoints under `work`."""
    start = time.perf_counter()
    x = fit_cap.activations(layer)
    h = held_cap.activations(layer)
    d = x.shape[1]
    aip = AIP.from_moment(fit_cap.moments[layer], ridge=config.ridge)
    sizes = [t for t in config.sweep_tokens if t <= x.shape[0]]
    if not sizes:
        raise BadInputError(
            f"every sweep token count {config.sweep_tokens} exceeds the {x.shape[0]} fit tokens; lower "
            "sweep_tokens or raise fit_tokens."
        )
    order = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(config.seed + 3))
    sample_rows = random_rows(h.shape[0], config.q_samples, config.seed + 2)
    cells = []
    for multiple in config.sweep_multiples:
        for tokens in sizes:
            cell_start = time.perf_counter()
            subset = x[order[:tokens]]
            n_atoms = multiple * d
            batch = min(config.sweep_batch_size, tokens)
            tc = train_config(config, tokens, config.sweep_steps, batch, config.main_l0)
            rule = plateau_rule(config, config.main_l0)
            model = new_sae("atoms", d, n_atoms, aip, config, seed=config.seed).to(config.device)
            key = keys.training(tc, model.config(), rule, sweep=True)
            folder = work / "sweep" / f"layer_{layer:03d}" / f"m{multiple}_t{tokens}-{key}"
            # The claim is about fitting the training vectors: the plateau is read on them.
            label = f"sweep: {multiple}d atoms, {tokens} tokens"
            fit, _ = fit_sae(model, subset, subset, tc, rule, folder, None, bars, label)
            model.eval()
            _, x_hat_train = encode(model, subset.to(config.device))
            codes, x_hat = encode(model, h.to(config.device))
            dic = Dictionary(model.dictionary()[0], aip)
            mu, l0 = sample_coherence(dic, codes[sample_rows])
            r2_train = seed_interval([r2_statistic(subset, x_hat_train, seed=config.seed)])
            cells.append(
                _CELL.build(
                    multiple=multiple,
                    n_atoms=n_atoms,
                    tokens=tokens,
                    r2_train_euclidean=r2_train.estimate,
                    r2_train_interval=[r2_train.low, r2_train.high],
                    r2_train_aip=r2(subset, x_hat_train, aip),
                    r2_heldout_euclidean=r2(h, x_hat),
                    r2_heldout_aip=r2(h, x_hat, aip),
                    l0=float((codes != 0).sum(dim=1).double().mean()),
                    q_star_quantile=q_star(mu, l0, form="quantile").value,
                    q_star_per_sample=q_star(mu, l0, form="per_sample").value,
                    steps=int(fit.result.loss.numel()),
                    converged=fit.convergence.converged,
                    convergence_reason=fit.convergence.reason,
                    seconds=time.perf_counter() - cell_start,
                )
            )
    return SWEEP.build(
        layer=layer,
        steps=config.sweep_steps,
        batch_size=config.sweep_batch_size,
        cells=cells,
        seconds=time.perf_counter() - start,
    )
