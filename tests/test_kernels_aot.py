"""Ahead-of-time compilation of every kernel for sm_80 and sm_90 under the installed Triton, without a GPU.

`make aot` runs this file once per Triton release at the two ends of the supported range (3.4 and 3.9), each
in a venv of its own; `make test` leaves it to that matrix (marker `aot`). Each kernel is compiled with the
tiles its launcher picks on a GPU, in every dtype it takes, and must:
- compile (a compiler crash fails here, not on a user's GPU);
- hold the tensor-core instruction where the kernel is a matrix product (`mma` on sm_80, `wgmma` on sm_90;
  float64 products use DMMA, `mma.sync ... f64`, on both: Hopper's wgmma has no float64 form), where the
  Triton release can emit one (kernels/compat.py says where it cannot);
- report no spills in the cubin, and stream its operand tiles asynchronously (`cp.async`) where it is a
  tensor-core product.
"""

import re

import pytest
import torch

triton = pytest.importorskip("triton")

from atoms.kernels import aip_gram as ag  # noqa: E402
from atoms.kernels import sparse_gather as sparse_g  # noqa: E402
from atoms.kernels import sparse_select as sparse_s  # noqa: E402
from atoms.kernels import support_gram as sg  # noqa: E402
from atoms.kernels import threshold_encoder as te  # noqa: E402
from atoms.kernels.aot import compile_for  # noqa: E402
from atoms.kernels.compat import has_fp64_dot  # noqa: E402
from atoms.kernels.dispatch import triton_version  # noqa: E402

pytestmark = pytest.mark.aot

TYPE = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}
CAPABILITIES = [80, 90]
H100_SHARED = 228 * 1024  # bytes of shared memory of an H100 SM
# m8n8k4 on sm_80; Hopper also has m16n8k{4,8,16} float64 shapes, which Triton 3.5-3.7 pick there.
DMMA = r"mma\.sync\.aligned\.m\d+n8k\d+\.row\.col\.f64\.f64\.f64\.f64"


def assert_float64_product(ptx: str, capability: int) -> None:
    """DMMA where Triton has a float64 `tl.dot` (3.5 on), FMA-unit products before (kernels/compat.py)."""
    assert "wgmma" not in ptx
    if has_fp64_dot():
        assert re.search(DMMA, ptx), f"sm_{capability}: no DMMA instruction in the PTX"
        assert "cp.async" in ptx  # the operand loads are pipelined
    else:
        assert not re.search(r"mma\.sync", ptx)
        assert re.search(r"\b(fma\.rn|mul\.rn|mul)\.f64\b", ptx)  # float64 products on the FMA units


def _known_support_spills(capability: int) -> int:
    """0, except on sm_90 under Triton 3.5 to 3.7, whose m16n8k16 float64 products spill up to 32 bytes in
    some support-Gram variants (measured, kernels/NOTES.md): slower there, not wrong, and outside the
    releases `make aot` holds to no spills."""
    return 32 if capability == 90 and (3, 5) <= triton_version() < (3, 8) else 0


# --------------------------------------------------------------------------------------------------------
# Threshold encoder
# --------------------------------------------------------------------------------------------------------


def _forward_spec(dtype: torch.dtype, precision: str):
    t = te._FWD_GPU_IEEE if precision == "ieee" else te._FWD_GPU[dtype]
    ty = TYPE[dtype]
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
    ty = TYPE[dtype]
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
    ("backward-fp16", lambda: _backward_spec(torch.float16), False),
    ("backward-fp32", lambda: _backward_spec(torch.float32), False),
]


@pytest.mark.parametrize("capability", CAPABILITIES)
@pytest.mark.parametrize(("name", "spec", "is_matmul"), VARIANTS, ids=[v[0] for v in VARIANTS])
def test_threshold_encoder_compiles_without_spills(name, spec, is_matmul, capability):
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
    assert info.shared <= H100_SHARED


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
    if triton_version() < (3, 7):
        pytest.skip(f"Triton {triton.__version__}'s interpreter does not run with NumPy >= 2.4 (dispatch.py)")
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


# --------------------------------------------------------------------------------------------------------
# AIP Gram reduction
# --------------------------------------------------------------------------------------------------------


def _gram_compile(dtype: torch.dtype, precision: str, capability: int, n_bins: int = 100, **pinned):
    b = ag._blocks(dtype, precision, 1 << 14, "triton")  # what a launch picks for a large dictionary
    acc = TYPE[ag._compute_dtype(dtype)]
    signature = {
        "unit_ptr": f"*{TYPE[dtype]}",
        "row_max_ptr": f"*{acc}",
        "row_idx_ptr": "*i32",
        "col_max_ptr": f"*{acc}",
        "col_idx_ptr": "*i32",
        "hist_ptr": "*i64",
        "limits_ptr": f"*{acc}",
        "above_ptr": "*i64",
        **dict.fromkeys(["N", "D", "stride_n", "bins", "n_limits", "s0", "q0", "band_n"], "i32"),
    }
    for name in pinned:  # integer arguments equal to 1 become constants in a launch
        del signature[name]
    constexprs = {
        "stride_d": 1,  # contiguous atoms: a launch specialises the unit stride to a constant
        "BLOCK": b.block,
        "BLOCK_D": b.block_d,
        "GROUP": b.group,
        "BINS_P2": max(2, ag.triton.next_power_of_2(n_bins)),
        "PRECISION": precision,
        "DOT_FP32": False,
        "FP64_DOT": ag.has_fp64_dot(),
        **pinned,
    }
    # Benchmark shape (16384 x 2304): pointers, N, D and the row stride are multiples of 16.
    aligned = [n for n in signature if n.endswith("_ptr")] + ["N", "D", "stride_n", "band_n"]
    return compile_for(
        ag._gram_reduce_kernel,
        signature,
        constexprs,
        capability,
        num_warps=b.num_warps,
        num_stages=b.num_stages,
        aligned=[n for n in aligned if n in signature],
    ), b


# (dtype, precision): the instruction the dot must compile to on sm_80 and on sm_90.
TENSOR_CORE = {
    (torch.bfloat16, "ieee"): (
        r"mma\.sync\.aligned\.m16n8k16\.row\.col\.f32\.bf16\.bf16\.f32",
        r"wgmma\.mma_async\.sync\.aligned\.m64n128k16\.f32\.bf16\.bf16",
    ),
    (torch.float32, "tf32x3"): (
        r"mma\.sync\.aligned\.m16n8k8\.row\.col\.f32\.tf32\.tf32\.f32",
        r"wgmma\.mma_async\.sync\.aligned\.m64n128k8\.f32\.tf32\.tf32",
    ),
    (torch.float16, "ieee"): (
        r"mma\.sync\.aligned\.m16n8k16\.row\.col\.f32\.f16\.f16\.f32",
        r"wgmma\.mma_async\.sync\.aligned\.m64n128k16\.f32\.f16\.f16",
    ),
}


@pytest.mark.parametrize("capability", CAPABILITIES)
@pytest.mark.parametrize(
    ("dtype", "precision"),
    [
        (torch.bfloat16, "ieee"),
        (torch.float16, "ieee"),
        (torch.float32, "ieee"),
        (torch.float32, "tf32x3"),
        (torch.float64, "ieee"),
    ],
    ids=["bf16", "fp16", "fp32-ieee", "fp32-tf32x3", "fp64"],
)
def test_gram_compiles_to_the_intended_product_without_spills(dtype, precision, capability):
    info, b = _gram_compile(dtype, precision, capability)
    assert info.n_spills == 0, f"{info.n_regs} registers, {info.n_spills} bytes of spills"
    assert info.shared <= H100_SHARED
    if dtype == torch.float64:
        assert_float64_product(info.ptx, capability)
    elif (dtype, precision) in TENSOR_CORE:
        assert "cp.async" in info.ptx  # operand tiles stream into shared memory: the d loop is pipelined
        assert re.search(TENSOR_CORE[(dtype, precision)][capability == 90], info.ptx)
    else:
        # Exact fp32 products have no tensor-core instruction: the "ieee" dot is an FMA chain, one fma.rn.f32
        # per accumulator and d step (BLOCK**2 BLOCK_D / threads per unrolled chunk).
        assert not re.search(r"\bw?gmma|mma\.sync", info.ptx)
        fmas = len(re.findall(r"\bfma\.rn\.f32\b", info.ptx))
        assert fmas >= b.block**2 * b.block_d // (32 * b.num_warps)


@pytest.mark.parametrize(
    ("dtype", "precision", "capability"),
    [(torch.bfloat16, "ieee", 80), (torch.float32, "tf32x3", 80), (torch.float32, "ieee", 90)],
    ids=["bf16-sm80", "fp32-tf32x3-sm80", "fp32-ieee-sm90"],
)
def test_gram_with_the_largest_histogram_compiles_without_spills(dtype, precision, capability):
    """MAX_KERNEL_BINS counters in registers, on the three variants closest to 255 registers."""
    info, _ = _gram_compile(dtype, precision, capability, n_bins=ag.MAX_KERNEL_BINS)
    assert info.n_spills == 0, f"{info.n_regs} registers, {info.n_spills} bytes of spills"


def test_gram_compiles_with_integer_arguments_pinned_to_one():
    """A launch passes integer arguments equal to 1 as constants: bins == 1, one threshold, the second band
    (s0 == 1, q0 == 1), a single atom of dimension 1 (N, D, stride_n, band_n)."""
    ones = dict.fromkeys(["N", "D", "stride_n", "bins", "n_limits", "s0", "q0", "band_n"], 1)
    info, _ = _gram_compile(torch.float32, "ieee", 80, n_bins=1, **ones)
    assert info.n_spills == 0


# --------------------------------------------------------------------------------------------------------
# Support Gram
# --------------------------------------------------------------------------------------------------------


def _support_compile(dtype: torch.dtype, k: int, store: bool, capability: int):
    """Compile what a launch on `dtype` atoms compiles (16-bit atoms are read as float32 where the Triton
    release needs it, kernels/compat.py)."""
    fp64_dot = sg.has_fp64_dot()
    t = sg._gpu_tiles(k, sg._operand_dtype(dtype, "triton"), fp64_dot)
    signature = {
        "unit_ptr": f"*{TYPE[sg._operand_dtype(dtype, 'triton')]}",
        "idx_ptr": "*i32",
        "max_ptr": "*fp64",
        "gram_ptr": "*fp64",
        **dict.fromkeys(["K", "D", "stride_un", "stride_ib", "stride_gb", "stride_gi"], "i32"),
    }
    constexprs = {
        "stride_ud": 1,  # a launch specialises the unit column stride 1 to a constant
        "TILE": t.tile,
        "N_TILES": -(-k // t.tile),
        "BLOCK_D": t.block_d,
        "STORE_GRAM": store,
        "FP64_DOT": fp64_dot,
    }
    # Benchmark shape d = 2304: the pointers, D and the row stride of unit are multiples of 16.
    aligned = ["unit_ptr", "idx_ptr", "max_ptr", "gram_ptr", "D", "stride_un"]
    return compile_for(
        sg._support_gram_kernel,
        signature,
        constexprs,
        capability,
        num_warps=t.num_warps,
        num_stages=t.num_stages,
        aligned=aligned,
    )


@pytest.mark.parametrize("capability", CAPABILITIES)
@pytest.mark.parametrize("k", [32, 64, 128])
@pytest.mark.parametrize("dtype", list(TYPE), ids=list(TYPE.values()))
def test_support_gram_compiles_to_float64_products_without_spills(dtype, k, capability):
    """Gram storage on at k = 64 and 128 (the mirrored stores cost registers), off at 32."""
    info = _support_compile(dtype, k, k > 32, capability)
    assert_float64_product(info.ptx, capability)
    assert info.n_spills <= _known_support_spills(capability), (
        f"{info.n_regs} registers, {info.n_spills} bytes of spills"
    )


# --------------------------------------------------------------------------------------------------------
# Sparse training step (fixed-capacity entries)
# --------------------------------------------------------------------------------------------------------


def _select_spec(dtype: torch.dtype, t, precision: str, jump: bool):
    ty = TYPE[dtype]
    signature = {
        "x_ptr": f"*{ty}",
        "w_ptr": f"*{ty}",
        "b_ptr": f"*{ty}",
        "theta_ptr": "*fp32",
        "idx_ptr": "*i32",
        "val_ptr": f"*{ty}",
        "flag_ptr": "*u8",
        "count_ptr": "*i32",
        **dict.fromkeys(["M", "N", "K", "capacity", "stride_xm", "stride_wk", "stride_om"], "i32"),
        "half_width": "fp32",
    }
    constexprs = {
        "stride_xk": 1,
        "stride_wn": 1,
        "BLOCK_M": t.block_m,
        "BLOCK_N": t.block_n,
        "BLOCK_K": t.block_k,
        "GROUP_M": t.group_m,
        "DOT_FP32": False,
        "PRECISION": precision,
        "JUMP": jump,
    }
    # Benchmark shapes: every size, and a capacity in multiples of 16, divisible by 16.
    aligned = [n for n in signature if n.endswith("_ptr") or n in ("M", "N", "K", "capacity")]
    aligned += ["stride_xm", "stride_wk", "stride_om"]
    return sparse_s._select_kernel, signature, constexprs, aligned, t


def _select_variants():
    """Every tile the autotuner may pick, per capability and dtype, JumpReLU; ReLU and exact fp32 once."""
    out = []
    for capability in CAPABILITIES:
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            for t in sparse_s.tuned_tiles(dtype.itemsize, capability):
                name = f"select-{TYPE[dtype]}-{t.block_m}x{t.block_n}x{t.block_k}-sm{capability}"
                out.append(pytest.param(capability, dtype, t, "tf32", True, True, id=name))
        out.append(
            pytest.param(
                capability,
                torch.bfloat16,
                sparse_s.TUNED_TILES[2][1],
                "tf32",
                False,
                True,
                id=f"select-bf16-relu-sm{capability}",
            )
        )
        out.append(
            pytest.param(
                capability,
                torch.float32,
                sparse_s.IEEE_TILES,
                "ieee",
                True,
                False,
                id=f"select-fp32-ieee-sm{capability}",
            )
        )
    return out


@pytest.mark.parametrize(("capability", "dtype", "t", "precision", "jump", "is_matmul"), _select_variants())
def test_sparse_select_compiles_without_spills(capability, dtype, t, precision, jump, is_matmul):
    kernel, signature, constexprs, aligned, t = _select_spec(dtype, t, precision, jump)
    info = compile_for(
        kernel,
        signature,
        constexprs,
        capability,
        num_warps=t.num_warps,
        num_stages=t.num_stages,
        aligned=aligned,
    )
    print(f"sm_{capability}: {info.n_regs} registers, {info.shared} bytes shared")
    assert info.n_spills == 0, f"{info.n_regs} registers, {info.n_spills} bytes of spills"
    assert info.shared <= H100_SHARED
    assert "cp.async" in info.ptx  # the K loop is software-pipelined
    if is_matmul:
        instruction = "wgmma" if capability == 90 else "mma"
        assert instruction in info.ptx, f"no `{instruction}` instruction in the PTX"


def _gather_specs(dtype: torch.dtype):
    """(name, kernel, signature, constexprs, aligned, blocks) of the three entry kernels on GPU blocks."""
    ty = TYPE[dtype]
    g, s = sparse_g._GATHER_GPU, sparse_g._SEGMENT_GPU
    gather = (
        "gather-sum",
        sparse_g._gather_sum_kernel,
        {
            "idx_ptr": "*i32",
            "val_ptr": f"*{ty}",
            "count_ptr": "*i32",
            "table_ptr": f"*{ty}",
            "out_ptr": f"*{ty}",
            **dict.fromkeys(["M", "D", "capacity", "stride_im", "stride_tn", "stride_om"], "i32"),
        },
        {"stride_td": 1, "BLOCK_M": g.block_m, "BLOCK_D": g.block_d},
        g,
    )
    sampled = (
        "sampled-dot",
        sparse_g._sampled_dot_kernel,
        {
            "idx_ptr": "*i32",
            "count_ptr": "*i32",
            "dense_ptr": f"*{ty}",
            "table_ptr": f"*{ty}",
            "out_ptr": "*fp32",
            **dict.fromkeys(["M", "D", "stride_im", "stride_dm", "stride_tn"], "i32"),
        },
        {"BLOCK_M": g.block_m, "BLOCK_D": g.block_d},
        g,
    )
    segment = (
        "segment-grads",
        sparse_g._segment_grads_kernel,
        {
            "order_ptr": "*i32",
            "seg_ptr": "*i32",
            "val_ptr": f"*{ty}",
            "gz_ptr": "*fp32",
            "win_ptr": "*fp32",
            "g_ptr": f"*{ty}",
            "xc_ptr": f"*{ty}",
            "dwdec_ptr": f"*{ty}",
            "dwenc_ptr": f"*{ty}",
            "gb_ptr": "*fp32",
            "gwin_ptr": "*fp32",
            **dict.fromkeys(["D", "capacity", "stride_gm", "stride_xm", "stride_om"], "i32"),
        },
        {"BLOCK_E": s.block_m, "BLOCK_D": s.block_d, "DO_DEC": True, "DO_ENC": True},
        s,
    )
    for name, kernel, signature, constexprs, blocks in (gather, sampled, segment):
        aligned = [n for n in signature if n.endswith("_ptr") or n in ("D", "capacity") or "stride" in n]
        yield name, kernel, signature, constexprs, aligned, blocks


@pytest.mark.parametrize("capability", CAPABILITIES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_sparse_entry_kernels_compile_without_spills(dtype, capability):
    for name, kernel, signature, constexprs, aligned, b in _gather_specs(dtype):
        info = compile_for(kernel, signature, constexprs, capability, num_warps=b.num_warps, aligned=aligned)
        print(f"{name} sm_{capability}: {info.n_regs} registers")
        assert info.n_spills == 0, f"{name}: {info.n_regs} registers, {info.n_spills} bytes of spills"
