"""SPEC section 4, theorem 4: inside the window eps K dmax < tau < dmin - eps (K - 1) dmax, the threshold
encoder (torch path) recovers every support of non-negative K-sparse codes with entries in [dmin, dmax]; a
least-squares refit on it reconstructs exactly; raw codes are off by at most eps (K - 1) dmax."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given

from atoms.claim_strategies import Sizes, instances
from atoms.kernels.threshold_encoder import threshold_encode
from atoms.verify import claim_named


@pytest.mark.parametrize("name", ["tsae_support", "tsae_refit", "tsae_code_error"])
def test_tsae_holds(holds, name):
    holds(name)


def numpy_support(inst) -> np.ndarray:
    """The encoder's support by numpy: pre-activations z = m U^T of m = codes U, kept where z > tau."""
    unit = inst.dictionary.unit.numpy()
    z = (inst.codes.numpy() @ unit) @ unit.T
    return z > inst.threshold


@pytest.mark.parametrize("name", ["false_tsae_low_threshold", "false_tsae_exact_raw"])
def test_false_tsae_refuted(refuted, name):
    report = refuted(name)
    inst = report.witness
    if name == "false_tsae_low_threshold":
        # Independent confirmation: numpy's encoder support differs from the true support.
        assert (numpy_support(inst) != (inst.codes.numpy() != 0)).any()
    else:
        unit = inst.dictionary.unit.numpy()
        codes = inst.codes.numpy()
        raw = codes @ unit @ unit.T
        assert np.abs(raw - codes)[codes != 0].max() > 1e-9


def test_support_recovery_against_numpy(cross_check):
    """The torch threshold encoder matches numpy's support and codes, and recovers the true support
    whenever the window premise holds."""
    claim = claim_named("tsae_support")

    @cross_check
    @given(instances(claim, Sizes(max_atoms=12, max_d=8, max_k=3, max_samples=6)))
    def check(inst):
        unit = inst.dictionary.unit
        n_atoms = unit.shape[0]
        tau = torch.full((n_atoms,), inst.threshold, dtype=torch.float64)
        encoded = threshold_encode(
            inst.codes @ unit, unit.T.contiguous(), torch.zeros(n_atoms, dtype=torch.float64), tau
        )
        expected = numpy_support(inst)
        assert np.array_equal(encoded.numpy() != 0, expected)
        z = (inst.codes.numpy() @ unit.numpy()) @ unit.numpy().T
        np.testing.assert_allclose(encoded.numpy(), np.where(expected, z, 0.0), atol=1e-12)
        if claim.check(inst).premise:
            assert np.array_equal(expected, inst.codes.numpy() != 0)

    check()
