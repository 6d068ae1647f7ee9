"""The first thing to run on a GPU: correctness, speed and the model's predictions in one short run.

    make gpu-check                                   # = python -m gptqlab.benchmarks.gpu_check
    python -m gptqlab.benchmarks.gpu_check --dry-run # the whole plumbing on the CPU, tiny sizes, interpreter

Sized to finish in 8 minutes on one H100 or H200 (most of it is triton compiling the autotune configs on a
fresh machine). Steps, each a section of the JSON and of the Markdown table:

1. ``correctness``: the gemv (M = 1, 7, 16) and the gemm (M = 256), each with the first config its
   pruning keeps (no autotuning, to save compile time), against the torch reference in fp16 and bf16,
   plain and with bias and an act-order permutation, 4-bit group 128 on 4096 x 4096; max |error| in units
   of the reference's largest output (limit: two roundings of x.dtype, 2 * eps).
2. ``timing``: the kernel alone (device time: CUDA-graph replays over weight copies larger than L2, so
   each call reads its weight from HBM) and the full call (host wall time of an eager ``gptq_matmul``,
   wrapper and launch included) at M = 1, 16, 256.
3. ``probe``: every M = 1 and M = 16 gemv config against a load-only probe on the same grid (same tiles,
   split of K, warps and stages, the words only XOR-ed): probe time is the memory ceiling of the grid,
   kernel time over probe time the price of dequantization and the dot.
4. ``table``: the autotuned kernels against cuBLAS fp16 (``x @ W``) on the six LLaMA-7B and BLOOM-7B1
   shapes at M = 1, 16, 256: us, speedup, GB/s, fraction of HBM, the autotuner's config, and the static
   model's prediction for that config (benchmarks/results/static-sm90/kernel_static.json) beside it.
5. ``quantize``: tiny-zh-llama quantized (GPTQ, 4-bit) on CUDA and on the CPU: share of identical packed
   words, largest scale difference, and the per-layer losses of both runs.
6. ``decode``: a LLaMA-7B-shaped model (random fp16 weights) decoding at batch 1, eager transformers:
   ms per token in fp16 and with its 224 Linears RTN-quantized to 4 bits (QuantLinear, Triton), and the
   per-token time of those 224 Linears alone (CUDA graph) for both.

Writes ``<out-dir>/gpu_check.json`` and ``gpu_check.md`` (default out-dir: benchmarks/results/<gpu-name>/)
with device, date and commit. Needs torch, triton and transformers only, imported lazily. Every number
is measured on the device named in the file; ``--dry-run`` numbers are CPU interpreter times, meaningless
as speed, and the file says so.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gptqlab.errors import GptqlabError

ROOT = Path(__file__).resolve().parents[1]
LLAMA_7B = {"llama q/k/v/o 4096x4096": (4096, 4096), "llama gate/up 4096x11008": (4096, 11008)}
LLAMA_7B |= {"llama down 11008x4096": (11008, 4096)}
BLOOM_7B1 = {"bloom qkv 4096x12288": (4096, 12288), "bloom h-4h 4096x16384": (4096, 16384)}
BLOOM_7B1 |= {"bloom 4h-h 16384x4096": (16384, 4096)}
HBM_BYTES_PER_S = {"H200": 4.8e12, "H100 PCIe": 2.0e12, "H100": 3.35e12, "A100": 2.0e12}
"""Peak HBM bandwidth by device-name substring (first match), for the fraction-of-HBM columns."""
L2_SWEEP_BYTES = 256 * 2**20
BUDGET_S = 8 * 60


@dataclasses.dataclass
class Context:
    """Sizes and clock of one run; ``dry_run`` shrinks everything and runs on the CPU interpreter."""

    dry_run: bool
    device: str
    started: float
    bits: int = 4
    group_size: int = 128
    budget_s: float = BUDGET_S

    @property
    def shapes(self) -> dict:
        if self.dry_run:
            return {"tiny 256x128": (256, 128), "tiny 128x192": (128, 192)}
        return {**LLAMA_7B, **BLOOM_7B1}

    @property
    def batches(self) -> tuple[int, ...]:
        return (1, 16, 33) if self.dry_run else (1, 16, 256)

    @property
    def check_shape(self) -> tuple[int, int]:
        return (256, 128) if self.dry_run else (4096, 4096)

    def left(self) -> float:
        return self.budget_s - (time.time() - self.started)


# -- helpers -------------------------------------------------------------------------------------------------
def _layer(ctx: Context, k: int, n: int, seed: int = 0):
    """Random GPTQ operands (qweight, zeros uint8, scales fp16) of a K x N layer on ctx.device."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    g = math.ceil(k / ctx.group_size)
    qweight = torch.randint(-(2**31), 2**31 - 1, (k * ctx.bits // 32, n), generator=gen, dtype=torch.int32)
    zeros = torch.randint(1, 2**ctx.bits, (g, n), generator=gen, dtype=torch.uint8)
    scales = (torch.rand(g, n, generator=gen) * 2e-3 + 1e-4).to(torch.float16)
    return qweight.to(ctx.device), zeros.to(ctx.device), scales.to(ctx.device)


def _sync(ctx: Context) -> None:
    if ctx.device == "cuda":
        import torch

        torch.cuda.synchronize()


def device_us(ctx: Context, call, copies: int, reps: int) -> float:
    """Median device microseconds per ``call(i)``, i sweeping ``copies`` weight copies: CUDA-graph replays
    on a GPU (launch overhead excluded, weights from HBM); wall time under the dry run."""
    import torch

    if ctx.device != "cuda":
        call(0)
        start = time.perf_counter()
        for i in range(copies):
            call(i)
        return (time.perf_counter() - start) * 1e6 / copies
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up and autotuning outside the capture
        for i in range(copies):
            call(i)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(copies):
            call(i)
    graph.replay()
    torch.cuda.synchronize()
    samples = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) * 1e3 / copies)
    return statistics.median(samples)


def host_us(ctx: Context, call, reps: int) -> float:
    """Median wall microseconds of an eager call, synchronized (wrapper, launch and kernel)."""
    samples = []
    call()
    for _ in range(reps):
        _sync(ctx)
        start = time.perf_counter()
        call()
        _sync(ctx)
        samples.append((time.perf_counter() - start) * 1e6)
    return statistics.median(samples)


def _copies(ctx: Context, nbytes: int) -> int:
    return 1 if ctx.dry_run else max(1, min(64, math.ceil(L2_SWEEP_BYTES / nbytes)))


def _packed_bytes(ctx: Context, k: int, n: int) -> int:
    return k * n * ctx.bits // 8 + math.ceil(k / ctx.group_size) * n * 3


def hbm_peak(name: str) -> float | None:
    for key, value in HBM_BYTES_PER_S.items():
        if key in name:
            return value
    return None


# -- steps -----------------------------------------------------------------------------------------------------
def _fixed_config(kernel: str, m: int, k: int, n: int, bits: int, group_size: int, dtype, perm: bool):
    """The first config the kernel's pruning keeps for this call: correctness needs no autotuning, and
    skipping it saves compiling every config for every bias/act-order/dtype variant."""
    import torch

    from gptqlab.kernels import gemm, gemv
    from gptqlab.kernels.common import m_bucket

    args = {"M_BUCKET": m_bucket(m), "K": k, "N": n, "BITS": bits, "group_size": group_size}
    args |= {"PACKED_FP16": dtype == torch.float16, "HAS_PERM": perm}
    if kernel == "gemv":
        return gemv._prune_gemv_configs(gemv.gemv_configs(), args)[0]
    return gemm._prune_gemm_configs(gemm.gemm_configs(), args)[0]


def step_correctness(ctx: Context) -> list[dict]:
    """Each kernel with a fixed config (see :func:`_fixed_config`) against the torch reference."""
    import torch

    from gptqlab.kernels import kernel_for, reference
    from gptqlab.kernels.gemm import gemm
    from gptqlab.kernels.gemv import gemv

    k, n = ctx.check_shape
    qweight, zeros, scales = _layer(ctx, k, n)
    gen = torch.Generator().manual_seed(1)
    bias = (0.1 * torch.randn(n, generator=gen)).to(torch.float16).to(ctx.device)
    perm = torch.randperm(k, generator=gen).to(torch.int32).to(ctx.device)
    rows = []
    dtypes = (torch.float16,) if ctx.dry_run else (torch.float16, torch.bfloat16)  # bf16: the interpreter's
    for dtype in dtypes:  # tl.dot multiplies raw bf16 bits (triton#11584), so the dry run skips it
        for m in (1, 7, 16, 33 if ctx.dry_run else 256):
            for variant in ("plain", "bias+act-order"):
                x = torch.randn(m, k, generator=gen).to(dtype).to(ctx.device)
                b, p = (bias.to(dtype), perm) if variant != "plain" else (None, None)
                kernel = kernel_for(m)
                config = _fixed_config(kernel, m, k, n, ctx.bits, ctx.group_size, dtype, p is not None)
                run = gemv if kernel == "gemv" else gemm
                out = run(x, qweight, zeros, scales, ctx.bits, ctx.group_size, b, p, config=config)
                xr = x if p is None else x.index_select(-1, p)
                ref = reference.matmul_contiguous(xr, qweight, zeros, scales, ctx.bits, ctx.group_size, b)
                err = ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
                limit = 2 * torch.finfo(dtype).eps
                rows.append(
                    {
                        "M": m,
                        "dtype": str(dtype).removeprefix("torch."),
                        "variant": variant,
                        "kernel": kernel,
                        "config": dict(config.kwargs) | {"num_warps": config.num_warps},
                        "max_rel_err": err,
                        "limit": limit,
                        "ok": err <= limit and out.dtype == dtype,
                    }
                )
    return rows


def step_timing(ctx: Context) -> list[dict]:
    import torch

    from gptqlab.kernels import gptq_matmul, kernel_for

    k, n = ctx.check_shape
    copies = _copies(ctx, _packed_bytes(ctx, k, n))
    layers = [_layer(ctx, k, n, seed=i) for i in range(copies)]
    rows = []
    for m in ctx.batches:
        x = torch.randn(m, k).to(torch.float16).to(ctx.device)

        def call(i, x=x):
            return gptq_matmul(x, *layers[i], ctx.bits, ctx.group_size, backend="triton")

        kernel = device_us(ctx, call, copies, 1 if ctx.dry_run else 30)
        full = host_us(ctx, lambda call=call: call(0), 1 if ctx.dry_run else 50)
        rows.append({"M": m, "K": k, "N": n, "kernel": kernel_for(m), "kernel_us": kernel, "call_us": full})
    return rows


def step_probe(ctx: Context) -> list[dict]:
    import torch

    from gptqlab.kernels import gemv as gemv_module
    from gptqlab.kernels.common import m_bucket
    from gptqlab.kernels.probe import load_probe

    k, n = ctx.check_shape
    copies = _copies(ctx, _packed_bytes(ctx, k, n))
    layers = [_layer(ctx, k, n, seed=i) for i in range(copies)]
    rows = []
    for m in (1, 16):
        x = torch.randn(m, k).to(torch.float16).to(ctx.device)
        args = {"M_BUCKET": m_bucket(m), "K": k, "N": n, "BITS": ctx.bits, "group_size": ctx.group_size}
        configs = gemv_module._prune_gemv_configs(gemv_module.gemv_configs(), args)
        for config in configs[:2] if ctx.dry_run else configs:
            if ctx.left() < 120:
                rows.append({"M": m, "skipped": "time budget"})
                return rows

            def kernel(i, x=x, config=config):
                return gemv_module.gemv(x, *layers[i], ctx.bits, ctx.group_size, config=config)

            def probe(i, config=config):
                return load_probe(layers[i][0], ctx.bits, config)

            reps = 1 if ctx.dry_run else 20
            t_kernel = device_us(ctx, kernel, copies, reps)
            t_probe = device_us(ctx, probe, copies, reps)
            name = "-".join(f"{key.lower()}{v}" for key, v in config.kwargs.items()) + f"-w{config.num_warps}"
            rows.append(
                {
                    "M": m,
                    "config": name,
                    "kernel_us": t_kernel,
                    "probe_us": t_probe,
                    "kernel_over_probe": t_kernel / t_probe,
                    "probe_gbps": k * n * ctx.bits / 8 / t_probe / 1e3,
                }
            )
    return rows


def _static_predictions() -> dict:
    """(M, K, N, config name) -> the static report's row, if the report is in the checkout."""
    path = ROOT / "benchmarks" / "results" / "static-sm90" / "kernel_static.json"
    if not path.exists():
        return {}
    rows = json.loads(path.read_text())["rows"]
    return {(r["M"], r["K"], r["N"], r["kernel"], json.dumps(r["params"], sort_keys=True)): r for r in rows}


def step_table(ctx: Context, peak: float | None) -> list[dict]:
    import torch

    from gptqlab.kernels import gemm as gemm_module
    from gptqlab.kernels import gemv as gemv_module
    from gptqlab.kernels import gptq_matmul, kernel_for

    static = _static_predictions()
    rows = []
    for shape, (k, n) in ctx.shapes.items():
        copies = _copies(ctx, _packed_bytes(ctx, k, n))
        layers = [_layer(ctx, k, n, seed=i) for i in range(copies)]
        dense_copies = _copies(ctx, 2 * k * n)
        dense = [torch.randn(k, n).to(torch.float16).to(ctx.device) for _ in range(dense_copies)]
        for m in ctx.batches:
            if ctx.left() < 90:
                rows.append({"shape": shape, "M": m, "skipped": "time budget"})
                continue
            x = torch.randn(m, k).to(torch.float16).to(ctx.device)
            reps = 1 if ctx.dry_run else 30

            def quantized(i, x=x, layers=layers):
                return gptq_matmul(x, *layers[i], ctx.bits, ctx.group_size, backend="triton")

            t = device_us(ctx, quantized, copies, reps)
            t16 = device_us(ctx, lambda i, x=x, dense=dense: x @ dense[i], dense_copies, reps)
            kernel = kernel_for(m)
            tuned = gemv_module._dequant_gemv_kernel if kernel == "gemv" else gemm_module._dequant_gemm_kernel
            config = getattr(tuned, "best_config", None)
            params = json.dumps(dict(config.kwargs), sort_keys=True) if config else None
            predicted = static.get((m, k, n, kernel, params), {})
            nbytes = _packed_bytes(ctx, k, n) + 2 * (m * k + m * n)
            rows.append(
                {
                    "shape": shape,
                    "M": m,
                    "K": k,
                    "N": n,
                    "kernel": kernel,
                    "us": t,
                    "fp16_us": t16,
                    "speedup_vs_fp16": t16 / t,
                    "gbps": nbytes / t / 1e3,
                    "hbm_fraction": None if peak is None else nbytes / (t * 1e-6) / peak,
                    "fp16_hbm_fraction": None if peak is None else (2 * k * n) / (t16 * 1e-6) / peak,
                    "config": None if config is None else dict(config.kwargs) | {"num_warps": config.num_warps},
                    "predicted_us_h100": predicted.get("predicted_us_h100"),
                    "predicted_speedup_h100": predicted.get("predicted_speedup_vs_fp16_h100"),
                    "predicted_us_h200": predicted.get("predicted_us_h200"),
                }
            )
    return rows


def step_quantize(ctx: Context) -> dict:
    """tiny-zh-llama, GPTQ 4-bit, on CUDA and on the CPU (dry run: the CPU once, compared with itself)."""
    from safetensors.torch import load_file

    from gptqlab.quantize.options import QuantizeOptions
    from gptqlab.quantize.run import quantize

    nsamples, seqlen = (4, 64) if ctx.dry_run else (32, 256)
    devices = ("cpu",) if ctx.dry_run else ("cuda", "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        outs, seconds = {}, {}
        for device in devices:
            start = time.time()
            opts = QuantizeOptions(
                "tiny-zh-llama", f"{tmp}/{device}", device=device, nsamples=nsamples, seqlen=seqlen, progress=False
            )
            outs[device] = quantize(opts)
            seconds[device] = time.time() - start
        a = load_file(str(outs[devices[0]] / "model.safetensors"))
        b = load_file(str(outs[devices[-1]] / "model.safetensors"))
        words = [key for key in a if key.endswith(".qweight")]
        same = sum(int((a[key] == b[key]).sum()) for key in words) / sum(a[key].numel() for key in words)
        scale_diff = max(
            ((a[key].float() - b[key].float()).abs().max() / b[key].float().abs().max()).item()
            for key in a
            if key.endswith(".scales")
        )
        reports = {d: json.loads((outs[d] / "quant_report.json").read_text()) for d in devices}
    return {
        "devices": list(devices),
        "nsamples": nsamples,
        "seqlen": seqlen,
        "identical_packed_words": same,
        "max_rel_scale_diff": scale_diff,
        "seconds": seconds,
        "reports": reports,
    }


def _llama_config(ctx: Context):
    from transformers import LlamaConfig

    if ctx.dry_run:
        return LlamaConfig(
            hidden_size=128, intermediate_size=256, num_hidden_layers=1, num_attention_heads=4, vocab_size=256
        )
    return LlamaConfig(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, vocab_size=32000
    )


def _rtn_linear(linear, ctx: Context):
    """QuantLinear (Triton backend) from an RTN-quantized nn.Linear."""
    import torch

    from gptqlab.qlinear import QuantLinear
    from gptqlab.quant import rtn
    from gptqlab.quant.config import QuantConfig
    from gptqlab.quant.pack import pack_rows

    res = rtn(linear.weight.data, QuantConfig(bits=ctx.bits, group_size=ctx.group_size, sym=False))
    qweight = pack_rows(res.codes.t().to(torch.int32), ctx.bits)  # [K*bits/32, N]
    zeros = res.zeros.t().contiguous().to(torch.uint8)  # [G, N]
    scales = res.scales.t().contiguous().to(torch.float16)
    layer = QuantLinear(qweight, zeros, scales, None, bits=ctx.bits, group_size=ctx.group_size)
    layer.backend = "triton"
    return layer


def _decode_ms(ctx: Context, model, tokens: int) -> float:
    """Eager ms per generated token at batch 1 after a 32-token prompt (KV cache)."""
    import torch
    from transformers import DynamicCache

    ids = torch.randint(0, model.config.vocab_size, (1, 4 if ctx.dry_run else 32), device=ctx.device)
    with torch.no_grad():
        cache = DynamicCache()
        out = model(input_ids=ids, past_key_values=cache, use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)
        _sync(ctx)
        start = time.perf_counter()
        for _ in range(tokens):
            out = model(input_ids=nxt, past_key_values=out.past_key_values, use_cache=True)
            nxt = out.logits[:, -1:].argmax(-1)
        _sync(ctx)
    return (time.perf_counter() - start) * 1e3 / tokens


def step_decode(ctx: Context) -> dict:
    """A LLaMA-7B-shaped model (random weights) decoding at batch 1, fp16 and with RTN 4-bit Linears."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float16)
    try:
        with torch.device(ctx.device):
            model = LlamaForCausalLM(_llama_config(ctx)).eval()
    finally:
        torch.set_default_dtype(default)
    tokens = 1 if ctx.dry_run else 32
    names = [name for name, mod in model.model.layers.named_modules() if isinstance(mod, torch.nn.Linear)]
    linears = [model.model.layers.get_submodule(name) for name in names]
    fp16_ms = _decode_ms(ctx, model, tokens)
    fp16_linears_us = _linears_us(ctx, linears, model.config)
    for name in names:  # replace every decoder Linear by its RTN-quantized QuantLinear
        parent, _, child = name.rpartition(".")
        module = model.model.layers.get_submodule(parent)
        setattr(module, child, _rtn_linear(getattr(module, child), ctx))
    quant_linears = [model.model.layers.get_submodule(name) for name in names]
    int4_ms = _decode_ms(ctx, model, tokens)
    int4_linears_us = _linears_us(ctx, quant_linears, model.config)
    return {
        "layers": model.config.num_hidden_layers,
        "linears": len(names),
        "tokens": tokens,
        "fp16_ms_per_token": fp16_ms,
        "int4_ms_per_token": int4_ms,
        "speedup": fp16_ms / int4_ms,
        "fp16_linears_us_per_token": fp16_linears_us,
        "int4_linears_us_per_token": int4_linears_us,
        "linears_speedup": fp16_linears_us / int4_linears_us,
    }


def _linears_us(ctx: Context, linears, config) -> float:
    """Device us of one pass over the decoder's Linears at M = 1 (one CUDA graph; the weights exceed L2)."""
    import torch

    inputs = {}
    for lin in linears:
        k = lin.in_features
        inputs.setdefault(k, torch.randn(1, k).to(torch.float16).to(ctx.device))

    def sweep(_):
        with torch.no_grad():
            for lin in linears:
                lin(inputs[lin.in_features])

    return device_us(ctx, sweep, 1, 1 if ctx.dry_run else 20)


# -- report ----------------------------------------------------------------------------------------------------
def _commit() -> str:
    try:
        run = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True)
        return run.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "") if run.returncode == 0 else "unknown"
    except OSError:
        return "unknown"


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _rows(report: dict, step: str) -> list[dict]:
    """A step's measured rows (none when it was skipped or failed; rows skipped for time left out)."""
    rows = report.get(step)
    return [r for r in rows if "skipped" not in r] if isinstance(rows, list) else []


def markdown(report: dict) -> str:
    meta = report["meta"]
    lines = [
        f"# gpu_check on {meta['device']}",
        "",
        f"{meta['date']} | commit {meta['commit']} | torch {meta['torch']} | triton {meta['triton']} | "
        f"{meta['seconds']:.0f} s" + (" | **dry run: CPU interpreter, times meaningless**" if meta["dry_run"] else ""),
        "",
        "## Correctness (max |kernel - reference| / max |reference|)",
        "",
        "| M | dtype | variant | kernel | error | limit | ok |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in _rows(report, "correctness"):
        lines.append(
            f"| {r['M']} | {r['dtype']} | {r['variant']} | {r['kernel']} | {r['max_rel_err']:.1e} | "
            f"{r['limit']:.1e} | {r['ok']} |"
        )
    lines += ["", "## Kernel alone vs full call (4-bit, group 128)", "", "| M | kernel | kernel us | call us |"]
    lines.append("|---|---|---|---|")
    for r in _rows(report, "timing"):
        lines.append(f"| {r['M']} | {r['kernel']} | {r['kernel_us']:.1f} | {r['call_us']:.1f} |")
    lines += ["", "## gemv configs against the load-only probe", "", "| M | config | kernel us | probe us | ratio |"]
    lines.append("|---|---|---|---|---|")
    for r in _rows(report, "probe"):
        lines.append(
            f"| {r['M']} | {r['config']} | {r['kernel_us']:.1f} | {r['probe_us']:.1f} | {r['kernel_over_probe']:.2f} |"
        )
    lines += [
        "",
        "## Autotuned kernels vs cuBLAS fp16 (predicted: kernel_static's model for the same config, H100)",
        "",
        "| shape | M | us | fp16 us | x fp16 | GB/s | HBM | predicted us | predicted x fp16 | config |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in _rows(report, "table"):
        lines.append(
            f"| {r['shape']} | {r['M']} | {r['us']:.1f} | {r['fp16_us']:.1f} | {r['speedup_vs_fp16']:.2f} | "
            f"{r['gbps']:.0f} | {_fmt(r['hbm_fraction'], '.0%')} | {_fmt(r['predicted_us_h100'], '.1f')} | "
            f"{_fmt(r['predicted_speedup_h100'], '.2f')} | {r['config']} |"
        )
    q = report.get("quantize")
    if q and "skipped" not in q:
        lines += [
            "",
            "## tiny-zh-llama quantized on " + " and ".join(q["devices"]),
            "",
            f"identical packed words: {q['identical_packed_words']:.4f}; largest relative scale difference: "
            f"{q['max_rel_scale_diff']:.2e}; seconds: {q['seconds']}",
        ]
    d = report.get("decode")
    if d and "skipped" not in d:
        lines += [
            "",
            f"## Decode at batch 1, LLaMA-7B shape ({d['layers']} layers, {d['linears']} Linears, random weights)",
            "",
            "| | fp16 | 4-bit RTN (Triton) | speedup |",
            "|---|---|---|---|",
            f"| eager ms/token | {d['fp16_ms_per_token']:.2f} | {d['int4_ms_per_token']:.2f} | {d['speedup']:.2f} |",
            f"| Linears us/token (CUDA graph) | {d['fp16_linears_us_per_token']:.0f} | "
            f"{d['int4_linears_us_per_token']:.0f} | {d['linears_speedup']:.2f} |",
        ]
    skipped = [step for step in STEPS if isinstance(report.get(step), dict) and "skipped" in report[step]]
    if skipped:
        lines += ["", "Skipped for time: " + ", ".join(skipped)]
    if report.get("errors"):
        lines += ["", "## Steps that failed", ""] + [f"- {k}: {v}" for k, v in report["errors"].items()]
    return "\n".join(lines) + "\n"


def run(dry_run: bool, out_dir: Path | None, steps: list[str]) -> tuple[dict, Path]:
    if dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is first imported
    import torch
    import triton

    if not dry_run and not torch.cuda.is_available():
        raise GptqlabError("gpu_check needs a CUDA GPU; use --dry-run to run the plumbing on the CPU")
    ctx = Context(dry_run=dry_run, device="cpu" if dry_run else "cuda", started=time.time())
    name = "cpu-interpreter" if dry_run else torch.cuda.get_device_name()
    peak = None if dry_run else hbm_peak(name)
    out_dir = out_dir or ROOT / "benchmarks" / "results" / name.lower().replace(" ", "-")
    report: dict = {"errors": {}}
    actions = {
        "correctness": lambda: step_correctness(ctx),
        "timing": lambda: step_timing(ctx),
        "probe": lambda: step_probe(ctx),
        "table": lambda: step_table(ctx, peak),
        "quantize": lambda: step_quantize(ctx),
        "decode": lambda: step_decode(ctx),
    }
    least = {"quantize": 60, "decode": 90}  # seconds a step needs at least; skipped when less is left
    for step in steps:
        print(f"[{time.time() - ctx.started:6.1f} s] {step}", file=sys.stderr, flush=True)
        if not dry_run and ctx.left() < least.get(step, 30):
            report[step] = {"skipped": f"time budget: {ctx.left():.0f} s left of {ctx.budget_s:.0f}"}
            continue
        try:
            report[step] = actions[step]()
        except Exception as exc:  # one failed step must not lose the others' results
            report["errors"][step] = f"{type(exc).__name__}: {exc}"[:2000]
    report["meta"] = {
        "device": name,
        "dry_run": dry_run,
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": _commit(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "hbm_bytes_per_s": peak,
        "bits": ctx.bits,
        "group_size": ctx.group_size,
        "seconds": time.time() - ctx.started,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    (out_dir / "gpu_check.md").write_text(markdown(report))
    return report, out_dir


STEPS = ["correctness", "timing", "probe", "table", "quantize", "decode"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gptqlab.benchmarks.gpu_check",
        description="Correctness, kernel timings, config sweep against a load-only probe, cuBLAS comparison, "
        "CUDA-vs-CPU quantization and 7B decode, in one run of at most 8 minutes on an H100/H200.",
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="run every step on the CPU at tiny sizes under the Triton interpreter"
    )
    parser.add_argument(
        "--out-dir",
        type=Path,
        default=None,
        help="where to write gpu_check.json/.md (default: benchmarks/results/<gpu>/)",
    )
    parser.add_argument(
        "--steps", nargs="+", choices=STEPS, default=STEPS, help="steps to run (default: all, in order)"
    )
    args = parser.parse_args(argv)
    try:
        report, out_dir = run(args.dry_run, args.out_dir, args.steps)
    except GptqlabError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(markdown(report))
    print(f"wrote {out_dir / 'gpu_check.json'} and {out_dir / 'gpu_check.md'}")
    failed = [r for r in _rows(report, "correctness") if not r["ok"]]
    if report["errors"] or failed:
        print(f"{len(report['errors'])} step(s) failed, {len(failed)} correctness check(s) failed", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
