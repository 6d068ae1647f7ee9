"""``gptqlab bench latency``: prefill and decode speed of a model, and of its baseline in the same run.

For each batch size B, a prompt of ``prompt_len`` random token ids per row is run once with the KV cache
on (prefill), then ``gen_len`` single-token steps feed back the greedy token (decode). One untimed run
warms up (allocator, Triton autotuning); the figures are medians over ``repeats`` timed runs, with the
device synchronized around every timed region.

- ``prefill_ms``: the prompt's forward pass. ``decode_ms_per_token``: decode time / gen_len (one step
  produces B tokens). ``tokens_per_s``: B * gen_len / decode time.
- ``peak_mem_mb``: memory the runs add on top of the loaded weights (KV cache, activations, dequantized
  temporaries): CUDA max allocated, or the peak RSS growth on the CPU.
- ``backend``: what the quantized Linears ran on (Triton gemv/gemm, the CPU int4 kernel, or the torch
  reference).

Roles, all timed alternately run by run in one process: ``baseline`` (the unquantized model, fp32 on the
CPU) and ``model`` (the checkpoint through ``gptqlab.load`` with its defaults). On the CPU also:
``baseline-bf16`` (the baseline in bf16), ``model-bf16`` (the checkpoint loaded with
``dtype=torch.bfloat16``) and, where GPTQModel is installed, ``gptqmodel`` (the same checkpoint through
``GPTQModel.load(device="cpu")``, its default kernel). ``decode_vs_<role>`` is that role's decode time
over ours; ``memory`` holds each load's RSS growth and, for gptqlab checkpoints, the bytes the quantized
layers hold against the same layers in bf16.
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
    rss_mb,
    set_threads,
    synchronize,
    table,
    write_json,
)
from gptqlab.errors import ConfigError
from gptqlab.evaluate import model_label
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
        kinds = sorted({type(m).__name__ for m in model.modules() if "Linear" in type(m).__name__} - {"Linear"})
        if kinds:
            return f"GPTQModel {'/'.join(kinds)}"
        return f"dense (torch nn.Linear, {str(next(model.parameters()).dtype).removeprefix('torch.')})"
    on_cpu_kernel = [q for q in layers if q.cpu_group is not None]
    used = {backend_for(q.bits, q.qweight.device, q.backend, q.group_size) for q in layers if q.cpu_group is None}
    parts = []
    if on_cpu_kernel:
        from gptqlab.kernels.cpu import DENSE_MIN_ROWS

        parts.append(f"CPU int4 kernel (dequantized bf16 tiles from {DENSE_MIN_ROWS} rows) on {len(on_cpu_kernel)}")
    if "triton" in used:
        prefill = sorted({kernel_for(b * prompt_len) for b in batch_sizes})
        decode = sorted({kernel_for(b) for b in batch_sizes})
        parts.append(f"triton (prefill {'/'.join(prefill)}, decode {'/'.join(decode)})")
    if "torch" in used:
        parts.append("torch reference (dequantizes each layer per call)")
    bits = sorted({q.bits for q in layers})
    return f"{' + '.join(parts)}; {len(layers)} QuantLinear, {'/'.join(map(str, bits))}-bit"


def write_random_llama(
    folder: str | Path, hidden: int = 2048, intermediate: int = 5504, layers: int = 8, vocab: int = 32000
) -> Path:
    """A random LLaMA in fp16 for CPU decode benchmarks (the shape of issue 10: hidden 2048, intermediate
    5504, vocab 32000), with the small news tokenizer of ``quantize_7b_layers`` for calibration (token ids
    beyond its size are never produced by it, which is fine for RTN and for timing)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from gptqlab.benchmarks.quantize_7b_layers import write_tokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_tokenizer(folder)
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_attention_heads=hidden // 128,
        num_key_value_heads=hidden // 128,
        num_hidden_layers=layers,
        vocab_size=vocab,
        max_position_embeddings=2048,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.float16)
    model.save_pretrained(folder)
    return folder


def quantized_layer_memory(model) -> dict | None:
    """Bytes the model's QuantLinear layers hold after load against the same layers in bf16; None when
    the model has none. ``ratio`` is the figure of issue 10's memory target (at most 0.35)."""
    from gptqlab.qlinear import QuantLinear

    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    if not layers:
        return None
    held = sum(m.packed_nbytes() for m in layers)
    bf16 = sum(m.in_features * m.out_features * 2 for m in layers)
    return {"quantized_layers_mb": held / 1e6, "bf16_mb": bf16 / 1e6, "ratio": held / bf16}


def load_gptqmodel(path: str):
    """The same checkpoint through GPTQModel on the CPU with its default kernel choice (``backend=auto``),
    run in a temporary directory (GPTQModel writes ./logs) with GPTQMODEL_CPU_WORKERS=2; returns the
    transformers model inside. None when GPTQModel is not installed."""
    import importlib.util

    if importlib.util.find_spec("gptqmodel") is None:
        return None
    from gptqlab.benchmarks.bench_kernels import _scratch_dir

    with _scratch_dir():
        from gptqmodel import GPTQModel

        return GPTQModel.load(str(path), device="cpu").model.eval()


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


def measure(
    models: dict[str, object], batch: int, prompt_len: int, gen_len: int, repeats: int, device: torch.device
) -> dict[str, dict]:
    """Time several models at one batch size, alternating them run by run so that load from other
    processes falls on all alike; returns {role: the row fields described in the module docstring}."""
    vocab = min(m.config.vocab_size for m in models.values())
    gen = torch.Generator().manual_seed(batch)
    ids = torch.randint(3, vocab, (batch, prompt_len), generator=gen).to(device)  # ids 0-2: special tokens
    runs: dict[str, list[tuple[float, float]]] = {role: [] for role in models}
    peaks: dict[str, float] = dict.fromkeys(models, 0.0)
    kind = ""
    for m in models.values():
        _generate(m, ids, gen_len, device)  # warm-up
    for _ in range(repeats):
        for role, m in models.items():
            with PeakMemory(device) as mem:
                runs[role].append(_generate(m, ids, gen_len, device))
            peaks[role], kind = max(peaks[role], mem.peak_mb), mem.kind
    rows = {}
    for role, timed in runs.items():
        prefill = statistics.median(r[0] for r in timed)
        decode = statistics.median(r[1] for r in timed)
        rows[role] = {
            "batch_size": batch,
            "prompt_len": prompt_len,
            "gen_len": gen_len,
            "repeats": repeats,
            "prefill_ms": prefill * 1e3,
            "decode_ms_per_token": decode * 1e3 / gen_len,
            "tokens_per_s": batch * gen_len / decode,
            "peak_mem_mb": peaks[role],
            "peak_mem_kind": kind,
        }
    return rows


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
    from gptqlab.kernels import BACKENDS
    from gptqlab.loader import load  # gptqlab.load without the threads argument (yet)

    batch_sizes = batch_sizes or [1, 4, 16]
    for flag, value in (("--prompt-len", prompt_len), ("--gen-len", gen_len), ("--repeats", repeats)):
        check_positive(value, flag)
    if backend not in BACKENDS:
        raise ConfigError(f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    dev = resolve_device(device)
    set_threads(threads)
    baseline = baseline_of(model) if compare == "auto" else None if compare in (None, "none") else compare

    on_cpu = dev.type == "cpu"
    loads = [("baseline", baseline, None), ("model", model, None)]
    if on_cpu and baseline is not None:
        loads.insert(1, ("baseline-bf16", baseline, torch.bfloat16))
    if on_cpu:  # the same checkpoint with bf16 activations and unquantized weights (dtype=torch.bfloat16)
        loads.append(("model-bf16", model, torch.bfloat16))
    models, memory = {}, {}
    for role, path, dtype in loads:
        if path is None or (role == "model-bf16" and memory["model"]["layers"] is None):
            continue  # model-bf16 only for a GPTQ checkpoint
        before = rss_mb()
        m = load(path, device=str(dev), backend=backend, dtype=dtype, threads=threads)
        memory[role] = {"rss_growth_mb": rss_mb() - before, "layers": quantized_layer_memory(m)}
        context = getattr(m.config, "max_position_embeddings", None)
        if isinstance(context, int) and prompt_len + gen_len + 1 > context:
            raise ConfigError(
                f"--prompt-len {prompt_len} + --gen-len {gen_len} exceed the context of {context} tokens of {path}"
            )
        models[role] = (path, m)
    if on_cpu and memory["model"]["layers"] is not None:
        threads_now = torch.get_num_threads()
        before = rss_mb()
        theirs = load_gptqmodel(model)
        torch.set_num_threads(threads_now)  # GPTQModel may change it; compare at the same count
        if theirs is not None:
            memory["gptqmodel"] = {"rss_growth_mb": rss_mb() - before, "layers": None}
            models["gptqmodel"] = (model, theirs)

    env = environment(dev)
    rows = []
    for batch in batch_sizes:
        timed = measure({role: m for role, (_, m) in models.items()}, batch, prompt_len, gen_len, repeats, dev)
        for role, (path, m) in models.items():
            row = {"model": model_label(path), "role": role, **timed[role]}
            row["backend"] = backend_summary(m, [batch], prompt_len)
            row["weights_mb"] = weights_mb(m)
            row.update(memory[role])
            rows.append(row)
    by_role = {(r["role"], r["batch_size"]): r for r in rows}
    for r in rows:
        ours = r["role"] in ("model", "model-bf16")
        b = by_role.get(("baseline", r["batch_size"])) if ours else None
        r["decode_speedup"] = b["decode_ms_per_token"] / r["decode_ms_per_token"] if b else None
        r["prefill_speedup"] = b["prefill_ms"] / r["prefill_ms"] if b else None
        for other in ("baseline-bf16", "gptqmodel"):
            o = by_role.get((other, r["batch_size"])) if ours else None
            r[f"decode_vs_{other}"] = o["decode_ms_per_token"] / r["decode_ms_per_token"] if o else None

    print(env_line(env))
    for role, (path, m) in models.items():
        print(f"{role}: {path} — {backend_summary(m, batch_sizes, prompt_len)}, {weights_mb(m):.1f} MB of weights")
    print(f"prompt {prompt_len} tokens, {gen_len} decode steps, median of {repeats} after 1 warm-up")
    headers = ["model", "role", "batch", "prefill ms", "decode ms/tok", "tok/s", "peak MB", "x decode", "x prefill"]
    headers += ["x bf16", "x GPTQModel"]
    keys = ["model", "role", "batch_size", "prefill_ms", "decode_ms_per_token", "tokens_per_s", "peak_mem_mb"]
    keys += ["decode_speedup", "prefill_speedup", "decode_vs_baseline-bf16", "decode_vs_gptqmodel"]
    print(table(headers, [[r[k] for k in keys] for r in rows]))
    layers = memory.get("model", {}).get("layers")
    if layers:
        print(
            f"quantized layers hold {layers['quantized_layers_mb']:.1f} MB after load, "
            f"{layers['ratio']:.3f}x their {layers['bf16_mb']:.1f} MB in bf16"
        )
    print(f"peak MB: {rows[0]['peak_mem_kind']} during the timed runs, on top of the weights")
    result = {"env": env, "model": model, "baseline": baseline, "backend": backend, "memory": memory, "rows": rows}
    if json_path is not None:
        print(f"wrote {write_json(json_path, result)}")
    del models
    gc.collect()
    return result


def thread_sweep(
    model: str,
    thread_counts: tuple[int, ...] = (1, 2),
    prompt_len: int = 32,
    gen_len: int = 16,
    repeats: int = 5,
    json_path: str | None = None,
) -> dict:
    """Greedy decode at batch 1 of one model on the CPU at each thread count, alternating the counts run by
    run in one process (the evidence behind ``gptqlab.loader.CPU_THREADS``); prints and returns the rows."""
    from gptqlab.loader import load

    dev = torch.device("cpu")
    m = load(model, device="cpu", threads=thread_counts[0])
    ids = torch.randint(3, m.config.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(0))
    runs: dict[int, list[tuple[float, float]]] = {t: [] for t in thread_counts}
    for t in thread_counts:
        torch.set_num_threads(t)
        _generate(m, ids, gen_len, dev)  # warm-up
    for _ in range(repeats):
        for t in thread_counts:
            torch.set_num_threads(t)
            runs[t].append(_generate(m, ids, gen_len, dev))
    rows = []
    for t, timed in runs.items():
        decode = statistics.median(r[1] for r in timed)
        prefill = statistics.median(r[0] for r in timed)
        rows.append(
            {
                "threads": t,
                "prefill_ms": prefill * 1e3,
                "decode_ms_per_token": decode * 1e3 / gen_len,
                "tokens_per_s": gen_len / decode,
            }
        )
    env = environment(dev)
    print(env_line(env))
    headers = ["threads", "prefill ms", "decode ms/tok", "tok/s"]
    print(
        table(headers, [[r[k] for k in ("threads", "prefill_ms", "decode_ms_per_token", "tokens_per_s")] for r in rows])
    )
    result = {
        "env": env,
        "model": model,
        "backend": backend_summary(m, [1], prompt_len),
        "prompt_len": prompt_len,
        "gen_len": gen_len,
        "repeats": repeats,
        "rows": rows,
    }
    if json_path is not None:
        print(f"wrote {write_json(json_path, result)}")
    return result
