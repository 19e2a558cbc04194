"""Basis pursuit throughput: the batched torch solver against cvxpy (Clarabel, HiGHS) and scipy's linprog.

The issue's problem set: 1000 problems with one Gaussian dictionary of n_atoms = 256 atoms in d = 128, each
code with 20 non-zeros on a uniform random support and N(0, 1) values (signed basis pursuit). Variants:

- batched: `basis_pursuit(..., solver="batched")`, all 1000 problems in one call (float64, ADMM + polish +
  certificates; HiGHS fallback for what it cannot prove, counted in the table). As in every recovery
  experiment, it is given the planted codes, and first searches each one's certificate.
- batched-blind: the same without the planted codes (`use_true_codes=False`): basis pursuit solved and
  proven from m alone, as the references solve it.
- cvxpy-clarabel: `solver="cvxpy"` with Clarabel, cvxpy's default: one compiled Problem, m a Parameter.
- cvxpy-highs: the same Problem solved by HiGHS through cvxpy.
- linprog: `scipy.optimize.linprog(method="highs")` on the split LP, one call per problem.

The references solve one problem at a time at a steady rate, so by default they time the first
REFERENCE_PROBLEMS problems (`--full`: all 1000) and throughput is problems per second. Agreement: the
fraction of those problems on which a reference's recovered / flagged / failed decision equals the batched
solver's. Targets (issue 8, reported not asserted): batched >= 50 x cvxpy-clarabel and >= 5 x linprog
throughput, with identical decisions.

`test_scaling` times the batched solver alone over batch sizes and problem sizes (sparsity 0.15 d) for the
the scaling table of docs/benchmarks.md.
"""

from __future__ import annotations

import functools
import os

import numpy as np
import pytest
import torch

from atoms.recovery import basis_pursuit

N_ATOMS, D, K, PROBLEMS = 256, 128, 20, 1000
REFERENCE_PROBLEMS = 100
VARIANTS = {
    "batched": {"solver": "batched"},
    "batched-blind": {"solver": "batched", "use_true_codes": False},
    "cvxpy-clarabel": {"solver": "cvxpy", "cvxpy_solver": "CLARABEL"},
    "cvxpy-highs": {"solver": "cvxpy", "cvxpy_solver": "HIGHS"},
    "linprog": {"solver": "linprog"},
}
TABLE = "basis pursuit: 1000 problems, n_atoms 256, d 128, sparsity 20"
SCALING = "batched basis pursuit: scaling"

_rates: dict[str, float] = {}
_decisions: dict[str, list[str]] = {}


@functools.lru_cache(maxsize=8)
def problems(
    n_atoms: int, d: int, k: int, batch: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """W (n_atoms, d) Gaussian, codes (batch, n_atoms) k-sparse with N(0, 1) values, m = codes @ W."""
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((n_atoms, d))
    X = np.zeros((batch, n_atoms))
    for b in range(batch):
        X[b, rng.choice(n_atoms, size=k, replace=False)] = rng.standard_normal(k)
    return W, X, X @ W


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_throughput(benchmark, summary, full, variant):
    W, X, M = problems(N_ATOMS, D, K, PROBLEMS)
    count = PROBLEMS if variant.startswith("batched") or full else REFERENCE_PROBLEMS
    benchmark.group = TABLE
    load_before = os.getloadavg()[0]
    result = benchmark.pedantic(
        lambda: basis_pursuit(W, M[:count], true_codes=X[:count], **VARIANTS[variant]),
        rounds=3 if variant.startswith("batched") else 1,
        warmup_rounds=1 if variant.startswith("batched") else 0,
        iterations=1,
    )
    load_after = os.getloadavg()[0]
    _decisions[variant] = result.decisions
    if benchmark.disabled:
        return
    seconds = benchmark.stats.stats.min
    rate = count / seconds
    _rates[variant] = rate
    batched = _decisions.get("batched")
    agree = None
    if batched is not None and variant != "batched":
        agree = float(np.mean([a == b for a, b in zip(batched[:count], result.decisions, strict=True)]))
    fallbacks = int(result.proof.fallback.sum()) if result.proof is not None else None
    benchmark.extra_info.update(problems=count, problems_per_s=rate, agreement=agree, counts=result.counts)
    summary.row(
        TABLE,
        variant=variant,
        problems=count,
        **{
            "min s": f"{seconds:.3f}",
            "problems/s": f"{rate:.1f}",
            "batched speed-up": f"{_rates['batched'] / rate:.1f}" if "batched" in _rates else "n/a",
            "same decision": "" if agree is None else f"{agree:.3f}",
            "recovered/flagged/failed": "/".join(
                str(result.counts[c]) for c in ("recovered", "flagged", "failed")
            ),
            "HiGHS fallbacks": "" if fallbacks is None else str(fallbacks),
            "load avg": f"{load_before:.1f}-{load_after:.1f}",
        },
    )
    summary.note(
        TABLE,
        f"{torch.get_num_threads()} torch threads on {os.cpu_count()} CPUs. Throughput from the minimum of 3 "
        "timed rounds (batched, after a warm-up) or one round (references, on the first "
        f"{REFERENCE_PROBLEMS} problems unless --full); batched speed-up = batched problems/s over the "
        "variant's; same decision = fraction of the variant's problems with the batched solver's decision. "
        "Targets (issue 8): >= 50 x cvxpy-clarabel, >= 5 x linprog, identical decisions.",
    )


SCALING_CASES = [(256, 128, 20), (512, 256, 40), (1024, 512, 80)]
SCALING_BATCHES = [10, 100, 1000]


@pytest.mark.parametrize("batch", SCALING_BATCHES)
@pytest.mark.parametrize(("n_atoms", "d", "k"), SCALING_CASES)
def test_scaling(benchmark, summary, full, n_atoms, d, k, batch):
    if not full and (n_atoms, batch) == (1024, 1000):
        pytest.skip("1000 problems of 1024 x 512 run under --full (a few minutes on 2 cores)")
    W, X, M = problems(n_atoms, d, k, batch, seed=1)
    benchmark.group = SCALING
    result = benchmark.pedantic(
        lambda: basis_pursuit(W, M, true_codes=X), rounds=2, warmup_rounds=0, iterations=1
    )
    if benchmark.disabled:
        return
    seconds = benchmark.stats.stats.min
    summary.row(
        SCALING,
        **{
            "n_atoms x d": f"{n_atoms} x {d}",
            "sparsity": k,
            "batch": batch,
            "min s": f"{seconds:.3f}",
            "problems/s": f"{batch / seconds:.1f}",
            "mean ADMM iterations": f"{float(result.proof.iterations.double().mean()):.0f}",
            "recovered": result.counts["recovered"],
            "HiGHS fallbacks": int(result.proof.fallback.sum()),
        },
    )
    summary.note(
        SCALING, "Minimum of 2 rounds; float64 on the CPU; no warm-up (the first call builds nothing)."
    )
