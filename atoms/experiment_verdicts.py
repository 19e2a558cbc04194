"""The run's conclusions: the summary over layers and the verdict on each of the paper's claims.

`verdicts` puts every claim's evidence at every layer (atoms.experiment_claims) and the capacity-vs-data
sweep through atoms.verdicts' rules, in the order of PAPER_CLAIMS.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from atoms.evidence import evidence_from_record
from atoms.experiment_config import ExperimentConfig
from atoms.experiment_definitions import Keys, each
from atoms.experiment_layer import KINDS
from atoms.intervals import Interval
from atoms.verdicts import (
    PAPER_CLAIMS,
    ClaimVerdict,
    GridCell,
    JumpEvidence,
    unmeasured_verdict,
    verdict,
)

__all__ = ["SUMMARY", "VERDICT", "summary", "verdicts"]

SUMMARY = each(each("Mean over the studied layers of the per-layer value of the same name."))
"""The results' "summary": kind -> headline number -> its mean over layers."""

VERDICT = Keys(
    {
        "claim": "Name of the claim (a key of atoms.verdicts.PAPER_CLAIMS).",
        "description": "The claim, in words.",
        "units": "Units of the estimate and its interval.",
        "layer": "Layer of the verdict's evidence (null when the claim was not measured).",
        "verdict": "The outcome of atoms.verdicts' rules: holds, fails or inconclusive (SPEC section 8).",
        "reason": "Why, in words, with the numbers behind it.",
        "paper": "The paper's value or inequality, formatted.",
        "estimate": "Our estimate (null when not measured or for the jump).",
        "low": "Lower end of our 95% interval.",
        "high": "Upper end of our 95% interval.",
        "conditions": each("A condition of the measurement behind the verdict."),
    }
)
"""An entry of the results' "verdicts"."""


def summary(layers: dict[str, Any]) -> dict[str, dict[str, float]]:
    """The means over layers of each kind's headline numbers (SUMMARY); layers: the results' "layers"."""
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


def verdicts(
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
            VERDICT.build(
                claim=v.claim,
                description=PAPER_CLAIMS[v.claim].description,
                units=PAPER_CLAIMS[v.claim].units,
                layer=layer,
                verdict=str(v.verdict),
                reason=v.reason,
                paper=v.paper,
                estimate=None if iv is None else iv.estimate,
                low=None if iv is None else iv.low,
                high=None if iv is None else iv.high,
                conditions=dict(v.conditions),
            )
        )
    return rows
