"""Tests of atoms.report: the report's numbers parse back to results.json, figures are embedded, and a real
browser (headless Chromium) loads every figure of report.html.

The results come from one tiny end-to-end run (a random 4-block Llama, see test_experiment.py), with the
sweep on so that every section of the report is present.
"""

from __future__ import annotations

import base64
import copy
import html.parser
import json
import re
import shutil
import subprocess

import pytest
from test_experiment import build_tiny, tiny_config

from atoms.errors import BadInputError
from atoms.experiment import run_experiment
from atoms.report import (
    FLOOR,
    KINDS,
    _bp_unproven,
    _dictionary_axes,
    _dictionary_figure,
    blocks,
    num,
    pct,
    phase_sentences,
    summary_lines,
    summary_table,
    sweep_sentences,
    to_markdown,
    training_sentences,
    verdict_lines,
    verdict_rows,
    write_report,
)

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """(results, paths) of a tiny run and its report."""
    root = tmp_path_factory.mktemp("report")
    model, files = build_tiny(root)
    results = run_experiment(tiny_config(model, files, root / "out"), progress=False)
    return results, write_report(results, root / "out")


# ---------------------------------------------------------------------------------------------- parsing


def md_tables(text: str) -> dict[str, list[tuple[list[str], list[list[str]]]]]:
    """Tables of a Markdown document by the '## ' section they sit in: [(headers, rows)], cells unescaped."""

    def cells(line: str) -> list[str]:
        parts = re.split(r"(?<!\\)\|", line.strip())[1:-1]
        return [p.strip().replace("\\|", "|") for p in parts]

    out: dict[str, list] = {}
    section, lines, i = "", text.splitlines(), 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("## "):
            section = line[3:]
        if line.startswith("| ") and i + 1 < len(lines) and lines[i + 1].startswith("|---"):
            headers, rows, i = cells(line), [], i + 2
            while i < len(lines) and lines[i].startswith("| "):
                rows.append(cells(lines[i]))
                i += 1
            out.setdefault(section, []).append((headers, rows))
            continue
        i += 1
    return out


class _HTMLTables(html.parser.HTMLParser):
    """Every <table> of an HTML page as a list of rows of cell texts (header row first); `headed` says
    which tables have <th> headers (the report's tables; the cards' tables have none)."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: list[list[list[str]]] = []
        self.headed: list[bool] = []
        self.cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.tables.append([])
            self.headed.append(False)
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self.cell = []
            self.headed[-1] |= tag == "th"

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self.cell is not None:
            self.tables[-1][-1].append("".join(self.cell).strip())
            self.cell = None

    def handle_data(self, data):
        if self.cell is not None:
            self.cell.append(data)


def number(cell: str) -> float:
    """The first number of a table cell ("12.5%", "3.2 of 8", "-0.5")."""
    found = re.match(r"\s*(-?\d+(?:\.\d+)?(?:e[-+]?\d+)?)", cell)
    assert found, f"no number in cell {cell!r}"
    return float(found.group(1))


def close_pct(cell: str, value: float) -> bool:
    """A cell printed by pct() shows 100 * value to one decimal."""
    return abs(number(cell) - 100 * value) <= 0.05 + 1e-9


def close(cell: str, value: float, digits: int) -> bool:
    return abs(number(cell) - value) <= 0.5 * 10**-digits + 1e-9


# ---------------------------------------------------------------------------------------------- files


def test_files_exist_and_figures_are_embedded(report):
    results, paths = report
    for key in ("markdown", "html", "json"):
        assert paths[key].is_file()
    assert json.loads(paths["json"].read_text()) == results
    page = paths["html"].read_text()
    md = paths["markdown"].read_text()
    names = {p.stem for p in paths["figures"]}
    assert names == {
        "frontier",
        "representation_shift",
        "dictionaries",
        "q_star",
        "training",
        "sweep",
        "phase_transition",
    }
    for path in paths["figures"]:
        png = path.read_bytes()
        assert png.startswith(b"\x89PNG\r\n\x1a\n")
        assert f"](figures/{path.name})" in md
        found = re.search(rf'<figure id="fig-{path.stem}"><img src="data:image/png;base64,([^"]+)"', page)
        assert found, f"figure {path.stem} is not embedded in report.html"
        assert base64.b64decode(found.group(1)) == png
    # Self-contained: nothing is fetched from elsewhere.
    assert not re.search(r"""(src|href)=["'](?!data:)""", page)
    assert "<link" not in page and "<script" not in page


def test_comparison_table_matches_results(report):
    results, paths = report
    tables = md_tables(paths["markdown"].read_text())
    headers, rows = tables["Ours beside the paper"][0]
    assert headers[0] == "dictionary" and len(rows) == 3
    for row in rows:
        kind = row[0]
        ours, paper = results["summary"][kind], results["paper"][kind]
        assert close_pct(row[1], paper["r2"]) and close_pct(row[4], paper["q_star"])
        assert close_pct(row[2], ours["r2_euclidean"]) and close_pct(row[3], ours["r2_aip"])
        assert close_pct(row[5], ours["q_star_quantile"]) and close_pct(row[6], ours["q_star_per_sample"])


def test_dictionary_table_matches_results(report):
    results, paths = report
    headers, rows = md_tables(paths["markdown"].read_text())["Neurons, features and atoms"][0]
    assert len(rows) == 3 * len(results["layers"])
    col = {h: i for i, h in enumerate(headers)}
    for row in rows:
        m = results["layers"][row[col["layer"]]]["dictionaries"][row[col["dictionary"]]]
        c = m["certified"]
        assert int(row[col["atoms"]]) == m["n_atoms"]
        assert close_pct(row[col["R^2 (Euclidean)"]], m["r2_euclidean"])
        assert close_pct(row[col["R^2 (AIP)"]], m["r2_aip"])
        assert close(row[col["l0"]], m["l0"], 1)
        assert close_pct(row[col["q* (quantile)"]], m["q_star_quantile"])
        assert close_pct(row[col["q* (per-sample)"]], m["q_star_per_sample"])
        assert close_pct(row[col["q* quantile, Euclidean atoms"]], m["q_star_quantile_euclidean"])
        assert int(row[col["silent (held-out)"]]) == m["silent_heldout"]
        if c.get("basis"):
            # The neurons form a basis: their certified columns say so instead of a trivial 100%.
            assert row[col["spark-certified"]] == row[col["BP exact"]] == "basis: trivially unique"
            continue
        assert close_pct(row[col["spark-certified"]], c["spark_fraction"])
        assert close_pct(row[col["ERC < 1"]], c["erc_fraction"])
        assert row[col["ERC < 1"]].endswith(f"of {c['erc_n']}")
        assert close_pct(row[col["BP exact"]], c["bp_fraction"])
        bp = row[col["BP exact"]]
        assert f"of {c['bp_n']}" in bp
        for key, word in (("bp_failed", "failed"), ("bp_flagged", "flagged")):
            shown = re.search(rf"(\d+) {word}", bp)
            assert (int(shown.group(1)) if shown else 0) == c[key], (bp, key)
        assert int(row[col["silent (held-out)"]]) == m["silent_heldout"]
        dead = row[col["dead (training)"]]
        assert dead == ("n/a" if m["dead_training"] is None else str(m["dead_training"]))


def test_shift_theory_window_and_sweep_tables_match_results(report):
    results, paths = report
    tables = md_tables(paths["markdown"].read_text())
    conditions = {"in-sample": "in_sample", "held-out": "heldout", "Gaussian null": "gaussian_null"}
    _, rows = tables["Representation shift"][0]
    assert len(rows) == 3 * len(results["layers"])
    for row in rows:
        s = results["layers"][row[0]]["shift"][conditions[row[1]]]
        for k, (geometry, key, digits) in enumerate(
            [
                ("euclidean", "mean", 1),
                ("euclidean", "median", 1),
                ("euclidean", "mean_abs_cos", 3),
                ("aip", "mean", 1),
                ("aip", "median", 1),
                ("aip", "mean_abs_cos", 3),
            ]
        ):
            assert close(row[2 + k], s[geometry][key], digits), (row, geometry, key)
    theory, window = tables["The theorems on the trained dictionaries"]
    for row in theory[1]:
        m = results["layers"][row[0]]["dictionaries"][row[1]]
        assert close(row[2], m["theory"]["coherence"], 4) and close(row[3], m["welch_bound"], 4)
        assert int(row[4]) == m["theory"]["K"] and close(row[5], m["theory"]["uniqueness_margin"], 4)
    for row in window[1]:
        w = results["layers"][row[0]]["dictionaries"]["atoms"]["window"]
        assert close(row[1], w["eps"], 4) and int(row[2]) == w["K"]
        assert close_pct(row[6], w["atom_contains"]) and close_pct(row[7], w["samples_certified"])
    _, rows = tables["Training"][0]
    for row in rows:
        t = results["layers"][row[0]]["dictionaries"][row[1]]["training"]
        assert int(row[2]) == t["steps"] and int(row[4]) == t["tokens_seen"]
        assert close(row[7], t["final_recon_loss"], 4)
    _, rows = tables["Capacity against data"][0]
    assert len(rows) == len(results["sweep"]["cells"])
    for row, cell in zip(rows, results["sweep"]["cells"], strict=True):
        assert row[0] == f"{cell['multiple']}d = {cell['n_atoms']}" and int(row[1]) == cell["tokens"]
        estimate, interval = row[2].split(" [")
        low, high = interval.rstrip("]").split(", ")
        assert close_pct(estimate, cell["r2_train_euclidean"]) and close_pct(row[5], cell["r2_heldout_aip"])
        assert close_pct(low, cell["r2_train_interval"][0]) and close_pct(high, cell["r2_train_interval"][1])
        assert close_pct(row[7], cell["q_star_quantile"]) and int(row[9].replace(",", "")) == cell["steps"]
        assert row[10] == ("yes" if cell["converged"] else "no")


def test_timing_and_cards_match_results(report):
    results, paths = report
    text = paths["markdown"].read_text()
    _, rows = md_tables(text)["Timing"][0]
    timing = dict(rows)
    assert close(timing["total (wall)"], results["meta"]["wall_seconds"], 1)
    assert close(timing["load model"], results["meta"]["stage_seconds"]["load_model"], 1)
    assert results["meta"]["command"] in text
    titles = re.findall(r"^\*\*(atom|feature|neuron) (\d+), positive on ([\d.]+)% of held-out", text, re.M)
    expected = [
        (card["kind"], card["latent"], card["fires"])
        for lay in results["layers"].values()
        for kind in ("atoms", "features", "neurons")
        for card in lay["cards"][kind]
    ]
    assert [(k, int(j)) for k, j, _ in titles] == [(k, j) for k, j, _ in expected]
    pairs = zip(titles, expected, strict=True)
    assert all(abs(float(f) - 100 * e) <= 0.05 + 1e-9 for (_, _, f), (_, _, e) in pairs)


def test_html_tables_equal_the_markdown_tables(report):
    _, paths = report
    parser = _HTMLTables()
    parser.feed(paths["html"].read_text())
    card_tables = len(re.findall(r'<div class="card">', paths["html"].read_text()))
    md = [t for section in md_tables(paths["markdown"].read_text()).values() for t in section]
    report_tables = [t for t in md if t[0] != ["value", "context", "source"]]  # cards differ in markup
    html_tables = [t for t, headed in zip(parser.tables, parser.headed, strict=True) if headed]
    assert len(html_tables) == len(report_tables)
    assert len(parser.tables) - len(html_tables) == card_tables
    for (headers, rows), table in zip(report_tables, html_tables, strict=True):
        assert table[0] == headers
        assert table[1:] == rows


def test_report_rebuilds_from_results_json(report):
    _, paths = report
    assert to_markdown(blocks(json.loads(paths["json"].read_text()))) == paths["markdown"].read_text()


def test_the_verdict_table_leads_the_report_and_every_row_has_its_reason(report):
    results, paths = report
    markdown = paths["markdown"].read_text()
    assert markdown.index("## Verdicts") < markdown.index("## Setup")
    _, rows = verdict_rows(results)
    assert len(rows) == len(results["verdicts"]) >= 10
    for row, verdict in zip(rows, results["verdicts"], strict=True):
        assert row[4] == verdict["verdict"].upper() and verdict["reason"] in markdown
    claims = {v["claim"] for v in results["verdicts"]}
    assert {"r2_atoms", "q_star_atoms", "q_star_neurons", "aip_angles_90", "capacity_jump"} <= claims
    assert len(verdict_lines(results)) == len(rows) + 1


def test_basis_pursuit_cell_names_failed_and_flagged_samples():
    assert _bp_unproven({"bp_failed": 7, "bp_flagged": 18}) == " (7 failed, 18 flagged)"
    assert _bp_unproven({"bp_failed": 1, "bp_flagged": 0}) == " (1 failed)"
    assert _bp_unproven({"bp_failed": 0, "bp_flagged": 0}) == ""


def test_formatting_and_bad_input():
    assert pct(0.9994) == "99.9%" and pct(None) == "n/a" and pct(float("nan")) == "n/a"
    assert num(1.23456, 2) == "1.23" and num("inf") == "inf" and num(None) == "n/a"
    with pytest.raises(BadInputError, match="run_experiment"):
        write_report({"layers": {}}, "/tmp/unused")


# ---------------------------------------------------------------------------------------------- browser

_PROBE = """<script>
window.addEventListener('load', function () {
  var states = Array.prototype.map.call(document.images, function (img) {
    return img.complete && img.naturalWidth > 0 ? img.naturalWidth + 'x' + img.naturalHeight : 'BROKEN';
  });
  var marker = document.createElement('pre');
  marker.id = 'atoms-probe';
  marker.textContent = 'IMAGES:' + states.join(',') + ':END';
  document.body.appendChild(marker);
});
</script>"""


def rendered_images(page: str, tmp_path) -> list[str]:
    """Load `page` in headless Chromium; the probe script reports each image's natural size or BROKEN."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("Chromium is not installed (apt-get install chromium); the browser check needs it")
    path = tmp_path / "page.html"
    path.write_text(page.replace("</body>", _PROBE + "</body>"))
    done = subprocess.run(
        [
            chromium,
            *CHROMIUM_FLAGS,
            f"--user-data-dir={tmp_path / 'profile'}",
            "--virtual-time-budget=10000",
            "--dump-dom",
            path.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    found = re.search(r'<pre id="atoms-probe">IMAGES:([^<]*):END</pre>', done.stdout)
    assert found, f"Chromium did not run the probe (exit {done.returncode}): {done.stderr[-2000:]}"
    return [s for s in found.group(1).split(",") if s]


def test_chromium_loads_every_figure(report, tmp_path):
    _, paths = report
    states = rendered_images(paths["html"].read_text(), tmp_path)
    assert len(states) == len(paths["figures"])
    assert "BROKEN" not in states
    assert all(int(s.split("x")[0]) > 100 for s in states)


def test_chromium_probe_sees_a_broken_image(tmp_path):
    page = '<!DOCTYPE html><html><body><img src="data:image/png;base64,AAAA"></body></html>'
    assert rendered_images(page, tmp_path) == ["BROKEN"]


def test_phase_plane_sentences_count_the_cells_against_the_curve(report):
    results, paths = report
    phase = results["phase_transition"]
    md = paths["markdown"].read_text()
    assert "## Exact recovery on Gaussian problems: the phase transition" in md
    sentences = phase_sentences(phase)
    for sign, sentence in zip(("signed", "nonneg"), sentences, strict=True):
        plane = phase[sign]
        below = above = below_bad = above_bad = 0
        for i in range(len(phase["deltas"])):
            for j, rho in enumerate(phase["rhos"]):
                if rho < plane["curve"][i] - 0.1:
                    below += 1
                    below_bad += plane["ci_high"][i][j] < 0.5
                elif rho > plane["curve"][i] + 0.1:
                    above += 1
                    above_bad += plane["ci_low"][i][j] > 0.5
        assert f"of {below} cells more than 0.1 below the curve, {below_bad} recover fewer" in sentence
        assert f"of {above} cells more than 0.1 above it, {above_bad} recover more" in sentence
        assert sentence in md


# ---------------------------------------------------------------------------------------------- issue fixes


def test_summary_is_a_table_on_a_terminal_and_short_lines_in_a_log(report):
    import io

    from rich.console import Console

    results, _ = report
    log = io.StringIO()
    Console(file=log, width=80).print(summary_table(results))
    assert log.getvalue().splitlines() == summary_lines(results)
    assert all(len(line) <= 80 for line in summary_lines(results))
    for kind in ("atoms", "neurons", "features"):
        ours = results["summary"][kind]
        assert f"  {kind}" in summary_lines(results)
        assert f"ours {pct(ours['r2_euclidean'])} (Euclidean), {pct(ours['r2_aip'])} (AIP)" in log.getvalue()
    terminal = io.StringIO()
    Console(file=terminal, width=160, force_terminal=True).print(summary_table(results))
    assert "┃" in terminal.getvalue() and "our q* (per-sample)" in terminal.getvalue()


def test_dictionary_figure_labels_a_bar_below_the_axis_with_its_value(report):
    results, _ = report
    low = copy.deepcopy(results)
    key = next(iter(low["layers"]))
    low["layers"][key]["dictionaries"]["features"]["r2_aip"] = -402.0
    fig = _dictionary_axes(low)
    r2_aip = fig.axes[1]
    assert r2_aip.get_title() == "R^2 (AIP)" and "%" in r2_aip.get_ylabel()
    assert r2_aip.get_ylim()[0] == FLOOR
    assert min(bar.get_height() for bar in r2_aip.patches) == FLOOR
    assert "-40200%" in [t.get_text() for t in r2_aip.texts]
    # Values are drawn in percent, as the title says: no bar of a fraction-sized height.
    r2_euclid = fig.axes[0]
    heights = [bar.get_height() for bar in r2_euclid.patches]
    expected = [
        100 * low["layers"][k]["dictionaries"][kind]["r2_euclidean"] for kind in KINDS for k in low["layers"]
    ]
    assert heights == pytest.approx([max(h, FLOOR) for h in expected])
    assert "in %" in fig._suptitle.get_text()
    assert [ax.get_title() for ax in fig.axes[2:]] == ["basis pursuit exact (proven)", "ERC < 1 (proven)"]
    assert _dictionary_figure(low).startswith(b"\x89PNG")


def test_cards_are_collapsed_in_both_renderings(report):
    results, paths = report
    md, page = paths["markdown"].read_text(), paths["html"].read_text()
    blocks_of_cards = [
        cards for lay in results["layers"].values() for cards in lay["cards"].values() if cards
    ]
    assert md.count("<details><summary>") == md.count("</details>") == len(blocks_of_cards)
    assert page.count("<details><summary>") == page.count("</details>") == len(blocks_of_cards)
    first = blocks_of_cards[0]
    assert f"<details><summary>{len(first)} {first[0]['kind']} card" in md


def _with_curve(results, values, steps):
    out = copy.deepcopy(results)
    out["meta"]["config"].update(lr_warmup_steps=20, sparsity_warmup_steps=60)
    for lay in out["layers"].values():
        for kind in ("features", "atoms"):
            out_curve = lay["dictionaries"][kind]["training"]["curve"]
            out_curve.update(step=steps, recon_loss=[0.3] * len(steps), l0=values)
    return out


def test_training_sentence_only_when_the_curve_alternates_between_odd_and_even_steps(report):
    results, _ = report
    # The experiment keeps 60 points of 240 steps: linspace(0, 239, 60) rounded, plus one.
    steps = sorted({round(239 * i / 59) + 1 for i in range(60)})
    smooth = [200 - 0.3 * s for s in steps]
    alternating = [v + (40 if s % 2 else 0) for v, s in zip(smooth, steps, strict=True)]
    assert training_sentences(_with_curve(results, smooth, steps)) == []
    sentences = training_sentences(_with_curve(results, alternating, steps))
    assert len(sentences) == 1 and "at step(s) 123, 204" in sentences[0]
    assert "l0: odd steps at" in sentences[0] and "reconstruction loss" not in sentences[0]
    md = to_markdown(blocks(_with_curve(results, alternating, steps)))
    assert sentences[0] in md


def test_sweep_sentence_says_whether_the_grid_tests_the_jump():
    def cell(r2, converged):
        return {
            "multiple": 1,
            "tokens": 2048,
            "r2_train_aip": r2,
            "r2_heldout_aip": 0.5,
            "converged": converged,
        }

    def first(cells):
        return sweep_sentences({"steps": 12_000, "cells": cells})[0]

    assert "come near 1, as the paper reports; whether they get there by a jump" in first(
        [cell(0.97, False), cell(0.7, True)]
    )
    assert "1 of 2 cells stopped unconverged at 12000 steps" in first([cell(0.8, False), cell(0.7, True)])
    assert "with every cell converged: the grid does not show" in first([cell(0.8, True), cell(0.7, True)])
