"""Tropp's exact recovery coefficient per support: one thin QR (ours) against a least-squares solve per call.

The main job's shape: n_atoms = 2304 unit-norm Gaussian atoms in d = 576, SUPPORTS random supports of k = 32
atoms (its target L0). Variants, each on the same supports:

- lstsq: what one writes from the definition max_{j not in L} ||pinv(D_L) d_j||_1 without forming pinv:
  `numpy.linalg.lstsq(D_L, D_rest)` for the off-support atoms, then the column l1 norms.
- ours: `atoms.recovery.erc_of_atoms` (float64 on the CPU): QR of D_L, the rank test on R's singular values,
  one triangular solve against every atom.

Agreement: the largest relative difference between the two ERC values over the supports (rounding only).
Timing: the minimum of 3 rounds, each over every support; seconds per support in the table.
"""

from __future__ import annotations

import functools
import os

import numpy as np
import pytest
import torch

from atoms.recovery import erc_of_atoms

N_ATOMS, D, K, SUPPORTS = 2304, 576, 32, 64
TABLE = "ERC per support"

_values: dict[str, np.ndarray] = {}
_seconds: dict[str, float] = {}


@functools.lru_cache(maxsize=1)
def problem() -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Unit-norm atoms (n_atoms, d) float64 and SUPPORTS supports, each (k,) int64."""
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(N_ATOMS, D, generator=gen, dtype=torch.float64)
    W /= W.norm(dim=1, keepdim=True)
    return W, [torch.randperm(N_ATOMS, generator=gen)[:K] for _ in range(SUPPORTS)]


def erc_by_lstsq(W: np.ndarray, L: np.ndarray) -> float:
    """The textbook ERC: least squares of the support's atoms against every off-support atom."""
    rest = np.setdiff1d(np.arange(W.shape[0]), L)
    coef = np.linalg.lstsq(W[L].T, W[rest].T, rcond=None)[0]
    return float(np.abs(coef).sum(axis=0).max())


def run_variant(variant: str) -> np.ndarray:
    W, supports = problem()
    if variant == "ours":
        return np.array([erc_of_atoms(W, L) for L in supports])
    W_np = W.numpy()
    return np.array([erc_by_lstsq(W_np, L.numpy()) for L in supports])


@pytest.mark.parametrize("variant", ["lstsq", "ours"])
def test_erc(benchmark, summary, variant):
    benchmark.group = TABLE
    values = benchmark.pedantic(run_variant, args=(variant,), rounds=3, warmup_rounds=1, iterations=1)
    _values[variant] = values
    if benchmark.disabled:
        return
    seconds = benchmark.stats.stats.min / SUPPORTS
    _seconds[variant] = seconds
    reference = _values.get("lstsq")
    agreement = "" if reference is None or variant == "lstsq" else np.abs(values / reference - 1).max()
    summary.row(
        TABLE,
        variant=variant,
        **{
            "ms per support": f"{1e3 * seconds:.2f}",
            "speed-up over lstsq": f"{_seconds['lstsq'] / seconds:.1f}" if "lstsq" in _seconds else "n/a",
            "max relative difference": agreement if agreement == "" else f"{agreement:.1e}",
            "mean ERC": f"{values.mean():.3f}",
        },
    )
    summary.note(
        TABLE,
        f"{N_ATOMS} unit Gaussian atoms in d = {D}, {SUPPORTS} random supports of {K}; float64; "
        f"{torch.get_num_threads()} torch threads on {os.cpu_count()} CPUs; minimum of 3 rounds after a "
        "warm-up.",
    )
