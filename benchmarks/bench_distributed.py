"""Quantize LLaMA decoder layers on N ranks (torchrun, gloo) and on one process; wall time, speedup, and
whether the N-rank result is bit-equal to the single-process one.

    python -m gptqlab.benchmarks.bench_distributed [--hidden 1024] [--layers 1] [--nsamples 16] [--seqlen 256]
        [--chunk 2] [--ranks 2] [--repeats 2] [--json FILE] [--end-to-end]

By default the building blocks of :mod:`gptqlab.quantize.distributed` run a stripped copy of the driver's
layer-wise loop (no model files, calibration or checkpoint writing, so the distributed part is timed
alone, with a phase breakdown): calibration samples are cut into chunks of ``--chunk`` samples; each rank runs its
chunks through each stage of a block with a hook that adds X_cᵀ X_c to a :class:`HessianSum` (one per
stage: the Linears of a LLaMA stage read the same input); the Hessian is reduced to the owners of the
stage's Linears; every rank solves its own Linears (GPTQ) and receives the others'; and
after each block rank 0 gathers every sample's output, as it will to write the progress folder. The layers
are transformers' LlamaDecoderLayer with random weights (seed 0) at ``--hidden`` widths, the inputs random
hidden states: no model files, no tokenizer, no checkpoint writing.

With ``--end-to-end`` the real command runs instead: ``gptqlab quantize`` on a random LLaMA folder of those
widths (``--layers`` blocks, fp16 weights, the news tokenizer of ``quantize_7b_layers``, peoples-daily
calibration), one process against ``torchrun --nproc-per-node N -m gptqlab quantize``, alternately, every
process on one thread. Timed: launch to exit, the run's own ``seconds`` from its quant_report.json
(model loading and calibration included), and the CPU seconds of all its processes (on a shared machine,
2 ranks can only be faster when 2 cores are free: compare the load average printed with each run); the
checkpoints' tensors are compared by a SHA-256 over all of them in name order.

Three configurations run alternately, ``--repeats`` times each (a shared machine is noisy): one process
with one thread (the bit-exact reference), one process with ``--ranks`` threads (what a single run gets
from the same cores), and ``--ranks`` ranks with one thread each, started by torchrun. Timed inside the
workers from after start-up (process group, layers and inputs built) to the last block: forward passes with
Hessian updates, Hessian reduction, solves with result sharing, gathering; and each rank's CPU seconds over
the same span (on a machine that other jobs share, the largest of them is a better guide than wall time to
what the configuration takes on idle cores). Reported: medians, speedups, and a SHA-256 over every Linear's
codes, scales, zeros and g_idx in block order.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

CONFIGS = ("1 process, 1 thread", "1 process, N threads", "N ranks, 1 thread each")
PHASES = ("forward", "reduce", "solve", "gather")


# ------------------------------------------------------------------------------------------------ worker


def _layers(args) -> tuple[list, object]:
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    cfg = LlamaConfig(
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        max_position_embeddings=max(2048, args.seqlen),
    )
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    layers = [LlamaDecoderLayer(cfg, layer_idx=i).eval() for i in range(args.layers)]
    return layers, LlamaRotaryEmbedding(cfg)


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def worker(args) -> None:
    """One rank (or the single process): quantize the layers, write timings and the digest (rank 0)."""
    from gptqlab.arch import ARCHS
    from gptqlab.quant import QuantConfig, dequantize_codes, gptq
    from gptqlab.quantize.distributed import Distributed, chunk_ranges

    ctx = Distributed.from_env("cpu")
    layers, rope = _layers(args)
    qcfg = QuantConfig(bits=args.bits, group_size=args.group_size)
    samples = torch.randn(args.nsamples, args.seqlen, args.hidden, generator=torch.Generator().manual_seed(1))
    chunks = chunk_ranges(args.nsamples, args.chunk)
    mine = ctx.my_chunks(len(chunks))
    inputs = [samples[chunks[c].start : chunks[c].stop] for c in mine]  # [b, seqlen, hidden] per own chunk
    position_ids = torch.arange(args.seqlen)[None]
    kwargs = {"position_ids": position_ids, "position_embeddings": rope(samples[:1], position_ids)}
    seconds = dict.fromkeys(PHASES, 0.0)
    digest = hashlib.sha256()

    def run(layer) -> list[torch.Tensor]:
        t0 = time.perf_counter()
        out = [_first(layer(x, **kwargs)) for x in inputs]
        seconds["forward"] += time.perf_counter() - t0
        return out

    with torch.no_grad():
        ctx.agree(json.dumps(vars(args), sort_keys=True), "benchmark settings")
        start, cpu_start = time.perf_counter(), time.process_time()
        for b, layer in enumerate(layers):
            modules = dict(layer.named_modules())
            for stage in ARCHS["llama"].stages:
                # The Linears of a LLaMA stage read the same input, so they share one Hessian.
                lins = [modules[n] for n in stage]
                acc = ctx.hessian(lins[0].in_features, len(chunks))
                hook = lins[0].register_forward_hook(lambda _m, a, _o, acc=acc: acc.add(a[0]))
                run(layer)
                hook.remove()
                owners = ctx.owners([(lin.out_features, lin.in_features) for lin in lins])
                names = [f"layers.{b}.{n}" for n in stage]
                t0 = time.perf_counter()
                H = acc.reduce(owners, names[0])
                seconds["reduce"] += time.perf_counter() - t0
                t0 = time.perf_counter()
                solves = [lambda lin=lin, H=H: gptq(lin.weight.data, H, qcfg) for lin in lins]
                results = [s.result for s in ctx.solve_stage(owners, solves, names)]
                seconds["solve"] += time.perf_counter() - t0
                for lin, res in zip(lins, results, strict=True):
                    Q = res.Q if res.Q is not None else dequantize_codes(res.codes, res.scales, res.zeros, res.g_idx)
                    lin.weight.data = Q.to(lin.weight.dtype)
                    for t in (res.codes, res.scales, res.zeros, res.g_idx):
                        digest.update(t.contiguous().cpu().numpy().tobytes())
            inputs = run(layer)
            t0 = time.perf_counter()
            everything = ctx.gather_inputs(inputs)
            seconds["gather"] += time.perf_counter() - t0
            if ctx.is_writer:
                assert sum(x.shape[0] for x in everything) == args.nsamples
        total = time.perf_counter() - start
        cpu = ctx.gather_inputs([torch.tensor([time.process_time() - cpu_start], dtype=torch.float64)])
    if ctx.is_writer:
        record = {
            "seconds": total,
            "phases": seconds,
            "cpu_seconds_per_rank": [float(t) for t in cpu],
            "digest": digest.hexdigest(),
            "world": ctx.world,
        }
        Path(args.result).write_text(json.dumps(record))
    ctx.close()


# ------------------------------------------------------------------------------------------------ parent


def _launch(args, config: str, result: Path) -> dict:
    """Run one configuration in fresh processes; returns the worker's record plus the launch-to-exit time."""
    flags = [
        f"--{k.replace('_', '-')}={v}"
        for k, v in vars(args).items()
        if k in ("hidden", "intermediate", "heads", "layers", "nsamples", "seqlen", "chunk", "bits", "group_size")
    ]
    worker_argv = ["-m", "gptqlab.benchmarks.bench_distributed", "--worker", f"--result={result}", *flags]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    if config == CONFIGS[2]:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.ranks}"]
        cmd += worker_argv
        env["OMP_NUM_THREADS"] = "1"
    else:
        cmd = [sys.executable, *worker_argv]
        env["OMP_NUM_THREADS"] = "1" if config == CONFIGS[0] else str(args.ranks)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{config} failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}{proc.stderr[-4000:]}")
    record = json.loads(result.read_text())
    record["wall"] = wall
    return record


E2E_CONFIGS = ("1 process", "N ranks (torchrun)")


def _tensors_digest(folder: Path) -> str:
    """SHA-256 over every tensor of a checkpoint (name, dtype, shape, bytes) in name order."""
    from safetensors import safe_open

    found = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            found.update({k: h.get_tensor(k) for k in h.keys()})
    h = hashlib.sha256()
    for k in sorted(found):
        t = found[k].contiguous()
        h.update(f"{k} {t.dtype} {tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def end_to_end(args) -> int:
    """``gptqlab quantize`` in one process against ``--ranks`` torchrun ranks on a random LLaMA folder."""
    from gptqlab.benchmarks.common import env_line, environment, table, write_json
    from gptqlab.benchmarks.quantize_7b_layers import write_random_llama

    env_info = environment(torch.device("cpu"))
    print(env_line(env_info))
    flags = ["--nsamples", args.nsamples, "--seqlen", args.seqlen, "--batch-size", args.chunk]
    flags += ["--bits", args.bits, "--group-size", args.group_size, "--calib", "peoples-daily", "-q"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    runs: dict[str, list[dict]] = {c: [] for c in E2E_CONFIGS}
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "model"
        write_random_llama(model, args.layers, hidden=args.hidden, intermediate=args.intermediate, heads=args.heads)
        for rep in range(args.repeats):
            for i, config in enumerate(E2E_CONFIGS):
                out = Path(tmp) / f"out-{rep}-{i}"
                cmd = [sys.executable]
                if i == 1:
                    cmd += ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.ranks}"]
                cmd += ["-m", "gptqlab", "quantize", str(model), str(out), *map(str, flags)]
                before = resource.getrusage(resource.RUSAGE_CHILDREN)
                t0 = time.perf_counter()
                proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
                wall = time.perf_counter() - t0
                after = resource.getrusage(resource.RUSAGE_CHILDREN)
                if proc.returncode != 0:
                    raise SystemExit(f"{config} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
                report = json.loads((out / "quant_report.json").read_text())
                cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
                record = {"wall": wall, "seconds": report["seconds"], "cpu": cpu, "digest": _tensors_digest(out)}
                runs[config].append(record)
                print(
                    f"  {config}: {wall:.1f} s wall, {report['seconds']:.1f} s run, {cpu:.1f} CPU s (run {rep + 1}); "
                    f"load average {os.getloadavg()[0]:.2f}",
                    flush=True,
                )
                shutil.rmtree(out)
    reference = runs[E2E_CONFIGS[0]][0]["digest"]
    base = statistics.median(r["wall"] for r in runs[E2E_CONFIGS[0]])
    base_run = statistics.median(r["seconds"] for r in runs[E2E_CONFIGS[0]])
    rows, summary = [], {}
    for config in E2E_CONFIGS:
        wall = statistics.median(r["wall"] for r in runs[config])
        secs = statistics.median(r["seconds"] for r in runs[config])
        equal = all(r["digest"] == reference for r in runs[config])
        name = config.replace("N", str(args.ranks))
        cpu = statistics.median(r["cpu"] for r in runs[config])
        summary[name] = {
            "wall": wall,
            "run_seconds": secs,
            "cpu_seconds_all_processes": cpu,
            "speedup_wall": base / wall,
            "speedup_run": base_run / secs,
            "bit_equal_to_1_process": equal,
            "runs": runs[config],
        }
        rows.append([name, wall, secs, cpu, base / wall, base_run / secs, equal])
    print(
        f"\ngptqlab quantize, random LLaMA: {args.layers} layer(s), hidden {args.hidden}, intermediate "
        f"{args.intermediate}; {args.nsamples} x {args.seqlen} tokens in batches of {args.chunk}; "
        f"GPTQ w{args.bits} g{args.group_size}; one thread per process"
    )
    headers = ["configuration", "wall s", "run s", "CPU s (all)", "speedup (wall)", "speedup (run)", "bit-equal"]
    print(table(headers, rows))
    if args.json:
        settings = {k: v for k, v in vars(args).items() if k not in ("json", "worker", "result")}
        out = {"env": env_info, "settings": settings, "mode": "end-to-end", "results": summary}
        print(f"wrote {write_json(args.json, out)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=1024, help="hidden size (default 1024)")
    parser.add_argument("--intermediate", type=int, default=2816, help="MLP width (default 2816, LLaMA's 11/4)")
    parser.add_argument("--heads", type=int, default=16, help="attention heads (default 16)")
    parser.add_argument("--layers", type=int, default=1, help="decoder layers (default 1)")
    parser.add_argument("--nsamples", type=int, default=16, help="calibration samples (default 16)")
    parser.add_argument("--seqlen", type=int, default=256, help="tokens per sample (default 256)")
    parser.add_argument("--chunk", type=int, default=2, help="samples per chunk, the forward batch (default 2)")
    parser.add_argument("--bits", type=int, default=4, help="code width (default 4)")
    parser.add_argument("--group-size", type=int, default=128, help="GPTQ group size (default 128)")
    parser.add_argument("--ranks", type=int, default=2, help="ranks, and threads of the multi-thread run (default 2)")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each configuration (default 2)")
    parser.add_argument("--json", default=None, help="write the results to this JSON file")
    parser.add_argument(
        "--end-to-end",
        action="store_true",
        help="time the real `gptqlab quantize` (1 process vs torchrun) on a random LLaMA folder instead",
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    if args.end_to_end:
        return end_to_end(args)

    from gptqlab.benchmarks.common import env_line, environment, table, write_json

    env = environment(torch.device("cpu"))
    print(env_line(env))
    runs: dict[str, list[dict]] = {c: [] for c in CONFIGS}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.repeats):
            for config in CONFIGS:
                record = _launch(args, config, Path(tmp) / f"{rep}-{CONFIGS.index(config)}.json")
                runs[config].append(record)
                print(f"  {config}: {record['seconds']:.2f} s (run {rep + 1}/{args.repeats})", flush=True)

    def median(config: str, key: str) -> float:
        return statistics.median(r[key] if key in r else r["phases"][key] for r in runs[config])

    base, threads, ranks = (median(c, "seconds") for c in CONFIGS)
    reference = runs[CONFIGS[0]][0]["digest"]
    rows = []
    summary = {}
    for config in CONFIGS:
        equal = all(r["digest"] == reference for r in runs[config])
        secs = median(config, "seconds")
        row = {
            "seconds": secs,
            "wall_with_startup": median(config, "wall"),
            **{p: median(config, p) for p in PHASES},
            "speedup_vs_1_thread": base / secs,
            "speedup_vs_n_threads": threads / secs,
            "max_rank_cpu_seconds": statistics.median(max(r["cpu_seconds_per_rank"]) for r in runs[config]),
            "bit_equal_to_1_thread": equal,
            "runs": runs[config],
        }
        summary[config.replace("N", str(args.ranks))] = row
        name = config.replace("N", str(args.ranks))
        rows.append([name, secs, *(row[p] for p in PHASES), row["max_rank_cpu_seconds"], base / secs, equal])
    print(
        f"\n{args.layers} LLaMA layer(s), hidden {args.hidden}, intermediate {args.intermediate}; "
        f"{args.nsamples} x {args.seqlen} tokens in chunks of {args.chunk}; GPTQ w{args.bits} g{args.group_size}"
    )
    print(table(["configuration", "seconds", *PHASES, "max rank CPU s", "speedup", "bit-equal"], rows))
    print(
        f"\n{args.ranks} ranks vs 1 process with 1 thread: {base / ranks:.2f}x; "
        f"vs 1 process with {args.ranks} threads: {threads / ranks:.2f}x (medians of {args.repeats})"
    )
    if args.json:
        settings = {k: v for k, v in vars(args).items() if k not in ("json", "worker", "result")}
        print(f"wrote {write_json(args.json, {'env': env, 'settings': settings, 'results': summary})}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
