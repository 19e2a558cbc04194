"""Differences between Triton releases that the kernels' code must bridge.

The kernels compile and pass under every Triton from 3.4 (shipped with torch 2.8, the oldest torch the
project supports) to 3.9 (`make aot` compiles each kernel under both ends, each in its own venv). Two
differences between those releases reach the kernels' code, both measured with the ahead-of-time compiler
(every release 3.4 to 3.9, sm_80 and sm_90; kernels/NOTES.md):

- Triton 3.4's `tl.dot` takes no float64 operands ("Unsupported lhs dtype fp64"); 3.5 added them, and 3.5
  to 3.8 need ``out_dtype=tl.float64`` for a float64 accumulator, which 3.9 infers. `f64_product` is the
  float64 product both Gram kernels use: the DMMA tensor-core dot where Triton has it, otherwise a
  broadcast multiply-and-sum (exact float64 products and float64 sums in another order, no tensor cores).
- Triton 3.5 to 3.8 crash (``PassManager::run failed`` in ConvertTritonGPUToLLVM) compiling a float64 dot
  fed by float16 or bfloat16 loads, on sm_80 and sm_90; float32 loads compile, and so does everything
  under 3.9. There the support-Gram launcher widens 16-bit atoms to float32 first (exact; one float32 copy
  of the atoms), `widens_half_before_fp64_dot`.
"""

from .dispatch import tl, triton, triton_version

__all__ = ["f64_product", "has_fp64_dot", "widens_half_before_fp64_dot"]


def has_fp64_dot() -> bool:
    """Whether `tl.dot` takes float64 operands (Triton >= 3.5): the float64 tensor-core (DMMA) product."""
    return triton_version() >= (3, 5)


def widens_half_before_fp64_dot() -> bool:
    """Whether float16 / bfloat16 operands must reach a float64 `tl.dot` as float32 (Triton 3.5 to 3.8)."""
    return (3, 5) <= triton_version() < (3, 9)


@triton.jit
def f64_product(a, b_t, acc, FP64_DOT: tl.constexpr):
    """acc + a @ b_t for float64 tiles a (M, K) and b_t (K, N): DMMA where `tl.dot` takes float64, else a
    broadcast multiply-and-sum (keep M K N small there: the (M, K, N) product lives in registers)."""
    if FP64_DOT:
        return tl.dot(a, b_t, acc, out_dtype=tl.float64)
    else:
        return acc + tl.sum(a[:, :, None] * b_t[None, :, :], axis=1)
