"""SPEC section 4, theorem 3: exact l1 recovery by basis pursuit (the cvxpy reference on every example) under
the coherence condition K < (1 + 1/mu)/2, Tropp's ERC and Cai-Zhang's delta_2K < 1/sqrt(2); cross-checked by
HiGHS on the split LP, by OMP and by the dual certificate. At mu = 1 (exact twins) 1-sparse codes fail."""

from __future__ import annotations

import numpy as np
import pytest
import torch
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


def test_false_l1_one_sparse_refuted(refuted):
    """1-sparse codes are not all recovered at mu <= 1: an exact twin (duplicate or antipode) of the code's
    atom carries the same image at the same l1 norm, so the minimiser is a segment."""
    inst = refuted("false_l1_one_sparse").witness
    unit = inst.dictionary.unit.numpy()
    codes = inst.codes.numpy()
    # Independent confirmation in numpy: some code's atom has a twin, and moving the code onto it keeps
    # the image and the l1 norm.
    found = []
    for code in codes:
        (atom,) = code.nonzero()[0]
        for twin in np.flatnonzero(np.abs(unit @ unit[atom]) > 1 - 1e-12):
            if twin != atom:
                moved = np.zeros_like(code)
                moved[twin] = code[atom] * np.sign(unit[twin] @ unit[atom])
                found.append(np.allclose(moved @ unit, code @ unit, rtol=0, atol=1e-15 * abs(code[atom])))
    assert any(found), "the witness has no code on a twinned atom"


@pytest.mark.parametrize("twin", [1.0, -1.0], ids=["duplicate", "antipode"])
def test_a_non_unique_minimiser_is_never_recovered(twin):
    """W = [e1, twin e1, e2] and the code (1, 0, 0.5): every (1 - t, t twin, 0.5) with t in [0, 1] has the
    same image and l1 norm, so basis pursuit cannot prove the planted code; cvxpy returns the midpoint."""
    W = torch.tensor([[1.0, 0.0], [twin, 0.0], [0.0, 1.0]], dtype=torch.float64)
    code = torch.tensor([[1.0, 0.0, 0.5]], dtype=torch.float64)
    assert basis_pursuit(W, code @ W, solver="cvxpy", true_codes=code).decisions == ["failed"]
    assert basis_pursuit(W, code @ W, true_codes=code).decisions != ["recovered"]


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
