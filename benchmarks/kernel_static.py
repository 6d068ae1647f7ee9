"""Static performance report for the GPTQ Triton kernels, made on a machine without a GPU.

    python -m gptqlab.benchmarks.kernel_static --json FILE --sass-dir DIR [--small] [--bits 4] [--group-size 128]

Every autotune config of ``kernels/gemv.py`` (M = 1 and 16) and ``kernels/gemm.py`` (M = 256) is compiled
for sm_90 (H100/H200) with the ptxas in triton's wheel, disassembled with its cuobjdump (one ``.sass``
file per kernel variant in DIR), and measured: registers, spill bytes, shared memory, and the SASS
instructions of the innermost main loop. Rows are written for the LLaMA-7B layer shapes (K x N =
4096 x 4096, 4096 x 11008, 11008 x 4096; ``--small``: 4096 x 4096 at M = 1 and 16 only, for CI).
``launches_per_call`` is counted by running the dispatcher under triton's CPU interpreter in a
subprocess (Triton launches plus torch operations that launch a kernel on CUDA).

Issue-and-bandwidth model (every number it prints is a **prediction**; ``gpu_check`` measures)
------------------------------------------------------------------------------------------------
For a config with P programs of W warps, I loop iterations per program, L loop instructions and R
other instructions per warp (from the SASS), B compulsory bytes and F = 2*M_pad*N*K tensor-core flops:

* memory:  t_mem = B / min(STREAM_EFFICIENCY * HBM, bytes_in_flight / DRAM_LATENCY), where
  bytes_in_flight = resident programs x one K tile of words x (num_stages - 1) and the resident
  programs follow from registers, shared memory and warps per SM (occupancy);
* issue:   t_issue = ceil(P / SMs) * W * (I*L + R) / (min(4, resident warps per SM) * clock * ISSUE_EFFICIENCY):
  an SM issues at most 4 warp instructions per clock, one per scheduler;
* tensor cores: t_mma = F / (fp16 dense peak * MMA_EFFICIENCY * busy SMs / SMs);
* t = max(t_mem, t_issue, t_mma) + SPLIT_K_TAIL when the split-K reduction runs (the last slice's
  counter round trip and partial reads through L2).

B counts the packed weight, fp16 scales, uint8 zeros, x and the output, plus the split-K partials.
The fp16 baseline (cuBLAS, ``x @ W``) is t = max(2*K*N bytes / (CUBLAS_EFFICIENCY * HBM), F / (peak *
MMA_EFFICIENCY)), with CUBLAS_EFFICIENCY 0.86 (the middle of the 82-90 % of HBM that cuBLAS fp16 reaches
at these shapes on an H100). Fixed per-launch costs (about 1-2 us of ramp that both kernels pay) are
left out of both; they would lower the predicted speedup of the 4096 x 4096 layer most.

``selected`` marks, per (M, shape), the config with the smallest predicted H100 time among those the
autotuner's pruning keeps (ties to the fewest instructions per weight): the config the model expects
the autotuner to choose; ``selected_h200`` the same for an H200. ``gpu_check`` records
the autotuner's actual choice next to it.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

# -- model constants (assumptions; gpu_check measures what they stand for) -------------------------------
STREAM_EFFICIENCY = 0.90
"""Fraction of HBM peak a well-fed streaming read sustains (the top of cuBLAS's range)."""
CUBLAS_EFFICIENCY = 0.86
"""cuBLAS fp16 at M <= 256 on 7B shapes: 82-90 % of HBM on an H100; the middle."""
ISSUE_EFFICIENCY = 0.8
"""Fraction of the 4 issue slots per SM and clock the main loop keeps busy (dependencies, barriers)."""
MMA_EFFICIENCY = 0.7
"""Fraction of the dense fp16 tensor-core peak a well-tiled GEMM sustains."""
DRAM_LATENCY = 0.8e-6
"""Seconds from a load's issue to its data under load: bytes in flight / latency bounds bandwidth."""
SPLIT_K_TAIL = 0.5e-6
"""Seconds the last split-K slice adds: an L2 atomic round trip and a read of the partials."""


@dataclasses.dataclass(frozen=True)
class Gpu:
    """What the model needs of a GPU (SXM boards, dense fp16 tensor-core peak, sustained clock)."""

    name: str
    hbm_bytes_per_s: float
    sms: int
    clock_hz: float
    fp16_flops: float
    smem_per_sm: int = 228 * 1024
    regs_per_sm: int = 65536
    max_warps_per_sm: int = 64
    max_programs_per_sm: int = 32


GPUS = {
    "h100": Gpu("H100 SXM", 3.35e12, 132, 1.755e9, 989e12),
    "h200": Gpu("H200 SXM", 4.8e12, 132, 1.755e9, 989e12),
}
SHAPES = {"qkvo 4096x4096": (4096, 4096), "gate/up 4096x11008": (4096, 11008), "down 11008x4096": (11008, 4096)}
"""LLaMA-7B layers, name: (K = in_features, N = out_features)."""
SMALL_SHAPES = {"qkvo 4096x4096": (4096, 4096)}
BATCHES = {"gemv": (1, 16), "gemm": (256,)}
SMALL_BATCHES = {"gemv": (1, 16), "gemm": ()}
ELEMENT = {"halves_ptr": "i16", "scales_ptr": "fp16", "zeros_ptr": "u8", "bias_ptr": "fp16", "perm_ptr": "i32"}
ELEMENT |= {"partial_ptr": "fp32", "count_ptr": "i32"}
UNIT_STRIDES = ("stride_xk", "stride_sn", "stride_zn", "stride_on")
ALIGNED = ("N", "K", "stride_xm", "stride_hk", "stride_sg", "stride_zg", "stride_om")


# -- compiling and reading SASS ----------------------------------------------------------------------------
def _tool(name: str) -> str:
    import shutil

    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    found = path if os.path.exists(path) else shutil.which(name)
    if found is None:
        raise RuntimeError(f"{name} not found (it ships in triton's wheel under backends/nvidia/bin)")
    return found


def jit_function(kernel):
    """The triton.JITFunction under autotune/heuristics wrappers."""
    import triton

    while not isinstance(kernel, triton.runtime.jit.JITFunction):
        kernel = kernel.fn
    return kernel


def compile_sm90(kernel, x_type: str, config, constexprs: dict):
    """Lower ``kernel`` to an sm_90 cubin as a launch on contiguous, 16-byte aligned tensors with dims that
    are multiples of 16 would. ``constexprs`` sets the kernel's meta-parameters (pointer arguments given
    as None there are compiled as absent); the config's kwargs that are not constexpr parameters (SPLIT_K)
    are compiled as runtime integers, as triton does for any value but 1."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = jit_function(kernel)
    types = {**ELEMENT, "x_ptr": x_type, "out_ptr": x_type}
    constants = {**dict.fromkeys(UNIT_STRIDES, 1), **constexprs}
    for key, value in config.kwargs.items():
        if fn.params[fn.arg_names.index(key)].is_constexpr or value == 1:
            constants[key] = value
    signature, attrs = {}, {}
    for i, (name, param) in enumerate(zip(fn.arg_names, fn.params, strict=True)):
        if param.is_constexpr or name in constants:
            signature[name] = "constexpr"
        elif name in types:
            signature[name] = "*" + types[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "i32"
            if name in ALIGNED:
                attrs[(i,)] = [["tt.divisibility", 16]]
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    if config.maxnreg is not None:
        options["maxnreg"] = config.maxnreg
    source = ASTSource(fn, signature, constexprs=constants, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)


def cubin_stats(cubin: bytes) -> tuple[dict, str]:
    """(registers, spill bytes) from cuobjdump's resource usage, and the SASS text."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", f.name], capture_output=True, text=True)
        sass = subprocess.run([_tool("cuobjdump"), "-sass", f.name], capture_output=True, text=True).stdout
    reg = int(re.search(r"REG:(\d+)", usage.stdout).group(1))
    stack = int(re.search(r"STACK:(\d+)", usage.stdout).group(1))
    return {"registers": reg, "spill_bytes": stack}, sass


_INSTRUCTION = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_BRANCH = re.compile(r"\bBRA\b.*?0x([0-9a-f]+)")


def sass_instructions(sass: str) -> list[tuple[int, str]]:
    """(address, instruction) for every SASS instruction, NOPs left out."""
    out = []
    for line in sass.splitlines():
        m = _INSTRUCTION.match(line)
        if m and not m.group(2).startswith("NOP"):
            out.append((int(m.group(1), 16), m.group(2)))
    return out


def main_loop(instructions: list[tuple[int, str]]) -> list[str]:
    """The instructions of the innermost main loop: of the loops (a backward branch to a lower address)
    that contain no other loop, the one with the most instructions."""
    loops = []
    for address, text in instructions:
        m = _BRANCH.search(text)
        if m and int(m.group(1), 16) < address:
            loops.append((int(m.group(1), 16), address))
    innermost = [(a, b) for a, b in loops if not any(a <= c < d <= b and (c, d) != (a, b) for c, d in loops)]
    if not innermost:
        return []
    a, b = max(innermost, key=lambda span: sum(a2 >= span[0] and a2 <= span[1] for a2, _ in instructions))
    return [text for address, text in instructions if a <= address <= b]


def opcode_histogram(loop: list[str]) -> dict[str, int]:
    """Opcode counts (predicates stripped) of a loop body, most frequent first."""
    counts: dict[str, int] = {}
    for text in loop:
        op = re.sub(r"^@!?U?P\w+\s+", "", text).split()[0]
        counts[op] = counts.get(op, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


# -- the model -------------------------------------------------------------------------------------------
def programs_per_sm(gpu: Gpu, registers: int, smem: int, warps: int) -> int:
    """Resident programs per SM allowed by registers (allocated per warp in units of 256), shared memory
    and warps."""
    regs_per_warp = math.ceil(registers * 32 / 256) * 256
    by_regs = gpu.regs_per_sm // (regs_per_warp * warps)
    by_smem = gpu.smem_per_sm // (smem + 1024) if smem else gpu.max_programs_per_sm
    return max(0, min(by_regs, by_smem, gpu.max_warps_per_sm // warps, gpu.max_programs_per_sm))


def compulsory_bytes(m: int, k: int, n: int, bits: int, group_size: int, split_k: int) -> int:
    """Bytes a call must move: packed weight, fp16 scales, uint8 zeros, fp16 x and out, and the split-K fp32
    partials, counted once (written back from L2 eventually; the last slice reads them from L2)."""
    groups = math.ceil(k / (k if group_size == -1 else group_size))
    partials = split_k * m * n * 4 if split_k > 1 else 0
    return k * n * bits // 8 + groups * n * 3 + 2 * (m * k + m * n) + partials


def fp16_baseline(gpu: Gpu, m: int, k: int, n: int) -> float:
    """Predicted seconds of cuBLAS ``x @ W`` with a dense fp16 W."""
    t_mem = (2 * k * n + 2 * (m * k + m * n)) / (CUBLAS_EFFICIENCY * gpu.hbm_bytes_per_s)
    return max(t_mem, 2 * m * n * k / (gpu.fp16_flops * MMA_EFFICIENCY))


def predict(gpu: Gpu, row: dict) -> dict:
    """Predicted seconds, bound and HBM fraction of one report row (see the module docstring)."""
    m, k, n, bits, pack = row["M"], row["K"], row["N"], row["bits"], 32 // row["bits"]
    cfg = row["params"]
    block_k = cfg["BLOCK_KP"] * pack
    split = cfg.get("SPLIT_K", 1)
    if row["kernel"] == "gemv":
        m_pad, programs = 16, math.ceil(n / cfg["BLOCK_N"]) * split
        iterations = math.ceil(math.ceil(k / block_k) / split)
    else:
        m_pad = math.ceil(m / cfg["BLOCK_M"]) * cfg["BLOCK_M"]
        programs = math.ceil(m / cfg["BLOCK_M"]) * math.ceil(n / cfg["BLOCK_N"])
        iterations = math.ceil(k / block_k)
    warps = row["num_warps"]
    per_sm = max(1, programs_per_sm(gpu, row["registers"], row["smem_bytes"], warps))
    resident = min(programs, gpu.sms * per_sm)
    in_flight = resident * cfg["BLOCK_KP"] * cfg["BLOCK_N"] * 4 * max(1, row["num_stages"] - 1)
    bandwidth = min(STREAM_EFFICIENCY * gpu.hbm_bytes_per_s, in_flight / DRAM_LATENCY)
    nbytes = compulsory_bytes(m, k, n, bits, row["group_size"], split)
    t_mem = nbytes / bandwidth
    busiest = math.ceil(programs / gpu.sms)
    warps_resident = min(busiest, per_sm) * warps
    warp_instructions = busiest * warps * (iterations * row["loop_instructions"] + row["other_instructions"])
    t_issue = warp_instructions / (min(4, warps_resident) * gpu.clock_hz * ISSUE_EFFICIENCY)
    t_mma = 2 * m_pad * n * k / (gpu.fp16_flops * MMA_EFFICIENCY * min(programs, gpu.sms) / gpu.sms)
    t = max(t_mem, t_issue, t_mma) + (SPLIT_K_TAIL if split > 1 else 0.0)
    bound = max((t_mem, "memory"), (t_issue, "issue"), (t_mma, "tensor cores"))[1]
    base = fp16_baseline(gpu, m, k, n)
    return {
        "us": t * 1e6,
        "fp16_us": base * 1e6,
        "speedup_vs_fp16": base / t,
        "hbm_fraction": compulsory_bytes(m, k, n, bits, row["group_size"], 1) / t / gpu.hbm_bytes_per_s,
        "bound": bound,
        "programs": programs,
        "memory_us": t_mem * 1e6,
        "issue_us": t_issue * 1e6,
        "mma_us": t_mma * 1e6,
    }


# -- variants, rows and selection ------------------------------------------------------------------------
def _config_name(kernel: str, config) -> str:
    keys = ("BLOCK_N", "BLOCK_KP", "SPLIT_K") if kernel == "gemv" else ("BLOCK_M", "BLOCK_N", "BLOCK_KP")
    parts = [f"{key.removeprefix('BLOCK_').lower()}{config.kwargs[key]}" for key in keys]
    return "-".join(parts) + f"-w{config.num_warps}-s{config.num_stages}"


def _variant(kernel: str, config, m: int, bits: int, group_size: int, k: int, n: int) -> tuple[dict, str]:
    """The constexprs a launch of ``kernel`` with ``config`` gets for (m, k, n), and a file-name stem for
    the compiled variant (SPLIT_K is a runtime argument except for the value 1)."""
    from gptqlab.kernels.common import tile_in_one_group

    pack = 32 // bits
    block_k = config.kwargs["BLOCK_KP"] * pack
    meta = {
        "BITS": bits,
        "HAS_BIAS": False,
        "HAS_PERM": False,
        "PACKED_FP16": True,
        "USE_ASM": True,
        "DOT_PRECISION": "tf32",
        "ONE_GROUP_PER_TILE": tile_in_one_group(block_k, group_size if group_size != -1 else k, k),
        "EVEN_N": n % config.kwargs["BLOCK_N"] == 0,
        "EVEN_K": k % block_k == 0,
        "bias_ptr": None,
        "perm_ptr": None,
    }
    if kernel == "gemv":
        meta |= {"BLOCK_M": 16}
        split = "split1" if config.kwargs["SPLIT_K"] == 1 else "splitK"
        keys = (config.kwargs["BLOCK_N"], config.kwargs["BLOCK_KP"], split)
        stem = f"gemv-{bits}bit-n{keys[0]}-kp{keys[1]}-{keys[2]}"  # one compiled kernel serves M = 1..16
    else:
        stem = f"gemm-{bits}bit-m{config.kwargs['BLOCK_M']}-n{config.kwargs['BLOCK_N']}-kp{config.kwargs['BLOCK_KP']}"
    flags = "".join(k[0].lower() for k in ("ONE_GROUP_PER_TILE", "EVEN_N", "EVEN_K") if meta[k])
    return meta, f"{stem}-w{config.num_warps}-s{config.num_stages}-{flags or 'x'}"


def candidates(kernel: str, m: int, k: int, n: int, bits: int, group_size: int) -> list:
    """The autotune configs the kernel's pruning keeps for this call."""
    from gptqlab.kernels import gemm, gemv
    from gptqlab.kernels.common import m_bucket

    args = {"M_BUCKET": m_bucket(m), "K": k, "N": n, "BITS": bits, "group_size": group_size}
    if kernel == "gemv":
        return gemv._prune_gemv_configs(gemv.gemv_configs(), args)
    return gemm._prune_gemm_configs(gemm.gemm_configs(), args)


def build_rows(
    shapes: dict, batches: dict, bits: int, group_size: int, sass_dir: Path, launches: dict, progress=print
) -> list[dict]:
    """Compile every variant the (kernel, M, shape) points need, once each, and return one row per
    (kernel, config, M, shape) with the model's predictions and ``selected`` set."""
    from gptqlab.kernels import gemm, gemv

    kernels = {"gemv": gemv._dequant_gemv_kernel, "gemm": gemm._dequant_gemm_kernel}
    compiled: dict[str, dict] = {}
    rows = []
    for kernel, ms in batches.items():
        for m in ms:
            for shape, (k, n) in shapes.items():
                point = []
                for config in candidates(kernel, m, k, n, bits, group_size):
                    meta, stem = _variant(kernel, config, m, bits, group_size, k, n)
                    if stem not in compiled:
                        progress(f"compiling {stem}")
                        c = compile_sm90(kernels[kernel], "fp16", config, meta)
                        stats, sass = cubin_stats(c.asm["cubin"])
                        instructions = sass_instructions(sass)
                        loop = main_loop(instructions)
                        (sass_dir / f"{stem}.sass").write_text(sass)
                        ptx = c.asm["ptx"]
                        compiled[stem] = {
                            **stats,
                            "smem_bytes": c.metadata.shared,
                            "loop_instructions": len(loop),
                            "other_instructions": len(instructions) - len(loop),
                            "loop_opcodes": opcode_histogram(loop),
                            "tensor_cores": "wgmma" if "wgmma" in ptx else "mma.sync" if "mma.sync" in ptx else "none",
                            "wgmma_async": "wgmma.wait_group.sync.aligned 1" in ptx,
                            "sass_file": f"{stem}.sass",
                        }
                    stats = compiled[stem]
                    block_k = config.kwargs["BLOCK_KP"] * (32 // bits)
                    per_thread = block_k * config.kwargs["BLOCK_N"] / (32 * config.num_warps)
                    row = {
                        "kernel": kernel,
                        "config": _config_name(kernel, config),
                        "params": dict(config.kwargs),
                        "num_warps": config.num_warps,
                        "num_stages": config.num_stages,
                        "selected": False,
                        "selected_h200": False,
                        "M": m,
                        "K": k,
                        "N": n,
                        "shape": shape,
                        "bits": bits,
                        "group_size": group_size,
                        **{key: v for key, v in stats.items() if key != "loop_opcodes"},
                        "weights_per_thread_per_iteration": per_thread,
                        "instructions_per_weight": stats["loop_instructions"] / per_thread,
                        "loop_opcodes": dict(list(stats["loop_opcodes"].items())[:12]),
                        "launches_per_call": launches.get(kernel),
                    }
                    for key, gpu in GPUS.items():
                        p = predict(gpu, row)
                        row |= {
                            f"predicted_us_{key}": p["us"],
                            f"predicted_fp16_us_{key}": p["fp16_us"],
                            f"predicted_speedup_vs_fp16_{key}": p["speedup_vs_fp16"],
                            f"predicted_hbm_fraction_{key}": p["hbm_fraction"],
                            f"predicted_bound_{key}": p["bound"],
                            f"predicted_memory_us_{key}": p["memory_us"],
                            f"predicted_issue_us_{key}": p["issue_us"],
                            f"predicted_mma_us_{key}": p["mma_us"],
                        }
                    row["programs"] = p["programs"]
                    point.append(row)
                # ties (same predicted time) go to the config with fewer instructions per weight; on an H200
                # the autotuner may choose another config (more bandwidth favours more programs)
                for gpu in GPUS:
                    best = min(point, key=lambda r: (round(r[f"predicted_us_{gpu}"], 2), r["instructions_per_weight"]))
                    best["selected" if gpu == "h100" else f"selected_{gpu}"] = True
                rows += point
    return rows


# -- launches per call, counted under the interpreter --------------------------------------------------
LAUNCH_FREE_OPS = {
    "empty.memory_format",
    "empty_strided.default",
    "view.default",
    "view.dtype",
    "_unsafe_view.default",
    "as_strided.default",
    "reshape.default",
    "t.default",
    "transpose.int",
    "expand.default",
    "detach.default",
    "alias.default",
    "slice.Tensor",
    "select.int",
    "unsqueeze.default",
    "squeeze.dim",
    "permute.default",
    "lift_fresh.default",
}
"""aten operations that launch no CUDA kernel (allocation and views)."""


def count_launches(m: int, act_order: bool) -> int:
    """CUDA launches of one ``gptq_matmul`` call (the second: the first zeroes the split-K counters once),
    counted under TRITON_INTERPRET=1 on the CPU: every Triton
    kernel run plus every torch operation outside :data:`LAUNCH_FREE_OPS` (which on CUDA would be a
    kernel: a fill, a copy, an index_select). Operations inside the interpreted Triton kernel are not
    counted. Must run in a process where TRITON_INTERPRET=1 was set before triton was imported."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from triton.runtime.autotuner import Autotuner

    from gptqlab.kernels import gptq_matmul
    from gptqlab.quant.pack import pack_rows

    k, n, bits, gs = 256, 128, 4, 128
    gen = torch.Generator().manual_seed(0)
    qweight = pack_rows(torch.randint(0, 16, (k, n), generator=gen, dtype=torch.int32), bits)
    zeros = torch.randint(0, 16, (k // gs, n), generator=gen, dtype=torch.uint8)
    scales = torch.rand(k // gs, n, generator=gen).to(torch.float16)
    x = torch.randn(m, k, generator=gen).to(torch.float16)
    perm = torch.randperm(k, generator=gen).to(torch.int32) if act_order else None
    gptq_matmul(x, qweight, zeros, scales, bits, gs, backend="triton", perm=perm)  # one-time setup (counters)
    counts = {"triton": 0, "torch": []}
    inside = [False]

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.__name__ if "." in func.__name__ else f"{func.__name__}.default"
            if not inside[0] and name not in LAUNCH_FREE_OPS:
                counts["torch"].append(name)
            return func(*args, **(kwargs or {}))

    original = Autotuner.run

    def run(self, *args, **kwargs):
        counts["triton"] += 1
        inside[0] = True
        try:
            return original(self, *args, **kwargs)
        finally:
            inside[0] = False

    Autotuner.run = run
    try:
        with Count():
            gptq_matmul(x, qweight, zeros, scales, bits, gs, backend="triton", perm=perm)
    finally:
        Autotuner.run = original
    return counts["triton"] + len(counts["torch"])


def launches_by_kernel() -> dict:
    """{"gemv": n, "gemm": n, "gemv_act_order": n, ...} from a subprocess under the interpreter."""
    code = (
        "import json; from gptqlab.benchmarks.kernel_static import count_launches as c; "
        "print(json.dumps({'gemv': c(1, False), 'gemm': c(256, False), "
        "'gemv_act_order': c(1, True), 'gemm_act_order': c(256, True)}))"
    )
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    if run.returncode != 0:
        raise RuntimeError(f"counting launches failed: {run.stderr[-2000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


# -- report ----------------------------------------------------------------------------------------------
def summary(rows: list[dict]) -> list[str]:
    """A table of the selected rows (predictions marked as such); the H200 column is the H200 selection."""
    h200 = {(r["kernel"], r["M"], r["shape"]): r for r in rows if r["selected_h200"]}
    head = (
        f"{'kernel':<5} {'M':>4} {'shape':<19} {'config':<24} {'regs':>4} {'spill':>5} {'instr/w':>7} "
        f"{'pred us H100':>12} {'pred x fp16 H100':>16} {'pred HBM':>8} {'pred x fp16 H200':>16}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        if r["selected"]:
            lines.append(
                f"{r['kernel']:<5} {r['M']:>4} {r['shape']:<19} {r['config']:<24} {r['registers']:>4} "
                f"{r['spill_bytes']:>5} {r['instructions_per_weight']:>7.2f} {r['predicted_us_h100']:>12.1f} "
                f"{r['predicted_speedup_vs_fp16_h100']:>15.2f}x {r['predicted_hbm_fraction_h100']:>7.0%} "
                f"{h200[r['kernel'], r['M'], r['shape']]['predicted_speedup_vs_fp16_h200']:>15.2f}x"
            )
    return lines


def markdown(report: dict) -> str:
    """The selected configs as a Markdown table (H200 columns: the config selected for the H200)."""
    meta, rows = report["meta"], report["rows"]
    h200 = {(r["kernel"], r["M"], r["shape"]): r for r in rows if r["selected_h200"]}
    lines = [
        f"# Static sm_90 report: {meta['bits']}-bit, group {meta['group_size']}, fp16 activations",
        "",
        f"{meta['date']} | commit {meta['commit']} | triton {meta['triton']} | compiled for sm_90 on a CPU "
        "(no GPU). **Times and speedups are predictions** of the model in "
        "`gptqlab/benchmarks/kernel_static.py`; `make gpu-check` measures them.",
        "",
        f"Launches per call (counted under the interpreter): {meta['launches_per_call']}",
        "",
        "| kernel | M | layer (K x N) | config (H100) | regs | spill | SASS instr / weight | predicted us H100 "
        "| predicted x fp16 H100 | predicted HBM H100 | bound | predicted x fp16 H200 | HBM H200 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in (r for r in rows if r["selected"]):
        o = h200[r["kernel"], r["M"], r["shape"]]
        lines.append(
            f"| {r['kernel']} | {r['M']} | {r['shape']} | {r['config']} | {r['registers']} | {r['spill_bytes']} | "
            f"{r['instructions_per_weight']:.2f} | {r['predicted_us_h100']:.1f} | "
            f"{r['predicted_speedup_vs_fp16_h100']:.2f} | {r['predicted_hbm_fraction_h100']:.0%} | "
            f"{r['predicted_bound_h100']} | {o['predicted_speedup_vs_fp16_h200']:.2f} | "
            f"{o['predicted_hbm_fraction_h200']:.0%} |"
        )
    return "\n".join(lines) + "\n"


def _commit() -> str:
    root = Path(__file__).resolve().parents[1]
    try:
        run = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True)
    except OSError:
        return "unknown"
    return run.stdout.strip() or "unknown"


def run(json_path: Path, sass_dir: Path, small: bool, bits: int, group_size: int) -> dict:
    """Build the report, write JSON (and a Markdown table of the selected configs beside it) and the SASS
    files, print the selected rows; return the report."""
    os.environ["TRITON_INTERPRET"] = "0"
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9's default, stated to silence its warning
    import triton

    sass_dir.mkdir(parents=True, exist_ok=True)
    launches = launches_by_kernel()
    rows = build_rows(
        SMALL_SHAPES if small else SHAPES,
        SMALL_BATCHES if small else BATCHES,
        bits,
        group_size,
        sass_dir,
        launches,
        progress=lambda msg: print(msg, file=sys.stderr, flush=True),
    )
    report = {
        "meta": {
            "what": "static sm_90 compile of the gptqlab Triton kernels; predicted_* fields are model predictions",
            "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "commit": _commit(),
            "bits": bits,
            "group_size": group_size,
            "triton": triton.__version__,
            "target": "sm_90 (ptxas and cuobjdump from triton's wheel)",
            "small": small,
            "model": {
                "gpus": {k: dataclasses.asdict(g) for k, g in GPUS.items()},
                "STREAM_EFFICIENCY": STREAM_EFFICIENCY,
                "CUBLAS_EFFICIENCY": CUBLAS_EFFICIENCY,
                "ISSUE_EFFICIENCY": ISSUE_EFFICIENCY,
                "MMA_EFFICIENCY": MMA_EFFICIENCY,
                "DRAM_LATENCY": DRAM_LATENCY,
                "SPLIT_K_TAIL": SPLIT_K_TAIL,
            },
            "launches_per_call": launches,
        },
        "rows": rows,
    }
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=1) + "\n")
    json_path.with_suffix(".md").write_text(markdown(report))
    print("\n".join(summary(rows)))
    print(f"launches per call (interpreter count): {launches}")
    print(f"wrote {json_path}, {json_path.with_suffix('.md')} and {len({r['sass_file'] for r in rows})} SASS files")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gptqlab.benchmarks.kernel_static",
        description="Compile the Triton kernels for sm_90 without a GPU; report registers, spills, SASS "
        "instructions per weight and predicted H100/H200 times (predictions, see the module docstring).",
    )
    parser.add_argument("--json", type=Path, required=True, help="where to write the report (JSON rows)")
    parser.add_argument("--sass-dir", type=Path, required=True, help="folder for one .sass file per kernel variant")
    parser.add_argument(
        "--small", action="store_true", help="CI size: 4096 x 4096 at M = 1 and 16 only (default: all shapes, M = 256)"
    )
    parser.add_argument("--bits", type=int, default=4, choices=[2, 4, 8], help="weight bits (default 4)")
    parser.add_argument("--group-size", type=int, default=128, help="rows per group, -1 for one (default 128)")
    args = parser.parse_args(argv)
    if args.group_size != -1 and (args.group_size <= 0 or args.group_size % (32 // args.bits)):
        print(f"error: --group-size must be -1 or a positive multiple of {32 // args.bits}, got {args.group_size}")
        return 2
    run(args.json, args.sass_dir, args.small, args.bits, args.group_size)
    return 0


if __name__ == "__main__":
    sys.exit(main())
