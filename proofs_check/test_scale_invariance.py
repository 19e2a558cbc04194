"""Every claim of SPEC section 4 is homogeneous: coherence, spark, delta_K and ERC do not see the atoms'
norms, and the TSAE window, the codes and the raw code error all scale with dmax. So a claim's verdict must
be the same with the atoms and codes at 1e-6 and at 1e6 scale, which holds only if every slack of
atoms.theorems scales with what it compares (an absolute 1e-12 refuted the raw code error bound on a
Gershgorin-tight frame from dmax = 3.7e3 up)."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings

from atoms import synth
from atoms.claim_strategies import codes, instances
from atoms.theorems import CLAIMS, Instance, instance
from atoms.verify import claim_named

SCALES = (1e-6, 1e6)
# Instances drawn per claim by its own strategy (which leans on the claim's edges), each checked at 3 scales.
DRAWN = settings(
    max_examples=6,
    deadline=None,
    database=None,
    derandomize=True,
    phases=[Phase.generate],
    suppress_health_check=list(HealthCheck),
)
# A relative distance to an edge that float64 rounding cannot cross, the strategies' smallest slack.
NEAR = 1e-9


def rescaled(inst: Instance, scale: float) -> Instance:
    """The same instance with its atoms, codes, threshold and code range multiplied by `scale`."""

    def times(value):
        return None if value is None else value * scale

    return instance(
        inst.dictionary.raw * scale,
        inst.k,
        codes=times(inst.codes),
        threshold=times(inst.threshold),
        dmin=times(inst.dmin),
        dmax=times(inst.dmax),
        label=f"{inst.label} at scale {scale:g}",
    )


def assert_scale_free(name: str, inst: Instance) -> None:
    """The verdict of claim `name` on `inst` is the same at every scale and never a counterexample."""
    claim = claim_named(name)
    base = claim.check(inst)
    assert not base.counterexample, f"{name} violated at scale 1 on {inst.describe()}: {base.evidence}"
    for scale in SCALES:
        verdict = claim.check(rescaled(inst, scale))
        assert (verdict.premise, verdict.conclusion) == (base.premise, base.conclusion), (
            f"{name} at scale {scale:g} on {inst.describe()}: premise {verdict.premise} (margin "
            f"{verdict.premise_margin:.3g}), conclusion {verdict.conclusion} ({verdict.evidence}); at scale "
            f"1: {base.premise} ({base.premise_margin:.3g}), {base.conclusion} ({base.evidence})"
        )


def gershgorin(k: int, mu: float, *, negative: bool = False) -> torch.Tensor:
    return synth.gershgorin_tight_frame(k, mu, d=k + 1, n_atoms=k + 1, negative=negative)


def one_hot(n_atoms: int, *atoms: int, value: float = 1.0) -> torch.Tensor:
    code = torch.zeros(1, n_atoms, dtype=torch.float64)
    code[0, list(atoms)] = value
    return code


def tsae_at_an_end(end: str) -> Instance:
    """K = 2, mu = 0.2: codes reach the window's lower end (K + 1 atoms at +mu, two crowding the third) or
    its upper end (at -mu, one at dmin beside one at dmax), with tau a relative NEAR inside that end."""
    k, mu, dmin, dmax = 2, 0.2, 0.9, 1.0
    atoms = gershgorin(k + 1, mu, negative=end == "upper")
    if end == "lower":
        values = codes(atoms, 3, k, dmin, dmax, True, seed=0, mode="crowd")
        tau = mu * k * dmax * (1 + NEAR)
    else:
        values = codes(atoms, 3, k, dmin, dmax, True, seed=0, mode="oppose")
        tau = (dmin - mu * (k - 1) * dmax) * (1 - NEAR)
    return instance(atoms, k, codes=values, threshold=tau, dmin=dmin, dmax=dmax, label=f"window's {end} end")


@functools.cache
def edge_instances() -> dict[str, list[Instance]]:
    """Per claim, instances on which it sits at an edge: a premise held or failed by rounding or by NEAR, or
    a conclusion met with equality."""
    uniqueness_edge = synth.dictionary_with_coherence(5, 4, (1 - NEAR) / 3, seed=0)  # K = 2: mu < 1/3
    twins = synth.twin_dictionary(4, 3, seed=0)  # mu = 1: every premise at K = 1 is on its edge
    dirac = synth.dirac_hadamard(4)  # ERC on atoms {3, 7} is 1, computed as 1 - 3e-16
    return {
        "welch": [instance(synth.simplex_etf(5), 1)],
        "rip_gershgorin": [instance(gershgorin(3, 0.3), 3), instance(gershgorin(3, 0.3, negative=True), 3)],
        "rip_babel": [instance(gershgorin(3, 0.3), 3), instance(twins, 2)],
        "spark_coherence": [instance(synth.simplex_etf(4), 1), instance(twins, 1)],
        "uniqueness_coherence": [instance(uniqueness_edge, 2), instance(twins, 1)],
        "l1_coherence": [
            instance(uniqueness_edge, 2, codes=one_hot(5, 0, 1)),
            instance(twins, 1, codes=one_hot(4, 0)),
        ],
        "l1_erc": [instance(dirac, 2, codes=one_hot(8, 3, 7)), instance(twins, 1, codes=one_hot(4, 1))],
        "l1_rip": [instance(gershgorin(2, (1 - NEAR) / math.sqrt(2)), 1, codes=one_hot(3, 0))],
        "tsae_support": [tsae_at_an_end("lower"), tsae_at_an_end("upper")],
        "tsae_refit": [tsae_at_an_end("lower"), tsae_at_an_end("upper")],
        # The bound eps (K - 1) dmax is attained: every planted atom at dmax.
        "tsae_code_error": [
            instance(gershgorin(3, 0.25), 3, codes=one_hot(4, 0, 1, 2), dmax=1.0),
            instance(gershgorin(4, 0.3), 4, codes=one_hot(5, 0, 1, 2, 3, value=3.0), dmax=3.0),
        ],
    }


@pytest.mark.parametrize("name", [c.name for c in CLAIMS])
def test_claims_at_their_edges_are_scale_free(name):
    for inst in edge_instances()[name]:
        assert_scale_free(name, inst)


@pytest.mark.parametrize("name", [c.name for c in CLAIMS])
def test_drawn_instances_are_scale_free(name, budget):
    @DRAWN
    @given(instances(claim_named(name), budget.sizes))
    def check(inst):
        assert_scale_free(name, inst)

    check()
