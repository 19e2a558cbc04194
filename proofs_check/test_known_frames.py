"""SPEC section 7's independent references: frames whose coherence, delta_K and spark have closed forms.

Equiangular tight frames (simplex, Steiner) reach the Welch bound; the Gershgorin-tight frame has
delta_K = (K - 1) mu exactly; the Dirac-Hadamard dictionary [I; H_n / sqrt(n)] has coherence 1/sqrt(n) and,
for n a perfect square, spark 2 sqrt(n) (Donoho-Huo 2001). Each value is checked with a dense numpy
computation and through the claims of atoms.theorems (where a false variant must fail on the frame).
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from atoms import synth
from atoms.rip import rip_constant
from atoms.theorems import instance
from atoms.uniqueness import spark
from atoms.verify import claim_named


def numpy_coherence(atoms: np.ndarray) -> float:
    unit = atoms / np.linalg.norm(atoms, axis=1, keepdims=True)
    gram = np.abs(unit @ unit.T)
    np.fill_diagonal(gram, 0.0)
    return float(gram.max())


def welch(n_atoms: int, d: int) -> float:
    return math.sqrt((n_atoms - d) / (d * (n_atoms - 1)))


ETFS = [
    *[
        (f"simplex d={d} seed={seed}", lambda d=d, seed=seed: synth.simplex_etf(d, seed))
        for d in (2, 3, 5, 8)
        for seed in (None, 7)
    ],
    ("steiner (16, 6)", lambda: synth.steiner_etf(4, 2)),
    ("steiner (28, 7)", lambda: synth.steiner_etf(7, 3, seed=1)),
    ("steiner (64, 28)", lambda: synth.steiner_etf(8, 2)),
]


@pytest.mark.parametrize(("label", "build"), ETFS, ids=[label for label, _ in ETFS])
def test_etfs_reach_the_welch_bound(label, build):
    atoms = build()
    n_atoms, d = atoms.shape
    assert abs(numpy_coherence(atoms.numpy()) - welch(n_atoms, d)) < 1e-12
    inst = instance(atoms, 1, label=label)
    verdict = claim_named("welch").check(inst)
    assert verdict.conclusion is True and abs(verdict.conclusion_margin) < 1e-12
    assert claim_named("false_welch_strict").check(inst).counterexample


def numpy_rip(atoms: np.ndarray, k: int) -> float:
    unit = atoms / np.linalg.norm(atoms, axis=1, keepdims=True)
    return max(
        np.abs(np.linalg.eigvalsh(unit[list(s)] @ unit[list(s)].T) - 1.0).max()
        for s in itertools.combinations(range(unit.shape[0]), k)
    )


@pytest.mark.parametrize("k", [2, 3, 4, 5])
@pytest.mark.parametrize(("mu", "extra_d", "extra_atoms"), [(0.1, 2, 0), (0.3, 0, 0), (0.6, 1, 2)])
def test_gershgorin_is_tight(k, mu, extra_d, extra_atoms):
    d = k + extra_d
    atoms = synth.gershgorin_tight_frame(k, mu, d=d, n_atoms=d + extra_atoms, seed=0)
    assert abs(numpy_coherence(atoms.numpy()) - mu) < 1e-12
    assert abs(numpy_rip(atoms.numpy(), k) - (k - 1) * mu) < 1e-12
    exact = rip_constant(atoms, k)
    assert exact.kind == "exact" and abs(exact.value - (k - 1) * mu) < 1e-12
    inst = instance(atoms, k, label=f"gershgorin_tight_frame(K={k}, mu={mu})")
    verdict = claim_named("rip_gershgorin").check(inst)
    assert verdict.conclusion is True and abs(verdict.conclusion_margin) < 1e-12
    assert claim_named("false_rip_gershgorin").check(inst).counterexample


def numpy_spark(atoms: np.ndarray, up_to: int) -> float:
    for k in range(1, up_to + 1):
        for subset in itertools.combinations(range(atoms.shape[0]), k):
            rows = atoms[list(subset)]
            if np.linalg.matrix_rank(rows, tol=1e-9 * np.linalg.norm(rows, 2)) < k:
                return float(k)
    return math.inf


@pytest.mark.parametrize("n", [2, 4, 8, 16, 32])
def test_dirac_hadamard_coherence(n):
    atoms = synth.dirac_hadamard(n, seed=3)
    assert abs(numpy_coherence(atoms.numpy()) - 1 / math.sqrt(n)) < 1e-12
    assert abs(instance(atoms, 1).mu - 1 / math.sqrt(n)) < 1e-12


def test_dirac_hadamard_spark(budget):
    """spark = 2 sqrt(n) for n = 4 (and n = 16 in the full budget: a MILP of a few seconds), with a
    brute-force confirmation for n = 4."""
    sizes = (4, 16) if budget.name == "full" else (4,)
    for n in sizes:
        atoms = synth.dirac_hadamard(n)
        result = spark(atoms, time_limit=120.0)
        assert result.kind == "exact" and result.value == 2 * math.sqrt(n), result
    assert numpy_spark(synth.dirac_hadamard(4).numpy(), 5) == 4
