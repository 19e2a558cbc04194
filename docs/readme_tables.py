"""Print README's main-job tables from a run's results.json, so the numbers there are generated, not typed.

    .venv/bin/atoms run --output atoms-report
    .venv/bin/python -P docs/readme_tables.py atoms-report/results.json

Prints, each as a Markdown table and separated by a blank line: the verdict table first (one row per claim:
description, the paper's value, ours with its 95% interval, conditions, verdict, reason; the cells the
report uses, from `atoms.report.verdict_rows`), then the headline table (means over layers beside the
paper's values) and the basis-pursuit table (per layer and dictionary: l0, spark-certified fraction, proven
recovery with its Wilson 95% interval, flagged, failed, seconds), and last, for a run with `--sweep`, the
capacity-vs-data grid (`atoms.report.sweep_rows`). A results.json without verdicts (from before the verdict
table) prints the others alone.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from atoms.report import sweep_rows, verdict_rows

NAMES = {"neurons": "neurons", "features": "features (ReLU SAE)", "atoms": "atoms (TSAE)"}
HEADLINE_NAMES = {"atoms": "atoms (TSAE, AIP)", "neurons": "neurons", "features": "features (ReLU SAE)"}


def pct(value: float) -> str:
    return f"{100 * value:.1f}%"


def markdown(headers: list[str], rows: list[list[str]]) -> list[str]:
    """A Markdown table; a "|" inside a cell is escaped so that it stays one cell."""

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(str(cell).replace("|", "\\|") for cell in cells) + " |"

    return [line(headers), "|" + "---|" * len(headers), *(line(row) for row in rows)]


def verdicts(results: dict) -> list[str]:
    """The verdict table, one row per claim (and layer), with the report's cells."""
    return markdown(*verdict_rows(results))


def headline(results: dict) -> list[str]:
    rows = [
        "| dictionary | paper R^2 | our R^2 (Euclidean) | our R^2 (AIP) | paper q* | our q* (quantile) | "
        "our q* (per-sample) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, label in HEADLINE_NAMES.items():
        ours, paper = results["summary"][name], results["paper"][name]
        rows.append(
            f"| {label} | {pct(paper['r2'])} | {pct(ours['r2_euclidean'])} | {pct(ours['r2_aip'])} | "
            f"{pct(paper['q_star'])} | {pct(ours['q_star_quantile'])} | {pct(ours['q_star_per_sample'])} |"
        )
    return rows


def recovery(certified: dict) -> str:
    """'100% (512)' when every sample is proven, else the fraction with its Wilson 95% interval."""
    if certified["bp_recovered"] == certified["bp_n"]:
        return f"100% ({certified['bp_n']})"
    low, high = certified["bp_interval"]
    return f"{pct(certified['bp_fraction'])} [{100 * low:.1f}, {100 * high:.1f}]"


def basis_pursuit(results: dict) -> list[str]:
    rows = [
        "| layer | dictionary | l0 | spark-certified | BP exact recovery, proven (Wilson 95%) | flagged | "
        "failed | BP seconds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for layer, entry in results["layers"].items():
        for name, label in NAMES.items():
            stats = entry["dictionaries"][name]
            cert = stats["certified"]
            # The neurons form a basis: every code is its activation's unique representation, so their
            # certified fractions say nothing comparable to the SAEs' (results.json, certified.basis).
            certified = (
                ["basis (trivially unique)"] * 2 + [""] * 3
                if cert.get("basis")
                else [
                    pct(cert["spark_fraction"]),
                    recovery(cert),
                    str(cert["bp_flagged"]),
                    str(cert["bp_failed"]),
                    f"{cert['seconds']:.2g}",
                ]
            )
            cells = [layer, label, f"{stats['l0']:.0f}", *certified]
            rows.append(f"| {' | '.join(cells)} |")
    return rows


def main(path: str) -> None:
    results = json.loads(Path(path).read_text())
    tables = [headline(results), basis_pursuit(results)]
    if "verdicts" in results:
        tables.insert(0, verdicts(results))
    if results.get("sweep"):
        tables.append(markdown(*sweep_rows(results["sweep"])))
    print("\n\n".join("\n".join(table) for table in tables))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -P docs/readme_tables.py RESULTS_JSON (from `atoms run --output DIR`)")
    main(sys.argv[1])
