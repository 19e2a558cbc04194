"""The settings of `atoms run`: `ExperimentConfig`, its presets, its validation and its field documentation.

One dataclass with a docstring per field (the sparsify way): `field_docs` reads those docstrings back, so the
results carry each setting's documentation (`meta.config_docs`) from the same text a reader of this file
sees. Which settings enter which cache key is decided in `atoms.experiment_cache`, field by field.
"""

from __future__ import annotations

import ast
import inspect
import itertools
import math
import textwrap
from dataclasses import dataclass
from typing import Any

from atoms.errors import BadInputError
from atoms.models import DEFAULT_MODEL

__all__ = ["ExperimentConfig", "field_docs", "preset_config"]


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
    fit_tokens: int = 196_608
    """Tokens per layer captured from the fit articles: the AIP is estimated and the SAEs are trained on
    them. Measured at layer 9 on 2 CPU cores: capture takes about 75 s; with 32,768 tokens the SAEs saw
    each token some 50 times and overfitted (held-out loss 0.49 against 0.35 on training rows, held-out
    L0 10-25% above its target), with 196,608 the TSAE's held-out L0 settled within 2% of its target."""
    heldout_tokens: int = 16_384
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
    steps: int = 6000
    """Most optimizer steps of each SAE training: it stops earlier when the plateau rule holds (min_steps,
    eval_every, plateau_window, plateau_tol, l0_tol), and a run that reaches this many first is reported as
    not converged."""
    batch_size: int = 512
    """Activation vectors per training step. Measured: at equal compute, 240 steps of 512 gave a higher R^2
    than 60 steps of 2048."""
    lr: float = 2e-3
    """Adam learning rate after warm-up."""
    adam_beta1: float = 0.9
    """Adam's beta1 (TrainConfig.betas[0]). Measured on SmolLM2 layer 9 (TSAE, L0 32, 3000 steps of 512, one
    exploratory pair of runs on 2026-12-05, not a committed script): at 0, the JumpReLU paper's choice, each
    step moves the thresholds by about the learning rate, so the held-out L0 swung between 26.7 and 35.7 and
    the held-out loss with it (+-4% between evaluations); at 0.9 the L0 stayed within 31.1-32.8 and the loss
    fell smoothly, so the plateau rule reads the trend, not the swing. docs/l0_controller.md has the held-out
    L0 at 0.9 for both SAEs (window spread 4-7%)."""
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
    validation_rows: int = 4096
    """Most rows held out for validation (the rest of validation_fraction trains). The plateau rule compares
    the same rows at every evaluation, so a few thousand decide it; measured at layer 9 on 2 cores, an
    evaluation took 0.4 s on 4096 rows and 2-4.7 s on 18,000, against 40-280 ms a training step."""
    target_l0_gain: float = 0.01
    """Integral gain of the target-L0 controller (TrainConfig.target_l0_gain)."""
    target_l0_damping: float = 0.0
    """Proportional gain of the target-L0 controller (TrainConfig.target_l0_damping). 0: the integral
    controller alone; docs/l0_controller.md compares it with a proportional-integral setting on real
    activations: at adam_beta1 0.9 both held the held-out L0 within 1% of its target on average, and the
    integral controller alone reached the lower validation loss for both SAEs."""
    target_l0_smoothing: float = 1.0
    """Weight of the newest batch in the controller's filtered L0 error (TrainConfig.target_l0_smoothing);
    1: no smoothing."""
    budget_minutes: float | None = 13.5
    """Wall-clock budget of the whole run: the SAE trainings share what is left after the capture (less
    METRICS_SECONDS per training for its metrics), and one that reaches its share stops there, reported as
    not converged. None: no budget. The default keeps `make demo` within 15 minutes on 2 CPU cores (the
    model load and the report come on top: about 20 s here)."""
    bandwidth: float = 0.01
    """Bandwidth e of the TSAE's threshold pseudo-derivatives. From the sweep on SmolLM2 layer 9
    (docs/jumprelu_defaults.md, `docs/jumprelu_sweep.py`, with this config's training settings): every
    (e, theta_0) in {0.001, 0.01, 0.05} x {0.001, 0.01} reached the target L0 without stalling, within 0.3
    points of held-out AIP R^2 of each other; the tie goes to the held-out L0 closest to the target,
    (0.01, 0.01) at 33.1 for 32. (With Adam beta1 at 0, e = 0.05 kept the held-out L0 some 15% above the
    target.) A narrower window is also cheaper: the sparse step touches every window entry."""
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
    sweep_tokens: tuple[int, ...] = (2048, 4096, 8192, 32_768)
    """Training-set sizes of the sweep (random subsets of the fit tokens; sizes above fit_tokens are
    skipped). The two smallest are at most the largest dictionary (8d = 4608 at d = 576), so the claim
    predicts the whole shape of their rows, jump included; the larger ones test that the critical n_atoms
    grows with the data."""
    sweep_steps: int = 12_000
    """Most optimizer steps of each sweep cell; each stops earlier at the plateau rule, read on its own
    training vectors. 200 left every cell of the default grid unconverged; with 12,000, 14 of its 16 cells
    reach their plateau on SmolLM2 layer 9 (README, "Capacity against data")."""
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
        counts |= {"plateau_window": 2, "min_steps": 0, "validation_rows": 1}
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
        if not (isinstance(self.target_l0_damping, (int, float)) and 0 <= self.target_l0_damping < math.inf):
            raise BadInputError(
                "ExperimentConfig.target_l0_damping must be a finite number >= 0, got "
                f"{self.target_l0_damping!r}."
            )
        if not (isinstance(self.adam_beta1, (int, float)) and 0 <= self.adam_beta1 < 1):
            raise BadInputError(f"ExperimentConfig.adam_beta1 must lie in [0, 1), got {self.adam_beta1!r}.")
        if not (isinstance(self.target_l0_smoothing, (int, float)) and 0 < self.target_l0_smoothing <= 1):
            raise BadInputError(
                f"ExperimentConfig.target_l0_smoothing must lie in (0, 1], got {self.target_l0_smoothing!r}."
            )
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
        H100/H200 with SmolLM2-135M (kernels/NOTES.md).

        The Wikipedia sample's fit articles hold about 561k tokens (its held-out ones 153k), so the preset
        asks for 524,288 fit tokens, which it can deliver; 50M vectors are then about 100 passes over them,
        judged by the plateau rule on held-out validation rows. More text (`--text`) gives more distinct
        tokens for the same steps."""
        preset: dict[str, Any] = {
            "device": "cuda",
            "fit_tokens": 524_288,
            "heldout_tokens": 65_536,
            "batch_size": 4096,
            "steps": 40_000,
            "min_steps": 12_300,
            "eval_every": 500,
            "lr": 5e-4,
            "lr_warmup_steps": 500,
            "sparsity_warmup_steps": 2000,
            "q_samples": 65_536,
            "validation_rows": 65_536,
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


def preset_config(name: str) -> ExperimentConfig:
    """The untouched preset `name` ("default", "quick" or "gpu")."""
    return {"quick": ExperimentConfig.quick, "gpu": ExperimentConfig.gpu}.get(name, ExperimentConfig)()


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
