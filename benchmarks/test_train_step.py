"""Full SAE training steps: ours (sparse and dense paths) against SAELens, plain torch, torch.compile and the
GEMM floor, at three sparsities.

A step is what a training loop does per batch: forward, loss (reconstruction + L0), backward, the optimizer
step (Adam, beta1 = 0) and the decoder's unit-norm constraint where the variant has one. Variants, on the same
inputs and weights:

- floor: one GEMM of the encoder's shape, x @ W_enc (batch x d x n_atoms): the least any step can cost;
- saelens: SAELens's `JumpReLUTrainingSAE` as its trainer runs it (`training_forward_pass`, the firing
  counters, backward, gradient clipping, Adam);
- plain: a JumpReLU SAE as training code usually writes it in torch: dense encoder, mask, decoder, MSE +
  L0 with straight-through rectangle pseudo-gradients, Adam, decoder rows renormalised;
- compiled: `torch.compile` of plain's forward and loss (the optimizer step stays eager);
- dense / sparse: `atoms.train.train_step` on an `atoms.TSAE` (no AIP: the same Euclidean inputs as the
  others) with the path forced; the trainer chooses sparse itself when L0 <= SPARSE_MAX_DENSITY[device]
  n_atoms.

Sparsity: theta is set per latent at the quantile of its pre-activations that leaves 0.5%, 1% or 3% of the
batch active, the same theta for every variant. At 5%, 8%, 12% and 16% only our two paths run: where they
cross is what `atoms.train.SPARSE_MAX_DENSITY` is set from. Tokens per second, ratios (to the floor, and
sparse's speed-up over each other variant) and peak memory per step go into the summary table; the issue's
targets (CPU fp32 at 4096 x 576 x 2304, L0 about 1%: sparse at least 5x each of dense, plain and SAELens)
are reported there, never asserted.
"""

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from naive_jumprelu import NaiveJumpReLU, NaiveStep, cpu_has_bf16, saelens_missing

from atoms.train import TrainConfig, TrainState, make_optimizer, train_step
from atoms.tsae import TSAE

SHAPES = {"small": (4096, 576, 2304), "large": (4096, 2304, 16384)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
LEVELS = (0.005, 0.01, 0.03)
# Denser levels, ours only: where the sparse step stops beating the dense one (SPARSE_MAX_DENSITY).
CROSSOVER_LEVELS = (0.05, 0.08, 0.12, 0.16)
VARIANTS = ("floor", "saelens", "plain", "compiled", "dense", "sparse")
VARIANTS_AT = {**dict.fromkeys(LEVELS, VARIANTS), **dict.fromkeys(CROSSOVER_LEVELS, ("dense", "sparse"))}
BANDWIDTH = 0.001
L0_COEFFICIENT = 1e-3
LR = 2e-4
ROUNDS = {"small": 5, "large": 3}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TABLE = "SAE training step (forward, loss, backward, Adam, constraint)"

_min_time: dict[tuple, dict[str, float]] = {}
_peaks: dict[tuple, dict[str, int | None]] = {}


def _inputs(dims: tuple[int, int, int], dtype: str, level: float, seed: int = 0) -> dict[str, torch.Tensor]:
    """x (batch, d) at unit mean squared norm, a unit-norm decoder W_dec (n_atoms, d) with W_enc = W_dec^T,
    and theta (n_atoms,) float32 at the (1 - level) quantile of each latent's pre-activations."""
    batch, d, n_atoms = dims
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, d, generator=gen) / d**0.5
    w = torch.randn(n_atoms, d, generator=gen)
    w /= w.norm(dim=1, keepdim=True)
    z = x @ w.T
    theta = torch.quantile(z, 1 - level, dim=0).clamp(min=1e-4)
    cast = {"dtype": DTYPES[dtype], "device": DEVICE}
    return {
        "x": x.to(**cast),
        "W_dec": w.to(**cast),
        "W_enc": w.T.contiguous().to(**cast),
        "b_enc": torch.zeros(n_atoms, **cast),
        "b_dec": torch.zeros(d, **cast),
        "theta": theta.to(DEVICE),
    }


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _plain_loss(x, W_enc, b_enc, W_dec, b_dec, theta):
    z = (x - b_dec) @ W_enc + b_enc
    theta_z = theta.to(z.dtype)
    codes = NaiveJumpReLU.apply(z, theta_z, BANDWIDTH)
    x_hat = codes @ W_dec + b_dec
    l0 = NaiveStep.apply(z, theta_z, BANDWIDTH).sum(-1)
    return (x_hat - x).pow(2).sum(-1).mean() + L0_COEFFICIENT * l0.mean()


def _saelens_sae(t: dict[str, torch.Tensor]) -> torch.nn.Module:
    from sae_lens.saes.jumprelu_sae import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig

    d, n_atoms = t["W_enc"].shape
    cfg = JumpReLUTrainingSAEConfig(
        d_in=d,
        d_sae=n_atoms,
        dtype=str(t["x"].dtype).removeprefix("torch."),
        device=str(t["x"].device),
        jumprelu_bandwidth=BANDWIDTH,
        jumprelu_sparsity_loss_mode="step",
        l0_coefficient=L0_COEFFICIENT,
    )
    sae = JumpReLUTrainingSAE(cfg)
    with torch.no_grad():
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            getattr(sae, name).copy_(t[name])
        sae.threshold.copy_(t["theta"])
    return sae


def _saelens_forward(sae: torch.nn.Module, x: torch.Tensor):
    from sae_lens.saes.sae import TrainStepInput

    step_input = TrainStepInput(
        sae_in=x,
        coefficients={"l0": L0_COEFFICIENT},
        dead_neuron_mask=None,
        n_training_steps=0,
        is_logging_step=False,
    )
    return sae.training_forward_pass(step_input)


def _saelens_step(t: dict[str, torch.Tensor]) -> Callable[[], None]:
    sae = _saelens_sae(t)
    optimizer = torch.optim.Adam(sae.parameters(), lr=LR, betas=(0.0, 0.999))
    since_fired = torch.zeros(t["W_enc"].shape[1], device=DEVICE)

    def step():
        out = _saelens_forward(sae, t["x"])
        with torch.no_grad():  # the trainer's firing counters
            did_fire = out.feature_acts.bool().float().sum(-2).bool()
            since_fired.add_(1)
            since_fired[did_fire] = 0
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        _sync()

    return step


def _plain_step(t: dict[str, torch.Tensor], compiled: bool) -> Callable[[], None]:
    params = [t[k].clone().requires_grad_() for k in ("W_enc", "b_enc", "W_dec", "b_dec", "theta")]
    optimizer = torch.optim.Adam(params, lr=LR, betas=(0.0, 0.999))
    loss_fn = torch.compile(_plain_loss) if compiled else _plain_loss

    def step():
        loss = loss_fn(t["x"], *params)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        with torch.no_grad():
            params[2] /= params[2].norm(dim=1, keepdim=True)
        _sync()

    return step


def _ours_step(t: dict[str, torch.Tensor], sparse: bool) -> Callable[[], None]:
    d, n_atoms = t["W_enc"].shape
    model = TSAE(d, n_atoms, bandwidth=BANDWIDTH, l0_coefficient=L0_COEFFICIENT, input_scale=1.0)
    model = model.to(device=DEVICE, dtype=t["x"].dtype)
    with torch.no_grad():
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            getattr(model, name).copy_(t[name])
        model.threshold.copy_(t["theta"])
    config = TrainConfig(lr=LR, lr_warmup_steps=0, sparsity_warmup_steps=0, sparse=sparse)
    state = TrainState.start(model, config)
    optimizer = make_optimizer(model, config)
    u = model.scale_rows(t["x"])  # what `train` does once per run: here input_scale 1, a copy

    def step():
        train_step(model, optimizer, u, state, scaled=True)
        _sync()

    return step


def training_step(variant: str, shape: str, dtype: str, level: float) -> Callable[[], None]:
    """One training step of `variant` on fresh inputs; the peak-memory child's factory."""
    t = _inputs(SHAPES[shape], dtype, level)
    if variant == "floor":

        def floor():
            out = t["x"] @ t["W_enc"]
            _sync()
            return out

        return floor
    if variant == "saelens":
        return _saelens_step(t)
    if variant in ("plain", "compiled"):
        return _plain_step(t, compiled=variant == "compiled")
    if variant in ("dense", "sparse"):
        return _ours_step(t, sparse=variant == "sparse")
    raise ValueError(f"unknown variant {variant!r}; use one of {VARIANTS}")


def _skip_reason(shape: str, dtype: str, variant: str, full: bool) -> str | None:
    if shape == "large" and DEVICE == "cpu" and not full:
        return "large shape on a CPU runs under --full only (a dense step takes tens of seconds on 2 cores)"
    if dtype == "bf16" and DEVICE == "cpu" and not (full and cpu_has_bf16()):
        return "bf16 on a CPU runs under --full only, and only with AVX512-BF16 or AMX"
    if dtype == "fp32" and DEVICE == "cuda" and shape == "large" and not full:
        return "fp32 at the large shape on a GPU runs under --full only (bf16 is the training dtype there)"
    if variant == "saelens":
        return saelens_missing()
    return None


def _peak_bytes(case: tuple, variant: str, measure: Callable, items: list, full: bool) -> int | None:
    """Peak memory of every selected variant of this case, from one child process."""
    if case not in _peaks:
        selected = [item.callspec.params for item in items if getattr(item, "function", None) is test_step]
        calls = [
            [p["variant"], *case]
            for p in selected
            if (p["shape"], p["dtype"], p["level"]) == case
            and not _skip_reason(p["shape"], p["dtype"], p["variant"], full)
        ]
        peaks = measure(Path(__file__), "training_step", calls) or [None] * len(calls)
        _peaks[case] = {c[0]: p for c, p in zip(calls, peaks, strict=True)}
    return _peaks[case].get(variant)


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


CASES = [
    pytest.param(shape, dtype, level, variant, id=f"{shape}-{dtype}-l0_{level:g}-{variant}")
    for shape in SHAPES
    for dtype in DTYPES
    for level, variants in VARIANTS_AT.items()
    for variant in variants
]


@pytest.mark.parametrize(("shape", "dtype", "level", "variant"), CASES)
def test_step(request, benchmark, summary, measure_peak_memory, full, shape, dtype, level, variant):
    if reason := _skip_reason(shape, dtype, variant, full):
        pytest.skip(reason)
    case = (shape, dtype, level)
    batch, d, n_atoms = SHAPES[shape]
    benchmark.group = f"training step {batch}x{d}x{n_atoms} {dtype} L0 {level:.1%} [{DEVICE}]"
    step = training_step(variant, shape, dtype, level)
    load_before = os.getloadavg()[0]
    benchmark.pedantic(step, rounds=ROUNDS[shape], warmup_rounds=2, iterations=1)
    load_after = os.getloadavg()[0]
    if benchmark.disabled:
        return
    del step

    times = _min_time.setdefault(case, {})
    seconds = benchmark.stats.stats.min
    times[variant] = seconds
    peak = _peak_bytes(case, variant, measure_peak_memory, request.session.items, full)
    x_floor = seconds / times["floor"] if "floor" in times else None
    # Filled in on the sparse row, which runs last: its speed-up over each variant measured before it.
    speedups = {k: v / seconds for k, v in times.items() if k not in ("floor", "sparse")}
    benchmark.extra_info.update(
        device=DEVICE,
        tokens_per_s=batch / seconds,
        peak_bytes=peak,
        ratio_to_gemm_floor=x_floor,
        sparse_speedup=speedups if variant == "sparse" else None,
        torch_threads=torch.get_num_threads(),
        load_average=(load_before, load_after),
    )
    summary.row(
        TABLE,
        **{
            "shape (batch, d, n_atoms)": f"{batch}, {d}, {n_atoms}",
            "dtype": dtype,
            "L0 / n_atoms": f"{level:.1%}",
            "variant": variant,
            "min ms": f"{seconds * 1e3:.1f}",
            "tokens/s": f"{batch / seconds:,.0f}",
            "x floor": _fmt(x_floor, ".2f"),
            "peak MiB": _fmt(None if peak is None else peak / 2**20, ".0f"),
            "sparse is faster by": (
                ", ".join(f"{v:.1f}x {k}" for k, v in speedups.items()) if variant == "sparse" else ""
            ),
            "load avg": f"{load_before:.1f}-{load_after:.1f}",
        },
    )
    summary.note(
        TABLE,
        f"Device {DEVICE}, {torch.get_num_threads()} torch threads. Times: the minimum of {ROUNDS[shape]} "
        "rounds after two warm-ups; floor = one GEMM of the encoder's shape. Targets (issue 16), reported "
        "not asserted: CPU fp32 4096 x 576 x 2304 at L0 1%: sparse >= 5x dense, plain and SAELens; GPU bf16 "
        "4096 x 2304 x 16384 at L0 0.4%: sparse <= 1.5 x floor, >= 4x plain, >= 2x compiled.",
    )
    summary.note(TABLE, f"Peak MiB: {measure_peak_memory.method}.")


def test_variants_compute_the_same_loss():
    """plain, SAELens and ours (sparse and dense) give the same loss on the same inputs, so the timings
    compare one computation; float32 at a small shape on the CPU."""
    t = {k: v.cpu() for k, v in _inputs((256, 24, 96), "fp32", 0.05).items()}
    plain = float(_plain_loss(t["x"], t["W_enc"], t["b_enc"], t["W_dec"], t["b_dec"], t["theta"]))
    d, n_atoms = t["W_enc"].shape
    model = TSAE(d, n_atoms, bandwidth=BANDWIDTH, l0_coefficient=L0_COEFFICIENT, input_scale=1.0)
    with torch.no_grad():
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            getattr(model, name).copy_(t[name])
        model.threshold.copy_(t["theta"])
    for sparse in (False, True):
        assert float(model.training_loss(t["x"], sparse=sparse).loss) == pytest.approx(plain, rel=1e-5)
    if saelens_missing() is None:
        saelens = float(_saelens_forward(_saelens_sae(t), t["x"]).loss)
        assert saelens == pytest.approx(plain, rel=1e-5)
