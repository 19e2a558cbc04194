"""atoms.verdicts: every branch of the SPEC section 8 rules, and reasons built from the evidence's numbers."""

from __future__ import annotations

import pytest

from atoms.errors import BadInputError
from atoms.intervals import Interval
from atoms.verdicts import (
    JUMP_HIGH_MIN,
    MIN_SEEDS,
    PAPER_CLAIMS,
    R2_MARGIN,
    ClaimEvidence,
    GridCell,
    JumpEvidence,
    Premise,
    Verdict,
    direction_verdict,
    jump_verdict,
    value_verdict,
    verdict_table,
)

CONVERGED = "the held-out loss changed 0.42% over steps 8000-10000"
NOT_CONVERGED = "budget exhausted before plateau: the held-out loss fell 3.10% over steps 8000-10000"
CONDITIONS = {"model": "SmolLM2-135M", "layer": 3, "tokens": 32768, "l0": 31.5, "norm": "aip"}


def iv(est, low, high, n=4096):
    return Interval(est, low, high, 0.95, "test", n)


def trained(claim, est, low, high, *, converged=True, seeds=MIN_SEEDS, premises=()):
    return ClaimEvidence(
        claim,
        iv(est, low, high),
        CONDITIONS,
        converged=converged,
        convergence_reason=CONVERGED if converged else NOT_CONVERGED,
        seeds=seeds,
        premises=premises,
    )


# ---------------------------------------------------------------- value claims (r2_atoms: 99.9% +- 1 point)


def test_value_holds_inside_margin():
    row = value_verdict(trained("r2_atoms", 0.9970, 0.9950, 0.9985))
    assert row.verdict is Verdict.HOLDS
    assert "99.70% [99.50%, 99.85%]" in row.reason and "[98.90%, 100.90%]" in row.reason
    assert row.conditions == CONDITIONS and row.paper.startswith("99.90%")


def test_value_holds_when_precise_interval_contains_paper_value():
    # [98.5%, 100%] sticks out of the margin's lower edge (98.9%) but contains 99.9% and is 1.5 points wide.
    row = value_verdict(trained("r2_atoms", 0.993, 0.985, 1.0))
    assert (
        row.verdict is Verdict.HOLDS and "contains the paper's 99.90%" in row.reason and "1.50%" in row.reason
    )


def test_value_holds_before_convergence_says_so():
    row = value_verdict(trained("r2_atoms", 0.9970, 0.9950, 0.9985, converged=False))
    assert row.verdict is Verdict.HOLDS and NOT_CONVERGED in row.reason


def test_value_fails_outside_margin_with_converged_training():
    row = value_verdict(trained("r2_atoms", 0.930, 0.900, 0.950))
    assert row.verdict is Verdict.FAILS
    assert "93.00% [90.00%, 95.00%]" in row.reason and "-6.90%" in row.reason and CONVERGED in row.reason


def test_value_inconclusive_not_converged():
    row = value_verdict(trained("r2_atoms", 0.930, 0.900, 0.950, converged=False))
    assert row.verdict is Verdict.INCONCLUSIVE and NOT_CONVERGED in row.reason and "93.00%" in row.reason


def test_value_inconclusive_straddles_margin_edge():
    row = value_verdict(trained("r2_atoms", 0.988, 0.980, 0.995))
    assert row.verdict is Verdict.INCONCLUSIVE and "straddles" in row.reason and "98.90%" in row.reason


def test_value_inconclusive_too_wide():
    row = value_verdict(trained("r2_atoms", 0.95, 0.90, 1.0))
    assert row.verdict is Verdict.INCONCLUSIVE
    assert "10.00% wide" in row.reason and f"{100 * R2_MARGIN:.2f}%" in row.reason


def test_value_inconclusive_premise_unmet_even_inside_margin():
    premise = Premise("angles on held-out text", False, "S and the angles both from articles 0-79")
    ev = ClaimEvidence("aip_angles_90", iv(90.1, 89.8, 90.4), CONDITIONS, premises=(premise,))
    row = value_verdict(ev)
    assert row.verdict is Verdict.INCONCLUSIVE
    assert (
        "angles on held-out text" in row.reason
        and "articles 0-79" in row.reason
        and "90.10 deg" in row.reason
    )
    met = Premise(premise.name, True, "S from articles 0-79, angles on articles 80-99")
    ev = ClaimEvidence("aip_angles_90", iv(90.1, 89.8, 90.4), CONDITIONS, premises=(met,))
    assert value_verdict(ev).verdict is Verdict.HOLDS


def test_value_inconclusive_too_few_seeds():
    row = value_verdict(trained("r2_atoms", 0.930, 0.900, 0.950, seeds=1))
    assert (
        row.verdict is Verdict.INCONCLUSIVE
        and f"1 training seed(s), the rule needs {MIN_SEEDS}" in row.reason
    )


def test_value_without_training_fails_without_convergence():
    row = value_verdict(ClaimEvidence("q_star_neurons", iv(0.25, 0.20, 0.30), CONDITIONS))
    assert row.verdict is Verdict.FAILS and "25.00%" in row.reason and "converged" not in row.reason


def test_trained_claim_needs_convergence_flag():
    with pytest.raises(BadInputError, match="plateau rule"):
        value_verdict(ClaimEvidence("r2_atoms", iv(0.99, 0.98, 1.0), CONDITIONS))


# ------------------------------------------------------------ direction claims (tsae_window: margin > 0)


def test_direction_holds():
    row = direction_verdict(trained("tsae_window", 0.2, 0.1, 0.3))
    assert row.verdict is Verdict.HOLDS and "0.2 [0.1, 0.3]" in row.reason and "> 0" in row.reason


def test_direction_fails_converged():
    row = direction_verdict(trained("tsae_window", -0.2, -0.3, -0.1))
    assert row.verdict is Verdict.FAILS and "-0.2 [-0.3, -0.1]" in row.reason and CONVERGED in row.reason


def test_direction_fails_when_touching_threshold():
    assert direction_verdict(trained("tsae_window", -0.1, -0.2, 0.0)).verdict is Verdict.FAILS


def test_direction_inconclusive_not_converged():
    row = direction_verdict(trained("tsae_window", -0.2, -0.3, -0.1, converged=False))
    assert row.verdict is Verdict.INCONCLUSIVE and NOT_CONVERGED in row.reason


def test_direction_inconclusive_straddles():
    row = direction_verdict(trained("tsae_window", 0.05, -0.1, 0.2))
    assert row.verdict is Verdict.INCONCLUSIVE and "straddles the threshold 0" in row.reason


def test_direction_inconclusive_premise():
    premise = Premise("codes within [dmin, dmax]", False, "dmin measured as 0 on 12 of 4096 samples")
    row = direction_verdict(trained("uniqueness_premise", 0.2, 0.1, 0.3, premises=(premise,)))
    assert row.verdict is Verdict.INCONCLUSIVE and "12 of 4096" in row.reason


def test_direction_untrained_claim_in_degrees():
    ev = ClaimEvidence("euclidean_angles_off_90", iv(14.0, 12.5, 15.5), CONDITIONS)
    assert direction_verdict(ev).verdict is Verdict.HOLDS
    ev = ClaimEvidence("euclidean_angles_off_90", iv(0.5, 0.2, 0.9), CONDITIONS)
    row = direction_verdict(ev)
    assert row.verdict is Verdict.FAILS and "0.50 deg" in row.reason and "2.00 deg" in row.reason


# ------------------------------------------------------------------------------ capacity-vs-data jump


def cells(tokens, r2s, converged=True):
    """A grid row at 576, 1152, 2304, 4608 atoms with R^2 intervals r2 +- 0.005."""
    return [
        GridCell(576 * 2**i, tokens, iv(r, r - 0.005, min(r + 0.005, 1.0)), converged, "reason " + str(i))
        for i, r in enumerate(r2s)
    ]


def test_jump_holds_when_jump_and_growth():
    grid = cells(2048, [0.70, 0.75, 0.99, 0.999]) + cells(32768, [0.60, 0.65, 0.70, 0.75])
    row = jump_verdict(JumpEvidence(tuple(grid), CONDITIONS))
    assert row.verdict is Verdict.HOLDS
    assert "in (1152, 2304] at T = 2048" in row.reason and "> 4608 at T = 32768" in row.reason
    assert "0.990 [0.985, 0.995] at 2304" in row.reason


def test_jump_fails_when_enough_atoms_never_fit():
    row = jump_verdict(JumpEvidence(tuple(cells(2048, [0.60, 0.65, 0.70, 0.75])), CONDITIONS))
    assert row.verdict is Verdict.FAILS and "4608 atoms" in row.reason and "0.755" in row.reason


def test_jump_fails_when_critical_shrinks_with_data():
    grid = cells(1024, [0.60, 0.70])[:2] + cells(8192, [0.99, 0.995, 0.999, 0.999])
    # T = 1024 at 1152 atoms (>= T) is below 0.95 too, so both failure reasons are present.
    row = jump_verdict(JumpEvidence(tuple(grid), CONDITIONS))
    assert (
        row.verdict is Verdict.FAILS and "shrinks from > 1152 at T = 1024 to <= 576 at T = 8192" in row.reason
    )


def test_jump_fails_when_r2_climbs_gradually():
    # Two cells wholly between JUMP_LOW_MAX and JUMP_HIGH_MIN before the critical one: a climb, not a jump.
    grid = cells(2048, [0.70, 0.87, 0.93, 0.99]) + cells(32768, [0.60, 0.65, 0.70, 0.75])
    row = jump_verdict(JumpEvidence(tuple(grid), CONDITIONS))
    assert row.verdict is Verdict.FAILS
    assert "at T = 2048, R^2 climbs gradually to the critical n_atoms in (2304, 4608]" in row.reason
    assert "0.870 at 1152, 0.930 at 2304 lie wholly between 0.8 and 0.95" in row.reason


def test_jump_failure_of_a_settled_row_stands_beside_an_unconverged_row():
    # T = 4096 climbs gradually with every cell converged; T = 2048 has a cell still training under 0.95.
    still = cells(2048, [0.80, 0.94, 0.99, 0.99])
    still[1] = GridCell(1152, 2048, iv(0.94, 0.935, 0.945), False, "loss still falling")
    grid = still + cells(4096, [0.70, 0.87, 0.93, 0.99])
    row = jump_verdict(JumpEvidence(tuple(grid), CONDITIONS))
    assert row.verdict is Verdict.FAILS and "at T = 4096, R^2 climbs gradually" in row.reason
    assert "other rows are not settled, which cannot undo this (cell 1152 atoms / 2048 tokens" in row.reason
    # Converged in the same place, the unconverged row alone would leave the claim undecided.
    alone = jump_verdict(JumpEvidence(tuple(still + cells(32768, [0.6, 0.65, 0.7, 0.75])), CONDITIONS))
    assert alone.verdict is Verdict.INCONCLUSIVE and "not converged: loss still falling" in alone.reason


def test_jump_one_cell_between_is_neither_jump_nor_climb():
    # One cell between the two levels: a sharp jump may fall between grid points, so no verdict either way.
    grid = cells(2048, [0.70, 0.75, 0.90, 0.99]) + cells(32768, [0.60, 0.65, 0.70, 0.75])
    row = jump_verdict(JumpEvidence(tuple(grid), CONDITIONS))
    assert row.verdict is Verdict.INCONCLUSIVE
    assert "no row rises from a cell under R^2 0.8 straight to a run of cells at or above 0.95" in row.reason


def test_jump_inconclusive_when_grid_does_not_reach():
    row = jump_verdict(JumpEvidence(tuple(cells(32768, [0.60, 0.65, 0.70, 0.75])), CONDITIONS))
    assert row.verdict is Verdict.INCONCLUSIVE
    assert "T = 32768 reaches only 4608 atoms" in row.reason and "only T = 32768" in row.reason


def test_jump_inconclusive_not_converged():
    grid = cells(2048, [0.70, 0.75, 0.99, 0.999]) + cells(32768, [0.60, 0.65, 0.70, 0.75], converged=False)
    row = jump_verdict(JumpEvidence(tuple(grid), CONDITIONS))
    assert (
        row.verdict is Verdict.INCONCLUSIVE
        and "cell 576 atoms / 32768 tokens not converged: reason 0" in (row.reason)
    )


def test_jump_unconverged_cell_past_the_jump_counts():
    # A memorising cell whose loss still falls, but whose whole interval is already >= JUMP_HIGH_MIN.
    fitting = cells(2048, [0.70, 0.75, 0.99, 0.999])
    fitting[2] = GridCell(2304, 2048, iv(0.99, 0.985, 0.995), False, "loss still falling")
    row = jump_verdict(JumpEvidence(tuple(fitting + cells(32768, [0.60, 0.65, 0.70, 0.75])), CONDITIONS))
    assert row.verdict is Verdict.HOLDS
    assert "cell 2304 atoms / 2048 tokens counts as past the jump unconverged" in row.reason


def test_jump_unconverged_cell_straddling_high_threshold_is_inconclusive():
    # The same cell with its interval reaching under JUMP_HIGH_MIN could still move the critical n_atoms.
    low = JUMP_HIGH_MIN - 0.001
    fitting = cells(2048, [0.70, 0.75, 0.99, 0.999])
    fitting[2] = GridCell(2304, 2048, iv(low + 0.002, low, low + 0.004), False, "loss still falling")
    row = jump_verdict(JumpEvidence(tuple(fitting + cells(32768, [0.60, 0.65, 0.70, 0.75])), CONDITIONS))
    assert row.verdict is Verdict.INCONCLUSIVE
    assert "cell 2304 atoms / 2048 tokens not converged: loss still falling" in row.reason


def test_jump_high_threshold_is_used():
    # Moving the past-jump cells just under JUMP_HIGH_MIN removes the jump: no longer holds.
    r = JUMP_HIGH_MIN - 0.01
    grid = cells(2048, [0.70, 0.75, r, r]) + cells(32768, [0.60, 0.65, 0.70, 0.75])
    assert jump_verdict(JumpEvidence(tuple(grid), CONDITIONS)).verdict is not Verdict.HOLDS


# -------------------------------------------------------------------------------------- table, registry


def test_registry_holds_the_papers_numbers():
    values = {name: c.value for name, c in PAPER_CLAIMS.items() if c.kind == "value"}
    assert values == {
        "r2_atoms": 0.999,
        "q_star_atoms": 0.998,
        "q_star_neurons": 0.005,
        "q_star_features": 0.682,
        "r2_features": 0.488,
        "aip_angles_90": 90.0,
    }
    assert {c.kind for c in PAPER_CLAIMS.values()} == {"value", "direction", "jump"}
    assert all(c.source and c.description for c in PAPER_CLAIMS.values())


def test_verdict_table_orders_and_dispatches():
    evidence = [
        trained("tsae_window", 0.2, 0.1, 0.3),
        JumpEvidence(tuple(cells(32768, [0.60, 0.65, 0.70, 0.75])), CONDITIONS),
        trained("r2_atoms", 0.9970, 0.9950, 0.9985),
    ]
    table = verdict_table(evidence)
    assert [r.claim for r in table] == ["r2_atoms", "capacity_jump", "tsae_window"]
    assert [r.verdict for r in table] == [Verdict.HOLDS, Verdict.INCONCLUSIVE, Verdict.HOLDS]
    assert table[1].interval is None and table[0].interval == evidence[2].interval
    with pytest.raises(BadInputError, match="more than once"):
        verdict_table([*evidence, trained("r2_atoms", 0.99, 0.98, 1.0)])


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: value_verdict(trained("no_such_claim", 0.5, 0.4, 0.6)), "unknown claim"),
        (lambda: value_verdict(trained("tsae_window", 0.5, 0.4, 0.6)), "direction claim"),
        (lambda: direction_verdict(trained("r2_atoms", 0.5, 0.6, 0.4)), "value claim"),
        (lambda: value_verdict(trained("r2_atoms", 0.5, 0.6, 0.4)), "low <= high"),
        (lambda: jump_verdict(JumpEvidence((), CONDITIONS)), "no cells"),
    ],
)
def test_bad_evidence(call, match):
    with pytest.raises(BadInputError, match=match):
        call()


def test_unmeasured_claims_are_inconclusive_with_the_reason():
    from atoms.verdicts import unmeasured_verdict

    row = unmeasured_verdict("capacity_jump", "the grid was not run (atoms run --sweep)", {"layer": 9})
    assert row.verdict == Verdict.INCONCLUSIVE
    assert row.reason == "not measured: the grid was not run (atoms run --sweep)"
    assert row.interval is None and row.conditions == {"layer": 9}
    with pytest.raises(BadInputError, match="unknown claim"):
        unmeasured_verdict("r2_of_everything", "x")
    with pytest.raises(BadInputError, match="say why"):
        unmeasured_verdict("capacity_jump", "")
