"""kernels/dispatch.py: a kernel that cannot run on the installed Triton gives one clear error naming the
fallback ATOMS_KERNELS=torch, never a raw compiler traceback."""

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from atoms.kernels import dispatch  # noqa: E402
from atoms.kernels.dispatch import KernelUnavailableError, backend, launch  # noqa: E402


@triton.jit
def _dot_too_small(x_ptr):
    """Invalid on every release: tl.dot needs blocks of at least 16."""
    lane = tl.arange(0, 2)
    tile = tl.load(x_ptr + lane[:, None] * 2 + lane[None, :])
    tl.store(x_ptr + lane[:, None] * 2 + lane[None, :], tl.dot(tile, tile))


class _CompilesOnLaunch:
    """Stands in for a JIT kernel on a GPU: launching it runs Triton's real compiler (for sm_90, no GPU
    needed), which is where a release's compiler bug surfaces on a user's machine."""

    fn = _dot_too_small.fn

    def __getitem__(self, grid):
        def run(*args, **meta):
            source = ASTSource(fn=_dot_too_small, signature={"x_ptr": "*fp32"}, constexprs={})
            triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"enable_fp_fusion": True})

        return run


def test_a_compiler_failure_names_the_fallback_without_the_compiler_traceback():
    with pytest.raises(KernelUnavailableError) as caught:
        launch(_CompilesOnLaunch(), (1,), "triton", torch.zeros(4))
    message = str(caught.value)
    assert "failed to compile _dot_too_small" in message and "ATOMS_KERNELS=torch" in message
    assert triton.__version__ in message
    assert caught.value.__cause__ is None and caught.value.__suppress_context__
    assert "CompilationError" in caught.value.compiler_error  # kept for a bug report, not printed


def test_an_error_raised_by_the_launch_itself_is_not_blamed_on_the_compiler():
    class _FailsToLaunch:
        fn = _dot_too_small.fn

        def __getitem__(self, grid):
            def run(*args, **meta):
                raise RuntimeError("Triton Error [CUDA]: an illegal memory access was encountered")

            return run

    with pytest.raises(RuntimeError, match="illegal memory access"):
        launch(_FailsToLaunch(), (1,), "triton")


def test_a_triton_older_than_the_supported_range_is_refused(monkeypatch):
    monkeypatch.setattr(dispatch, "triton_version", lambda: (3, 3))
    with pytest.raises(KernelUnavailableError, match=r"need Triton 3\.4 to 3\.9.*ATOMS_KERNELS=torch"):
        launch(_CompilesOnLaunch(), (1,), "triton")


def test_the_interpreter_is_refused_where_it_cannot_run_with_this_numpy(monkeypatch):
    monkeypatch.setenv("ATOMS_KERNELS", "interpret")
    monkeypatch.setattr(dispatch, "triton_version", lambda: (3, 6))
    monkeypatch.setattr(dispatch.np, "__version__", "2.4.6")
    with pytest.raises(ValueError, match=r"needs Triton >= 3\.7 with NumPy 2\.4\.6.*unset ATOMS_KERNELS"):
        backend(torch.zeros(2))
    monkeypatch.setattr(dispatch.np, "__version__", "2.3.5")
    assert backend(torch.zeros(2)) == "interpret"
