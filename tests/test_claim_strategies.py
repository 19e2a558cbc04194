"""atoms.claim_strategies: adversarial codes, rebuildable labels, a recipe for every claim."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from atoms import claim_strategies, synth
from atoms.claim_strategies import RECIPES, Sizes, codes, instances, recipe_for
from atoms.errors import BadInputError
from atoms.theorems import CLAIMS, FALSE_VARIANTS, Claim
from atoms.verify import claim_named

FAST = settings(max_examples=15, deadline=None, database=None, suppress_health_check=list(HealthCheck))


@pytest.mark.parametrize("mode", ["random", "crowd", "oppose"])
@pytest.mark.parametrize("nonneg", [True, False])
def test_codes_are_k_sparse_in_range(mode, nonneg):
    atoms = synth.gaussian_dictionary(12, 5, seed=1)
    values = codes(atoms, 20, 3, 0.5, 2.0, nonneg, seed=4, edge=0.5, mode=mode).numpy()
    assert values.shape == (20, 12)
    assert np.all(np.count_nonzero(values, axis=1) == 3)
    magnitudes = np.abs(values[values != 0])
    assert magnitudes.min() >= 0.5 and magnitudes.max() <= 2.0
    if nonneg:
        assert values.min() >= 0.0
    if mode == "crowd":
        assert np.all(magnitudes == 2.0)
    if mode == "oppose":
        assert np.all(np.sort(np.abs(values), axis=1)[:, -3:] == [0.5, 2.0, 2.0])


def test_crowd_codes_reach_the_off_support_extreme():
    """On the Gershgorin-tight frame (K + 1 atoms at cosine +mu), a crowded code on K atoms gives the
    remaining planted atom the pre-activation mu K dmax: the TSAE window's lower end."""
    k, mu = 3, 0.2
    atoms = synth.gershgorin_tight_frame(k + 1, mu, d=k + 1)
    values = codes(atoms, 10, k, 0.5, 1.0, True, seed=0, mode="crowd")
    z = (values @ atoms) @ atoms.T
    off = np.where(values.numpy() == 0, z.numpy(), -np.inf).max(axis=1)
    np.testing.assert_allclose(off, mu * k * 1.0, atol=1e-12)


def test_window_family_reaches_the_window_end_its_threshold_sits_at():
    """The "window" family's codes reach the lower end mu K dmax (off support) or the upper end
    dmin - mu (K - 1) dmax (on support) exactly, and tau sits just inside that end or within 1 % beyond it."""
    seen = set()

    @settings(FAST, max_examples=30, derandomize=True)
    @given(instances(claim_named("tsae_support"), Sizes(max_atoms=10, max_d=6, max_k=3), ("window",)))
    def check(inst):
        mu, k, dmin, dmax, tau = inst.mu, inst.k, inst.dmin, inst.dmax, inst.threshold
        lower, upper = mu * k * dmax, dmin - mu * (k - 1) * dmax
        assert 0 < lower < upper
        codes = inst.codes.numpy()
        unit = inst.dictionary.unit.numpy()
        z = codes @ unit @ unit.T
        where = inst.label.rsplit("(", 1)[1].rstrip(")")
        seen.add(where)
        if where in ("below the window", "at the lower end"):
            np.testing.assert_allclose(np.where(codes == 0, z, -np.inf).max(axis=1), lower, rtol=1e-12)
            assert (lower * (1 - 1e-2) <= tau < lower) if where == "below the window" else lower < tau < upper
        else:
            np.testing.assert_allclose(np.where(codes != 0, z, np.inf).min(axis=1), upper, rtol=1e-12)
            assert (upper < tau <= upper * (1 + 1e-2)) if where == "above the window" else lower < tau < upper

    check()
    assert seen == {"below the window", "at the lower end", "above the window", "at the upper end"}


def test_codes_reject_bad_arguments():
    atoms = synth.gaussian_dictionary(3, 3, seed=0)
    with pytest.raises(BadInputError, match="mode must be 'random', 'crowd' or 'oppose'"):
        codes(atoms, 2, 1, 0.5, 1.0, True, seed=0, mode="worst")
    with pytest.raises(BadInputError, match="needs an atom besides the k=3"):
        codes(atoms, 2, 3, 0.5, 1.0, True, seed=0, mode="crowd")


def test_families_must_belong_to_the_recipe():
    with pytest.raises(BadInputError, match="must be a non-empty subset"):
        instances(claim_named("welch"), families=("edge",))


def test_every_claim_has_a_recipe():
    assert {c.name for c in (*CLAIMS, *FALSE_VARIANTS)} <= set(RECIPES)


@pytest.mark.parametrize("name", ["tsae_support", "l1_coherence", "spark_coherence", "false_l1_one_sparse"])
def test_labels_rebuild_the_instance(name):
    """The label is the generator calls: evaluated, they give back the dictionary and the codes."""

    @FAST
    @given(instances(claim_named(name), Sizes(max_atoms=10, max_d=6, max_k=3)))
    def check(inst):
        parts = inst.label.split("; ")
        atoms = eval(parts[0], {"synth": synth})
        torch.testing.assert_close(atoms, inst.dictionary.raw, rtol=0, atol=0)
        if inst.codes is not None:
            namespace = {"claim_strategies": claim_strategies, "atoms": inst.dictionary.unit}
            torch.testing.assert_close(eval(parts[1], namespace), inst.codes, rtol=0, atol=0)
        if inst.threshold is not None:
            assert parts[2].startswith(f"tau={inst.threshold!r} (")

    check()


@pytest.mark.parametrize("needs", [(), ("codes",), ("codes", "threshold", "dmin", "dmax")])
def test_a_claim_without_a_recipe_gets_a_generic_one_whose_families_all_draw(needs):
    claim = Claim("new_claim", "0", "a claim added later", lambda inst: 1.0, lambda inst: (True, 1.0, ""))
    claim = replace(claim, needs=needs)
    drawn = {}
    for family in recipe_for(claim).families:

        @settings(FAST, max_examples=2, phases=[Phase.generate])
        @given(instances(claim, Sizes(), (family,)), st.just(family))
        def draw(inst, family):
            drawn[family] = inst

        draw()
    assert set(drawn) == set(recipe_for(claim).families)
    for family, inst in drawn.items():
        assert all(getattr(inst, field) is not None for field in needs), family
