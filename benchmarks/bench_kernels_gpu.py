"""Benchmark the GPTQ Triton kernels on a CUDA GPU at 7B-model layer shapes; print a table, write JSON.

    python benchmarks/bench_kernels_gpu.py [--bits 4] [--group-size 128] [--m 1 16 256] [--out FILE]

Needs torch and triton only, and runs from a checkout without installing gptqlab. For each layer
(in_features x out_features), batch M and bit width it reports:

- ``us``: median GPU time per call. Each sample replays a CUDA graph that sweeps over enough copies of
  the weight to exceed L2 (decoding reads every layer's weight from HBM once per token; timing one copy
  in a loop would measure L2), so launch overhead and cache reuse are both excluded. A call is one
  kernel launch (the gemv reduces its split-K slices inside the kernel).
- ``TFLOP/s`` = 2*M*N*K / time; ``GB/s`` = compulsory bytes (packed weight, scales, zeros, x, out) / time.
- ``x dense``: speedup over ``x @ W`` with a dense W in x.dtype (cuBLAS), timed the same way.
- ``err``: max |kernel - torch reference| / max |reference|; expect below 1e-2 (fp16 rounding).
  ``python -m gptqlab.benchmarks.gpu_check`` runs this and more (correctness, probe, decode) in one go.
- ``config``: the tile the autotuner picked (first call per shape autotunes; that time is not measured).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SHAPES = {  # name: (in_features K, out_features N), LLaMA-7B / Baichuan-7B / Qwen-7B-class layers
    "q/k/v/o_proj 4096x4096": (4096, 4096),
    "gate/up_proj 4096x11008": (4096, 11008),
    "down_proj 11008x4096": (11008, 4096),
}
L2_SWEEP_BYTES = 256 * 2**20  # bytes of weight copies per timed sweep; H100 L2 is 50 MiB


def _import_gptqlab():
    """``gptqlab.kernels`` from the environment, else from this checkout (setup.py maps the top-level
    ``kernels/`` and ``quant/`` folders into the ``gptqlab`` package; the same mapping is done here)."""
    try:
        import gptqlab.kernels
    except ModuleNotFoundError:
        sys.path.insert(0, str(ROOT))
        import gptqlab

        gptqlab.__path__.append(str(ROOT))
    import gptqlab.kernels

    return gptqlab.kernels


def _time_us(call, copies: int, reps: int) -> tuple[float, str]:
    """Median microseconds per ``call(i)`` over ``reps`` sweeps of i = 0..copies-1, replayed from a CUDA
    graph (or eagerly if capture fails, which the second return value says)."""
    import torch

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (and autotuning) outside the capture, as the CUDA graph docs ask
        for i in range(copies):
            call(i)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()

    def sweep():
        for i in range(copies):
            call(i)

    mode = "graph"
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            sweep()
        run = graph.replay
    except RuntimeError as exc:
        print(f"  (CUDA graph capture failed, timing eagerly: {exc})", file=sys.stderr)
        mode, run = "eager", sweep
    run()
    torch.cuda.synchronize()
    samples = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) * 1e3 / copies)
    return statistics.median(samples), mode


def bench_one(
    kernels, k: int, n: int, m: int, bits: int, group_size: int, dtype, reps: int, device: str = "cuda"
) -> dict:
    """Time and check one (layer, M, bits) point; returns one JSON row."""
    import torch

    from gptqlab.kernels import reference
    from gptqlab.kernels.gemm import _dequant_gemm_kernel
    from gptqlab.kernels.gemv import _dequant_gemv_kernel

    gen = torch.Generator(device=device).manual_seed(0)
    groups = math.ceil(k / (k if group_size == -1 else group_size))
    pack_bytes = k * n * bits // 8 + groups * n * 3  # codes + uint8 zeros + fp16 scales
    copies = max(1, min(64, math.ceil(L2_SWEEP_BYTES / pack_bytes)))
    layers = [
        (
            torch.randint(-(2**31), 2**31 - 1, (k * bits // 32, n), device=device, dtype=torch.int32, generator=gen),
            torch.randint(0, 2**bits, (groups, n), device=device, dtype=torch.uint8, generator=gen),
            (torch.rand(groups, n, device=device, generator=gen) * 2e-3 + 1e-4).to(torch.float16),
        )
        for _ in range(copies)
    ]
    x = torch.randn(m, k, device=device, generator=gen).to(dtype)

    def quantized(i):
        qweight, zeros, scales = layers[i]
        return kernels.gptq_matmul(x, qweight, zeros, scales, bits, group_size, backend="triton")

    out = quantized(0)
    ref = reference.matmul_contiguous(x, *layers[0], bits, group_size)
    err = ((out.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-12)).item()
    us, mode = _time_us(quantized, copies, reps)
    kernel = kernels.kernel_for(m)
    config = (_dequant_gemv_kernel if kernel == "gemv" else _dequant_gemm_kernel).best_config

    dense_copies = max(1, min(64, math.ceil(L2_SWEEP_BYTES / (k * n * 2))))
    dense = [torch.randn(k, n, device=device, generator=gen).to(dtype) for _ in range(dense_copies)]
    dense_us, _ = _time_us(lambda i: x @ dense[i], dense_copies, reps)

    io_bytes = (m * k + m * n) * x.element_size()
    return {
        "K": k,
        "N": n,
        "M": m,
        "bits": bits,
        "group_size": group_size,
        "dtype": str(dtype).removeprefix("torch."),
        "kernel": kernel,
        "us": us,
        "dense_us": dense_us,
        "tflops": 2 * m * n * k / us / 1e6,
        "gbps": (pack_bytes + io_bytes) / us / 1e3,
        "dense_gbps": (k * n * 2 + io_bytes) / dense_us / 1e3,
        "speedup_vs_dense": dense_us / us,
        "max_rel_err": err,
        "config": " ".join(f"{k}={v}" for k, v in config.kwargs.items()) + f" warps={config.num_warps}",
        "timing": mode,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bits", type=int, nargs="+", default=[4], choices=[2, 4, 8])
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--m", type=int, nargs="+", default=[1, 16, 256])
    parser.add_argument("--dtype", choices=["float16", "bfloat16"], default="float16")
    parser.add_argument("--reps", type=int, default=30, help="timed sweeps per point (median reported)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "kernels_gpu.json")
    args = parser.parse_args(argv)

    import torch
    import triton

    if not torch.cuda.is_available():
        print("no CUDA device: this benchmark needs a GPU (run tests/kernels for the CPU interpreter)")
        return 2
    kernels = _import_gptqlab()
    dtype = getattr(torch, args.dtype)
    device = torch.cuda.get_device_name()
    versions = f"torch {torch.__version__} | triton {triton.__version__}"
    print(f"{device} | {versions} | {args.dtype} activations | group size {args.group_size}")
    header = (
        f"{'layer':<24} {'M':>4} {'bits':>4} {'kernel':>6} {'us':>9} {'dense us':>9} {'TFLOP/s':>8} "
        f"{'GB/s':>7} {'x dense':>7} {'err':>8}  config"
    )
    print(header)
    print("-" * len(header))
    rows = []
    for name, (k, n) in SHAPES.items():
        for bits in args.bits:
            for m in args.m:
                row = {"layer": name, **bench_one(kernels, k, n, m, bits, args.group_size, dtype, args.reps)}
                rows.append(row)
                print(
                    f"{name:<24} {m:>4} {bits:>4} {row['kernel']:>6} {row['us']:>9.1f} {row['dense_us']:>9.1f} "
                    f"{row['tflops']:>8.1f} {row['gbps']:>7.0f} {row['speedup_vs_dense']:>6.2f}x "
                    f"{row['max_rel_err']:>8.1e}  {row['config']}",
                    flush=True,
                )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "device": device,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "dtype": args.dtype,
        "group_size": args.group_size,
    }
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")
    bad = [r for r in rows if r["max_rel_err"] > 1e-2]
    if bad:
        print(f"{len(bad)} point(s) exceed the expected error of 1e-2: check the kernels", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
