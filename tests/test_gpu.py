"""GPU suite: the Triton kernels compiled on a CUDA device against float64 references, and the public APIs on
CUDA tensors against their CPU results. Every test is marked `gpu`: `pytest -m gpu tests/test_gpu.py`, or
`python -P benchmarks/gpu_check.py`, which runs this suite and the benchmarks' CUDA rows in one table.

Without a CUDA device every test skips (CI runs on CPUs and stays green).

ATOMS_GPU_DRYRUN=1 runs the suite on the CPU instead: the device runs go through Triton's interpreter
(ATOMS_KERNELS=interpret) on tiny shapes, so this file's own code can be checked on a machine without a GPU
(about 20 s on 2 cores). A dry run says nothing about compiled kernels.

Kernels. Every kernel output is allocated NaN-poisoned (each kernel module's `_empty`, as in the interpreter
tests; integer outputs get their dtype's maximum, which for the encoder's 2-bit states means "on and in the
window"), so an element a kernel leaves unwritten fails the comparison. Shapes are not multiples of the blocks
(1 x 16 x 4, 1023 x 577 x 2305) and reach the sizes the project runs (encoder 1024 x 2304 x 16384, Gram
16384 x 2304, 4096 support Grams of 64 atoms), in every dtype each kernel accepts: fp32 in each of its
product precisions, bf16, fp16, and float64 where the kernel takes it. A spy on each kernel module's `launch`
checks that the kernels really ran, compiled ("triton") or, in the dry run, interpreted. Each tolerance is a
bound on rounding, stated beside its comparison, in units of the magnitudes that rounding scales with.

Public APIs. Each runs once on device tensors (kernels on the device) and once on CPU tensors with
ATOMS_KERNELS=torch (the reference paths); every tensor result must be on the device, except those documented
to live on the host (a SecondMoment's state, an AIP's factor, a Capture's rows and tokens), and every result
must agree with the CPU one within float rounding.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from types import ModuleType
from typing import Any, NamedTuple
from unittest import mock

import numpy as np
import pytest
import torch
from test_threshold_encoder import closed_form, grid_problem, run
from tiny_models import byte_tokenizer, tiny_llama

import atoms.recovery
from atoms.activations import capture
from atoms.aip import AIP, SecondMoment
from atoms.dictionary import Dictionary
from atoms.kernels import aip_gram, dispatch, support_gram, threshold_encoder
from atoms.kernels.aip_gram import gram_reduce
from atoms.kernels.support_gram import support_coherence
from atoms.kernels.threshold_encoder import threshold_encode
from atoms.metrics import certified_fractions, per_sample_coherence, q_star, r2
from atoms.recovery import basis_pursuit
from atoms.train import TrainConfig, train
from atoms.tsae import TSAE, ReLUSAE

DRY_RUN = os.environ.get("ATOMS_GPU_DRYRUN", "") not in ("", "0")
DEVICE = torch.device("cpu" if DRY_RUN else "cuda")
# The backend every kernel launch of a device run must take.
KERNEL_MODE = "interpret" if DRY_RUN else "triton"

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not (DRY_RUN or torch.cuda.is_available()),
        reason="no CUDA device (ATOMS_GPU_DRYRUN=1 dry-runs this suite on the CPU, Triton interpreted)",
    ),
    pytest.mark.skipif(not dispatch.HAS_TRITON, reason="Triton is not installed (Linux wheels only)"),
]

# Unit roundoff of each dtype's significand, and of TF32's (11 bits).
UNIT_ROUNDOFF = {
    torch.float64: 2.0**-53,
    torch.float32: 2.0**-24,
    torch.bfloat16: 2.0**-8,
    torch.float16: 2.0**-11,
}
FP32 = UNIT_ROUNDOFF[torch.float32]  # every kernel and cuBLAS GEMM here accumulates in fp32 (or float64)
FP64 = UNIT_ROUNDOFF[torch.float64]
TF32 = 2.0**-11


def size(gpu: Any, dry: Any) -> Any:
    """The GPU run's value, or the dry run's (tiny, because the interpreter runs programs one at a time)."""
    return dry if DRY_RUN else gpu


class Variant(NamedTuple):
    """A dtype a kernel accepts and, for fp32, how it multiplies: the id part is `name`."""

    name: str
    dtype: torch.dtype
    precision: str = ""
    """fp32 products: "ieee" or "tf32" (encoder: torch's matmul setting), "ieee" or "tf32x3" (Gram)."""


def cases(shapes: list[tuple[int, ...]], variants: list[Variant]) -> list[Any]:
    """Every (shape, variant), with ids "<shape>-<dtype>" (benchmarks/gpu_check.py reads them back)."""
    return [
        pytest.param(shape, variant, id=f"{'x'.join(map(str, shape))}-{variant.name}")
        for shape in shapes
        for variant in variants
    ]


def _poisoned(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if dtype.is_floating_point:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.full(shape, torch.iinfo(dtype).max, dtype=dtype, device=device)


@pytest.fixture(autouse=True)
def device_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    """Kernel outputs NaN-poisoned, and the device runs' backend: Triton's interpreter in the dry run, the
    default dispatch (compiled Triton for CUDA tensors) otherwise."""
    for module in (threshold_encoder, aip_gram, support_gram):
        monkeypatch.setattr(module, "_empty", _poisoned)
    if DRY_RUN:
        monkeypatch.setenv("ATOMS_KERNELS", "interpret")
    else:
        monkeypatch.delenv("ATOMS_KERNELS", raising=False)


@contextmanager
def cpu_reference() -> Iterator[None]:
    """The torch reference paths, for the CPU runs the device runs are compared with."""
    with mock.patch.dict(os.environ, {"ATOMS_KERNELS": "torch"}):
        yield


@contextmanager
def launches(*modules: ModuleType) -> Iterator[set[str]]:
    """The backends of the kernel launches of `modules` inside the block (filled when it ends)."""
    modes: set[str] = set()
    with ExitStack() as stack:
        spies = [stack.enter_context(mock.patch.object(m, "launch", wraps=m.launch)) for m in modules]
        yield modes
        # launch(kernel, grid, mode, ...)
        modes.update(call.args[2] for spy in spies for call in spy.call_args_list)


@contextmanager
def fp32_products(precision: str) -> Iterator[None]:
    """torch's fp32 matmul setting, which the encoder kernel follows: "tf32" -> "high", else "highest"."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high" if precision == "tf32" else "highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def assert_on_device(*results: Any) -> None:
    """Every tensor in `results` (nested in tuples, lists and dicts) is on the device of the run's inputs."""
    for r in results:
        if isinstance(r, torch.Tensor):
            assert r.device.type == DEVICE.type, f"a result is on {r.device}, its inputs on {DEVICE}"
        elif isinstance(r, dict):
            assert_on_device(*r.values())
        elif isinstance(r, (tuple, list)):
            assert_on_device(*r)


def close(got: Any, want: Any, *, rtol: float, atol: float = 0.0, msg: str | None = None) -> None:
    """Device and CPU results agree (tensors compared on the CPU, whatever device each is on)."""
    torch.testing.assert_close(
        torch.as_tensor(got).cpu(),
        torch.as_tensor(want).cpu(),
        rtol=rtol,
        atol=atol,
        check_dtype=False,
        msg=msg,
    )


@functools.lru_cache(maxsize=2)
def unit_rows(n: int, d: int, seed: int) -> torch.Tensor:
    """n Gaussian unit rows in R^d, float64, on the CPU (seeded; kept for the next dtype's test)."""
    w = torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return torch.nn.functional.normalize(w, dim=1)


# ------------------------------------------------------------------------------------------------------------
# Threshold encoder
# ------------------------------------------------------------------------------------------------------------

ENCODER_SHAPES = size([(1, 16, 4), (1023, 577, 2305), (1024, 2304, 16384)], [(1, 16, 4), (33, 17, 45)])
ENCODER_VARIANTS = [
    Variant("fp32-ieee", torch.float32, "ieee"),
    Variant("fp32-tf32", torch.float32, "tf32"),
    Variant("bf16", torch.bfloat16),
    Variant("fp16", torch.float16),
]


def assert_encoder_matches(got: dict[str, Any], want: dict[str, Any], variant: Variant) -> None:
    """`run`'s results (on any device) against test_threshold_encoder's float64 closed form."""
    got = {k: v.cpu().double().numpy() for k, v in got.items() if v is not None}
    u = UNIT_ROUNDOFF[variant.dtype]
    # Grid inputs make every z exact in the fp32 accumulator, even in TF32 (test_threshold_encoder's module
    # docstring), and keep it 1/64 from theta and from the window's edges: masks and l0 must be exact, and a
    # code's only error is its conversion to x's dtype, rounded on a GPU (u |z|), truncated under the
    # interpreter (2 u |z|).
    np.testing.assert_array_equal(got["codes"] != 0, want["codes"] != 0)
    bad = np.abs(got["codes"] - want["codes"]) > 2 * u * np.abs(want["codes"])
    assert not bad.any(), f"{bad.sum()} codes off by more than 2 u |z|"
    if "l0" in got:
        np.testing.assert_array_equal(got["l0"], want["l0"])
    # A gradient entry sums `terms` products: fp32 accumulation errs by at most terms * FP32 of the sum of
    # their magnitudes (closed_form's "scale", the same sums on absolute values; the worst case gamma_K). TF32
    # backward GEMMs ("high") round both operands of every product: + 2 TF32. Results in x's dtype take up to
    # 4 roundings to it (the result; the b_enc column sum in x's dtype before b_dec's GEMV; cuBLAS's split-K
    # reduction, which torch lets round to half types); theta's is fp32. Plus one subnormal spacing for
    # results below the smallest normal.
    batch, n = want["codes"].reshape(-1, want["codes"].shape[-1]).shape
    terms = {"x": n, "W_enc": batch, "b_enc": batch, "b_dec": batch + n, "threshold": batch}
    for name, count in terms.items():
        if name not in got:
            continue
        out = torch.float32 if name == "threshold" else variant.dtype
        finfo = torch.finfo(out)
        rel = count * FP32 + (2 * TF32 if variant.precision == "tf32" else 0.0) + 4 * UNIT_ROUNDOFF[out]
        err = np.abs(got[name] - want[name])
        bound = rel * want["scale"][name] + finfo.smallest_normal * finfo.eps
        assert got[name].shape == want[name].shape, name
        assert (err <= bound).all(), (
            f"{name}: error {float((err / np.maximum(want['scale'][name], 1e-300)).max()):.3g} of the "
            f"magnitude of its terms, bound {rel:.3g}"
        )


@functools.lru_cache(maxsize=1)
def encoder_problem(shape: tuple[int, int, int], return_l0: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """test_threshold_encoder's grid problem in float64 with the upstream gradient g moved onto the 1/8 grid
    in [-4, 4], so that every input is exact in every dtype and one float64 closed form (numpy, ~10 s at the
    largest shape) serves all variants; and that closed form."""
    batch, d, n = shape
    p = grid_problem(
        seed=0, batch_shape=(batch,), d=d, n=n, dtype=torch.float64, with_b_dec=True, half_width_32nds=2
    )
    p["g"] = (p["g"] * 8).round().clamp(-32, 32) / 8
    return p, closed_form(p, return_l0)


def encoder_inputs(p: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
    """The problem on the device: x, the parameters and g in `dtype`; theta and l0's gradient in fp32."""
    wide = ("threshold", "gl")
    return {
        k: v.to(DEVICE, torch.float32 if k in wide else dtype) if isinstance(v, torch.Tensor) else v
        for k, v in p.items()
    }


@pytest.mark.parametrize(("shape", "variant"), cases(ENCODER_SHAPES, ENCODER_VARIANTS))
def test_encoder_grid(shape: tuple[int, int, int], variant: Variant) -> None:
    """Forward and backward (codes, l0, gradients wrt x, W_enc, b_enc, b_dec, theta) on grid inputs."""
    p, want = encoder_problem(shape, return_l0=True)
    with fp32_products(variant.precision), launches(threshold_encoder) as modes:
        got = run(threshold_encode, encoder_inputs(p, variant.dtype))
    assert modes == {KERNEL_MODE}
    assert_on_device(*got.values())
    assert_encoder_matches(got, want, variant)


@pytest.mark.parametrize(
    ("shape", "variant"), cases(ENCODER_SHAPES[1:2], [ENCODER_VARIANTS[0], ENCODER_VARIANTS[2]])
)
def test_encoder_grid_without_l0(shape: tuple[int, int, int], variant: Variant) -> None:
    """The kernels' other compiled variants: no l0 output (forward), no l0 gradient (backward); no x grad."""
    p, want = encoder_problem(shape, return_l0=False)
    with fp32_products(variant.precision), launches(threshold_encoder) as modes:
        got = run(threshold_encode, encoder_inputs(p, variant.dtype), return_l0=False, x_grad=False)
    assert modes == {KERNEL_MODE} and "x" not in got
    assert_encoder_matches(got, want, variant)


@pytest.mark.parametrize(("shape", "variant"), cases(ENCODER_SHAPES, ENCODER_VARIANTS))
def test_encoder_continuous(shape: tuple[int, int, int], variant: Variant) -> None:
    """Forward on Gaussian inputs, where products and sums round: codes may differ from the float64 ones only
    where z lies within rounding of theta."""
    batch, d, n = shape
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, d, generator=gen).to(variant.dtype)
    W = (torch.randn(d, n, generator=gen) / d**0.5).to(variant.dtype)
    b = (0.1 * torch.randn(n, generator=gen)).to(variant.dtype)
    theta = 0.5 + torch.rand(n, generator=gen)  # about 30% of the unit-variance z pass it
    with fp32_products(variant.precision), launches(threshold_encoder) as modes:
        codes, l0 = threshold_encode(*(t.to(DEVICE) for t in (x, W, b, theta)), return_l0=True)
    assert modes == {KERNEL_MODE}
    assert_on_device(codes, l0)
    x64, W64, b64, t64 = (t.to(DEVICE, torch.float64) for t in (x, W, b, theta))
    z = torch.addmm(b64, x64, W64)
    # z of the stored inputs against the kernel's: fp32 accumulation of d products and the bias, each step
    # rounding once (FMA, the interpreter's numpy sums) or up to twice (tensor-core accumulation may truncate,
    # Fasi et al. 2021): (2 d + 2) FP32 of sum |x_k W_kj| + |b_j|; TF32 rounds both operands: + 2 TF32 of it.
    scale = torch.addmm(b64.abs(), x64.abs(), W64.abs())
    err = ((2 * d + 2) * FP32 + (2 * TF32 if variant.precision == "tf32" else 0.0)) * scale
    on = z > t64
    clear = (z - t64).abs() > err
    got = codes.double()
    assert bool(((got != 0) == on)[clear].all()), "a code is on/off against a pre-activation clear of theta"
    # Where the kernel fires, its code is its z converted to x's dtype: rounded (u), or truncated under the
    # interpreter (2 u).
    u = UNIT_ROUNDOFF[variant.dtype]
    fired = got != 0
    assert bool(((got - z).abs() <= err + 2 * u * (z.abs() + err))[fired].all())
    if variant.precision == "ieee":
        # Exact fp32 products under torch's "highest", not TF32: an FMA chain's round-to-nearest errors stay
        # within 10 sqrt(d) FP32 of the magnitudes (see test_gram_reduce), plus the bias's rounding.
        assert bool(((got - z).abs() <= (10 * math.sqrt(d) + 1) * FP32 * scale)[fired].all())
    assert bool(((l0.double() - on.sum(1)).abs() <= (~clear).sum(1)).all())


def test_encoder_rejects_float64() -> None:
    """float64 runs on the torch path only: the kernel path refuses it and says how to get it."""
    x = torch.randn(4, 3, dtype=torch.float64, device=DEVICE)
    W = torch.randn(3, 5, dtype=torch.float64, device=DEVICE)
    b, theta = torch.zeros(5, dtype=torch.float64, device=DEVICE), torch.full((5,), 0.1, device=DEVICE)
    with pytest.raises(TypeError, match="ATOMS_KERNELS=torch"):
        threshold_encode(x, W, b, theta)


# ------------------------------------------------------------------------------------------------------------
# AIP Gram reduction
# ------------------------------------------------------------------------------------------------------------

GRAM_VARIANTS = [
    Variant("fp64", torch.float64),
    Variant("fp32-ieee", torch.float32, "ieee"),
    Variant("fp32-tf32x3", torch.float32, "tf32x3"),
    Variant("bf16", torch.bfloat16),
    Variant("fp16", torch.float16),
]
# Degenerate shapes (one atom; d = 1, where every pair has |cos| = 1, all tied) in an FMA and a tensor-core
# variant; the others in all five. Each (shape, variant) is a Triton compilation of its own, ~2-5 s.
GRAM_CASES = cases(size([(1, 16), (33, 1)], [(1, 5), (33, 1)]), GRAM_VARIANTS[1::2]) + cases(
    size([(1023, 577), (16384, 2304)], [(70, 37)]), GRAM_VARIANTS
)
BINS = 100
THRESHOLDS = (0.05, 0.1, 0.5)


def pairs_above(unit: torch.Tensor, limits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 |cos| of the rows of `unit`, in dense row blocks on its device: each row's maximum over j != i
    (n,), and for each of `limits` (any order) the number of pairs i < j with |cos| above it."""
    u = unit.double()
    n = u.shape[0]
    ordered, order = limits.double().to(u.device).sort()
    hits = torch.zeros(ordered.numel() + 1, dtype=torch.int64, device=u.device)
    row_max = torch.empty(n, dtype=torch.float64, device=u.device)
    cols = torch.arange(n, device=u.device)
    step = max(1, (1 << 26) // n)  # 2^26 float64 entries (512 MiB) per block
    for r0 in range(0, n, step):
        a = (u[r0 : r0 + step] @ u.T).abs_()
        rows = cols[r0 : r0 + a.shape[0]]
        a[rows - r0, rows] = -1.0
        row_max[rows] = a.max(dim=1).values
        upper = a[cols[None, :] > rows[:, None]]
        # searchsorted = how many limits lie below each |cos|
        hits += torch.bincount(torch.searchsorted(ordered, upper), minlength=hits.numel())
    above = torch.empty_like(hits[1:])
    above[order] = hits.flip(0).cumsum(0).flip(0)[1:]
    return row_max, above


@pytest.mark.parametrize(("shape", "variant"), GRAM_CASES)
def test_gram_reduce(shape: tuple[int, int], variant: Variant) -> None:
    n, d = shape
    stored = unit_rows(n, d, seed=2).to(DEVICE, variant.dtype)
    with launches(aip_gram) as modes:
        stats = gram_reduce(stored, bins=BINS, thresholds=THRESHOLDS, precision=variant.precision or "ieee")
    assert modes == {KERNEL_MODE}
    assert_on_device(*stats)
    pairs = n * (n - 1) // 2
    assert int(stats.histogram.sum()) == pairs
    if n == 1:
        assert stats.max_per_atom.tolist() == [0.0] and stats.partner.tolist() == [-1]
        assert not stats.histogram.any() and not stats.counts_above.any()
        return
    # Error of a kernel cosine against the float64 cosine of the stored rows a, b (aip_gram's docstring):
    # float64 or fp32 accumulation of d products, each step rounding once or, on tensor cores, up to twice
    # (2 d + 2 roundings, which also covers the interpreter's chunked sums); tf32x3 adds 3 2^-22 per product.
    # All in units of sum |a_k b_k| <= max |a|^2 (rows rounded to bf16 are not exactly unit).
    r2max = float((stored.double() ** 2).sum(1).max())
    acc = FP64 if variant.dtype == torch.float64 else FP32
    t = ((2 * d + 2) * acc + (3 * 2.0**-22 if variant.precision == "tf32x3" else 0.0)) * r2max
    inner = torch.arange(1, BINS, dtype=torch.float64) / BINS
    limits = torch.cat([inner - t, inner + t, torch.tensor(THRESHOLDS) - t, torch.tensor(THRESHOLDS) + t])
    row_max, above = pairs_above(stored, limits)
    edges_lo, edges_hi, limit_lo, limit_hi = above.split(
        [BINS - 1, BINS - 1, len(THRESHOLDS), len(THRESHOLDS)]
    )

    got = stats.max_per_atom.double()
    assert float((got - row_max).abs().max()) <= t
    assert abs(float(stats.max_abs_cos) - float(row_max.max())) <= t
    if variant.precision == "ieee":
        # Exact fp32 products, not TF32, whose error (2^-10 relative per product) reaches ~1e-4 at these
        # sizes, inside the worst-case t. An FMA chain rounds to nearest; its errors, independent and
        # mean-zero, keep a dot product within lambda sqrt(d) FP32 sum |a_k b_k| except with probability
        # 2 d exp(-lambda^2 / 2), under 1e-18 at lambda = 10 (Higham & Mary 2019): over 1.3e8 pairs a larger
        # error is something other than rounding. (Not for the tensor-core variants: their accumulation may
        # truncate, and truncation errors are not mean-zero.)
        assert float((got - row_max).abs().max()) <= 10 * math.sqrt(d) * FP32 * r2max
    p = stats.partner
    atoms = torch.arange(n, device=DEVICE)
    assert bool(((p >= 0) & (p < n) & (p != atoms)).all())
    reach = (stored.double() * stored.double()[p]).sum(1).abs()
    assert bool((reach >= row_max - 2 * t).all()), "a partner does not reach its atom's maximum |cos|"
    # A |cos| within t of an edge or threshold may land on either side of it, nothing more: the pairs below
    # each interior edge lie between those surely below (|cos| <= e - t) and those maybe below (<= e + t).
    below = stats.histogram.cumsum(0)[:-1]
    assert bool(((pairs - edges_lo <= below) & (below <= pairs - edges_hi)).all())
    assert bool(((limit_hi <= stats.counts_above) & (stats.counts_above <= limit_lo)).all())


# ------------------------------------------------------------------------------------------------------------
# Support Gram
# ------------------------------------------------------------------------------------------------------------

# (batch, k, n_atoms, d): one atom per sample; k past the single-block limit of 64 (32-wide blocks), ragged;
# q*'s size (4096 codes of 64 atoms among 16384).
SUPPORT_SHAPES = size(
    [(3, 1, 2, 16), (1023, 65, 577, 2305), (4096, 64, 16384, 2304)], [(3, 1, 2, 16), (5, 37, 70, 40)]
)
SUPPORT_VARIANTS = [
    Variant("fp64", torch.float64),
    Variant("fp32", torch.float32),
    Variant("bf16", torch.bfloat16),
    Variant("fp16", torch.float16),
]


@functools.lru_cache(maxsize=1)
def supports(batch: int, k: int, n_atoms: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices, values) (batch, k) on the CPU: distinct atoms per sample, 20% padding (-1) and 20% zero
    values (listed, inactive); kept for the next dtype's test."""
    gen = torch.Generator().manual_seed(3)
    idx = torch.rand(batch, n_atoms, generator=gen).topk(k, dim=1).indices
    idx[torch.rand(batch, k, generator=gen) < 0.2] = -1
    values = torch.randn(batch, k, generator=gen)
    values[torch.rand(batch, k, generator=gen) < 0.2] = 0.0
    return idx, values


@pytest.mark.parametrize(("shape", "variant"), cases(SUPPORT_SHAPES, SUPPORT_VARIANTS))
def test_support_coherence(shape: tuple[int, int, int, int], variant: Variant) -> None:
    batch, k, n_atoms, d = shape
    stored = unit_rows(n_atoms, d, seed=4).to(DEVICE, variant.dtype)
    idx, values = (t.to(DEVICE) for t in supports(batch, k, n_atoms))
    with_grams = batch * k * k <= 1 << 22
    with launches(support_gram) as modes:
        out = support_coherence(stored, idx, values, return_grams=with_grams)
    assert modes == {KERNEL_MODE}
    assert_on_device(out.max_abs_cos, out.support_size)
    assert out.max_abs_cos.dtype == torch.float64

    active = (idx >= 0) & (values != 0)
    assert torch.equal(out.support_size, active.sum(1))
    # Every path multiplies the stored values in float64 (exact products), so the only error is float64
    # summation over d: d FP64 sum |a_k b_k| (support_gram's docstring), allowed 4 times, <= max |a|^2.
    t = (4 * d + 4) * FP64 * float((stored.double() ** 2).sum(1).max())
    u = stored.double()
    for s in range(0, batch, 512):  # float64 rows of 512 samples at a time: 0.6 GB at k = 64, d = 2304
        rows = u[idx[s : s + 512].clamp(min=0)]
        on = active[s : s + 512]
        pair = on[:, :, None] & on[:, None, :]
        gram = torch.where(pair, rows @ rows.mT, 0.0)
        off = gram.abs().masked_fill(torch.eye(k, dtype=torch.bool, device=DEVICE), 0.0)
        want = off.flatten(1).amax(1) if k else torch.zeros(on.shape[0], dtype=torch.float64, device=DEVICE)
        assert float((out.max_abs_cos[s : s + 512] - want).abs().max()) <= t
        if with_grams:
            assert float((out.grams[s : s + 512] - gram).abs().max()) <= t
            assert not out.grams[s : s + 512][~pair].any(), "inactive rows and columns of a Gram must be 0"
    assert (out.grams is None) != with_grams


# ------------------------------------------------------------------------------------------------------------
# Public APIs on device tensors against the CPU
# ------------------------------------------------------------------------------------------------------------


def activations(n: int, d: int, seed: int) -> torch.Tensor:
    """(n, d) float32 Gaussian activations with correlated coordinates and a mean, on the CPU."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.eye(d) + torch.randn(d, d, generator=gen) / d**0.5
    return (torch.randn(n, d, generator=gen) @ mix + 0.3).float()


def sparse_codes(batch: int, n_atoms: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices, values) (batch, k): k distinct atoms per sample with N(0, 1) values, on the CPU."""
    gen = torch.Generator().manual_seed(seed)
    idx = torch.rand(batch, n_atoms, generator=gen).topk(k, dim=1).indices
    return idx, torch.randn(batch, k, generator=gen, dtype=torch.float64)


def test_api_second_moment_and_aip() -> None:
    n, d = size((8192, 256), (512, 16))
    x = activations(n, d, seed=5)
    xd = x.to(DEVICE)
    moment, ref = SecondMoment(d).update(xd), SecondMoment(d).update(x)
    # float64 sums of n terms in another order: n FP64 relative to the sums of magnitudes, ~1e-12 here.
    close(moment.matrix, ref.matrix, rtol=1e-10, atol=1e-10)
    aip, ref_aip = AIP.from_moment(moment), AIP.from_moment(ref)
    close(aip.cholesky, ref_aip.cholesky, rtol=1e-8, atol=1e-10)
    close(AIP.fit(xd).cholesky, ref_aip.cholesky, rtol=1e-8, atol=1e-10)
    white64, white32 = aip.whiten(xd.double()), aip.whiten(xd)
    unwhite = aip.unwhiten(white64)
    inner, cosine, norm = aip.inner(xd[:-1], xd[1:]), aip.cosine(xd[:-1], xd[1:]), aip.norm(xd)
    angles, ref_angles = aip.angles(xd[:300]), ref_aip.angles(x[:300])
    assert_on_device(white64, white32, unwhite, inner, cosine, norm, angles)
    assert white64.dtype == torch.float64 and white32.dtype == torch.float32
    # Triangular solves and dot products with the condition number of C (~10 here) in float64 / float32.
    close(white64, ref_aip.whiten(x.double()), rtol=1e-10, atol=1e-10)
    close(white32, ref_aip.whiten(x), rtol=1e-4, atol=1e-4)
    close(unwhite, x.double(), rtol=1e-10, atol=1e-10)
    close(inner, ref_aip.inner(x[:-1], x[1:]), rtol=1e-10, atol=1e-10)
    close(cosine, ref_aip.cosine(x[:-1], x[1:]), rtol=1e-10, atol=1e-10)
    close(norm, ref_aip.norm(x), rtol=1e-10)
    close(angles.cosines, ref_angles.cosines, rtol=0, atol=1e-10)
    assert angles.mean == pytest.approx(ref_angles.mean, abs=1e-8)


class DictionaryStats(NamedTuple):
    """What test_api_dictionary compares between the device and the CPU."""

    coherence: float
    top: torch.Tensor
    partner: torch.Tensor
    counts: torch.Tensor
    counts7: torch.Tensor
    babel3: float
    crossing: int | None
    near: list[tuple[int, int, float]]
    gram: torch.Tensor


def dictionary_stats(dic: Dictionary, index: torch.Tensor) -> DictionaryStats:
    top, partner = dic.max_coherence()
    return DictionaryStats(
        dic.coherence(),
        top,
        partner,
        dic.cos_histogram()[0],
        dic.cos_histogram(bins=7)[0],
        dic.babel(3),
        dic.babel_crossing(),
        dic.near_duplicates(0.3),
        dic.gram(index),
    )


def test_api_dictionary() -> None:
    n_atoms, d = size((3000, 128), (60, 12))
    W = torch.randn(n_atoms, d, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    aip = AIP.fit(activations(8 * d, d, seed=7))
    index = torch.arange(0, n_atoms, 3)
    with launches(aip_gram) as modes:
        dic = Dictionary(W.to(DEVICE), aip)
        got = dictionary_stats(dic, index)
    assert modes == {KERNEL_MODE}
    with cpu_reference():
        ref = Dictionary(W, aip)
        want = dictionary_stats(ref, index)
        dense = ref.gram().abs().fill_diagonal_(-1.0)
    assert_on_device(dic.raw, dic.unit, dic.norms, got)
    # Whitening in float64 (condition ~10), then float64 dot products of d terms: a few 1e-15 apart.
    close(dic.unit, ref.unit, rtol=0, atol=1e-12)
    close(dic.norms, ref.norms, rtol=1e-12)
    close(got.gram, want.gram, rtol=0, atol=1e-12)
    assert got.coherence == pytest.approx(want.coherence, abs=1e-12)
    close(got.top, want.top, rtol=0, atol=1e-12)
    assert bool((dense[torch.arange(n_atoms), got.partner.cpu()] >= want.top - 1e-12).all())
    pairs = dense[torch.ones_like(dense, dtype=torch.bool).triu(1)]
    for bins, counts, ref_counts in ((100, got.counts, want.counts), (7, got.counts7, want.counts7)):
        # Only pairs within 1e-12 of a bin edge may change bins.
        scaled = pairs * bins
        near_edge = int(((scaled - scaled.round()).abs() < 1e-12 * bins).sum())
        assert int(counts.sum()) == int(ref_counts.sum())
        assert int((counts.cpu().cumsum(0) - ref_counts.cumsum(0)).abs().max()) <= near_edge
    assert got.babel3 == pytest.approx(want.babel3, abs=1e-11)
    assert got.crossing == want.crossing
    assert [p[:2] for p in got.near] == [p[:2] for p in want.near]
    close([p[2] for p in got.near], [p[2] for p in want.near], rtol=0, atol=1e-12)


def test_api_metrics() -> None:
    n, d, n_atoms, k = size((4096, 128, 1000, 24), (64, 12, 40, 5))
    x = activations(n, d, seed=8)
    x_hat = x + 0.3 * torch.randn(n, d, generator=torch.Generator().manual_seed(9))
    aip = AIP.fit(x)
    W = torch.randn(n_atoms, d, generator=torch.Generator().manual_seed(10), dtype=torch.float64)
    idx, values = sparse_codes(n, n_atoms, k, seed=11)
    idx[:, -2:] = -1  # padding
    values[:, -2:] = 0.0
    values[:, 0] = 0.0  # listed, inactive
    dic = Dictionary(W.to(DEVICE), aip)
    with launches(support_gram) as modes:
        mu, l0 = per_sample_coherence(dic, idx.to(DEVICE), values.to(DEVICE))
    assert modes == {KERNEL_MODE}
    assert_on_device(mu, l0)
    with cpu_reference():
        ref_mu, ref_l0 = per_sample_coherence(Dictionary(W, aip), idx, values)
    # float64 products and sums of d terms (support_gram's docstring): 4 d FP64 of unit rows.
    close(mu, ref_mu, rtol=0, atol=4 * d * FP64)
    assert torch.equal(l0.cpu(), ref_l0)
    for form in ("quantile", "per_sample"):
        assert q_star(mu, l0, form=form).value == q_star(ref_mu, ref_l0, form=form).value
    # R^2: float64 sums of n d squares, then one division.
    xd, xhd = x.to(DEVICE), x_hat.to(DEVICE)
    assert r2(xd, xhd) == pytest.approx(r2(x, x_hat), rel=1e-10)
    assert r2(xd, xhd, aip) == pytest.approx(r2(x, x_hat, aip), rel=1e-10)


def test_api_certified_fractions() -> None:
    n_atoms, d, n, k = size((256, 128, 64, 6), (48, 24, 12, 3))
    W = torch.randn(n_atoms, d, generator=torch.Generator().manual_seed(12), dtype=torch.float64)
    idx, values = sparse_codes(n, n_atoms, k, seed=13)
    kwargs = {"erc_samples": size(16, 6), "bp_samples": size(32, 6)}
    cert = certified_fractions(Dictionary(W.to(DEVICE)), idx.to(DEVICE), values.to(DEVICE), **kwargs)
    assert_on_device(cert)
    with cpu_reference():
        ref = certified_fractions(Dictionary(W), idx, values, **kwargs)
    for field in ref._fields:
        got, want = getattr(cert, field), getattr(ref, field)
        if field == "seconds":
            continue
        if isinstance(want, torch.Tensor) or field == "erc_interval":
            close(got, want, rtol=1e-8, atol=1e-10)  # least-squares ERC coefficients: condition ~10
        elif isinstance(want, float) and not math.isnan(want):
            assert got == pytest.approx(want, rel=1e-10), field
        elif isinstance(want, float):
            assert math.isnan(got), field
        else:
            assert got == want, field


def test_api_basis_pursuit() -> None:
    """The batched solver on device tensors solves on the device and decides as on the CPU."""
    n_atoms, d, k, batch = size((256, 128, 10, 200), (48, 24, 3, 12))
    W = torch.randn(n_atoms, d, generator=torch.Generator().manual_seed(14), dtype=torch.float64)
    idx, values = sparse_codes(batch, n_atoms, k, seed=15)
    X = torch.zeros(batch, n_atoms, dtype=torch.float64).scatter_(1, idx, values)
    M = X @ W
    with mock.patch.object(atoms.recovery, "solve_batched", wraps=atoms.recovery.solve_batched) as solve:
        got = basis_pursuit(W.to(DEVICE), M.to(DEVICE), true_codes=X.to(DEVICE), solver="batched")
    assert {call.args[0].device.type for call in solve.call_args_list} == {DEVICE.type}
    assert_on_device(got)
    with cpu_reference():
        ref = basis_pursuit(W, M, true_codes=X, solver="batched")
    assert got.decisions == ref.decisions and got.counts == ref.counts
    # Certified minimisers are unique: both runs find the same code up to the solver's 1e-9 gap tolerance.
    recovered = torch.tensor([dec == "recovered" for dec in ref.decisions])
    close(got.codes.cpu()[recovered], ref.codes[recovered], rtol=0, atol=1e-8 * float(X.abs().max()))


@pytest.mark.parametrize("architecture", ["tsae", "relu"])
def test_api_train(architecture: str) -> None:
    """A few steps of atoms.train on the device (TSAE: the fused encoder) agree with the CPU run."""
    n, d, n_atoms = size((8192, 64, 256), (256, 12, 32))
    x = activations(n, d, seed=16)
    aip = AIP.fit(x)
    config = TrainConfig(
        lr=1e-3,
        batch_size=size(1024, 64),
        steps=size(5, 3),
        lr_warmup_steps=0,
        sparsity_warmup_steps=0,
        input_scale_samples=size(4096, 256),
    )

    def build() -> TSAE | ReLUSAE:
        return TSAE(d, n_atoms, aip, seed=0) if architecture == "tsae" else ReLUSAE(d, n_atoms, seed=0)

    model = build().to(DEVICE)
    with launches(threshold_encoder) as modes:
        first = model(x[:256].to(DEVICE))
        result = train(model, x.to(DEVICE), config, progress=False)
    assert modes == ({KERNEL_MODE} if architecture == "tsae" else set())
    with cpu_reference():
        ref_model = build()
        ref_first = ref_model(x[:256])
        ref = train(ref_model, x, config, progress=False)
    assert_on_device(first, result, list(model.parameters()))
    # The same weights and data on both sides: the runs differ by fp32 rounding (GEMMs and sums in another
    # order; measured through the interpreter: 1e-7 relative on the losses, identical l0) and by the codes
    # whose z lies within that rounding of theta, which may flip. A flip moves its row's reconstruction by
    # that code (~theta / input_scale), the sparsity loss by coefficient / batch and l0 by 1 / batch.
    same = ((first.codes != 0).cpu() == (ref_first.codes != 0)).all(1)
    assert float(same.double().mean()) >= 0.9
    close(first.x_hat.cpu()[same], ref_first.x_hat[same], rtol=1e-4, atol=1e-4)
    close(first.loss, ref_first.loss, rtol=1e-4)
    close(result.loss, ref.loss, rtol=1e-4)
    close(result.l0, ref.l0, rtol=0, atol=0.1)
    # Adam (beta1 = 0) moves an entry by at most lr sqrt(t) at step t, whatever its gradient, so a rounding
    # difference that flips a tiny gradient's sign separates the runs by at most 2 lr sum_t sqrt(t).
    bound = 2 * config.lr * sum(math.sqrt(t) for t in range(1, config.steps + 1))
    for (name, p), q in zip(model.named_parameters(), ref_model.parameters(), strict=True):
        close(p.detach(), q.detach(), rtol=0, atol=bound + 1e-6, msg=name)


def test_api_capture() -> None:
    tok = byte_tokenizer()
    words = "atoms sparse residual stream coherence dictionary shard token layer whitening".split()
    gen = torch.Generator().manual_seed(17)
    texts = [
        " ".join(words[int(i)] for i in torch.randint(len(words), (30,), generator=gen)) for _ in range(40)
    ]

    def run_capture(device: torch.device) -> Any:
        model = tiny_llama(tok).to(device)
        return capture(model, tok, texts, [1, 3], max_tokens=size(4000, 400), seq_len=32, batch_size=4)

    cap = run_capture(DEVICE)
    with cpu_reference():
        ref = run_capture(torch.device("cpu"))
    assert cap.n_tokens == ref.n_tokens and cap.layers == ref.layers
    for got, want in zip(cap.tokens, ref.tokens, strict=True):
        assert torch.equal(got.cpu(), want)
    for layer in ref.layers:
        # fp32 forward passes of a 4-block model (activations O(1)): GEMMs and attention in another order.
        close(cap.activations(layer), ref.activations(layer), rtol=1e-4, atol=1e-4)
        close(cap.moments[layer].matrix, ref.moments[layer].matrix, rtol=1e-4, atol=1e-5)
