"""SPEC section 3: the Welch bound mu >= sqrt((N - d) / (d (N - 1))) on the coherence of N unit atoms in
R^d."""

from __future__ import annotations

import math

import numpy as np
from hypothesis import given

from atoms.claim_strategies import Sizes, instances
from atoms.verify import claim_named


def numpy_coherence(atoms: np.ndarray) -> float:
    """Dense float64 reference: largest |cos| over distinct rows, normalised here."""
    unit = atoms / np.linalg.norm(atoms, axis=1, keepdims=True)
    gram = np.abs(unit @ unit.T)
    np.fill_diagonal(gram, 0.0)
    return float(gram.max())


def test_welch_holds(holds):
    report = holds("welch")
    # ETFs are in the search: it must reach the bound itself (margin ~ 0, up to rounding).
    assert abs(report.worst_conclusion_margin) < 1e-12


def test_false_welch_strict_refuted(refuted):
    report = refuted("false_welch_strict")
    witness = report.witness.dictionary.raw.numpy()
    n_atoms, d = witness.shape
    # Independent confirmation: the witness's coherence is under 1.01 x the Welch bound.
    assert numpy_coherence(witness) < 1.01 * math.sqrt((n_atoms - d) / (d * (n_atoms - 1)))


def test_welch_against_numpy(cross_check):
    claim = claim_named("welch")

    @cross_check
    @given(instances(claim, Sizes(max_atoms=12, max_d=6)))
    def check(inst):
        atoms = inst.dictionary.raw.numpy()
        n_atoms, d = atoms.shape
        welch = math.sqrt(max(n_atoms - d, 0) / (d * (n_atoms - 1)))
        mu = numpy_coherence(atoms)
        assert abs(mu - inst.mu) < 1e-12
        assert mu >= welch - 1e-12
        assert claim.check(inst).conclusion is True

    check()
