"""Compile the Triton kernels for an H100 (sm_90) on a machine without a GPU; print one JSON line per case.

    python tests/kernels/sm90_compile.py          # the CI cases: every code path once, one tile each
    python tests/kernels/sm90_compile.py --all    # every config of both autotune lists, every bit width

Run by test_compile_sm90.py in a subprocess with TRITON_INTERPRET=0: whether ``triton.jit`` builds
compilable or interpreted kernels is fixed when the kernel modules are imported, and the other kernel
tests import them under the interpreter.

Each case is lowered like a launch on contiguous, 16-byte aligned tensors with dims that are multiples of
16 (``gptqlab.benchmarks.kernel_static.compile_sm90``), through TTIR, TTGIR, LLVM and PTX to a cubin
with the ptxas bundled in triton's wheel. The stack frame that cuobjdump reports is 0 bytes when no
registers were spilled.
"""

import json
import os
import sys

os.environ["TRITON_INTERPRET"] = "0"
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import triton

from gptqlab.benchmarks.kernel_static import compile_sm90, cubin_stats
from gptqlab.kernels import gemm, gemv

GEMM_TILE = triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_KP": 16, "L2_GROUP_M": 8}, num_warps=4, num_stages=3)
GEMM_TILE_ACT_ORDER = triton.Config(
    {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_KP": 16, "L2_GROUP_M": 8}, num_warps=4, num_stages=3
)
GEMV_TILE = triton.Config(
    {"BLOCK_N": 128, "BLOCK_KP": 16, "SPLIT_K": 4}, num_warps=2, num_stages=3, maxnreg=gemv.MAX_REGISTERS
)
GEMV_TILE_2BIT = triton.Config(  # 16 packed rows would be 256 inputs, more than gemv.MAX_TILE_ROWS
    {"BLOCK_N": 128, "BLOCK_KP": 8, "SPLIT_K": 4}, num_warps=2, num_stages=3, maxnreg=gemv.MAX_REGISTERS
)
BASE = {"HAS_BIAS": True, "HAS_PERM": False, "USE_ASM": True, "EVEN_N": True, "EVEN_K": True}
DTYPE = {"fp16": ("fp16", "tf32", True), "bf16": ("bf16", "tf32", False), "fp32": ("fp32", "tf32x3", False)}


def _meta(bits: int, dtype: str, one_group: bool) -> dict:
    _, precision, packed = DTYPE[dtype]
    return {**BASE, "BITS": bits, "PACKED_FP16": packed, "DOT_PRECISION": precision, "ONE_GROUP_PER_TILE": one_group}


def ci_cases() -> dict:
    """name: (kernel, x type, config, constexprs): every code path of both kernels once."""
    cases = {}
    for dtype in ("fp16", "bf16"):
        for one in (True, False):
            name = f"gemm-4bit-{dtype}-{'one' if one else 'many'}-groups"
            cases[name] = (gemm._dequant_gemm_kernel, DTYPE[dtype][0], GEMM_TILE, _meta(4, dtype, one))
    cases["gemm-4bit-fp16-act-order-ragged"] = (
        gemm._dequant_gemm_kernel,
        "fp16",
        GEMM_TILE_ACT_ORDER,
        {**_meta(4, "fp16", True), "HAS_PERM": True, "EVEN_N": False, "EVEN_K": False},
    )
    for bits in (2, 4, 8):  # M is a runtime argument: one compiled gemv serves M = 1..16
        meta = {**_meta(bits, "fp16", True), "BLOCK_M": 16}
        tile = GEMV_TILE_2BIT if bits == 2 else GEMV_TILE
        cases[f"gemv-{bits}bit-fp16"] = (gemv._dequant_gemv_kernel, "fp16", tile, meta)
    for dtype in ("bf16", "fp32"):
        meta = {**_meta(4, dtype, True), "BLOCK_M": 16}
        cases[f"gemv-4bit-{dtype}"] = (gemv._dequant_gemv_kernel, DTYPE[dtype][0], GEMV_TILE, meta)
    cases["gemv-4bit-fp16-act-order-many-groups-ragged"] = (
        gemv._dequant_gemv_kernel,
        "fp16",
        GEMV_TILE,
        {**_meta(4, "fp16", False), "HAS_PERM": True, "EVEN_N": False, "EVEN_K": False} | {"BLOCK_M": 16},
    )
    return cases


def all_cases() -> dict:
    """Every config of both autotune lists that their pruning keeps for some call, at 2, 4 and 8 bits in fp16
    and at 4 bits in bf16, group size 128 (gemv SPLIT_K: 1 and 2; values above 1 share one compiled kernel,
    and so do all M <= 16)."""
    cases = {}
    for bits, dtype in ((2, "fp16"), (4, "fp16"), (8, "fp16"), (4, "bf16")):
        args = {"K": 4096, "M_BUCKET": 1, "BITS": bits, "PACKED_FP16": dtype == "fp16"}
        for config in gemv._prune_gemv_configs(gemv.gemv_configs(), args):
            if config.kwargs["SPLIT_K"] > 2:
                continue
            meta = {**_meta(bits, dtype, True), "BLOCK_M": 16}
            name = f"gemv-{bits}bit-{dtype}-" + "-".join(f"{k}{v}" for k, v in config.kwargs.items())
            cases[f"{name}-w{config.num_warps}"] = (gemv._dequant_gemv_kernel, DTYPE[dtype][0], config, meta)
        for config in gemm._prune_gemm_configs(gemm.gemm_configs(), {"M_BUCKET": 4096, "BITS": bits}):
            name = f"gemm-{bits}bit-{dtype}-" + "-".join(f"{k}{v}" for k, v in config.kwargs.items())
            meta = _meta(bits, dtype, True)
            cases[f"{name}-w{config.num_warps}"] = (gemm._dequant_gemm_kernel, DTYPE[dtype][0], config, meta)
    return cases


def main(argv: list[str]) -> int:
    cases = all_cases() if "--all" in argv else ci_cases()
    for name, (kernel, x_type, config, meta) in cases.items():
        absent = {ptr: None for ptr, flag in (("bias_ptr", "HAS_BIAS"), ("perm_ptr", "HAS_PERM")) if not meta[flag]}
        compiled = compile_sm90(kernel, x_type, config, {**meta, **absent})
        stats, _ = cubin_stats(compiled.asm["cubin"])
        ptx = compiled.asm["ptx"]
        result = {
            "case": name,
            "shared_bytes": compiled.metadata.shared,
            "stack_bytes": stats["spill_bytes"],
            "registers": stats["registers"],
            "wgmma": "wgmma" in ptx,
            "mma": "mma.sync" in ptx or "wgmma" in ptx,
            "inline_asm_dequant": "lop3.b32" in ptx and "0x64006400" in ptx,
        }
        print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
