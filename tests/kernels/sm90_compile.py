"""Compile the Triton kernels for an H100 (sm_90) on a machine without a GPU; print one JSON line per case.

Run by test_compile_sm90.py in a subprocess with TRITON_INTERPRET=0: whether ``triton.jit`` builds
compilable or interpreted kernels is fixed when the kernel modules are imported, and the other kernel
tests import them under the interpreter.

Each case is lowered like a launch on contiguous, 16-byte aligned tensors with dims that are multiples of
16, through TTIR, TTGIR, LLVM and PTX to a cubin with the ptxas bundled in triton's wheel. The stack
frame that cuobjdump reports is 0 bytes when no registers were spilled.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from gptqlab.kernels import gemm, gemv

ELEMENT = {"qweight_ptr": "i32", "scales_ptr": "fp16", "zeros_ptr": "u8", "bias_ptr": "fp16"}
UNIT_STRIDES = ("stride_xk", "stride_qn", "stride_sn", "stride_zn", "stride_on")
ALIGNED = ("N", "K", "stride_xm", "stride_qk", "stride_sg", "stride_zg", "stride_om")

GEMM_TILE = triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "L2_GROUP_M": 8}, num_warps=8, num_stages=3)
GEMV_TILES = {  # the largest tile per thread that the autotuner may pick for each path (gemv._prune_gemv_configs)
    1: triton.Config({"BLOCK_N": 128, "BLOCK_KP": 32, "SPLIT_K": 8}, num_warps=4, num_stages=3),
    16: triton.Config({"BLOCK_N": 128, "BLOCK_KP": 16, "SPLIT_K": 8}, num_warps=4, num_stages=3),
}
CASES = {  # name: (kernel, x type, out type, config, constexpr meta-parameters)
    **{
        f"gemm-{x}-{'one' if one else 'many'}-groups": (
            gemm._dequant_gemm_kernel,
            x,
            x,
            GEMM_TILE,
            {"BITS": 4, "HAS_BIAS": True, "DOT_PRECISION": "tf32", "ONE_GROUP_PER_TILE": one},
        )
        for x in ("fp16", "bf16")
        for one in (True, False)
    },
    **{
        f"gemv-{bits}bit-m{block_m}-{'one' if one else 'many'}-groups": (
            gemv._dequant_gemv_kernel,
            "fp16",
            "fp32",
            GEMV_TILES[block_m],
            {"BITS": bits, "HAS_BIAS": True, "DOT_PRECISION": "tf32", "BLOCK_M": block_m, "ONE_GROUP_PER_TILE": one},
        )
        for bits in (2, 4, 8)
        for block_m in (1, 16)
        for one in ((True, False) if bits == 4 else (True,))
    },
}


def _jit_function(kernel):
    while not isinstance(kernel, triton.runtime.jit.JITFunction):
        kernel = kernel.fn  # autotuner -> heuristics -> jit function
    return kernel


def compile_sm90(kernel, x_type: str, out_type: str, config: triton.Config, meta: dict):
    fn = _jit_function(kernel)
    types = {**ELEMENT, "x_ptr": x_type, "out_ptr": out_type}
    signature, attrs = {}, {}
    for i, (name, param) in enumerate(zip(fn.arg_names, fn.params, strict=True)):
        if param.is_constexpr or name in UNIT_STRIDES:
            signature[name] = "constexpr"
        elif name in types:
            signature[name] = "*" + types[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "i32"
            if name in ALIGNED:
                attrs[(i,)] = [["tt.divisibility", 16]]
    constants = {**config.kwargs, **meta, **dict.fromkeys(UNIT_STRIDES, 1)}
    source = ASTSource(fn, signature, constexprs=constants, attrs=attrs)
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)


def stack_bytes(cubin: bytes, cuobjdump: str) -> int:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True)
    return int(re.search(r"STACK:(\d+)", usage.stdout).group(1))


def main() -> int:
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    cuobjdump = cuobjdump if os.path.exists(cuobjdump) else shutil.which("cuobjdump")
    for name, (kernel, x_type, out_type, config, meta) in CASES.items():
        compiled = compile_sm90(kernel, x_type, out_type, config, meta)
        result = {
            "case": name,
            "shared_bytes": compiled.metadata.shared,
            "wgmma": "wgmma" in compiled.asm["ptx"],
            "stack_bytes": None if cuobjdump is None else stack_bytes(compiled.asm["cubin"], cuobjdump),
        }
        print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
