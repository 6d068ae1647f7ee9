"""``gptqlab bench latency``: prefill and decode speed of a model, and of its baseline in the same run.

For each batch size B, a prompt of ``prompt_len`` random token ids per row is run once with the KV cache
on (prefill), then ``gen_len`` single-token steps feed back the greedy token (decode). One untimed run
warms up (allocator, Triton autotuning); the figures are medians over ``repeats`` timed runs, with the
device synchronized around every timed region.

- ``prefill_ms``: the prompt's forward pass. ``decode_ms_per_token``: decode time / gen_len (one step
  produces B tokens). ``tokens_per_s``: B * gen_len / decode time.
- ``peak_mem_mb``: memory the runs add on top of the loaded weights (KV cache, activations, dequantized
  temporaries): CUDA max allocated, or the peak RSS growth on the CPU.
- ``backend``: what the quantized Linears ran on (Triton gemv/gemm or the torch reference).
"""

from __future__ import annotations

import gc
import json
import statistics
import time
from pathlib import Path

import torch

from gptqlab.benchmarks.common import (
    PeakMemory,
    check_positive,
    env_line,
    environment,
    set_threads,
    synchronize,
    table,
    write_json,
)
from gptqlab.benchmarks.eval_ppl import model_label
from gptqlab.errors import ConfigError
from gptqlab.resolve import resolve_device


def baseline_of(model: str) -> str | None:
    """The model a gptqlab checkpoint was quantized from, as its ``quant_report.json`` names it, if that
    model can still be found (an embedded name or an existing folder)."""
    from gptqlab.embedded import EMBEDDED_MODELS
    from gptqlab.resolve import resolve_model_dir

    report = Path(resolve_model_dir(model)) / "quant_report.json"
    if not report.is_file():
        return None
    info = json.loads(report.read_text(encoding="utf-8"))
    for candidate in (info.get("model"), info.get("model_dir")):
        if candidate and (candidate in EMBEDDED_MODELS or Path(candidate).is_dir()):
            return candidate
    return None


def backend_summary(model, batch_sizes: list[int], prompt_len: int) -> str:
    """Which implementation the model's Linears use: dense nn.Linear, or for QuantLinear layers the
    Triton kernels (gemm for prefill, gemv for decode up to 16 rows) or the torch reference."""
    from gptqlab.kernels import backend_for, kernel_for
    from gptqlab.qlinear import QuantLinear

    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    if not layers:
        return "dense (torch nn.Linear)"
    used = {backend_for(q.bits, q.qweight.device, q.backend, q.group_size) for q in layers}
    parts = []
    if "triton" in used:
        prefill = sorted({kernel_for(b * prompt_len) for b in batch_sizes})
        decode = sorted({kernel_for(b) for b in batch_sizes})
        parts.append(f"triton (prefill {'/'.join(prefill)}, decode {'/'.join(decode)})")
    if "torch" in used:
        parts.append("torch reference (dequantizes each layer per call)")
    bits = sorted({q.bits for q in layers})
    return f"{' + '.join(parts)}; {len(layers)} QuantLinear, {'/'.join(map(str, bits))}-bit"


def weights_mb(model) -> float:
    """Bytes held by the model's parameters and buffers (packed weights included), in MB."""
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values()) / 1e6


@torch.no_grad()
def _generate(model, ids: torch.Tensor, gen_len: int, device: torch.device) -> tuple[float, float]:
    """(prefill seconds, decode seconds) of one greedy generation; ids: [B, prompt_len]."""
    synchronize(device)
    start = time.perf_counter()
    out = model(input_ids=ids, use_cache=True)
    token = out.logits[:, -1].argmax(-1, keepdim=True)  # [B, 1]
    synchronize(device)
    prefilled = time.perf_counter()
    past = out.past_key_values
    for _ in range(gen_len):
        out = model(input_ids=token, past_key_values=past, use_cache=True)
        past = out.past_key_values
        token = out.logits[:, -1].argmax(-1, keepdim=True)
    synchronize(device)
    return prefilled - start, time.perf_counter() - prefilled


def measure(model, batch: int, prompt_len: int, gen_len: int, repeats: int, device: torch.device) -> dict:
    """Time one model at one batch size; returns the row fields described in the module docstring."""
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(batch)
    ids = torch.randint(3, vocab, (batch, prompt_len), generator=gen).to(device)  # ids 0-2: special tokens
    _generate(model, ids, gen_len, device)  # warm-up
    with PeakMemory(device) as mem:
        runs = [_generate(model, ids, gen_len, device) for _ in range(repeats)]
    prefill = statistics.median(r[0] for r in runs)
    decode = statistics.median(r[1] for r in runs)
    return {
        "batch_size": batch,
        "prompt_len": prompt_len,
        "gen_len": gen_len,
        "repeats": repeats,
        "prefill_ms": prefill * 1e3,
        "decode_ms_per_token": decode * 1e3 / gen_len,
        "tokens_per_s": batch * gen_len / decode,
        "peak_mem_mb": mem.peak_mb,
        "peak_mem_kind": mem.kind,
    }


def run(
    model: str,
    compare: str | None = "auto",
    batch_sizes: list[int] | None = None,
    prompt_len: int = 128,
    gen_len: int = 32,
    repeats: int = 5,
    device: str = "auto",
    backend: str = "auto",
    threads: int | None = None,
    json_path: str | None = None,
) -> dict:
    """Benchmark ``model`` and its baseline (``compare``: a model, "auto" for the one named in the
    checkpoint's quant_report.json, or None/"none"), print a table, and write JSON if asked."""
    import gptqlab
    from gptqlab.kernels import BACKENDS

    batch_sizes = batch_sizes or [1, 4, 16]
    for flag, value in (("--prompt-len", prompt_len), ("--gen-len", gen_len), ("--repeats", repeats)):
        check_positive(value, flag)
    if backend not in BACKENDS:
        raise ConfigError(f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    dev = resolve_device(device)
    set_threads(threads)
    baseline = baseline_of(model) if compare == "auto" else None if compare in (None, "none") else compare

    models = {}
    for role, path in (("model", model), ("baseline", baseline)):
        if path is not None:
            m = gptqlab.load(path, device=str(dev), backend=backend)
            context = getattr(m.config, "max_position_embeddings", None)
            if isinstance(context, int) and prompt_len + gen_len + 1 > context:
                raise ConfigError(
                    f"--prompt-len {prompt_len} + --gen-len {gen_len} exceed the context of {context} tokens of {path}"
                )
            models[role] = (path, m)

    env = environment(dev)
    rows = []
    for batch in batch_sizes:
        for role in ("baseline", "model"):  # baseline first: the quantized row then reads as a comparison
            if role not in models:
                continue
            path, m = models[role]
            row = {"model": model_label(path), "role": role, **measure(m, batch, prompt_len, gen_len, repeats, dev)}
            row["backend"] = backend_summary(m, [batch], prompt_len)
            row["weights_mb"] = weights_mb(m)
            rows.append(row)
    base = {r["batch_size"]: r for r in rows if r["role"] == "baseline"}
    for r in rows:
        b = base.get(r["batch_size"]) if r["role"] == "model" else None
        r["decode_speedup"] = b["decode_ms_per_token"] / r["decode_ms_per_token"] if b else None
        r["prefill_speedup"] = b["prefill_ms"] / r["prefill_ms"] if b else None

    print(env_line(env))
    for role, (path, m) in models.items():
        print(f"{role}: {path} — {backend_summary(m, batch_sizes, prompt_len)}, {weights_mb(m):.1f} MB of weights")
    print(f"prompt {prompt_len} tokens, {gen_len} decode steps, median of {repeats} after 1 warm-up")
    headers = ["model", "batch", "prefill ms", "decode ms/tok", "tok/s", "peak MB", "x decode", "x prefill"]
    keys = ["model", "batch_size", "prefill_ms", "decode_ms_per_token", "tokens_per_s", "peak_mem_mb"]
    print(table(headers, [[*(r[k] for k in keys), r["decode_speedup"], r["prefill_speedup"]] for r in rows]))
    print(f"peak MB: {rows[0]['peak_mem_kind']} during the timed runs, on top of the weights")
    result = {"env": env, "model": model, "baseline": baseline, "backend": backend, "rows": rows}
    if json_path is not None:
        print(f"wrote {write_json(json_path, result)}")
    del models
    gc.collect()
    return result
