"""The `atoms` command line: help texts and the synthetic geometry summary."""

import json

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
