"""``gptqlab bench kernels``: gptqlab's GPTQ matmul against a dense matmul at real 7B layer shapes.

On CUDA each point is timed by :func:`gptqlab.benchmarks.bench_kernels_gpu.bench_one` (the kernel
engineer's CUDA-graph, L2-sweeping timer) against a dense fp16 ``x @ W``; bit widths without a Triton
kernel (3-bit) time the torch reference instead. On the CPU there are no Triton kernels; each point
times, round-robin in one run (:func:`bench_cpu_point`): dense fp32 and dense bf16 matmuls, gptqlab's
CPU path as a loaded model runs it (``QuantLinear`` repacked by ``use_cpu_kernel``, fp32 activations:
the int4 kernel below :data:`gptqlab.kernels.cpu.DENSE_MIN_ROWS` rows, else dequantized bf16 tiles and
a dense matmul), both of those paths forced (to show the crossover), and, where GPTQModel is installed,
its CPU kernels (TorchAten, TorchFused, TorchInt8) built from the same checkpoint tensors, in bf16 as
GPTQModel runs them. CPU shapes are divided by 8 by default (``--shrink 1`` for the real ones), and the
output says plainly that the GPU numbers are missing.

Columns: ``us`` median time per call; ``TFLOP/s`` = 2·M·K·N / time; ``GB/s`` = compulsory bytes (packed
weight, uint8 zeros, fp16 scales, x, out) / time; ``speedup`` = dense time / gptqlab time; ``% peak BW`` =
GB/s over the device's peak bandwidth (:data:`gptqlab.benchmarks.common.PEAK_BANDWIDTH_TBS`), 'unknown'
for devices not in that table.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import math
import os
import re
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

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
    "GPU numbers are missing: torch sees no CUDA device here, so these rows time gptqlab's CPU path "
    "(gptqlab.kernels.cpu) against dense fp32 and bf16 matmuls and GPTQModel's CPU kernels{shrunk}. They say "
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


@contextlib.contextmanager
def _scratch_dir():
    """Run GPTQModel in a temporary directory (it writes ./logs) with GPTQMODEL_CPU_WORKERS=2."""
    cwd = os.getcwd()
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    with tempfile.TemporaryDirectory(prefix="gptqlab-gptqmodel-") as tmp:
        os.chdir(tmp)
        try:
            yield
        finally:
            os.chdir(cwd)


def gptqmodel_cpu_layers(qweight, zeros, scales, bits: int, group_size: int) -> dict[str, torch.nn.Module]:
    """GPTQModel's CPU QuantLinear classes that take this layer, built from the same tensors (qzeros in the
    format each class expects), after their ``post_init``; {} when GPTQModel is not installed.

    qweight [K*bits/32, N] int32; zeros [G, N] actual zero points; scales [G, N] fp16."""
    if importlib.util.find_spec("gptqmodel") is None:
        return {}
    from gptqlab.kernels.reference import contiguous_g_idx
    from gptqlab.quant.pack import pack_cols

    with _scratch_dir():
        from gptqmodel.nn_modules.qlinear.torch_aten_kernel import TorchAtenLinear
        from gptqmodel.nn_modules.qlinear.torch_fused import TorchFusedLinear
        from gptqmodel.nn_modules.qlinear.torch_int8 import TorchInt8Linear

        k, n = qweight.shape[0] * 32 // bits, qweight.shape[1]
        layers = {}
        for name, cls in (
            ("TorchAten", TorchAtenLinear),
            ("TorchFused", TorchFusedLinear),
            ("TorchInt8", TorchInt8Linear),
        ):
            if bits not in cls.SUPPORTS_BITS or group_size not in cls.SUPPORTS_GROUP_SIZE:
                continue
            layer = cls(bits=bits, group_size=group_size, sym=True, desc_act=False, in_features=k, out_features=n)
            offset = 0 if getattr(cls, "REQUIRES_FORMAT_V2", False) else 1  # v1 files store z - 1
            layer.qweight.copy_(qweight)
            layer.qzeros.copy_(pack_cols(zeros.to(torch.int32) - offset, bits))
            layer.scales.copy_(scales)
            layer.g_idx.copy_(contiguous_g_idx(k, group_size))
            layer.eval()
            layer.post_init()
            layers[f"gptqmodel-{name}"] = layer
    return layers


def last_level_cache_bytes() -> int:
    """The CPU's last-level cache size from sysfs (Linux), else 64 MiB."""
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"), reverse=True):
        size = (index / "size").read_text().strip() if (index / "size").is_file() else ""
        if size[:-1].isdigit():
            return int(size[:-1]) * {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(size[-1], 1)
    return 64 << 20


FLUSH_MIN_BYTES = 1 << 20
"""Layers whose dense fp32 weight has at least this many bytes (larger than a core's L2) are timed with
the cache flushed before each call; smaller ones (test shapes) are not, which keeps them quick."""


def _round_robin(
    calls: dict[str, Callable[[], object]], rounds: int, flush: bool
) -> tuple[dict[str, float], dict[str, float]]:
    """(median, fastest) seconds per call of each callable, calling them in turn for ``rounds`` rounds.

    With ``flush``, a buffer of twice the last-level cache is overwritten before every timed call, so that
    each kernel reads its weight from DRAM, as in a model whose weights exceed the cache, and none profits
    from the previous kernel having touched the same packed weight. Round r starts at kernel r
    (rotation), so no kernel always follows the same neighbour."""
    scratch = torch.empty(2 * last_level_cache_bytes() // 4 if flush else 0, dtype=torch.float32)
    times: dict[str, list[float]] = {name: [] for name in calls}
    names = list(calls)
    for fn in calls.values():
        fn()  # warm-up
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            scratch.fill_(r)
            start = time.perf_counter()
            calls[name]()
            times[name].append(time.perf_counter() - start)
    return {n: statistics.median(t) for n, t in times.items()}, {n: min(t) for n, t in times.items()}


@torch.no_grad()
def bench_cpu_point(k: int, n: int, m: int, bits: int, group_size: int, repeats: int) -> list[dict]:
    """Rows for one (K, N, M, bits) on the CPU: every kernel of the module docstring, timed round-robin
    (``repeats`` rounds of one call each, so that load from other processes hits all kernels alike, with
    the cache flushed before each call from :data:`FLUSH_MIN_BYTES` on; the median is reported, and the
    fastest call as ``best_us``).

    Each row has ``us`` (median per call), ``vs_fp32`` and ``vs_bf16`` (dense time / this time) and
    ``rel_err`` (relative Frobenius error of the output against the exact fp32 reference, from which a
    wrongly built kernel would stand out)."""
    from gptqlab.kernels import cpu, reference
    from gptqlab.qlinear import QuantLinear

    qweight, zeros, scales = layer_operands(k, n, bits, group_size, torch.device("cpu"))
    zeros.fill_(2 ** (bits - 1))  # symmetric, as gptqlab and GPTQModel quantize by default (TorchFused needs it)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(m, k, generator=gen)  # [M, K] fp32, as a loaded gptqlab model feeds its layers
    xb = x.to(torch.bfloat16)
    exact_w = reference.dequantize(
        qweight, zeros, scales, reference.contiguous_g_idx(k, group_size), bits, torch.float32
    )  # [K, N]
    exact = x @ exact_w
    dense32, dense16 = exact_w.clone(), exact_w.to(torch.bfloat16)
    del exact_w
    lin = QuantLinear(qweight.clone(), zeros.clone(), scales.clone(), bits=bits, group_size=group_size)
    fast = lin.use_cpu_kernel()
    calls: dict[str, Callable[[], torch.Tensor]] = {
        "dense-fp32": lambda: x @ dense32,
        "dense-bf16": lambda: xb @ dense16,
        "gptqlab": lambda: lin(x),
    }
    if fast:
        w, sz, gk = lin.cpu_weight, lin.cpu_scale_zeros, lin.cpu_group
        calls["gptqlab-int4"] = lambda: cpu.matmul(x, w, sz, gk, path="int4")
        if n % cpu.BLOCK_N == 0:
            calls["gptqlab-dense-tile"] = lambda: cpu.matmul(x, w, sz, gk, path="dense-tile")
    for name, layer in gptqmodel_cpu_layers(qweight, zeros, scales, bits, group_size).items():
        calls[name] = functools.partial(layer, xb)
    seconds, best = _round_robin(calls, repeats, flush=k * n * 4 >= FLUSH_MIN_BYTES)
    rows = []
    for name, fn in calls.items():
        out = fn().float()
        rows.append(
            {
                "K": k,
                "N": n,
                "M": m,
                "bits": bits,
                "group_size": group_size,
                "kernel": name,
                "path": cpu.path_for(m, n) if name == "gptqlab" and fast else None,
                "us": 1e6 * seconds[name],
                "vs_fp32": seconds["dense-fp32"] / seconds[name],
                "vs_bf16": seconds["dense-bf16"] / seconds[name],
                "rel_err": float((out - exact).norm() / exact.norm()),
                "tflops": 2 * m * n * k / seconds[name] / 1e12,
                "best_us": 1e6 * best[name],
                "calls": repeats,
            }
        )
    return rows


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


def cpu_table(rows: list[dict]) -> str:
    """The CPU rows as printed: one line per kernel, ratios against dense fp32 and bf16 of the same run."""
    headers = ["model", "layer", "KxN", "M", "bits", "kernel", "us", "x fp32", "x bf16", "rel err"]
    return table(
        headers,
        [
            [
                r["model"],
                r["layer"],
                f"{r['K']}x{r['N']}",
                r["M"],
                r["bits"],
                r["kernel"] + (f" ({r['path']})" if r["path"] else ""),
                r["us"],
                f"{r['vs_fp32']:.2f}x",
                f"{r['vs_bf16']:.2f}x",
                f"{r['rel_err']:.1e}",
            ]
            for r in rows
        ],
    )


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

    if not on_cuda:
        rows = []
        for model, layer, k, n in points:
            for b in bits:
                for m in batches or [1, 16, 256]:
                    for row in bench_cpu_point(k, n, m, b, group_size, repeats):
                        rows.append({"model": model, "layer": layer, "backend": "cpu", **row})
        print(cpu_table(rows))
        shrunk = f", at model shapes divided by {shrink}" if shrink > 1 else ""
        note = CPU_NOTE.format(shrunk=shrunk)
        print(note)
    else:
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


def plot_cpu_kernels(results: list[dict], path: str | Path) -> Path:
    """A PNG of CPU results (JSON of :func:`run` on the CPU): per (bits, M), each kernel's time per call as a
    multiple of dense bf16's in the same run (log scale; lower is faster). Returns the file written."""
    from gptqlab.benchmarks.plots import _grouped_bars, _pyplot

    plt = _pyplot()
    rows = [r for res in results for r in res["rows"]]
    groups = sorted({(r["bits"], r["M"]) for r in rows})
    kernels = list(dict.fromkeys(r["kernel"] for r in rows))
    index = {(r["bits"], r["M"], r["kernel"]): r for r in rows}
    series = {k: [1 / index[(b, m, k)]["vs_bf16"] if (b, m, k) in index else None for b, m in groups] for k in kernels}
    colors = dict(zip(kernels, plt.get_cmap("tab10").colors, strict=False))
    fig, ax = plt.subplots(figsize=(max(8, 1.3 * len(groups)), 4.5))
    _grouped_bars(ax, [f"{b}-bit M={m}" for b, m in groups], series, colors)
    ax.set_yscale("log")
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    first = rows[0]
    ax.set_ylabel("time / dense bf16 time (log)")
    ax.set_title(
        f"{first['K']}x{first['N']} layer, {results[0]['env']['device_name']}, "
        f"{results[0]['env']['torch_threads']} thread(s), group {results[0]['group_size']}"
    )
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
