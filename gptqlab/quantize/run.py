"""``gptqlab quantize``: resolve the model, sample calibration data, run the layer-wise driver, and write
the checkpoint.

All input is validated before anything is written. Progress lives in ``OUT.partial/``, and the final
folder is assembled there and renamed to OUT at the very end.
"""

from __future__ import annotations

import logging
import os
import platform
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import safe_open

from gptqlab import __version__
from gptqlab.arch import arch_for, block_list
from gptqlab.checkpoint.format import quantize_config_dict, to_checkpoint
from gptqlab.checkpoint.write import publish, save_atomic, write_json, write_manifest, write_shards
from gptqlab.errors import ConfigError, GptqlabError
from gptqlab.evaluate import model_context_length
from gptqlab.modelfiles import materialize, model_config, model_skeleton, open_weights
from gptqlab.quantize.driver import LayerReport, QuantizedLinear, quantize_model
from gptqlab.quantize.options import QuantizeOptions, parse_size
from gptqlab.quantize.progress import PartialRun, partial_dir, run_record, write_error
from gptqlab.resolve import resolve_device, resolve_model_dir

log = logging.getLogger("gptqlab")

DEFAULT_SEQLEN = 2048
# Test-only hook: seconds to sleep after each block is quantized and before it is saved, so that
# tests/test_resume.py can kill a run in the middle of a block. Never set it otherwise.
SLOW_BLOCK_ENV = "GPTQLAB_TEST_SLOW_BLOCK"


def model_context(config, tokenizer) -> int | None:
    """The longest sequence the model was built for: its config's limit, else the tokenizer's, or None when
    neither sets one (ALiBi)."""
    context = model_context_length(config)
    if context is not None:
        return context
    limit = getattr(tokenizer, "model_max_length", None)
    return limit if isinstance(limit, int) and 0 < limit < 1_000_000 else None


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise GptqlabError(f"output {out} already exists; pass --overwrite to replace it")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.exists():
        raise GptqlabError(f"cannot create output {out}: folder {parent} does not exist")
    if not parent.is_dir():
        raise GptqlabError(f"cannot create output {out}: {parent} is a file, not a folder")
    partial = partial_dir(out)
    if partial.exists() and not partial.is_dir():
        raise GptqlabError(f"{partial} is in the way: it is a file, but gptqlab keeps its progress there; move it")
    # os.access says yes to root even on a read-only mount, so try for real.
    try:
        Path(tempfile.mkdtemp(prefix=f".{out.name}.probe-", dir=parent)).rmdir()
    except OSError as exc:
        raise GptqlabError(
            f"cannot create output {out}: folder {parent} is not writable ({exc.strerror}); choose another OUT"
        ) from None


def _test_pause() -> None:
    seconds = os.environ.get(SLOW_BLOCK_ENV)
    if seconds:
        time.sleep(float(seconds))


def _block_tensors(block, prefix: str, done: dict[str, QuantizedLinear], bits: int, fmt: str) -> dict:
    tensors = {}
    for n, q in done.items():
        for key, t in to_checkpoint(q.result, bits, fmt, q.bias).items():
            tensors[f"{prefix}.{n}.{key}"] = t
    quantized = {f"{n}.{p}" for n in done for p in ("weight", "bias")}
    for name, p in block.named_parameters():
        if name not in quantized:
            tensors[f"{prefix}.{name}"] = p.detach().to("cpu", torch.float16).contiguous()
    return tensors


def _iter_partial(files: list[Path]):
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():
                yield k, h.get_tensor(k)


def quantize(opts: QuantizeOptions) -> Path:
    """Run ``gptqlab quantize``; returns the output folder."""
    from transformers import AutoTokenizer

    from gptqlab.calib import load_calibration

    started = time.time()
    out = Path(opts.out).expanduser()
    _check_out(out, opts.overwrite)
    model_dir = resolve_model_dir(opts.model)
    device = resolve_device(opts.device)
    config = model_config(model_dir, opts.trust_remote_code)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=opts.trust_remote_code)
    except Exception as exc:  # tokenizer files fail in many ways: OSError, ValueError, JSON and Rust errors
        if "trust_remote_code" in str(exc):
            raise GptqlabError(
                f"the tokenizer of {opts.model} runs custom code; pass --trust-remote-code if you trust it"
            ) from exc
        raise GptqlabError(f"cannot load the tokenizer of {opts.model}: {type(exc).__name__}") from exc

    context = model_context(config, tokenizer)
    seqlen = opts.seqlen
    if seqlen is None:
        seqlen = min(DEFAULT_SEQLEN, context or DEFAULT_SEQLEN)
    elif context is not None and seqlen > context:
        raise GptqlabError(f"--seqlen {seqlen} is longer than the model's context of {context} tokens")

    model = model_skeleton(config, opts.trust_remote_code)
    model.eval()
    arch = arch_for(model)
    blocks = block_list(model, arch)
    for n in arch.linears:
        lin = blocks[0].get_submodule(n)
        try:
            opts.quant.group_size_for(lin.in_features)
        except ConfigError as exc:
            raise ConfigError(f"layer {n}: {exc}") from exc

    calib = load_calibration(opts.calib, tokenizer, opts.nsamples, seqlen, opts.seed)
    if opts.progress:
        print(calib.summary())

    weights = open_weights(model_dir, prefix=model.base_model_prefix, model=model)
    dtype = torch.float32 if device.type == "cpu" else torch.float16
    block_prefix = arch.blocks + "."
    for name, p in list(model.named_parameters()):
        if not name.startswith(block_prefix) and p.device.type == "meta" and name in weights:
            owner, _, _ = name.rpartition(".")
            materialize(model.get_submodule(owner), owner, weights, "cpu", dtype)
    _tie_output_embeddings(model)

    run = PartialRun(out)
    record = run_record(opts, model_dir, calib.input_ids, device, dtype, len(blocks))
    run.open(record, opts.resume)
    resumed_at = run.finished

    def on_block(i: int, block, done: dict[str, QuantizedLinear], outputs: list) -> None:
        _test_pause()
        tensors = _block_tensors(block, f"{arch.blocks}.{i}", done, opts.bits, opts.format)
        run.save_block(i, tensors, [q.report for q in done.values()], outputs)

    try:
        run.start(record)
        quantize_model(
            model,
            calib.input_ids,
            opts.quant,
            method=opts.method,
            device=device,
            dtype=dtype,
            weights=weights,
            on_block=on_block,
            progress=opts.progress,
            start=run.finished,
            inputs=run.inputs,
        )
        staging = run.folder / "final"
        staging.mkdir()
        rest = {}
        tied = _tied(model)
        for name, p in model.named_parameters():
            if not name.startswith(block_prefix) and not (tied and name == "lm_head.weight"):
                rest[name] = p.detach().to("cpu", torch.float16).contiguous()
        save_atomic(rest, run.blocks / "rest.safetensors", metadata={"format": "pt"})
        files = [*(run.block_file(i) for i in range(len(blocks))), run.blocks / "rest.safetensors"]
        write_shards(staging, _iter_partial(files), parse_size(opts.max_shard_size))
        _write_configs(staging, model_dir, config, tokenizer, opts)
        report = _report(opts, model_dir, calib, run.reports, device, started) | {"resumed_at_block": resumed_at}
        write_json(staging / "quant_report.json", report)
        write_manifest(staging)
        publish(staging, out, opts.overwrite)
    except GptqlabError:
        run.discard()  # the input is bad: fixing it changes the model or the settings, so nothing is resumable
        raise
    except OSError as exc:
        raise write_error(exc, run) from exc
    except BaseException:
        if run.finished:
            log.warning("%d finished blocks are kept in %s; rerun the same command to resume", run.finished, run.folder)
        raise
    run.discard()
    return out


def _tied(model) -> bool:
    out_emb = model.get_output_embeddings()
    in_emb = model.get_input_embeddings()
    return out_emb is not None and out_emb.weight is in_emb.weight


def _tie_output_embeddings(model) -> None:
    out_emb = model.get_output_embeddings()
    if out_emb is not None and out_emb.weight.device.type == "meta":
        if not getattr(model.config, "tie_word_embeddings", False):
            raise GptqlabError("the checkpoint has no lm_head weights and the config does not tie them")
        out_emb.weight = model.get_input_embeddings().weight


def _write_configs(staging: Path, model_dir: Path, config, tokenizer, opts: QuantizeOptions) -> None:
    qdict = quantize_config_dict(opts.quant, opts.method)
    write_json(staging / "quantize_config.json", qdict)
    cfg = config.to_dict()
    cfg["quantization_config"] = qdict
    cfg["dtype"] = "float16"
    cfg.pop("torch_dtype", None)
    write_json(staging / "config.json", cfg)
    tokenizer.save_pretrained(staging)
    gen = model_dir / "generation_config.json"
    if gen.is_file():
        shutil.copyfile(gen, staging / "generation_config.json")


def _report(opts, model_dir, calib, reports: list[LayerReport], device, started) -> dict:
    settings = {k: v for k, v in asdict(opts).items() if k not in ("quant", "progress")}
    return {
        "gptqlab_version": __version__,
        "model": opts.model,
        "model_dir": str(model_dir),
        "method": opts.method,
        "settings": settings,
        "quant_config": opts.quant.to_dict(),
        "calibration": calib.description(),
        "tokens_per_char": calib.description().get("tokens_per_char"),
        "device": str(device),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "seconds": round(time.time() - started, 3),
        "total_loss": sum(r.loss for r in reports),
        "layers": [asdict(r) for r in reports],
    }
