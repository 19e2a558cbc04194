"""SPEC section 4, theorem 1: delta_K <= (K - 1) mu (Gershgorin) and delta_K <= mu1(K - 1) (babel)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given

from atoms.claim_strategies import Sizes, instances
from atoms.rip import rip_constant
from atoms.verify import claim_named


def numpy_rip(unit: np.ndarray, k: int) -> float:
    """delta_K by a plain loop over supports with numpy's spectral norm (independent of atoms.rip)."""
    return max(
        np.linalg.norm(unit[list(s)] @ unit[list(s)].T - np.eye(k), 2)
        for s in itertools.combinations(range(unit.shape[0]), k)
    )


def numpy_babel(unit: np.ndarray, k: int) -> float:
    gram = np.abs(unit @ unit.T)
    np.fill_diagonal(gram, -np.inf)
    return float(np.sort(gram, axis=1)[:, ::-1][:, :k].sum(axis=1).max())


@pytest.mark.parametrize("name", ["rip_gershgorin", "rip_babel"])
def test_rip_bounds_hold(holds, name):
    report = holds(name)
    # The Gershgorin-tight frame is in the search: the bound is met with equality somewhere.
    assert report.worst_conclusion_margin < 1e-9


def test_false_rip_gershgorin_refuted(refuted):
    report = refuted("false_rip_gershgorin")
    inst = report.witness
    unit = inst.dictionary.unit.numpy()
    assert numpy_rip(unit, inst.k) > (inst.k - 2) * inst.mu + 1e-12


def test_rip_against_numpy(cross_check):
    claim = claim_named("rip_gershgorin")

    @cross_check
    @given(instances(claim, Sizes(max_atoms=10, max_d=6, max_k=4)))
    def check(inst):
        unit = inst.dictionary.unit.numpy()
        delta = numpy_rip(unit, inst.k)
        assert delta <= (inst.k - 1) * inst.mu + 1e-12
        assert delta <= numpy_babel(unit, inst.k - 1) + 1e-12
        exact = rip_constant(inst.dictionary, inst.k)
        assert exact.kind == "exact"
        assert abs(exact.value - delta) < 1e-12
        assert claim.check(inst).conclusion is True

    check()
