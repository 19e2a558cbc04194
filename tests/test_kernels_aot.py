"""Ahead-of-time compilation of the threshold-encoder kernels for sm_80 and sm_90, without a GPU.

Each kernel is compiled with the tile sizes its launcher uses on a GPU; the PTX must hold tensor-core
instructions where the kernel is a matrix product (`mma` on sm_80, `wgmma` on sm_90) and the cubin must report
no spills.
"""

import pytest
import torch

triton = pytest.importorskip("triton")

from atoms.kernels import threshold_encoder as te  # noqa: E402
from atoms.kernels.aot import compile_for  # noqa: E402

_TYPE = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def _forward_spec(dtype: torch.dtype, precision: str):
    t = te._FWD_GPU_IEEE if precision == "ieee" else te._FWD_GPU[dtype]
    ty = _TYPE[dtype]
    signature = {
        "x_ptr": f"*{ty}",
        "w_ptr": f"*{ty}",
        "b_ptr": f"*{ty}",
        "theta_ptr": "*fp32",
        "codes_ptr": f"*{ty}",
        "state_ptr": "*u8",
        "l0_ptr": "*fp32",
        **dict.fromkeys(
            ["M", "N", "K", "stride_xm", "stride_wk", "stride_cm", "stride_sm", "stride_lm"], "i32"
        ),
        "half_width": "fp32",
    }
    constexprs = {
        # Contiguous inputs: a launch specialises unit strides to constants.
        "stride_xk": 1,
        "stride_wn": 1,
        "BLOCK_M": t.block_m,
        "BLOCK_N": t.block_n,
        "BLOCK_K": t.block_k,
        "GROUP_M": t.group_m,
        "DOT_FP32": False,
        "PRECISION": precision,
        "WRITE_L0": True,
    }
    # The benchmark shapes (batch 4096, d 576 / 2304, n_atoms 2304 / 16384) make every size and leading stride
    # a multiple of 16, which a launch turns into divisibility hints; K's is what lets the compiler pipeline
    # the masked K-loop loads (cp.async / TMA): without it the loads go through registers, unpipelined.
    aligned = [n for n in signature if n.endswith("_ptr") or n in ("M", "N", "K", "stride_xm", "stride_wk")]
    aligned += ["stride_cm", "stride_sm"]
    return te._encode_fwd_kernel, signature, constexprs, aligned, t


def _backward_spec(dtype: torch.dtype):
    t = te._BWD_GPU
    ty = _TYPE[dtype]
    signature = {
        "g_ptr": f"*{ty}",
        "gl_ptr": "*fp32",
        "state_ptr": "*u8",
        "theta_ptr": "*fp32",
        "gz_ptr": f"*{ty}",
        "gcol_ptr": "*fp32",
        "gtheta_ptr": "*fp32",
        **dict.fromkeys(["M", "N", "stride_gm", "stride_sm", "stride_zm"], "i32"),
    }
    constexprs = {"stride_gn": 1, "stride_glm": 1, "BLOCK_M": t.block_m, "BLOCK_N": t.block_n, "HAS_GL": True}
    aligned = [
        n for n in signature if n.endswith("_ptr") or n in ("M", "N", "stride_gm", "stride_sm", "stride_zm")
    ]
    return te._encode_bwd_kernel, signature, constexprs, aligned, t


# (name, spec, is a tensor-core matrix product). fp32 with input_precision="ieee" (torch's default "highest"
# matmul precision) is an exact-fp32 FMA product by design: no tensor cores.
VARIANTS = [
    ("forward-bf16", lambda: _forward_spec(torch.bfloat16, "tf32"), True),
    ("forward-fp16", lambda: _forward_spec(torch.float16, "tf32"), True),
    ("forward-fp32-tf32", lambda: _forward_spec(torch.float32, "tf32"), True),
    ("forward-fp32-ieee", lambda: _forward_spec(torch.float32, "ieee"), False),
    ("backward-bf16", lambda: _backward_spec(torch.bfloat16), False),
    ("backward-fp32", lambda: _backward_spec(torch.float32), False),
]


@pytest.mark.parametrize("capability", [80, 90])
@pytest.mark.parametrize(("name", "spec", "is_matmul"), VARIANTS, ids=[v[0] for v in VARIANTS])
def test_kernel_compiles_without_spills(name, spec, is_matmul, capability):
    kernel, signature, constexprs, aligned, t = spec()
    info = compile_for(
        kernel,
        signature,
        constexprs,
        capability,
        num_warps=t.num_warps,
        num_stages=t.num_stages,
        aligned=aligned,
    )
    assert info.n_spills == 0, (
        f"{name} sm_{capability}: {info.n_spills} bytes of spills at {info.n_regs} registers"
    )
    print(f"{name} sm_{capability}: {info.n_regs} registers, {info.shared} bytes shared")
    assert 0 < info.n_regs <= 255
    if is_matmul:
        instruction = "wgmma" if capability == 90 else "mma"
        assert instruction in info.ptx, f"{name} sm_{capability}: no `{instruction}` instruction in the PTX"
    if name.startswith("forward"):
        # Operand tiles stream into shared memory asynchronously: the K loop is software-pipelined.
        assert "cp.async" in info.ptx, f"{name} sm_{capability}: K loop not pipelined"
    # The shared-memory budget the tile comment in threshold_encoder.py states: within an H100 SM's 228 KiB.
    assert info.shared <= 228 * 1024


def test_spill_detector_sees_spills():
    # The zero-spill assertion above is only worth something if a spilling kernel is caught: cap the
    # registers.
    kernel, signature, constexprs, aligned, t = _forward_spec(torch.bfloat16, "tf32")
    info = compile_for(
        kernel,
        signature,
        constexprs,
        80,
        num_warps=t.num_warps,
        num_stages=t.num_stages,
        aligned=aligned,
        options={"maxnreg": 32},
    )
    assert info.n_regs <= 32
    assert info.n_spills > 0


def test_compile_for_names_missing_arguments():
    kernel, signature, constexprs, _, _ = _backward_spec(torch.float32)
    del signature["M"]
    with pytest.raises(ValueError, match=r"missing \['M'\]"):
        compile_for(kernel, signature, constexprs, 80)


def test_compiles_after_an_interpreted_launch(monkeypatch):
    # The interpreter patches triton.language while it runs; dispatch.launch must put everything back so the
    # compiler still works in the same process.
    from triton.runtime.jit import JITFunction

    monkeypatch.setenv("ATOMS_KERNELS", "interpret")
    x = torch.randn(5, 7)
    te.threshold_encode(x, torch.randn(7, 9), torch.zeros(9), torch.full((9,), 0.1))
    assert isinstance(triton.language.sum, JITFunction)
    assert isinstance(triton.language.standard.zeros, JITFunction)
    kernel, signature, constexprs, aligned, t = _backward_spec(torch.float32)
    info = compile_for(kernel, signature, constexprs, 90, num_warps=t.num_warps, aligned=aligned)
    assert info.n_spills == 0
