"""Coherence statistics of a whitened dictionary: tiled (ours) against the materialised Gram and a GEMM floor.

Each case (shape, dtype) times three variants on the same unit-norm AIP-whitened atoms `unit` (n, d), in
this order:

- floor: one GEMM with the FLOPs the statistics need at least, n^2 d (the n (n - 1) / 2 distinct pairs,
  2 d each): unit @ unit[: n / 2].T. Nothing is reduced; it is the time any tiled walk has to beat.
- materialised: what one writes without a kernel: G = unit @ unit.T (n^2 d FLOPs twice over, n^2 entries
  held), then abs, the per-atom max and argmax, the histogram and the threshold count over the strict upper
  triangle.
- ours: `atoms.kernels.gram_reduce` on the tensors' device, the same outputs in tiles: the Triton kernel on
  CUDA, the torch tiled reference on CPU (the Triton kernel is then not measured, and the summary says so).

Every variant computes the default statistics of `Dictionary`: 100 bins, plus one threshold (0.5).
Timing: one warm-up and ROUNDS timed rounds each; ratios to the floor use the minimum (the least disturbed
round on a shared machine). Peak memory is measured for every variant in one fresh process (conftest's
`measure_peak_memory`). The issue's targets (ours within 1.5 x the floor's time and under 1 GiB of extra
memory at 16384 x 2304) are reported in the summary table, never asserted.

Shapes: the issue's 16384 x 2304 runs under `--full`, and always on CUDA (milliseconds there). On CPU the
default is 4096 x 2304 float64 (the dtype `Dictionary` uses), about 1-2 minutes with 2 cores; `--full` adds
16384 x 2304 (about 15 minutes, and ~5 GiB for the materialised variant) and float32.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from atoms.aip import AIP
from atoms.dictionary import Dictionary
from atoms.kernels import aip_gram
from atoms.kernels.dispatch import backend

SHAPES = {"small": (4096, 2304), "large": (16384, 2304)}
DTYPES = {"fp64": torch.float64, "fp32": torch.float32, "bf16": torch.bfloat16}
VARIANTS = ("floor", "materialised", "ours")
BINS = 100
THRESHOLDS = (0.5,)
ROUNDS = {"small": 2, "large": 2}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TABLE = "coherence of a whitened dictionary"

_min_time: dict[tuple[str, str], dict[str, float]] = {}
_peaks: dict[tuple[str, str], dict[str, int | None]] = {}


@functools.lru_cache(maxsize=1)
def _unit64(shape: str) -> torch.Tensor:
    """Unit rows of a Dictionary of Gaussian atoms under an AIP whose covariance has a decaying spectrum
    (eigenvalues 1 / (1 + k / 64)), as activations have: float64 (n, d), on the CPU."""
    n, d = SHAPES[shape]
    gen = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    C = (Q / (1 + torch.arange(d, dtype=torch.float64) / 64)) @ Q.T
    W = torch.randn(n, d, generator=gen, dtype=torch.float64)
    return Dictionary(W, AIP.from_moment(C)).unit


def _inputs(shape: str, dtype: str) -> torch.Tensor:
    return _unit64(shape).to(device=DEVICE, dtype=DTYPES[dtype])


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def materialised_statistics(unit: torch.Tensor, bins: int, thresholds: tuple[float, ...]):
    """gram_reduce's outputs from the dense (n, n) Gram: (max, per-atom max, partner, histogram, counts)."""
    n = unit.shape[0]
    dtype = torch.float64 if unit.dtype == torch.float64 else torch.float32
    G = unit.to(dtype) @ unit.to(dtype).T
    A = G.abs_()
    A.fill_diagonal_(-1.0)
    best, partner = A.max(dim=1)
    pairs = A[torch.ones(n, n, dtype=torch.bool, device=unit.device).triu_(1)].to(torch.float64)
    histogram = torch.bincount((pairs * bins).long().clamp_(max=bins - 1), minlength=bins)
    counts = torch.stack([(pairs > t).sum() for t in thresholds])
    return best.max(), best, partner, histogram, counts


def coherence_step(variant: str, shape: str, dtype: str) -> Callable[[], object]:
    """The work of `variant` on fresh inputs, as a zero-argument callable; the peak-memory child's factory."""
    unit = _inputs(shape, dtype)
    if variant == "floor":
        half = unit[: unit.shape[0] // 2]

        def floor():
            out = unit @ half.T
            _sync()
            return out

        return floor
    if variant == "materialised":

        def materialised():
            out = materialised_statistics(unit, BINS, THRESHOLDS)
            _sync()
            return out

        return materialised
    if variant == "ours":

        def ours():
            out = aip_gram.gram_reduce(unit, bins=BINS, thresholds=THRESHOLDS)
            _sync()
            return out

        return ours
    raise ValueError(f"unknown variant {variant!r}; use one of {VARIANTS}")


def _peak_bytes(shape: str, dtype: str, variant: str, measure: Callable) -> int | None:
    """Peak memory of every variant of this (shape, dtype) from one child process (it builds the inputs
    once)."""
    if (shape, dtype) not in _peaks:
        calls = [[v, shape, dtype] for v in VARIANTS]
        peaks = measure(Path(__file__), "coherence_step", calls) or [None] * len(calls)
        _peaks[shape, dtype] = dict(zip(VARIANTS, peaks, strict=True))
    return _peaks[shape, dtype][variant]


def _cases(full: bool) -> tuple[list[str], list[str]]:
    if DEVICE == "cuda":
        return ["large"], ["fp64", "fp32", "bf16"]
    # Without bf16 GEMM instructions a CPU emulates bf16 products: bf16 is a CUDA case only.
    return (["small", "large"], ["fp64", "fp32"]) if full else (["small"], ["fp64"])


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


CASES = [
    pytest.param(shape, dtype, variant, id=f"{shape}-{dtype}-{variant}")
    for shape in SHAPES
    for dtype in DTYPES
    for variant in VARIANTS
]


@pytest.mark.parametrize(("shape", "dtype", "variant"), CASES)
def test_coherence(benchmark, summary, measure_peak_memory, full, shape, dtype, variant):
    shapes, dtypes = _cases(full)
    if shape not in shapes or dtype not in dtypes:
        pytest.skip(
            f"{shape} {dtype} runs under --full (CPU) or on CUDA: the default CPU run is 4096 x 2304 "
            "float64, about 1-2 minutes on 2 cores"
        )
    n, d = SHAPES[shape]
    mode = backend(torch.empty(0, device=DEVICE))
    benchmark.group = f"coherence {n}x{d} {dtype} [{mode}]"
    step = coherence_step(variant, shape, dtype)
    load_before = os.getloadavg()[0]
    benchmark.pedantic(step, rounds=ROUNDS[shape], warmup_rounds=1, iterations=1)
    load_after = os.getloadavg()[0]
    if benchmark.disabled:
        return
    del step

    stats = benchmark.stats.stats
    times = _min_time.setdefault((shape, dtype), {})
    times[variant] = stats.min
    floor = times.get("floor")
    x_floor = None if floor is None else stats.min / floor
    peak = _peak_bytes(shape, dtype, variant, measure_peak_memory)
    flops = {"floor": n * n * d, "materialised": 2 * n * n * d, "ours": n * n * d}[variant]
    benchmark.extra_info.update(
        backend=mode,
        device=DEVICE,
        kernel="triton" if mode == "triton" and variant == "ours" else "torch",
        n_atoms=n,
        d=d,
        min_flops=flops,
        gflops_per_s=flops / stats.min / 1e9,
        peak_bytes=peak,
        ratio_to_gemm_floor=x_floor,
        load_average=(load_before, load_after),
        torch_threads=torch.get_num_threads(),
    )
    summary.row(
        TABLE,
        **{
            "n_atoms x d": f"{n} x {d}",
            "dtype": dtype,
            "variant": variant,
            "min s": f"{stats.min:.3f}",
            "median s": f"{stats.median:.3f}",
            "GFLOP/s": f"{flops / stats.min / 1e9:.1f}",
            "peak MiB": _fmt(None if peak is None else peak / 2**20, ".0f"),
            "x floor": _fmt(x_floor, ".2f"),
            "load avg": f"{load_before:.1f}-{load_after:.1f}",
        },
    )
    if mode != "triton":
        summary.note(
            TABLE,
            f"Device {DEVICE}, {torch.get_num_threads()} torch threads: the Triton kernel is NOT measured "
            "here; `ours` is gram_reduce's torch tiled reference (backend 'torch'). This file benchmarks the "
            "Triton kernel on a CUDA machine.",
        )
    summary.note(
        TABLE,
        "floor = one GEMM of n^2 d FLOPs (unit @ unit[:n/2].T), the least work for the n (n - 1) / 2 pairs; "
        "GFLOP/s counts those n^2 d FLOPs for floor and ours (ours also computes whole diagonal tiles) and "
        "2 n^2 d for materialised. Times: min and median of the timed rounds after one warm-up; x floor "
        "uses the minima. Targets (issue 5) at 16384 x 2304, reported not asserted: ours <= 1.5 x floor, "
        "peak < 1024 MiB.",
    )
    summary.note(TABLE, f"Peak MiB: {measure_peak_memory.method}.")


def test_variants_agree():
    """The materialised statistics equal gram_reduce's (float64, small: no pair near a bin edge matters)."""
    gen = torch.Generator().manual_seed(3)
    unit = torch.nn.functional.normalize(torch.randn(300, 40, generator=gen, dtype=torch.float64), dim=1)
    top, best, partner, histogram, counts = materialised_statistics(unit, BINS, THRESHOLDS)
    ours = aip_gram.gram_reduce(unit, bins=BINS, thresholds=THRESHOLDS, tile=64)
    torch.testing.assert_close(best, ours.max_per_atom, rtol=0, atol=1e-12)
    torch.testing.assert_close(top, ours.max_abs_cos, rtol=0, atol=1e-12)
    assert torch.equal(partner, ours.partner)
    assert torch.equal(histogram, ours.histogram) and torch.equal(counts, ours.counts_above)
