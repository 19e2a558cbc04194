"""Per-call choice between the Triton kernels, Triton's interpreter and the torch reference.

`backend(*tensors)` decides from the tensors' device and the environment variable ``ATOMS_KERNELS``, read on
every call (never at import):

- unset or ``auto``: CUDA tensors run the Triton kernels, CPU tensors the torch reference;
- ``torch``: the torch reference everywhere;
- ``interpret``: the Triton kernels through Triton's CPU interpreter (how tests check kernels without a GPU).

How Triton 3.9.0 handles its interpreter, and why `launch` does not just set ``TRITON_INTERPRET=1``: the flag
is read when ``@triton.jit`` *decorates* a function (``triton.runtime.jit.jit`` returns an
``InterpretedFunction`` instead of a ``JITFunction``), and that happens at import time for our kernels and,
worse, for the jit-defined parts of ``triton.language`` itself (``tl.zeros``, ``tl.sum``, ``tl.max``,
``tl.cdiv`` ... in ``triton/language/standard.py``). Launching is not affected by the flag. So setting
``TRITON_INTERPRET=1`` before a call does nothing, and setting it before ``import triton`` makes every kernel
in the process interpret-only (the ahead-of-time compilation tests could then not run in the same process).
`launch` instead builds the interpreted twin of the kernel per call (``InterpretedFunction(kernel.fn)``,
cached) and, for the duration of the run only, swaps every ``JITFunction`` attribute of the
``triton.language`` modules and of the kernel's own module (its jit helpers) for its interpreted twin, with
``knobs.runtime.interpret`` set inside ``knobs.runtime.scope()``; afterwards everything is put back (the
interpreter's own per-launch patching of ``tl.core`` is not fully undone by Triton, so the restore covers
every attribute that existed before). Checked here: after an interpreted launch, ``triton.compile`` of the
same kernel for sm_80/sm_90 still works. A lock serialises interpreted runs because they patch module state.
"""

import os
import re
import sys
import threading
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

try:
    import triton
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    HAS_TRITON = True
except ImportError:  # Triton ships Linux wheels only; elsewhere every call takes the torch reference.
    HAS_TRITON = False

    class _NoTriton:
        """Stands in for `triton` and `triton.language` so kernel modules still import (kernels never run)."""

        constexpr = object

        @staticmethod
        def jit(fn):
            return fn

    triton = tl = _NoTriton()

__all__ = [
    "HAS_TRITON",
    "NEWEST_TESTED",
    "OLDEST_SUPPORTED",
    "Backend",
    "KernelUnavailableError",
    "backend",
    "dot_in_fp32",
    "launch",
    "tl",
    "triton",
    "triton_version",
]

Backend = Literal["triton", "interpret", "torch"]
_MODES = ("auto", "torch", "interpret")
# The Triton releases the kernels are compiled and tested under (`make aot`): 3.4 ships with torch 2.8, the
# oldest torch the project supports.
OLDEST_SUPPORTED = (3, 4)
NEWEST_TESTED = (3, 9)


class KernelUnavailableError(RuntimeError):
    """A Triton kernel cannot run with the installed Triton: too old, or its compiler failed on the kernel.

    The message names the fix (ATOMS_KERNELS=torch); `compiler_error` keeps the compiler's own traceback
    for a bug report, which is not printed.
    """

    def __init__(self, message: str, compiler_error: str = "") -> None:
        super().__init__(message)
        self.compiler_error = compiler_error


@cache
def triton_version() -> tuple[int, int]:
    """(major, minor) of the installed Triton; (0, 0) without Triton."""
    match = re.match(r"(\d+)\.(\d+)", getattr(triton, "__version__", ""))
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


def _tested_range() -> str:
    return "{}.{} to {}.{}".format(*OLDEST_SUPPORTED, *NEWEST_TESTED)


def _require_supported_triton() -> None:
    if triton_version() < OLDEST_SUPPORTED:
        raise KernelUnavailableError(
            f"the atoms kernels need Triton {_tested_range()}, and Triton {triton.__version__} is installed; "
            "install a supported Triton (torch >= 2.8 ships one), or set ATOMS_KERNELS=torch to run the "
            "torch reference on this device."
        )


def _require_working_interpreter() -> None:
    # Measured with Triton 3.4-3.9 and NumPy 2.4.6: before 3.7 the interpreter calls int() on one-element
    # arrays in every loop over a runtime bound, which NumPy 2.4 refuses ("only 0-dimensional arrays can be
    # converted to Python scalars").
    numpy_version = tuple(int(v) for v in re.findall(r"\d+", np.__version__)[:2])
    if triton_version() < (3, 7) and numpy_version >= (2, 4):
        raise ValueError(
            f"ATOMS_KERNELS=interpret needs Triton >= 3.7 with NumPy {np.__version__}: Triton "
            f"{triton.__version__}'s interpreter fails on NumPy >= 2.4. Install Triton >= 3.7 or "
            "NumPy < 2.4, or unset ATOMS_KERNELS (the torch reference on CPU)."
        )


def _compiler_failure(kernel: Any, error: BaseException) -> KernelUnavailableError | None:
    """The clear error for `error` if Triton's compiler raised it (front end or MLIR passes), else None:
    a launch failure (bad address, out of memory) is not the compiler's and propagates as it is."""
    compiler = Path(triton.__file__).parent / "compiler"
    frames = traceback.extract_tb(error.__traceback__)
    if not any(Path(frame.filename).is_relative_to(compiler) for frame in frames):
        return None
    name = getattr(getattr(kernel, "fn", kernel), "__name__", "a kernel")
    first = next((line.strip() for line in str(error).splitlines() if line.strip()), "")
    return KernelUnavailableError(
        f"Triton {triton.__version__} failed to compile {name} ({type(error).__name__}: {first}). The "
        f"kernels are tested under Triton {_tested_range()}; set ATOMS_KERNELS=torch to run the torch "
        "reference on this device, and report the compiler error (KernelUnavailableError.compiler_error).",
        compiler_error="".join(traceback.format_exception(error)),
    )


def backend(*tensors: torch.Tensor | None) -> Backend:
    """Which implementation runs for these tensors (``None`` entries are ignored), decided on every call.

    Raises ValueError for an unknown ``ATOMS_KERNELS`` value, tensors on different devices, or
    ``ATOMS_KERNELS=interpret`` without Triton installed.
    """
    mode = os.environ.get("ATOMS_KERNELS", "auto").strip().lower() or "auto"
    if mode not in _MODES:
        raise ValueError(
            f"ATOMS_KERNELS={mode!r} is not a known kernel backend; set it to one of {_MODES} or unset it "
            "(auto: Triton on CUDA tensors, the torch reference on CPU)."
        )
    devices = {t.device for t in tensors if t is not None}
    if len(devices) > 1:
        raise ValueError(
            f"tensors are on different devices {sorted(str(d) for d in devices)}; move them to one device "
            "(e.g. `.to(x.device)`) before calling the kernel."
        )
    if mode == "torch":
        return "torch"
    if mode == "interpret":
        if not HAS_TRITON:
            raise ValueError(
                "ATOMS_KERNELS=interpret needs Triton, which is not installed; `pip install triton` (Linux) "
                "or unset ATOMS_KERNELS to use the torch reference."
            )
        _require_working_interpreter()
        return "interpret"
    if HAS_TRITON and any(d.type == "cuda" for d in devices):
        return "triton"
    return "torch"


def dot_in_fp32(mode: Backend, dtype: torch.dtype) -> bool:
    """Whether a kernel must upcast its `tl.dot` operands to fp32.

    Under Triton 3.9.0's interpreter `tl.dot` on bf16 operands multiplies their raw uint16 bit patterns
    (upstream triton issue 11584); fp16 is fine (numpy has float16). Compiled kernels keep bf16 tensor-core
    dots.
    """
    return mode == "interpret" and dtype == torch.bfloat16


def launch(kernel: Any, grid: tuple[int, ...], mode: Backend, *args: Any, **meta: Any) -> None:
    """Run a ``@triton.jit`` kernel on `grid`: compiled for mode "triton", interpreted for "interpret".

    Raises KernelUnavailableError, naming the fallback ATOMS_KERNELS=torch, when the installed Triton is
    older than 3.4 or its compiler fails on the kernel (never the compiler's raw traceback).
    """
    if mode not in ("triton", "interpret"):
        raise ValueError(
            f"launch() runs Triton kernels only, got backend {mode!r}; call the torch reference."
        )
    _require_supported_triton()
    if mode == "interpret":
        with _interpreting(kernel):
            _interpreted(kernel)[grid](*args, **meta)
        return
    try:
        kernel[grid](*args, **meta)
    except Exception as error:
        failure = _compiler_failure(kernel, error)
        if failure is None:
            raise
        raise failure from None


_LOCK = threading.RLock()
_MISSING = object()
# id(JITFunction) -> (JITFunction, InterpretedFunction); keyed by id because hashing a JITFunction computes
# its cache key, which walks the very globals being patched.
_TWINS: dict[int, tuple[Any, Any]] = {}


def _interpreted(fn: Any) -> Any:
    if isinstance(fn, InterpretedFunction):  # TRITON_INTERPRET=1 was set before import: already interpreted
        return fn
    if id(fn) not in _TWINS:
        _TWINS[id(fn)] = (fn, InterpretedFunction(fn.fn))
    return _TWINS[id(fn)][1]


def _member(twin: Any) -> Any:
    # An InterpretedFunction is not a descriptor, so `x.sum(0)` needs a plain function to bind `x` as self.
    def method(*args: Any, **kwargs: Any) -> Any:
        return twin(*args, **kwargs)

    return method


def _namespaces(kernel: Any) -> list[Any]:
    # triton.language, plus the kernel's own module so that jit helper functions it calls are interpreted too.
    modules = [m for name, m in list(sys.modules.items()) if name.split(".")[:2] == ["triton", "language"]]
    own = sys.modules.get(kernel.fn.__module__)
    return [*modules, tl.tensor, tl.dtype, *([own] if own is not None else [])]


@contextmanager
def _interpreting(kernel: Any) -> Iterator[None]:
    with _LOCK, triton.knobs.runtime.scope():
        triton.knobs.runtime.interpret = True
        saved = [(ns, dict(vars(ns))) for ns in _namespaces(kernel)]
        try:
            for ns, attrs in saved:
                for name, value in attrs.items():
                    if isinstance(value, JITFunction):
                        setattr(
                            ns,
                            name,
                            _member(_interpreted(value)) if isinstance(ns, type) else _interpreted(value),
                        )
            yield
        finally:
            # Names the interpreter adds to module globals stay: its cached rewritten functions look them up.
            for ns, attrs in saved:
                current = vars(ns)
                for name, value in attrs.items():
                    if current.get(name, _MISSING) is not value:
                        setattr(ns, name, value)
