"""Representation shift (SPEC section 2): angles between token vectors, Euclidean against the AIP.

In-sample (fit tokens), held-out, and on a Gaussian null with the same second moment: under the AIP the
angles of real activations should centre near 90 degrees, as the null's do, while Euclidean ones do not.
"""

from __future__ import annotations

from typing import Any

import torch

from atoms.aip import AIP, Angles, euclidean_angles
from atoms.experiment_definitions import Keys, each
from atoms.experiment_metrics import random_rows

__all__ = ["ANGLE_BINS", "SHIFT", "representation_shift"]

# Angle histograms: 2-degree bins over [0, 180].
ANGLE_BINS = 90

ANGLES = Keys(
    {
        "mean": "Mean angle in degrees between pairs of distinct token vectors.",
        "median": "Median angle in degrees between pairs of distinct token vectors.",
        "mean_abs_cos": "Mean |cos| between pairs of distinct token vectors (0 = orthogonal on average).",
        "n_pairs": "Number of vector pairs measured (all pairs of angle_vectors vectors).",
        "n_vectors": "Number of token vectors whose pairs are measured.",
        "histogram": "Counts of the pair angles in 2-degree bins from 0 to 180 degrees.",
    }
)
SHIFT = each(each(ANGLES))
"""A layer's "shift": sample (in_sample, heldout, gaussian_null) -> geometry (euclidean, aip) -> ANGLES."""


def _angle_summary(angles: Angles, n_vectors: int) -> dict[str, Any]:
    hist = torch.histc(angles.degrees, bins=ANGLE_BINS, min=0.0, max=180.0)
    return ANGLES.build(
        mean=angles.mean,
        median=angles.median,
        mean_abs_cos=angles.mean_abs_cos,
        n_pairs=int(angles.degrees.numel()),
        n_vectors=n_vectors,
        histogram=[int(c) for c in hist.tolist()],
    )


def representation_shift(
    fit: torch.Tensor, heldout: torch.Tensor, aip: AIP, n_vectors: int, seed: int
) -> dict[str, dict[str, Any]]:
    """Euclidean and AIP angle statistics of token vectors: in-sample, held-out, and a Gaussian null.

    fit, heldout: activations (n, d); aip: fitted on the fit tokens. In-sample angles use fit tokens (whose
    whitened second moment is the identity by construction), held-out ones the held-out tokens under the
    same AIP, and the null N(0, C) vectors g = z L^T (z standard normal, C = L L^T): Gaussian vectors with
    the same second moment. Each uses `n_vectors` vectors and all their pairs.
    """
    gen = torch.Generator().manual_seed(seed + 17)
    null = torch.randn(n_vectors, aip.d, generator=gen, dtype=torch.float64) @ aip.cholesky.T
    samples = {
        "in_sample": fit[random_rows(fit.shape[0], n_vectors, seed)],
        "heldout": heldout[random_rows(heldout.shape[0], n_vectors, seed + 1)],
        "gaussian_null": null,
    }
    out = {}
    for name, x in samples.items():
        x = x.to(torch.float64)
        out[name] = {
            "euclidean": _angle_summary(euclidean_angles(x, seed=seed), x.shape[0]),
            "aip": _angle_summary(aip.angles(x, seed=seed), x.shape[0]),
        }
    return out
