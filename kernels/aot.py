"""Ahead-of-time compilation of a Triton kernel for a given NVIDIA architecture, without a GPU.

Used by the kernel tests: every kernel must compile for sm_80 and sm_90, matrix-product kernels must hold
tensor-core instructions in their PTX, and the cubin must report no spills.

Triton 3.9.0's `ASTSource(fn, signature, constexprs, attrs)`: `signature` maps *every* argument name of the
kernel to a type string ("*bf16" for a pointer to bf16, "i32", "fp32", ...; "constexpr" for compile-time
arguments), `constexprs` maps argument names to their values, and `attrs` maps argument-index tuples such as
``(0,)`` to ``[["tt.divisibility", 16]]`` hints. A real launch specialises the same way: pointers whose
address is a multiple of 16 and integers divisible by 16 get the divisibility hint, integers equal to 1 become
constants.

Registers and spills come from the cubin through ``cuobjdump --dump-resource-usage`` (shipped inside the
triton wheel, ``triton/backends/nvidia/bin/cuobjdump``). ptxas puts spill slots in the thread's stack frame,
so spills show as STACK (checked here: the same kernel compiled with ``maxnreg=40`` reported ``STACK:624``
where ``ptxas -v`` said "968 bytes spill stores"); Triton kernels hold no local arrays and inline every call,
so any STACK or LOCAL bytes are spills.
"""

import re
import subprocess
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

__all__ = ["CompiledInfo", "compile_for", "cuobjdump_path"]

_USAGE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


class CompiledInfo(NamedTuple):
    """One kernel compiled for one architecture."""

    ptx: str
    """The PTX text (search it for `mma` / `wgmma`)."""
    n_regs: int
    """Registers per thread."""
    n_spills: int
    """Bytes of per-thread stack frame plus local memory, i.e. spill slots; 0 when nothing spills."""
    shared: int
    """Bytes of dynamic shared memory the launch reserves (pipeline stages, layout conversions)."""


def cuobjdump_path() -> Path:
    """The cuobjdump binary inside the installed triton package."""
    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not path.exists():
        raise FileNotFoundError(
            f"cuobjdump not found at {path}; reinstall the triton wheel (it ships NVIDIA's binary tools)."
        )
    return path


def compile_for(
    kernel: Any,
    signature: Mapping[str, str],
    constexprs: Mapping[str, Any],
    capability: int,
    *,
    num_warps: int = 4,
    num_stages: int = 3,
    aligned: Iterable[str] = (),
    options: Mapping[str, Any] | None = None,
) -> CompiledInfo:
    """Compile `kernel` (a ``@triton.jit`` function) for CUDA compute capability `capability` (80, 90, ...).

    Args:
        signature: type string of every runtime argument ("*fp32", "i32", "fp32", ...); constexpr
            arguments may be left out (they are filled in as "constexpr").
        constexprs: values of the compile-time arguments.
        aligned: arguments to hint as divisible by 16, as a launch does for aligned pointers and strides.
        options: further triton compile options (e.g. ``{"maxnreg": 64}``).
    """
    names = list(kernel.arg_names)
    missing = [n for n in names if n not in signature and n not in constexprs]
    unknown = [n for n in [*signature, *constexprs] if n not in names]
    if missing or unknown:
        raise ValueError(
            f"{kernel.__name__}: give a type or constexpr value for every argument; missing {missing}, not "
            f"arguments of the kernel {unknown}."
        )
    full = {n: "constexpr" if n in constexprs else signature[n] for n in names}
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    src = ASTSource(fn=kernel, signature=full, constexprs=dict(constexprs), attrs=attrs)
    # enable_fp_fusion=True is what a launch uses by default in triton 3.9; naming it silences 3.9's warning.
    opts = {"num_warps": num_warps, "num_stages": num_stages, "enable_fp_fusion": True, **(options or {})}
    compiled = triton.compile(src, target=GPUTarget("cuda", capability, 32), options=opts)
    n_regs, stack, local = _resource_usage(compiled.asm["cubin"])
    return CompiledInfo(compiled.asm["ptx"], n_regs, stack + local, compiled.metadata.shared)


def _resource_usage(cubin: bytes) -> tuple[int, int, int]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        out = subprocess.run(
            [str(cuobjdump_path()), "--dump-resource-usage", str(path)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    match = _USAGE.search(out)
    if match is None:
        raise RuntimeError(f"could not read the resource usage from cuobjdump's output:\n{out}")
    reg, stack, _static_shared, local = (int(v) for v in match.groups())
    return reg, stack, local
