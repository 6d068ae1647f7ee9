"""Quantize LLaMA-7B-shaped decoder layers through the real pipeline and extrapolate to all 32 layers.

    python -m gptqlab.benchmarks.quantize_7b_layers [--layers 2] [--nsamples 8] [--seqlen 128] [--json FILE]
    python -m gptqlab.benchmarks.quantize_7b_layers --solve [--inner 8,16,32] [--threads 2] [--json FILE]

A LLaMA-7B configuration (hidden 4096, intermediate 11008, 32 heads) with only ``--layers`` decoder layers
and random fp16 weights (normal, std 0.02; norms 1) is written as one safetensors shard per layer, with a
small BPE tokenizer trained on the built-in news text. ``gptqlab quantize`` then runs on it in a child
process (:mod:`gptqlab.benchmarks.quantize_worker`): lazy per-block loading, GPTQ, packing, writing.

Measured: the setup before the first block (config, embeddings, calibration), the seconds each block
takes (between the appearances of consecutive block files; their mean is the per-layer time), the
assembly after the last block, the GPTQ solve time per layer (quant_report.json), peak RSS of the
child, and peak CUDA memory on a GPU. Extrapolated to 32 layers:

    total(32) = setup + 32 * per_layer + assembly * 32 / layers

and to the usual 128 x 2048 calibration tokens, where the forward passes and Hessian updates (per_layer
minus the GPTQ solve) grow with the token count (attention's seqlen² term is ignored), the layer inputs
that the driver keeps take nsamples * seqlen * 4096 float16 values, and down_proj's Hessian partial sums
take one 11008² float32 matrix per level of the chunk tree (at most 16 chunks of forward batches).

Goals printed against: peak RSS on the CPU ≤ 4 GB; all of LLaMA-7B on one H100 in ≤ 5 minutes.

``--solve`` times the GPTQ solve alone on the two 7B Linear shapes (q_proj 4096 → 4096 and down_proj
11008 → 4096) with a Hessian of correlated random inputs: :func:`gptqlab.quant.gptq` for each ``--inner``
chunk width against :func:`gptqlab.quant.gptq_reference` (the reference algorithm), alternating, in one
run; it prints seconds, the ratio to the reference and the Hessian-weighted error of both.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch

HIDDEN, INTERMEDIATE, HEADS, FULL_LAYERS = 4096, 11008, 32, 32
TOKENIZER_VOCAB = 1024
GOAL_CPU_RSS_GB = 4.0
GOAL_H100_SECONDS = 300.0
TARGET_NSAMPLES, TARGET_SEQLEN = 128, 2048


def write_tokenizer(folder: Path) -> int:
    """A byte-level BPE tokenizer of ``TOKENIZER_VOCAB`` ids trained on news text; returns its size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from gptqlab.calib import builtin_texts

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB,
        special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(builtin_texts("peoples-daily")[:2000], trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", model_max_length=TARGET_SEQLEN
    )
    fast.save_pretrained(folder)
    return len(fast)


def write_random_llama(
    folder: Path,
    layers: int,
    seed: int = 0,
    hidden: int = HIDDEN,
    intermediate: int = INTERMEDIATE,
    heads: int = HEADS,
) -> None:
    """Config, tokenizer and random fp16 weights of a LLaMA model with ``layers`` layers (LLaMA-7B widths by
    default); one safetensors shard per decoder layer plus one for the embeddings, norm and lm_head (peak
    memory: one layer)."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    vocab = write_tokenizer(folder)
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        num_hidden_layers=layers,
        vocab_size=vocab,
        max_position_embeddings=TARGET_SEQLEN,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
        tie_word_embeddings=False,
        dtype="float16",
    )
    config.save_pretrained(folder)
    with torch.device("meta"):
        shapes = {name: tuple(p.shape) for name, p in LlamaForCausalLM(config).named_parameters()}
    groups = [[n for n in shapes if n.startswith(f"model.layers.{i}.")] for i in range(layers)]
    groups.append([n for n in shapes if not n.startswith("model.layers.")])
    gen = torch.Generator().manual_seed(seed)
    weight_map, total = {}, 0
    for index, names in enumerate(groups):
        shard = f"model-{index + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for name in names:
            shape = shapes[name]
            w = torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=gen) * 0.02
            tensors[name] = w.to(torch.float16)
            weight_map[name] = shard
            total += w.numel() * 2
        save_file(tensors, str(folder / shard), metadata={"format": "pt"})
        del tensors
    index_file = folder / "model.safetensors.index.json"
    index_file.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def layer_activations_gb(nsamples: int, seqlen: int) -> float:
    """The layer inputs the driver keeps between blocks: nsamples x seqlen x hidden in float16 (the output
    pass replaces them batch by batch, so inputs and outputs are not held at once)."""
    return nsamples * seqlen * HIDDEN * 2 / 1e9


def hessian_buffers_gb(nsamples: int, seqlen: int) -> float:
    """down_proj's Hessian buffers at their most, float32 intermediate x intermediate matrices: while summing,
    one partial sum per level of the chunk tree below the root plus the open chunk's (at most 16 chunks of
    forward batches, :mod:`gptqlab.quantize.distributed.tree`); while factoring, H and its working copy."""
    from types import SimpleNamespace

    from gptqlab.quantize.distributed.tree import root_level
    from gptqlab.quantize.driver import batch_size_for, hessian_chunks

    cfg = SimpleNamespace(hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_attention_heads=HEADS)
    _, _, num_chunks = hessian_chunks(nsamples, batch_size_for(SimpleNamespace(config=cfg), seqlen, nsamples))
    return max(root_level(num_chunks) + 1, 2) * INTERMEDIATE**2 * 4 / 1e9


def extrapolate(result: dict, layers: int, nsamples: int, seqlen: int, on_cuda: bool) -> dict:
    """The per-layer figures and the 32-layer and 128 x 2048 estimates described in the module docstring."""
    times = result["block_seconds"]
    total = result["seconds"]
    setup = result["setup_seconds"]
    if len(times) != layers or setup is None:
        raise RuntimeError(f"saw {len(times)} of {layers} block files appear; the per-layer times are unknown")
    per_layer = (times[-1] - setup) / layers
    assembly = total - times[-1]
    report = json.loads((Path(result["job"]["out"]) / "quant_report.json").read_text(encoding="utf-8"))
    gptq_per_layer = sum(r["seconds"] for r in report["layers"]) / layers
    token_ratio = TARGET_NSAMPLES * TARGET_SEQLEN / (nsamples * seqlen)
    per_layer_target = gptq_per_layer + (per_layer - gptq_per_layer) * token_ratio
    activations_gb = layer_activations_gb(nsamples, seqlen)
    target_activations_gb = layer_activations_gb(TARGET_NSAMPLES, TARGET_SEQLEN)
    hessians_gb = hessian_buffers_gb(nsamples, seqlen)
    target_hessians_gb = hessian_buffers_gb(TARGET_NSAMPLES, TARGET_SEQLEN)
    peak_gb = result["peak_rss_mb"] / 1e3
    return {
        "block_done_seconds": times,
        "per_layer_seconds": per_layer,
        "gptq_solve_per_layer_seconds": gptq_per_layer,
        "setup_seconds": setup,
        "assembly_seconds": assembly,
        "total_seconds": total,
        "total_32_layers_seconds": setup + FULL_LAYERS * per_layer + assembly * FULL_LAYERS / layers,
        "per_layer_at_128x2048_seconds": per_layer_target,
        "total_32_layers_at_128x2048_seconds": setup + FULL_LAYERS * per_layer_target + assembly * FULL_LAYERS / layers,
        "peak_rss_gb": peak_gb,
        "activations_gb": activations_gb,
        "peak_rss_at_128x2048_gb": peak_gb - activations_gb + target_activations_gb - hessians_gb + target_hessians_gb,
        "activations_at_128x2048_gb": target_activations_gb,
        "hessian_buffers_gb": hessians_gb,
        "hessian_buffers_at_128x2048_gb": target_hessians_gb,
        "cuda_peak_gb": result.get("cuda_peak_mb", 0) / 1e3 if on_cuda else None,
    }


def goals(est: dict, device_label: str) -> list[tuple[str, str, str]]:
    """(status, goal, numbers) for the two goals; a goal this device cannot measure is 'n/a'."""
    rss = est["peak_rss_gb"]
    rss_full = est["peak_rss_at_128x2048_gb"]
    out = []
    if device_label.startswith("cpu"):
        out.append(
            (
                "PASS" if rss <= GOAL_CPU_RSS_GB else "MISS",
                f"peak RSS on CPU <= {GOAL_CPU_RSS_GB:.0f} GB",
                f"measured {rss:.2f} GB at this calibration size; estimated {rss_full:.1f} GB at "
                f"{TARGET_NSAMPLES}x{TARGET_SEQLEN} tokens, of which {est['activations_at_128x2048_gb']:.1f} GB "
                f"are the float16 layer inputs and {est['hessian_buffers_at_128x2048_gb']:.1f} GB down_proj's "
                "Hessian partial sums (one per level of the chunk tree, at most 16 chunks of forward batches)",
            )
        )
    else:
        out.append(("n/a", f"peak RSS on CPU <= {GOAL_CPU_RSS_GB:.0f} GB", "this run is on a GPU"))
    minutes = est["total_32_layers_at_128x2048_seconds"] / 60
    if device_label == "h100":
        status = "PASS" if minutes * 60 <= GOAL_H100_SECONDS else "MISS"
        numbers = f"estimated {minutes:.1f} min for 32 layers at {TARGET_NSAMPLES}x{TARGET_SEQLEN} tokens"
    else:
        status = "n/a"
        numbers = f"not measured: this run is on {device_label}, not an H100 (estimate here: {minutes:.0f} min)"
    out.append((status, f"LLaMA-7B on one H100 in <= {GOAL_H100_SECONDS / 60:.0f} min", numbers))
    return out


SOLVE_SHAPES = (("q_proj", HIDDEN, HIDDEN), ("down_proj", HIDDEN, INTERMEDIATE))  # (name, N, K)


def solve_problem(N: int, K: int, device: torch.device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """W [N, K] (std 0.02) and H = 2/T XᵀX of T = 2K tokens whose channels share K/16 latent factors."""
    gen = torch.Generator().manual_seed(seed)
    T, r = 2 * K, K // 16
    X = torch.randn(T, r, generator=gen) @ torch.randn(r, K, generator=gen) / r**0.5
    X += 0.3 * torch.randn(T, K, generator=gen)
    H = 2 * X.T @ X / T
    return (torch.randn(N, K, generator=gen) * 0.02).to(device), H.to(device)


def bench_solve(inner: list[int], device: torch.device, bits: int, group_size: int) -> list[dict]:
    """Seconds of gptq (per inner width) and gptq_reference per Linear shape, alternating; see the docstring."""
    import time

    from gptqlab.benchmarks.common import synchronize
    from gptqlab.quant import QuantConfig, gptq, gptq_reference, weighted_error

    cfg = QuantConfig(bits=bits, group_size=group_size)
    rows = []
    for name, N, K in SOLVE_SHAPES:
        W, H = solve_problem(N, K, device)
        runs = [("reference", None), *((f"gptq b={b}", b) for b in inner)]
        for label, b in runs:
            synchronize(device)
            t0 = time.perf_counter()
            res = gptq_reference(W, H, cfg) if b is None else gptq(W, H, cfg, inner_block=b)
            synchronize(device)
            seconds = time.perf_counter() - t0
            loss = weighted_error(W, res.Q, H)
            rows.append({"linear": name, "N": N, "K": K, "solver": label, "seconds": seconds, "loss": loss})
            print(f"{name} [{N}x{K}] {label}: {seconds:.2f} s, weighted error {loss:.6g}", flush=True)
            del res
    for row in rows:
        ref = next(r for r in rows if r["linear"] == row["linear"] and r["solver"] == "reference")
        row["ratio_to_reference"] = row["seconds"] / ref["seconds"]
        row["loss_ratio_to_reference"] = row["loss"] / ref["loss"]
    return rows


def main(argv: list[str] | None = None) -> int:
    from gptqlab.benchmarks.common import env_line, environment, set_threads, table, write_json
    from gptqlab.benchmarks.quantize_worker import Job
    from gptqlab.resolve import resolve_device

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=2, help="decoder layers to build")
    parser.add_argument(
        "--nsamples",
        type=int,
        default=8,
        help="calibration sequences; small by default because a 7B layer with 128 x 2048 tokens takes most "
        "of an hour on 2 CPU cores",
    )
    parser.add_argument("--seqlen", type=int, default=128, help="tokens per calibration sequence (at most 2048)")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--calib", default="peoples-daily", help="calibration spec")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--work-dir", default=None, help="keep the model and checkpoint here (default: temp)")
    parser.add_argument("--json", default=None, help="write the results to this JSON file")
    parser.add_argument("--solve", action="store_true", help="time the GPTQ solve alone (see above)")
    parser.add_argument("--inner", default="16", help="with --solve: inner chunk widths to time, comma-separated")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args(argv)
    set_threads(args.threads)
    if args.solve:
        dev = resolve_device(args.device)
        env = environment(dev)
        print(env_line(env))
        inner = [int(x) for x in args.inner.split(",")]
        rows = bench_solve(inner, dev, args.bits, args.group_size)
        print(
            table(
                ["linear", "solver", "seconds", "x reference", "loss x reference"],
                [
                    [r["linear"], r["solver"], r["seconds"], r["ratio_to_reference"], r["loss_ratio_to_reference"]]
                    for r in rows
                ],
            )
        )
        if args.json:
            print(f"wrote {write_json(args.json, {'env': env, 'options': vars(args), 'solve': rows})}")
        return 0
    if args.layers < 1 or args.nsamples < 1 or not 1 <= args.seqlen <= TARGET_SEQLEN:
        parser.error("--layers and --nsamples must be positive and --seqlen in 1..2048")

    dev = resolve_device(args.device)
    env = environment(dev)
    print(env_line(env))
    print(
        f"LLaMA-7B shapes (hidden {HIDDEN}, intermediate {INTERMEDIATE}, {HEADS} heads), {args.layers} of "
        f"{FULL_LAYERS} layers, random weights; {args.bits}-bit g{args.group_size} GPTQ on {dev}; calibration "
        f"{args.nsamples} x {args.seqlen} tokens (small on purpose: a full {TARGET_NSAMPLES} x {TARGET_SEQLEN} "
        "run of one 7B layer is too slow for this CPU; the 128 x 2048 figures below are estimates)"
    )
    with tempfile.TemporaryDirectory(prefix="gptqlab-7b-") as tmp:
        work = Path(args.work_dir or tmp).resolve()
        model_dir, out = work / "llama-7b-shaped", work / "quantized"
        write_random_llama(model_dir, args.layers)
        job = Job(
            tool="gptqlab",
            method="gptq",
            model=str(model_dir),
            out=str(out),
            bits=args.bits,
            group_size=args.group_size,
            act_order=False,
            damp_percent=0.01,
            calib=args.calib,
            nsamples=args.nsamples,
            seqlen=args.seqlen,
            device=str(dev),
            scratch=str(work),
        )
        job_file, result_file = work / "job.json", work / "result.json"
        job_file.write_text(json.dumps(asdict(job)), encoding="utf-8")
        command = [sys.executable, "-m", "gptqlab.benchmarks.quantize_worker", str(job_file), str(result_file)]
        subprocess.run(command, check=True, env={**os.environ, "TQDM_DISABLE": "1"})
        result = json.loads(result_file.read_text(encoding="utf-8"))
        est = extrapolate(result, args.layers, args.nsamples, args.seqlen, dev.type == "cuda")

    done = est["block_done_seconds"]
    parts = result.get("blocks") or [{}] * len(done)
    steps = [
        [i, t, t - (done[i - 1] if i else est["setup_seconds"]), p.get("forward"), p.get("hessian"), p.get("solve")]
        for i, (t, p) in enumerate(zip(done, parts, strict=True))
    ]
    print(table(["block", "done at s", "seconds since previous", "forward s", "hessians s", "solve s"], steps))
    print(
        f"per layer {est['per_layer_seconds']:.1f} s (GPTQ solve {est['gptq_solve_per_layer_seconds']:.1f} s), "
        f"setup {est['setup_seconds']:.1f} s, assembly {est['assembly_seconds']:.1f} s, "
        f"total {est['total_seconds']:.1f} s"
    )
    print(
        f"32 layers: {est['total_32_layers_seconds'] / 60:.1f} min at {args.nsamples}x{args.seqlen} tokens; "
        f"about {est['total_32_layers_at_128x2048_seconds'] / 60:.0f} min at {TARGET_NSAMPLES}x{TARGET_SEQLEN}"
    )
    memory = f"peak RSS {est['peak_rss_gb']:.2f} GB (whole child process)"
    if est["cuda_peak_gb"] is not None:
        memory += f", peak CUDA memory {est['cuda_peak_gb']:.2f} GB"
    print(memory)
    checks = goals(est, env["device"])
    for status, goal, numbers in checks:
        print(f"{status}  {goal}: {numbers}")
    if args.json:
        options = {k: v for k, v in vars(args).items() if k != "json"}
        payload = {"env": env, "options": options, "result": result, "estimates": est}
        payload["goals"] = [{"status": s, "goal": g, "numbers": n} for s, g, n in checks]
        print(f"wrote {write_json(args.json, payload)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
