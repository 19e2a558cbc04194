"""The verify engine's bookkeeping on fake claims: counts, shrinking, the exit-code rule, table and JSON."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch
from hypothesis import strategies as st
from rich.console import Console

from atoms import verify as verify_module
from atoms.claim_strategies import recipe_for
from atoms.errors import BadInputError
from atoms.theorems import CLAIMS, FALSE_VARIANTS, Claim, instance
from atoms.verify import (
    Budget,
    ClaimReport,
    claim_named,
    counterexample_lines,
    exit_code,
    render,
    run_claim,
    to_json,
    verify,
    verify_table,
)

EYE = torch.eye(30, dtype=torch.float64)
# Instances differ only in K (1..30) on 30 orthonormal atoms: the fake claims below read nothing else.
BY_K = st.integers(1, 30).map(lambda k: instance(EYE, k, label=f"fake k={k}"))
SMALL = Budget("test", examples=60, shrink_seconds=30.0, shrink_examples=500)


def fake_claim(conclusion, *, premise=lambda inst: inst.k - 4.5, planted_false=False, calls=None) -> Claim:
    """A claim "K >= 5 => conclusion(K)" that logs every K it is checked on into `calls`."""

    def logged(inst):
        if calls is not None:
            calls.append(inst.k)
        return conclusion(inst.k)

    return Claim("fake", "0 (test)", "K >= 5 => something", premise, logged, planted_false=planted_false)


def undecided_every_seventh(k):
    return (None if k % 7 == 0 else True), 100.0 - k, f"k = {k}"


def test_counts_match_a_recount_of_the_calls():
    calls = []
    report = run_claim(fake_claim(undecided_every_seventh, calls=calls), SMALL, strategy=BY_K)
    # Each distinct instance is checked once, and every check is counted.
    assert len(calls) == len(set(calls)) == report.tried > 10
    held = [k for k in calls if k >= 5]
    assert report.premise_held == len(held)
    assert report.undecided == sum(k % 7 == 0 for k in held)
    assert report.conclusion_held == len(held) - report.undecided
    assert report.violated == 0
    assert report.held_without_premise == sum(k < 5 and k % 7 != 0 for k in calls)
    assert report.worst_premise_margin == min(k - 4.5 for k in held)
    assert report.worst_conclusion_margin == min(100.0 - k for k in held)
    assert report.counterexample is None and report.error is None and report.witness is None
    assert report.status == "held" and report.families == {"custom": report.tried}
    assert exit_code([report]) == 0


def test_a_counterexample_is_shrunk_to_the_minimal_one():
    report = run_claim(fake_claim(lambda k: (k < 12, 11.5 - k, f"k = {k}")), SMALL, strategy=BY_K)
    assert report.status == "VIOLATED" and report.violated >= 1
    assert report.witness.k == 12
    assert "K=12" in report.counterexample and "conclusion margin -0.5" in report.counterexample
    assert "evidence: k = 12" in report.counterexample
    assert exit_code([report]) == 1


def test_a_check_that_raises_is_an_error_shrunk_to_the_minimal_instance():
    def conclusion(k):
        if k >= 20:
            raise ValueError(f"cannot decide k = {k}")
        return True, 1.0, ""

    report = run_claim(fake_claim(conclusion), SMALL, strategy=BY_K)
    assert report.status == "ERROR" and report.counterexample is None
    assert report.witness.k == 20
    assert "K=20" in report.error and "ValueError('cannot decide k = 20')" in report.error
    assert exit_code([report]) == 1


def test_a_strategy_that_raises_is_an_error():
    broken = st.integers(1, 30).map(lambda k: instance(EYE, k, codes=torch.zeros(1, 2)))
    report = run_claim(fake_claim(lambda k: (True, 1.0, "")), SMALL, strategy=broken)
    assert report.status == "ERROR" and report.witness is None
    assert "drawing an instance raised BadInputError" in report.error
    assert exit_code([report]) == 1


def test_shrinking_stops_at_its_budget():
    calls = []
    capped = Budget("capped", examples=60, shrink_examples=0)
    report = run_claim(fake_claim(lambda k: (k < 12, 11.5 - k, ""), calls=calls), capped, strategy=BY_K)
    # No new instance is checked after the first counterexample; that one is reported as it is.
    assert calls[-1] >= 12 and all(k < 12 for k in calls[:-1])
    assert report.witness.k == calls[-1] and f"K={calls[-1]}" in report.counterexample


def test_the_search_is_deterministic():
    claim = fake_claim(lambda k: (k < 12, 11.5 - k, ""))
    first, second = (run_claim(claim, SMALL, strategy=BY_K) for _ in range(2))
    assert (first.tried, first.counterexample) == (second.tried, second.counterexample)


def test_planted_false_variants_must_be_refuted():
    refuted = run_claim(
        fake_claim(lambda k: (k < 12, 11.5 - k, ""), planted_false=True), SMALL, strategy=BY_K
    )
    assert refuted.status == "REFUTED" and exit_code([refuted]) == 0
    weak = run_claim(fake_claim(lambda k: (True, 1.0, ""), planted_false=True), SMALL, strategy=BY_K)
    assert weak.status == "NOT REFUTED" and exit_code([weak]) == 2


def test_a_premise_that_never_holds_leaves_the_claim_untested():
    report = run_claim(fake_claim(lambda k: (True, 1.0, ""), premise=lambda inst: -1.0), SMALL, strategy=BY_K)
    assert report.status == "UNTESTED" and report.premise_held == 0
    assert report.worst_premise_margin is None and report.worst_conclusion_margin is None
    assert exit_code([report]) == 2


@pytest.mark.parametrize(
    ("margin", "scale", "held"),
    [(1e-13, 1e-3, True), (1e-13, 1.0, False), (1e-7, 1e6, False), (1e-5, 1e6, True), (0.0, 0.0, False)],
)
def test_a_premise_must_hold_by_more_than_rounding_at_its_scale(margin, scale, held):
    """The premise holds when its margin exceeds atoms.theorems.RELATIVE_TOLERANCE (1e-12) times its scale."""
    claim = Claim("fake", "0 (test)", "a premise at scale", lambda inst: margin, lambda inst: (True, 1.0, ""))
    verdict = replace(claim, premise_scale=lambda inst: scale).check(instance(EYE, 1))
    assert verdict.premise is held and verdict.premise_margin == margin


def report(name="r", planted_false=False, **fields) -> ClaimReport:
    return ClaimReport(name, "0 (test)", "statement", planted_false, "test", **fields)


def test_exit_code_rule():
    good = report(tried=3, premise_held=2, conclusion_held=2)
    violated = report(tried=3, premise_held=2, violated=1, counterexample="x")
    errored_false = report(planted_false=True, error="raised")
    refuted = report(planted_false=True, tried=1, premise_held=1, violated=1, counterexample="x")
    not_refuted = report(planted_false=True, tried=3, premise_held=3, conclusion_held=3)
    untested = report(tried=3)
    assert exit_code([good, refuted]) == 0
    assert exit_code([good, violated, not_refuted]) == 1  # a violation outranks a weak suite
    assert exit_code([good, errored_false]) == 1
    assert exit_code([good, not_refuted]) == 2
    assert exit_code([good, untested]) == 2
    assert exit_code([]) == 0


def test_to_json_is_strict_json_with_every_field():
    rows = [
        report(
            "always",
            tried=2,
            premise_held=2,
            conclusion_held=2,
            worst_premise_margin=math.inf,
            worst_conclusion_margin=0.25,
            families={"simplex": 2},
        ),
        report("never", tried=2),
        report(
            "false",
            planted_false=True,
            tried=1,
            premise_held=1,
            violated=1,
            counterexample="ce",
            worst_premise_margin=-math.inf,
            witness=instance(EYE, 3),
        ),
    ]
    out = json.loads(json.dumps(to_json(rows), allow_nan=False))
    assert out["budget"] == "test" and out["exit_code"] == 2
    first, second, third = out["claims"]
    assert set(first) == {
        "name",
        "theorem",
        "statement",
        "planted_false",
        "budget",
        "tried",
        "premise_held",
        "conclusion_held",
        "undecided",
        "violated",
        "held_without_premise",
        "worst_premise_margin",
        "worst_conclusion_margin",
        "counterexample",
        "error",
        "seconds",
        "families",
        "status",
    }
    assert first["worst_premise_margin"] == "inf" and first["worst_conclusion_margin"] == 0.25
    assert first["families"] == {"simplex": 2} and first["status"] == "held"
    assert second["worst_premise_margin"] is None and second["status"] == "UNTESTED"
    assert third["worst_premise_margin"] == "-inf" and third["status"] == "REFUTED"


def test_render_marks_planted_false_variants():
    rows = [
        report("true_ok", tried=4, premise_held=3, conclusion_held=3, worst_conclusion_margin=0.5),
        report("true_broken", tried=4, premise_held=3, violated=1, counterexample="simplex d=2"),
        report("false_refuted", planted_false=True, tried=1, premise_held=1, violated=1, counterexample="ce"),
        report("false_missed", planted_false=True, tried=9, premise_held=9, conclusion_held=9),
    ]
    table = render(rows)
    assert table.row_count == 4
    console = Console(record=True, width=250)
    console.print(table)
    text = console.export_text()
    for needle in (
        "planted false: must be refuted",
        "REFUTED (good)",
        "NOT REFUTED (the suite is too weak)",
        "VIOLATED",
        "premise held",
        "conclusion held",
        "undecided",
        "worst conclusion margin",
    ):
        assert needle in text, needle
    # Counterexamples are too long for a cell: they are listed beside the table.
    assert counterexample_lines(rows) == ["true_broken: simplex d=2", "false_refuted: ce"]


def test_unknown_names_and_budgets_are_rejected():
    with pytest.raises(BadInputError, match=r"Budget\.examples must be an int >= 1"):
        Budget("none", examples=0)
    with pytest.raises(BadInputError, match="no claim named 'nope'; choose from"):
        claim_named("nope")
    with pytest.raises(BadInputError, match="unknown budget 'huge'"):
        run_claim("welch", "huge")


def test_the_stratified_search_draws_every_family():
    claim = claim_named("welch")
    # Three examples per family: an instance already checked under another family is not counted again.
    result = run_claim(claim, Budget("tiny", examples=18))
    assert set(result.families) == set(recipe_for(claim).families)
    assert all(count >= 1 for count in result.families.values()), result.families


def test_a_real_false_variant_is_refuted_with_its_witness():
    result = run_claim("false_rip_gershgorin", Budget("tiny", examples=6))
    assert result.status == "REFUTED"
    assert claim_named("false_rip_gershgorin").check(result.witness).counterexample


def test_verify_runs_the_selected_claims_in_order(monkeypatch):
    seen = []

    def fake_run(claim, budget):
        seen.append(claim.name)
        return report(claim.name, claim.planted_false, tried=1, premise_held=1, conclusion_held=1)

    monkeypatch.setattr(verify_module, "run_claim", fake_run)
    progress = []
    assert [r.name for r in verify(["rip_babel", "welch"], progress=progress.append)] == [
        "rip_babel",
        "welch",
    ]
    assert [r.name for r in progress] == ["rip_babel", "welch"]
    seen.clear()
    verify(include_false=False)
    assert seen == [c.name for c in CLAIMS]
    seen.clear()
    reports, table, code = verify_table()
    assert seen == [c.name for c in (*CLAIMS, *FALSE_VARIANTS)]
    assert table.row_count == len(reports) and code == 2  # the fake run refutes no false variant
