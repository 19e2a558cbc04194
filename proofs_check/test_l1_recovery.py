"""SPEC section 4, theorem 3: exact l1 recovery by basis pursuit (the cvxpy reference on every example) under
the coherence condition K < (1 + 1/mu)/2, Tropp's ERC and Cai-Zhang's delta_2K < 1/sqrt(2); cross-checked by
HiGHS on the split LP, by OMP and by the dual certificate."""

from __future__ import annotations

import pytest
from hypothesis import given

from atoms.claim_strategies import Sizes, instances
from atoms.recovery import basis_pursuit, dual_certificate
from atoms.verify import claim_named

SMALL = Sizes(max_atoms=12, max_d=8, max_k=3, max_samples=3)


@pytest.mark.parametrize("name", ["l1_coherence", "l1_erc", "l1_rip"])
def test_l1_recovery_holds(holds, name):
    holds(name)


def test_false_l1_twice_refuted(refuted):
    report = refuted("false_l1_twice")
    inst = report.witness
    unit = inst.dictionary.unit
    # Independent confirmation by HiGHS: some code's l1 minimiser is not the planted code.
    result = basis_pursuit(unit, inst.codes @ unit, solver="linprog", true_codes=inst.codes)
    assert result.counts["failed"] > 0, result.reasons
    # And by the batched solver, whose answers carry their own proof of optimality.
    batched = basis_pursuit(unit, inst.codes @ unit, true_codes=inst.codes)
    assert batched.decisions == result.decisions, (batched.reasons, result.reasons)


def test_coherence_recovery_by_highs_omp_and_batched(cross_check):
    """Under K < (1 + 1/mu)/2 the split LP (HiGHS), K steps of OMP and the batched solver recover every code
    too (Tropp 2004); the batched solver proves each by its own dual certificate, without HiGHS."""
    claim = claim_named("l1_coherence")

    @cross_check
    @given(instances(claim, SMALL))
    def check(inst):
        if not claim.check(inst).premise:
            return
        unit = inst.dictionary.unit
        m = inst.codes @ unit
        highs = basis_pursuit(unit, m, solver="linprog", true_codes=inst.codes)
        assert highs.counts["failed"] == 0, highs.reasons
        omp = basis_pursuit(unit, m, solver="omp", k=inst.k, true_codes=inst.codes)
        assert omp.counts["failed"] == 0, omp.reasons
        batched = basis_pursuit(unit, m, true_codes=inst.codes)
        assert batched.counts["recovered"] == m.shape[0], batched.reasons
        assert not bool(batched.proof.fallback.any())

    check()


def test_erc_gives_a_dual_certificate(cross_check):
    """ERC(L) < 1 makes the minimum-norm dual certificate valid: |<d_j, y>| <= ||pinv(D_L) d_j||_1 < 1."""
    claim = claim_named("l1_erc")

    @cross_check
    @given(instances(claim, SMALL))
    def check(inst):
        if not claim.check(inst).premise:
            return
        for code in inst.codes:
            certificate = dual_certificate(inst.dictionary.unit, code)
            assert certificate.ok, certificate.reason

    check()
