"""JumpReLU as SAE training code usually writes it, whether sae-lens is importable and whether the CPU has
fast bf16: shared by the
encoder and training-step benchmarks (both files import it; the peak-memory child puts this folder on
sys.path as pytest does)."""

from pathlib import Path

import torch

__all__ = ["NaiveJumpReLU", "NaiveStep", "cpu_has_bf16", "saelens_missing"]


def _rectangle(u: torch.Tensor) -> torch.Tensor:
    return (u.abs() <= 0.5).to(u.dtype)


class NaiveJumpReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, theta, bandwidth):
        ctx.save_for_backward(z, theta)
        ctx.bandwidth = bandwidth
        return z * (z > theta)

    @staticmethod
    def backward(ctx, grad):
        z, theta = ctx.saved_tensors
        window = _rectangle((z - theta) / ctx.bandwidth)
        grad_theta = -(theta / ctx.bandwidth) * window * grad
        return (z > theta) * grad, grad_theta.sum(0), None


class NaiveStep(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, theta, bandwidth):
        ctx.save_for_backward(z, theta)
        ctx.bandwidth = bandwidth
        return (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx, grad):
        z, theta = ctx.saved_tensors
        grad_theta = -(1.0 / ctx.bandwidth) * _rectangle((z - theta) / ctx.bandwidth) * grad
        return None, grad_theta.sum(0), None


def saelens_missing() -> str | None:
    """Why the SAELens variant cannot run here, or None when it can."""
    try:
        import sae_lens  # noqa: F401
    except ImportError as err:
        return f"sae-lens is not installed ({err}); install the `peers` extra: pip install -e '.[peers]'"
    return None


def cpu_has_bf16() -> bool:
    """Whether the CPU has AVX512-BF16 or AMX, without which bf16 GEMMs run about 40x slower than fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags
