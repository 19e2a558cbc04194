"""Threshold encoder, forward + backward: ours against a naive JumpReLU, SAELens and the three-GEMM floor.

Each case (shape, dtype, whether x needs a gradient) times four variants on the same inputs, in this order:

- floor: the three GEMMs alone, z = x W, grad_x = g W^T, grad_W = x^T g;
- saelens: SAELens's `JumpReLUTrainingSAE` (sae-lens 6) with the same weights, `encode_with_hidden_pre` plus
  its "step" L0 loss (`calculate_aux_loss`), then backward;
- naive: JumpReLU as SAE code usually writes it, z = (x - b_dec) @ W_enc + b_enc kept dense for backward,
  codes = z * (z > theta), straight-through rectangle pseudo-gradients in plain autograd Functions;
- ours: `atoms.kernels.threshold_encode(..., return_l0=True)` on the tensors' device: the torch reference path
  on CPU, the Triton kernels on CUDA.

One step is what an SAE training step asks of the encoder: the forward, the L0 loss, backward with a dense
upstream gradient g on the codes (what the reconstruction loss sends) and the gradients of W_enc, b_enc, b_dec
and theta (and of x in the `x grad` cases), then `.grad` dropped as `optimizer.zero_grad()` does. The decoder
is left out of every variant. Ratios to the floor and to SAELens use the minimum time of each variant (the
least disturbed round on a shared machine) and go into `benchmark.extra_info` and the summary table printed at
the end. The issue's targets (ours within 1.3x of the floor and no slower than SAELens) are reported there,
never asserted. Without an x gradient (SAE training) ours skips the grad_x GEMM (b_dec's gradient is a GEMV),
so it can come in under the three-GEMM floor; the `x grad` cases compare equal GEMM work.
"""

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from naive_jumprelu import NaiveJumpReLU, NaiveStep, cpu_has_bf16, saelens_missing

from atoms.kernels import backend, threshold_encode

SHAPES = {"small": (4096, 576, 2304), "large": (4096, 2304, 16384)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
VARIANTS = ("floor", "saelens", "naive", "ours")
BANDWIDTH = 0.001
L0_COEFFICIENT = 1.0
# Five timed rounds after one warm-up: the default run (small shape, fp32) takes 2-3.5 minutes on 2 shared
# cores (load average 4-8 from other jobs); the large shape's steps take 10-30 s each.
ROUNDS = {"small": 5, "large": 3}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TABLE = "threshold encoder, forward + backward"

_min_time: dict[tuple, dict[str, float]] = {}
_peaks: dict[tuple, dict[tuple, int | None]] = {}


def _inputs(shape: str, dtype: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """x (batch, d), W_enc (d, n_atoms) with unit-scale columns, biases, theta in [1.5, 2.5) (about 3% of
    unit-variance pre-activations pass it), g (batch, n_atoms) the upstream gradient on the codes."""
    batch, d, n_atoms = SHAPES[shape]
    gen = torch.Generator().manual_seed(seed)
    cast = {"dtype": DTYPES[dtype], "device": DEVICE}
    return {
        "x": torch.randn(batch, d, generator=gen).to(**cast),
        "W_enc": (torch.randn(d, n_atoms, generator=gen) / d**0.5).to(**cast),
        "b_enc": (0.1 * torch.randn(n_atoms, generator=gen)).to(**cast),
        "b_dec": (0.1 * torch.randn(d, generator=gen)).to(**cast),
        "theta": (1.5 + torch.rand(n_atoms, generator=gen)).to(DEVICE),
        "g": torch.randn(batch, n_atoms, generator=gen).to(**cast),
    }


def _saelens_sae(t: dict[str, torch.Tensor], bandwidth: float) -> torch.nn.Module:
    from sae_lens.saes.jumprelu_sae import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig

    d, n_atoms = t["W_enc"].shape
    cfg = JumpReLUTrainingSAEConfig(
        d_in=d,
        d_sae=n_atoms,
        dtype=str(t["x"].dtype).removeprefix("torch."),
        device=str(t["x"].device),
        jumprelu_bandwidth=bandwidth,
        jumprelu_sparsity_loss_mode="step",
        l0_coefficient=L0_COEFFICIENT,
    )
    sae = JumpReLUTrainingSAE(cfg)
    with torch.no_grad():
        for name in ("W_enc", "b_enc", "b_dec"):
            getattr(sae, name).copy_(t[name])
        sae.threshold.copy_(t["theta"])
    return sae


def _forward(
    variant: str, t: dict[str, torch.Tensor], bandwidth: float
) -> tuple[Callable[[], tuple[torch.Tensor, torch.Tensor]], dict[str, torch.Tensor]]:
    """A closure returning (codes (batch, n_atoms), L0 loss scalar) and the parameters it differentiates."""
    if variant == "saelens":
        from sae_lens.saes.sae import TrainStepInput

        sae = _saelens_sae(t, bandwidth)
        step_input = TrainStepInput(
            sae_in=t["x"],
            coefficients={"l0": L0_COEFFICIENT},
            dead_neuron_mask=None,
            n_training_steps=0,
            is_logging_step=False,
        )

        def run_saelens():
            codes, hidden_pre = sae.encode_with_hidden_pre(t["x"])
            losses = sae.calculate_aux_loss(step_input, codes, hidden_pre, sae_out=None)
            return codes, losses["l0_loss"]

        params = {name: getattr(sae, name) for name in ("W_enc", "b_enc", "b_dec")}
        return run_saelens, {**params, "theta": sae.threshold}

    params = {name: t[name].clone().requires_grad_() for name in ("W_enc", "b_enc", "b_dec", "theta")}
    W, b_enc, b_dec, theta = params.values()
    if variant == "naive":

        def run_naive():
            z = (t["x"] - b_dec) @ W + b_enc
            theta_z = theta.to(z.dtype)
            l0 = NaiveStep.apply(z, theta_z, bandwidth).sum(-1)
            return NaiveJumpReLU.apply(z, theta_z, bandwidth), (L0_COEFFICIENT * l0).mean()

        return run_naive, params
    if variant == "ours":

        def run_ours():
            codes, l0 = threshold_encode(
                t["x"], W, b_enc, theta, b_dec=b_dec, bandwidth=bandwidth, return_l0=True
            )
            return codes, (L0_COEFFICIENT * l0).mean()

        return run_ours, params
    raise ValueError(f"unknown variant {variant!r}; use one of {VARIANTS}")


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def encoder_step(variant: str, shape: str, dtype: str, x_grad: bool) -> Callable[[], object]:
    """One training step's encoder work for `variant` on fresh inputs; the peak-memory child's factory."""
    t = _inputs(shape, dtype)
    if variant == "floor":
        x, W, g = t["x"], t["W_enc"], t["g"]

        def floor():
            # Fresh outputs, as autograd allocates them: the floor's peak memory is then the least any variant
            # needs (z, grad_x, grad_W), and its time includes the same first-touch page faults.
            outputs = x @ W, g @ W.T, x.T @ g
            _sync()
            return outputs

        return floor

    t["x"].requires_grad_(x_grad)
    run, params = _forward(variant, t, BANDWIDTH)
    leaves = [*params.values(), t["x"]]

    def step():
        codes, l0_loss = run()
        torch.autograd.backward([codes, l0_loss], [t["g"], None])
        _sync()
        for leaf in leaves:
            leaf.grad = None

    return step


def _skip_reason(shape: str, dtype: str, variant: str, full: bool) -> str | None:
    if shape == "large" and not full:
        return (
            "large shape runs under --full only: its four training-step variants took 11.5 min at fp32 on 2 "
            "shared CPU cores (one floor step 15-30 s); both gradient settings take about 25 min"
        )
    if dtype == "bf16" and DEVICE == "cpu":
        if not cpu_has_bf16():
            # Measured here (AVX2 only): the small shape's forward GEMM takes 14 s in bf16, 0.35 s in fp32.
            return "bf16 skipped: no AVX512-BF16 or AMX on this CPU, so bf16 GEMMs run ~40x slower than fp32"
        if not full:
            return "bf16 on a CPU runs under --full only"
    if variant == "saelens":
        return saelens_missing()
    return None


def _peak_bytes(case: tuple, variant: str, measure: Callable, items: list, full: bool) -> int | None:
    """Peak memory of every selected variant and x-grad setting of this (shape, dtype), all from one child
    process, so the child pays the imports (sae_lens alone takes ~20 s here) once per shape and dtype."""
    shape, dtype, x_grad = case
    if (shape, dtype) not in _peaks:
        selected = [item.callspec.params for item in items if getattr(item, "function", None) is test_encoder]
        calls = [
            [p["variant"], shape, dtype, p["x_grad"]]
            for p in selected
            if (p["shape"], p["dtype"]) == (shape, dtype)
            and not _skip_reason(shape, dtype, p["variant"], full)
        ]
        peaks = measure(Path(__file__), "encoder_step", calls) or [None] * len(calls)
        _peaks[shape, dtype] = {(c[0], c[3]): p for c, p in zip(calls, peaks, strict=True)}
    return _peaks[shape, dtype].get((variant, x_grad))


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a / b


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


CASES = [
    pytest.param(
        shape, dtype, x_grad, variant, id=f"{shape}-{dtype}-{'xgrad' if x_grad else 'train'}-{variant}"
    )
    for shape in SHAPES
    for dtype in DTYPES
    for x_grad in (False, True)
    for variant in VARIANTS
]


@pytest.mark.parametrize(("shape", "dtype", "x_grad", "variant"), CASES)
def test_encoder(request, benchmark, summary, measure_peak_memory, full, shape, dtype, x_grad, variant):
    if reason := _skip_reason(shape, dtype, variant, full):
        print(f"{variant} skipped: {reason}")
        pytest.skip(reason)

    mode = backend(torch.empty(0, device=DEVICE))
    case = (shape, dtype, x_grad)
    batch, d, n_atoms = SHAPES[shape]
    benchmark.group = (
        f"encoder fwd+bwd {batch}x{d}x{n_atoms} {dtype} {'x grad' if x_grad else 'train'} [{mode}]"
    )
    step = encoder_step(variant, shape, dtype, x_grad)
    load_before = os.getloadavg()[0]
    benchmark.pedantic(step, rounds=ROUNDS[shape], warmup_rounds=1, iterations=1)
    load_after = os.getloadavg()[0]
    if benchmark.disabled:
        return
    del step

    stats = benchmark.stats.stats
    times = _min_time.setdefault(case, {})
    times[variant] = stats.min
    peak = _peak_bytes(case, variant, measure_peak_memory, request.session.items, full)
    x_floor = _ratio(stats.min, times.get("floor"))
    x_saelens = _ratio(stats.min, times.get("saelens"))
    benchmark.extra_info.update(
        backend=mode,
        device=DEVICE,
        peak_bytes=peak,
        ratio_to_gemm_floor=x_floor,
        ratio_to_saelens=x_saelens,
        load_average=(load_before, load_after),
        torch_threads=torch.get_num_threads(),
    )
    summary.row(
        TABLE,
        **{
            "shape (batch, d, n_atoms)": f"{batch}, {d}, {n_atoms}",
            "dtype": dtype,
            "x grad": "yes" if x_grad else "no",
            "variant": variant,
            "min s": f"{stats.min:.3f}",
            "median s": f"{stats.median:.3f}",
            "peak MiB": _fmt(None if peak is None else peak / 2**20, ".0f"),
            "x floor": _fmt(x_floor, ".2f"),
            "x SAELens": _fmt(x_saelens, ".2f"),
            "load avg": f"{load_before:.1f}-{load_after:.1f}",
        },
    )
    if DEVICE == "cpu":
        summary.note(
            TABLE,
            f"Device cpu, {torch.get_num_threads()} torch threads: `ours` is threshold_encode's torch "
            "reference path (backend 'torch'); the Triton kernels are benchmarked by this same file on a "
            "CUDA machine.",
        )
    summary.note(
        TABLE,
        "Times: min and median of the timed rounds after one warm-up; ratios use the minimum. floor = the "
        "three GEMMs alone (forward, grad_x, grad_W), its peak memory their three outputs. x grad no = SAE "
        "training (ours does 2 GEMMs + a GEMV; SAELens and naive 3); yes = every variant does the 3 GEMMs. "
        "Targets (issue 5), reported not asserted: ours <= 1.3 x floor and <= 1.0 x SAELens.",
    )
    summary.note(TABLE, f"Peak MiB: {measure_peak_memory.method}.")


def test_variants_agree():
    """The benchmarked variants agree on codes, L0 loss and gradients (CPU, float64, a populated window)."""
    batch, d, n_atoms = 64, 48, 96
    gen = torch.Generator().manual_seed(1)
    t = {
        "x": torch.randn(batch, d, generator=gen, dtype=torch.float64),
        "W_enc": torch.randn(d, n_atoms, generator=gen, dtype=torch.float64) / d**0.5,
        "b_enc": 0.1 * torch.randn(n_atoms, generator=gen, dtype=torch.float64),
        "b_dec": 0.1 * torch.randn(d, generator=gen, dtype=torch.float64),
        "theta": 0.5 + torch.rand(n_atoms, generator=gen),
        "g": torch.randn(batch, n_atoms, generator=gen, dtype=torch.float64),
    }
    variants = [v for v in VARIANTS if v != "floor" and not (v == "saelens" and saelens_missing())]
    results = {}
    for variant in variants:
        run, params = _forward(variant, t, bandwidth=0.5)
        codes, l0_loss = run()
        torch.autograd.backward([codes, l0_loss], [t["g"], None])
        results[variant] = {"codes": codes, "l0": l0_loss, **{k: p.grad for k, p in params.items()}}
    assert results["naive"]["theta"].abs().max() > 0, "the window must hold elements for theta's gradient"
    for variant in variants:
        for key, value in results[variant].items():
            torch.testing.assert_close(
                value.double(), results["naive"][key].double(), rtol=1e-6, atol=1e-6, msg=f"{variant} {key}"
            )
