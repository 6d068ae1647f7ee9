"""``gptqlab bench kernels``: gptqlab's GPTQ matmul against a dense matmul at real 7B layer shapes.

On CUDA each point is timed by :func:`gptqlab.benchmarks.bench_kernels_gpu.bench_one` (the kernel
engineer's CUDA-graph, L2-sweeping timer) against a dense fp16 ``x @ W``; bit widths without a Triton
kernel (3-bit) time the torch reference instead. On the CPU there are no Triton kernels: the torch
reference path (dequantize, then an fp32 matmul) is timed against a dense fp32 matmul, by default at
shapes divided by 8, and the output says plainly that the GPU numbers are missing.

Columns: ``us`` median time per call; ``TFLOP/s`` = 2·M·K·N / time; ``GB/s`` = compulsory bytes (packed
weight, uint8 zeros, fp16 scales, x, out) / time; ``speedup`` = dense time / gptqlab time; ``% peak BW`` =
GB/s over the device's peak bandwidth (:data:`gptqlab.benchmarks.common.PEAK_BANDWIDTH_TBS`), 'unknown'
for devices not in that table.
"""

from __future__ import annotations

import math
import re

import torch

from gptqlab.benchmarks.common import (
    env_line,
    environment,
    median_seconds,
    peak_bandwidth_gbs,
    set_threads,
    split_list,
    table,
    write_json,
)
from gptqlab.errors import ConfigError
from gptqlab.resolve import resolve_device

MODEL_SHAPES: dict[str, tuple[tuple[str, int, int], ...]] = {
    # name: (layer, in_features K, out_features N)
    "llama-7b": (
        ("q/k/v/o_proj", 4096, 4096),
        ("gate/up_proj", 4096, 11008),
        ("down_proj", 11008, 4096),
    ),
    "bloom-7b1": (
        ("query_key_value", 4096, 12288),
        ("dense_h_to_4h", 4096, 16384),
        ("dense_4h_to_h", 16384, 4096),
    ),
    "qwen2-7b": (
        ("q/o_proj", 3584, 3584),
        ("k/v_proj", 3584, 512),
        ("gate/up_proj", 3584, 18944),
        ("down_proj", 18944, 3584),
    ),
}
CPU_SHRINK = 8
CPU_NOTE = (
    "GPU numbers are missing: torch sees no CUDA device here, so these rows time the torch reference path "
    "(dequantize the layer, then an fp32 matmul) against a dense fp32 matmul on the CPU{shrunk}. They say "
    "nothing about the Triton kernels; run `gptqlab bench kernels` on a CUDA machine for those."
)


def parse_shapes(items: list[str], shrink: int) -> list[tuple[str, str, int, int]]:
    """(model, layer, K, N) for each model name of :data:`MODEL_SHAPES` (K and N divided by ``shrink``,
    rounded up to a multiple of 32) and each custom ``KxN`` (used as given)."""
    shapes = []
    for item in split_list(items):
        if item in MODEL_SHAPES:
            for layer, k, n in MODEL_SHAPES[item]:
                shapes.append((item, layer, _shrunk(k, shrink), _shrunk(n, shrink)))
            continue
        m = re.fullmatch(r"(\d+)\s*[xX×]\s*(\d+)", item)
        if not m:
            names = ", ".join(MODEL_SHAPES)
            raise ConfigError(f"--shapes: unknown shape {item!r}; use {names} or KxN, e.g. 4096x11008")
        k, n = int(m.group(1)), int(m.group(2))
        if k % 32 or n <= 0:
            raise ConfigError(f"--shapes: {item}: K must be a positive multiple of 32 (packing) and N positive")
        shapes.append(("custom", item, k, n))
    if not shapes:
        raise ConfigError("--shapes needs at least one shape")
    return shapes


def _shrunk(dim: int, shrink: int) -> int:
    return max(32, math.ceil(dim / shrink / 32) * 32)


def layer_operands(k: int, n: int, bits: int, group_size: int, device: torch.device, seed: int = 0):
    """Random operands in the kernels' layout: qweight [K*bits/32, N] int32, zeros [G, N] uint8 and
    scales [G, N] fp16 (all codes and zeros equally likely; the timing does not depend on the values)."""
    gen = torch.Generator().manual_seed(seed)
    groups = math.ceil(k / (k if group_size == -1 else group_size))
    qweight = torch.randint(-(2**31), 2**31 - 1, (k * bits // 32, n), dtype=torch.int32, generator=gen)
    zeros = torch.randint(0, 2**bits, (groups, n), dtype=torch.uint8, generator=gen)
    scales = (torch.rand(groups, n, generator=gen) * 2e-3 + 1e-4).to(torch.float16)
    return qweight.to(device), zeros.to(device), scales.to(device)


def bench_torch_path(
    k: int, n: int, m: int, bits: int, group_size: int, device: torch.device, dtype: torch.dtype, repeats: int
) -> dict:
    """Time ``gptq_matmul(backend="torch")`` and a dense ``x @ W`` in ``dtype``; the fields of one row."""
    from gptqlab.kernels import gptq_matmul

    qweight, zeros, scales = layer_operands(k, n, bits, group_size, device)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(m, k, generator=gen).to(device=device, dtype=dtype)  # [M, K]
    dense = torch.randn(k, n, generator=gen).to(device=device, dtype=dtype)  # [K, N]
    us = 1e6 * median_seconds(
        lambda: gptq_matmul(x, qweight, zeros, scales, bits, group_size, backend="torch"), device, 1, repeats
    )
    dense_us = 1e6 * median_seconds(lambda: x @ dense, device, 1, repeats)
    groups = zeros.shape[0]
    io_bytes = (m * k + m * n) * x.element_size()
    pack_bytes = k * n * bits // 8 + groups * n * 3  # codes + uint8 zeros + fp16 scales
    return {
        "K": k,
        "N": n,
        "M": m,
        "bits": bits,
        "group_size": group_size,
        "dtype": str(dtype).removeprefix("torch."),
        "kernel": "torch",
        "us": us,
        "dense_us": dense_us,
        "tflops": 2 * m * n * k / us / 1e6,
        "gbps": (pack_bytes + io_bytes) / us / 1e3,
        "dense_gbps": (k * n * x.element_size() + io_bytes) / dense_us / 1e3,
        "speedup_vs_dense": dense_us / us,
    }


def bench_point(
    k: int, n: int, m: int, bits: int, group_size: int, device: torch.device, repeats: int
) -> tuple[str, dict]:
    """(backend, row) for one point: the Triton kernels through bench_kernels_gpu on CUDA when they cover
    ``bits``, else the torch reference."""
    from gptqlab.kernels.layout import KERNEL_BITS

    if device.type == "cuda" and bits in KERNEL_BITS:
        import gptqlab.kernels
        from gptqlab.benchmarks.bench_kernels_gpu import bench_one

        return "triton", bench_one(gptqlab.kernels, k, n, m, bits, group_size, torch.float16, repeats, str(device))
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    return "torch", bench_torch_path(k, n, m, bits, group_size, device, dtype, repeats)


def run(
    shapes: list[str] | None = None,
    bits: list[int] | None = None,
    batches: list[int] | None = None,
    group_size: int = 128,
    shrink: int | None = None,
    repeats: int | None = None,
    device: str = "auto",
    threads: int | None = None,
    json_path: str | None = None,
) -> dict:
    """Benchmark every (shape, bits, M); print a table and write JSON when asked."""
    from gptqlab.quant.pack import SUPPORTED_BITS

    dev = resolve_device(device)
    set_threads(threads)
    on_cuda = dev.type == "cuda"
    shrink = shrink if shrink is not None else (1 if on_cuda else CPU_SHRINK)
    repeats = repeats if repeats is not None else (30 if on_cuda else 10)
    if shrink < 1 or repeats < 1:
        raise ConfigError("--shrink and --repeats must be at least 1")
    if group_size != -1 and (group_size <= 0 or group_size % 32):
        raise ConfigError(f"--group-size must be -1 or a positive multiple of 32, got {group_size}")
    bits = bits or [4, 8]
    bad = [b for b in bits if b not in SUPPORTED_BITS]
    if bad:
        raise ConfigError(f"--bits must be among {', '.join(map(str, SUPPORTED_BITS))}, got {bad[0]}")
    points = parse_shapes(shapes or list(MODEL_SHAPES), shrink)
    peak = peak_bandwidth_gbs(dev)
    env = environment(dev)
    print(env_line(env))
    print(f"peak memory bandwidth: {f'{peak:,.0f} GB/s' if peak else 'unknown'}; group size {group_size}")

    rows = []
    for model, layer, k, n in points:
        for b in bits:
            for m in batches or [1, 16, 256]:
                backend, row = bench_point(k, n, m, b, group_size, dev, repeats)
                row.update(model=model, layer=layer, backend=backend)
                row["pct_peak_bw"] = 100 * row["gbps"] / peak if peak else None
                rows.append(row)
    headers = ["model", "layer", "KxN", "M", "bits", "kernel", "us", "dense us", "TFLOP/s", "GB/s"]
    headers += ["% peak BW", "speedup"]
    print(
        table(
            headers,
            [
                [
                    r["model"],
                    r["layer"],
                    f"{r['K']}x{r['N']}",
                    r["M"],
                    r["bits"],
                    r["kernel"],
                    r["us"],
                    r["dense_us"],
                    r["tflops"],
                    r["gbps"],
                    "unknown" if r["pct_peak_bw"] is None else f"{r['pct_peak_bw']:.0f}%",
                    f"{r['speedup_vs_dense']:.2f}x",
                ]
                for r in rows
            ],
        )
    )
    note = None
    if not on_cuda:
        shrunk = f", at model shapes divided by {shrink}" if shrink > 1 else ""
        note = CPU_NOTE.format(shrunk=shrunk)
        print(note)
    result = {
        "env": env,
        "group_size": group_size,
        "shrink": shrink,
        "repeats": repeats,
        "peak_bandwidth_gbs": peak,
        "gpu_numbers_missing": not on_cuda,
        "note": note,
        "rows": rows,
    }
    if json_path is not None:
        print(f"wrote {write_json(json_path, result)}")
    return result
