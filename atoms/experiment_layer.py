"""One layer of the experiment, from its captured activations to its finished results.

The AIP fitted on the fit tokens, the representation shift, the SAEs at every sparsity and seed
(atoms.experiment_training), the metrics of neurons, features and atoms on the held-out tokens
(atoms.experiment_metrics), the frontier, the claims' evidence (atoms.experiment_claims) and the cards.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from atoms.activations import Capture
from atoms.aip import AIP
from atoms.cards import make_cards
from atoms.dictionary import Dictionary
from atoms.errors import BadInputError
from atoms.evidence import angle_means, q_star_quantile, statistic
from atoms.experiment_cache import CacheKeys
from atoms.experiment_claims import CLAIM, SEED, claims, seed_statistics
from atoms.experiment_config import ExperimentConfig
from atoms.experiment_definitions import Keys, each
from atoms.experiment_metrics import (
    DICTIONARY,
    FRONTIER,
    dictionary_metrics,
    frontier_point,
    random_rows,
    sample_coherence,
    window,
)
from atoms.experiment_progress import Progress, timed
from atoms.experiment_shift import SHIFT, representation_shift
from atoms.experiment_training import (
    Budget,
    budget_weight,
    encode,
    fit_sae,
    new_sae,
    plateau_rule,
    runs,
    split_fit,
    train_config,
    training_record,
)
from atoms.metrics import neuron_dictionary
from atoms.tsae import save_saelens

__all__ = ["KINDS", "LAYER", "layer_results"]

KINDS = ("neurons", "features", "atoms")

_AIP = Keys(
    {
        "condition_number": "Condition number of the second moment C (after any ridge).",
        "ridge": "Relative ridge added to C: C + ridge * trace(C)/d * I.",
        "n_samples": "Fit tokens behind C.",
        "whitened_mean_norm": "Norm of the mean of the whitened held-out activations (0 for centred data; "
        "the uncentered C keeps the mean in the metric).",
    }
)
_EXAMPLE = Keys(
    {
        "row": "Held-out capture row of the example token.",
        "value": "The latent's value on the example token.",
        "token": "The example token, decoded.",
        "before": "The tokens of its chunk just before it, decoded.",
        "after": "The tokens of its chunk just after it, decoded.",
        "source": "Title of the document the token comes from.",
    }
)
_CARD = Keys(
    {
        "kind": "What the latent is: atom, feature or neuron.",
        "latent": "Index of the latent shown on the card.",
        "fires": "Fraction of held-out tokens on which the latent is positive.",
        "examples": each(_EXAMPLE),
    }
)
LAYER = Keys(
    {
        "layer": "Decoder block index (layer i is the output of block i).",
        "aip": _AIP,
        "shift": SHIFT,
        "dictionaries": each(DICTIONARY),
        "frontier": each(each(FRONTIER)),
        "seeds": each(SEED),
        "claims": each(CLAIM),
        "cards": each(each(_CARD)),
        "seconds": each("Wall seconds of a step of this layer when it was computed."),
    }
)
"""An entry of the results' "layers"."""


def layer_results(
    layer: int,
    config: ExperimentConfig,
    fit_cap: Capture,
    held_cap: Capture,
    tokenizer: Any,
    heldout_titles: list[str],
    work: Path,
    out_dir: Path,
    keys: CacheKeys,
    bars: Progress,
    budget: Budget,
) -> dict[str, Any]:
    """Everything of one layer (LAYER): AIP, representation shift, SAEs at every sparsity and seed, metrics,
    the frontier, the window, the claims' evidence, cards.

    work: the folder of this capture's trainings (checkpoints resume from there); out_dir: where the trained
    SAEs (main sparsity, first seed) are saved in SAELens format; keys: the run's cache keys.
    """
    seconds: dict[str, float] = {}
    x = fit_cap.activations(layer)
    h = held_cap.activations(layer)
    d = x.shape[1]
    n_atoms = config.n_atoms or 4 * d
    train_x, val_x = split_fit(x, config)
    if train_x.shape[0] < config.batch_size:
        raise BadInputError(
            f"the fit text gave {train_x.shape[0]} training tokens at layer {layer} (after holding out "
            f"{val_x.shape[0]} for validation), fewer than batch_size = {config.batch_size}; pass more text "
            "(or a larger fit_tokens) or a smaller batch size."
        )
    aip = AIP.from_moment(fit_cap.moments[layer], ridge=config.ridge)
    aip_record = _AIP.build(
        condition_number=aip.condition_number,
        ridge=aip.ridge,
        n_samples=aip.n_samples,
        whitened_mean_norm=float(aip.whiten(h.double()).mean(dim=0).norm()),
    )
    step = bars.task(f"layer {layer}: representation shift", None)
    with timed(seconds, "representation_shift"):
        shift = representation_shift(x, h, aip, config.angle_vectors, config.seed)
        angle_rows = h[random_rows(h.shape[0], config.angle_vectors, config.seed + 1)]
        angles = {
            "euclidean": statistic(np.abs(angle_means(angle_rows) - 90.0), np.mean, seed=config.seed),
            "aip": statistic(angle_means(angle_rows, aip), np.mean, seed=config.seed),
        }
    step(total=1, completed=1)

    fitted = {}
    for kind, target, s in runs(config):
        model = new_sae(kind, d, n_atoms, aip, config, seed=config.seed + 1000 * s).to(config.device)
        tc = train_config(config, train_x.shape[0], config.steps, config.batch_size, target)
        rule = plateau_rule(config, target)
        key = keys.training(tc, model.config(), rule)
        folder = work / "train" / f"layer_{layer:03d}" / f"{kind}-l0_{target:g}-seed{s}-{key}"
        label = f"layer {layer}: {kind} ({n_atoms}), L0 {target:g}, seed {s}"
        with timed(seconds, f"train_{kind}_l0_{target:g}_seed{s}"):
            deadline = budget.deadline(budget_weight(config, kind, target))
            fit, secs = fit_sae(model, train_x, val_x, tc, rule, folder, deadline, bars, label)
        model.eval()
        record = training_record(model, fit, tc, train_x.shape[0], target, secs)
        fitted[kind, target, s] = (model, record, int(fit.result.dead_latents.sum()))
    for kind in ("features", "atoms"):
        save_saelens(
            fitted[kind, config.main_l0, 0][0],
            out_dir / "saes" / f"layer_{layer:03d}_{kind}",
            metadata={"model_name": config.model, "hook_name": f"blocks.{layer}.hook_resid_post"},
        )

    step = bars.task(f"layer {layer}: metrics", 1 + len(fitted))
    dics: dict[str, dict[str, Any]] = {}
    codes_of: dict[str, torch.Tensor] = {}
    frontier: dict[str, list[dict[str, Any]]] = {"features": [], "atoms": []}
    per_seed: dict[str, list[Any]] = {"features": [], "atoms": []}
    with timed(seconds, "metrics"):
        # Neurons: the identity basis; the code is the activation, reconstruction exact. Both row samples
        # come from one permutation, so the neurons' rows are among the SAEs' when neuron_samples is smaller.
        neuron_rows = random_rows(h.shape[0], config.neuron_samples, config.seed + 2)
        sample_rows = random_rows(h.shape[0], config.q_samples, config.seed + 2)
        dics["neurons"] = dictionary_metrics(
            neuron_dictionary(d, aip),
            neuron_dictionary(d),
            h,
            h,
            h,
            aip,
            config,
            nonneg=False,
            sample_rows=neuron_rows,
            basis=True,
            dead_training=None,
        )
        codes_of["neurons"] = h
        mu_n, l0_n = sample_coherence(neuron_dictionary(d, aip), h[neuron_rows])
        neuron_q = statistic(np.stack([mu_n.numpy(), l0_n.numpy()], 1), q_star_quantile, seed=config.seed)
        step(advance=1)
        # Metrics in the results' order (features then atoms, l0_targets' order), whatever the training order.
        in_order = sorted(fitted, key=lambda k: (k[0] != "features", config.l0_targets.index(k[1]), k[2]))
        for kind, target, s in in_order:
            model, record, dead = fitted[kind, target, s]
            codes, x_hat = encode(model, h.to(config.device))
            raw = model.dictionary()[0]
            dic_aip = Dictionary(raw, aip)
            if s == 0:
                # Only the TSAE has a threshold window (SPEC theorem 4).
                win = {"window": window(model, dic_aip, codes)} if kind == "atoms" else {}
                metrics = dictionary_metrics(
                    dic_aip,
                    Dictionary(raw),
                    codes,
                    h,
                    x_hat,
                    aip,
                    config,
                    nonneg=True,
                    sample_rows=sample_rows,
                    dead_training=dead,
                    training=record,
                    **win,
                )
                frontier[kind].append(frontier_point(target, metrics))
                if target == config.main_l0:
                    dics[kind] = metrics
                    codes_of[kind] = codes
            if target == config.main_l0:
                per_seed[kind].append(
                    seed_statistics(kind, s, dic_aip, codes, h, x_hat, aip, sample_rows, record, config)
                )
            step(advance=1)
    budget.measured(len(fitted))
    evidence = claims(
        layer, config, n_atoms, d, angles, neuron_q, per_seed, fit_cap.n_tokens, dics, int(h.shape[0])
    )

    with timed(seconds, "cards"):
        cards = {
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
    return LAYER.build(
        layer=layer,
        aip=aip_record,
        shift=shift,
        dictionaries=dics,
        frontier=frontier,
        seeds=[record for kind in per_seed for record, _ in per_seed[kind]],
        claims=evidence,
        cards=cards,
        seconds=seconds,
    )
