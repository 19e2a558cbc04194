"""JumpReLU as SAE training code usually writes it, and whether sae-lens is importable: shared by the
encoder and training-step benchmarks (both files import it; the peak-memory child puts this folder on
sys.path as pytest does)."""

import torch

__all__ = ["NaiveJumpReLU", "NaiveStep", "saelens_missing"]


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
