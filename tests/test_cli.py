"""The `atoms` command line: help texts and the synthetic geometry summary."""

import json
import re

from typer.testing import CliRunner

from atoms.cli import app

runner = CliRunner()


def test_help_lists_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    assert "geometry" in result.output
    assert "Towards Atoms of Large Language Models" in result.output


def test_geometry_prints_both_geometries_and_the_welch_bound():
    result = runner.invoke(app, ["geometry", "--kind", "simplex", "--d", "8", "--samples", "2000"])
    assert result.exit_code == 0, result.output
    assert "Euclidean" in result.output and "AIP" in result.output
    # The simplex in R^8 meets the Welch bound 1/8 exactly in the Euclidean geometry.
    euclidean_row = next(line for line in result.output.splitlines() if "Euclidean" in line)
    assert euclidean_row.count("0.1250") == 2


def test_geometry_rejects_unknown_kind():
    result = runner.invoke(app, ["geometry", "--kind", "cube"])
    assert result.exit_code != 0
    assert "unknown kind" in result.output


def test_verify_prints_table_counterexample_and_json(tmp_path):
    out = tmp_path / "claims.json"
    result = runner.invoke(
        app, ["verify", "--claim", "welch", "--claim", "false_welch_strict", "--json", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert "welch" in result.output and "REFUTED" in result.output
    assert "false_welch_strict: synth." in result.output  # the counterexample is printed
    body = json.loads(out.read_text())
    assert [c["name"] for c in body["claims"]] == ["welch", "false_welch_strict"]
    assert body["exit_code"] == 0


def test_verify_rejects_unknown_budget():
    result = runner.invoke(app, ["verify", "--budget", "huge"])
    assert result.exit_code != 0
    assert "unknown budget" in result.output


def test_run_help_lists_the_flags_of_the_main_job():
    result = runner.invoke(app, ["run", "--help"])
    assert result.exit_code == 0
    for flag in ("--model", "--layers", "--tokens", "--n-atoms", "--text", "--output", "--device", "--seed"):
        assert flag in result.output
    assert "--quick" in result.output and "--sweep" in result.output


def test_run_reports_bad_flags_without_a_traceback():
    result = runner.invoke(app, ["run", "--layers", "3,3", "--output", "unused"])
    assert result.exit_code == 2
    assert "atoms run:" in result.output and "Traceback" not in result.output


def test_help_shows_no_value_type_after_flags():
    for args in (["--help"], ["run", "--help"], ["verify", "--help"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        assert "<bool>" not in result.output, args


def test_verify_lists_the_claim_names_in_help_and_on_a_bad_name():
    from atoms.theorems import CLAIMS, FALSE_VARIANTS

    names = [c.name for c in (*CLAIMS, *FALSE_VARIANTS)]
    shown = " ".join(runner.invoke(app, ["verify", "--help"]).output.split())
    assert all(name in shown for name in names)
    result = runner.invoke(app, ["verify", "--claim", "no_such_claim"])
    assert result.exit_code == 2
    assert "no_such_claim" in result.output and all(f"'{name}'" in result.output for name in names)


def test_progress_in_a_log_is_plain_lines():
    import io

    from atoms.experiment_progress import Progress as _Progress

    log = io.StringIO()
    with _Progress(True, stream=log, interval=0.0) as bars:
        update = bars.task("layer 3: train atoms (2304)", 240)
        update(completed=120, description="layer 3: train atoms (2304)  recon 0.300  l0 150")
        update(completed=240)
        short = bars.task("capture fit tokens", 1000)
        short(completed=900)
        bars.log("layer 9: loaded")
    lines = log.getvalue().splitlines()
    assert "\x1b" not in log.getvalue() and "\r" not in log.getvalue()
    assert all(re.match(r"\[\d\d:\d\d:\d\d\] ", line) for line in lines)
    body = [line[11:] for line in lines]
    assert body[0] == "start    layer 3: train atoms (2304): 240 to do"
    assert re.fullmatch(
        r"progress layer 3: train atoms \(2304\)  recon 0\.300  l0 150: 120/240, [\d.]+ s", body[1]
    )
    assert re.fullmatch(r"done     layer 3: train atoms .*: 240/240, [\d.]+ s", body[2])
    # A stage that stops short of its total is ended by the next message's stage or by the exit.
    assert body[3] == "start    capture fit tokens: 1,000 to do"
    assert body[4].startswith("progress capture fit tokens: 900/1,000")
    assert body[5] == "layer 9: loaded"
    assert body[6].startswith("done     capture fit tokens: 900/1,000")
    assert len(body) == 7


def test_progress_off_writes_nothing():
    import io

    from atoms.experiment_progress import Progress as _Progress

    log = io.StringIO()
    with _Progress(False, stream=log, interval=0.0) as bars:
        bars.task("stage", 2)(completed=2)
        bars.log("message")
    assert log.getvalue() == ""
