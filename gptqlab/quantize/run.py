"""``gptqlab quantize``: resolve the model, sample calibration data, run the layer-wise driver, and write
the checkpoint.

All input is validated before anything is written, and before any heavy work: the config against the
weights' headers (block count, every parameter's shape and dtype), the tokenizer against the embedding,
and every Linear of every block against the bit width and group size. Inputs are never modified: an OUT
that is, contains or lies inside the model folder or a calibration file is refused, with or without
``--overwrite`` (which moves the old OUT aside and deletes it only once the new one is complete). One run
at a time writes an OUT (:mod:`gptqlab.quantize.lock`). Progress lives in ``OUT.partial/``; the final
folder is assembled there, checked as ``gptqlab verify`` checks it, and only then renamed to OUT.

Under ``torchrun`` (``torchrun --nproc-per-node N -m gptqlab quantize MODEL OUT``) every rank runs this
module: rank 0 alone checks and locks OUT, draws the calibration tokens (and sends them to the others),
keeps ``OUT.partial`` and writes the checkpoint; the ranks share the calibration batches and the Linears of
each stage (:mod:`gptqlab.quantize.driver`). A failure that rank 0 finds before the work starts stops every
rank; a rank that dies during the run stops the others with :class:`RankFailure`, and the finished blocks
stay in ``OUT.partial`` for a rerun (with any number of ranks, or none).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from gptqlab import __version__
from gptqlab.arch import arch_for, block_list
from gptqlab.checkpoint.format import quantize_config_dict, to_checkpoint
from gptqlab.checkpoint.write import (
    publish,
    save_atomic,
    sha256_file,
    write_json,
    write_manifest,
    write_shards,
)
from gptqlab.errors import GptqlabError, printable
from gptqlab.evaluate import model_context_length
from gptqlab.modelfiles import (
    check_layer_count,
    check_parameters,
    materialize,
    model_config,
    model_skeleton,
    open_weights,
)
from gptqlab.quantize.distributed import Distributed, RankFailure, RemoteError
from gptqlab.quantize.driver import (
    LayerReport,
    QuantizedLinear,
    batch_size_for,
    cpu_compute_dtype,
    cpu_threads,
    quantize_model,
)
from gptqlab.quantize.lock import lock_path, locked
from gptqlab.quantize.options import QuantizeOptions, calibration_size, parse_size
from gptqlab.quantize.preflight import (
    check_inputs_untouched,
    check_out,
    check_packable,
    check_vocab,
    input_paths,
    output_path,
    probe_name,
)
from gptqlab.quantize.progress import PartialRun, run_record, write_error
from gptqlab.resolve import resolve_device, resolve_model_dir

log = logging.getLogger("gptqlab")

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


def _test_pause() -> None:
    seconds = os.environ.get(SLOW_BLOCK_ENV)
    if seconds:
        time.sleep(float(seconds))


def _block_tensors(
    block, prefix: str, done: dict[str, QuantizedLinear], bits: int, fmt: str, written: torch.dtype
) -> dict:
    tensors = {}
    for n, q in done.items():
        for key, t in to_checkpoint(q.result, bits, fmt, q.bias).items():
            tensors[f"{prefix}.{n}.{key}"] = t
    quantized = {f"{n}.{p}" for n in done for p in ("weight", "bias")}
    for name, p in block.named_parameters():
        if name not in quantized:
            tensors[f"{prefix}.{name}"] = p.detach().to("cpu", written).contiguous()
    return tensors


def _iter_partial(files: list[Path]):
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as h:
                for k in h.keys():
                    yield k, h.get_tensor(k)
        except SafetensorError as exc:
            raise _NotPublished(f"{f} cannot be read ({exc})") from None


class _NotPublished(GptqlabError):
    """The assembled checkpoint is unsound; the finished blocks are kept so that a rerun assembles it again."""


def _tied_names(model) -> list[str]:
    """Names of output-embedding parameters that the config ties to the input embedding (may be absent)."""
    out_emb = model.get_output_embeddings()
    if out_emb is None or not getattr(model.config, "tie_word_embeddings", False):
        return []
    return [f"{n}.weight" for n, m in model.named_modules() if m is out_emb]


class StoppedByRank0(GptqlabError):
    """Raised on the other ranks when rank 0 stopped the run for bad input, which rank 0 reports; the CLI
    prints nothing for it (``quiet``), so the reason appears once."""

    quiet = True


def _on_writer(ctx: Distributed, what: str, fn):
    """Run ``fn`` on rank 0 and tell every rank whether it raised a GptqlabError: rank 0 re-raises it, the
    others raise :class:`StoppedByRank0` with its message. Returns fn's result on rank 0, None elsewhere."""
    error = None
    result = None
    if ctx.is_writer:
        try:
            result = fn()
        except GptqlabError as exc:
            error = exc
    if ctx.is_distributed:
        text = "" if error is None else str(error)
        message = [torch.tensor(list(text.encode()), dtype=torch.uint8)] if ctx.is_writer else None
        (message,) = ctx.broadcast_tensors(message, 0, what=f"waiting for rank 0 ({what})")
        if not ctx.is_writer and message.numel():
            raise StoppedByRank0(f"rank 0 stopped the run: {bytes(message.tolist()).decode()}")
    if error is not None:
        raise error
    return result


def quantize(opts: QuantizeOptions) -> Path | None:
    """Run ``gptqlab quantize``; returns the output folder (None on the ranks other than 0 under torchrun)."""
    started = time.time()
    out = output_path(opts.out)
    model_dir = resolve_model_dir(opts.model)
    ctx = Distributed.from_env(resolve_device(opts.device), timeout=opts.dist_timeout)
    try:
        with contextlib.ExitStack() as stack:

            def claim() -> None:
                check_inputs_untouched(out, input_paths(model_dir, opts.calib))
                check_out(out, opts.overwrite)
                try:
                    stack.enter_context(locked(out))
                except OSError as exc:
                    raise GptqlabError(
                        f"cannot create output {out}: {lock_path(out)} cannot be created ({exc.strerror}); "
                        "choose another OUT"
                    ) from None
                probe_name(out)

            _on_writer(ctx, "checking OUT", claim)
            return _quantize(opts, out, model_dir, started, ctx)
    finally:
        ctx.close()


def _quantize(opts: QuantizeOptions, out: Path, model_dir: Path, started: float, ctx: Distributed) -> Path | None:
    from transformers import AutoTokenizer

    from gptqlab.calib import load_calibration

    device = ctx.device
    config = model_config(model_dir, opts.trust_remote_code)
    check_layer_count(config, open_weights(model_dir).keys(), model_dir)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=opts.trust_remote_code)
    except Exception as exc:  # tokenizer files fail in many ways: OSError, ValueError, JSON and Rust errors
        if "trust_remote_code" in str(exc):
            raise GptqlabError(
                f"the tokenizer of {opts.model} runs custom code; pass --trust-remote-code if you trust it"
            ) from exc
        raise GptqlabError(f"cannot load the tokenizer of {opts.model}: {type(exc).__name__}") from exc

    model = model_skeleton(config, opts.trust_remote_code)
    model.eval()
    nsamples, seqlen = calibration_size(
        opts, sum(p.numel() for p in model.parameters()), model_context(config, tokenizer)
    )
    arch = arch_for(model)
    blocks = block_list(model, arch)
    weights = open_weights(model_dir, prefix=model.base_model_prefix, model=model)
    check_parameters(model, weights, tied=_tied_names(model))
    check_packable(blocks, arch, opts)
    check_vocab(tokenizer, model)

    def draw():
        calib = load_calibration(opts.calib, tokenizer, nsamples, seqlen, opts.seed)
        check_vocab(tokenizer, model, calib.input_ids)
        if opts.progress:
            print(calib.summary())
        return calib

    calib = _on_writer(ctx, "drawing the calibration tokens", draw)  # the others need only the tokens
    (input_ids,) = ctx.broadcast_tensors(
        [calib.input_ids] if ctx.is_writer else None, 0, what="receiving the calibration tokens"
    )

    written_name = opts.checkpoint_dtype(config)
    written = getattr(torch, written_name)
    dtype = torch.float32 if device.type == "cpu" else written
    # Layer inputs between blocks in half precision on the CPU (each block keeps float32 weights):
    # half the memory and traffic; tiny-zh-llama 4-bit perplexity 584.96 with float32 inputs, 584.76 with these.
    act_dtype = torch.float16 if device.type == "cpu" else dtype
    # The forward passes' products in bfloat16 where the CPU multiplies it fast; GPTQ still reads float32 weights.
    compute_dtype = cpu_compute_dtype(opts.cpu_compute) if device.type == "cpu" else dtype
    batch_size = opts.batch_size or batch_size_for(model, seqlen, nsamples)
    threads = cpu_threads(model, device)
    block_prefix = arch.blocks + "."
    _materialize_outside_blocks(model, weights, block_prefix, dtype)

    run = PartialRun(out)
    record = run_record(
        opts,
        model_dir,
        input_ids,
        device,
        dtype,
        len(blocks),
        written_name,
        batch_size=batch_size,
        threads=threads,
        act_dtype=act_dtype,
        compute_dtype=compute_dtype,
    )
    # Every rank must compute the same bits: same settings, tokens, versions, dtypes, threads and model files.
    # The model's path and its files' times may differ between machines: only the files' sizes are compared.
    shared = {k: v for k, v in record.items() if k != "model"}
    shared["model_files"] = {name: size for name, (size, _mtime) in record["model_files"].items()}
    ctx.agree(json.dumps(shared, sort_keys=True), "settings (or thread count, gptqlab or torch version)")
    _on_writer(ctx, "reading OUT.partial", lambda: run.open(record, opts.resume))
    (finished,) = ctx.broadcast_tensors(
        [torch.tensor([run.finished])] if ctx.is_writer else None, 0, what="receiving the resume point"
    )
    resumed_at = int(finished)

    def on_block(i: int, block, done: dict[str, QuantizedLinear], outputs: list) -> None:
        _test_pause()
        tensors = _block_tensors(block, f"{arch.blocks}.{i}", done, opts.bits, opts.format, written)
        run.save_block(i, tensors, [q.report for q in done.values()], outputs)

    settings = {
        "method": opts.method,
        "device": device,
        "dtype": dtype,
        "weights": weights,
        "act_dtype": act_dtype,
        "compute_dtype": compute_dtype,
        "batch_size": batch_size,
        "threads": threads,
        "ctx": ctx,
    }
    if not ctx.is_writer:
        quantize_model(model, input_ids, opts.quant, start=resumed_at, **settings)
        return None
    try:
        run.start(record)
        quantize_model(
            model,
            input_ids,
            opts.quant,
            on_block=on_block,
            progress=opts.progress,
            start=run.finished,
            inputs=run.inputs,
            **settings,
        )
        _check_block_files(run)
        staging = run.folder / "final"
        staging.mkdir()
        rest = {}
        _materialize_outside_blocks(model, weights, block_prefix, written)  # the driver released them
        tied = _tied(model)
        for name, p in model.named_parameters():
            if not name.startswith(block_prefix) and not (tied and name == "lm_head.weight"):
                rest[name] = p.detach().to("cpu", written).contiguous()
        save_atomic(rest, run.blocks / "rest.safetensors", metadata={"format": "pt"})
        files = [*(run.block_file(i) for i in range(len(blocks))), run.blocks / "rest.safetensors"]
        write_shards(staging, _iter_partial(files), parse_size(opts.max_shard_size))
        _write_configs(staging, model_dir, config, tokenizer, opts, written_name)
        report = _report(opts, model_dir, calib, run.reports, device, started, record, ctx.world)
        report["resumed_at_block"] = resumed_at
        write_json(staging / "quant_report.json", report)
        write_manifest(staging)
        _verify_before_publishing(staging, opts.trust_remote_code)
        publish(staging, out, opts.overwrite)
    except _NotPublished as exc:
        raise GptqlabError(
            f"{exc}; nothing was published to {out}; {run.finished} finished blocks are kept in {run.folder}: "
            "rerun the same command to assemble the checkpoint again, or pass --no-resume to start over"
        ) from None
    except GptqlabError:
        run.discard()  # the input is bad: fixing it changes the model or the settings, so nothing is resumable
        raise
    except OSError as exc:
        raise write_error(exc, run) from exc
    except (RankFailure, RemoteError) as exc:
        exc.add_note(_kept(run) or "no block was finished")  # the CLI prints the notes on the error's line
        raise
    except BaseException:
        if run.finished:
            log.warning("%s", _kept(run))
        raise
    run.discard()
    return out


def _kept(run: PartialRun) -> str:
    """What a stopped run leaves for a rerun, or '' when it finished no block."""
    if not run.finished:
        return ""
    return f"{run.finished} finished blocks are kept in {printable(run.folder)}; rerun the same command to resume"


def _check_block_files(run: PartialRun) -> None:
    """Every block file still has the SHA-256 it had when it was written (the disk may have changed it)."""
    for i, digest in enumerate(run.block_sha256):
        if sha256_file(run.block_file(i)) != digest:
            raise _NotPublished(f"{run.block_file(i)} changed on disk after it was written")


def _verify_before_publishing(staging: Path, trust_remote_code: bool) -> None:
    """Run ``gptqlab verify``'s checks (hashes and tensors) on the assembled checkpoint."""
    from gptqlab.checkpoint.verify import verify

    report = verify(staging, hashes=True, trust_remote_code=trust_remote_code)
    if not report.sound:
        more = f" and {len(report.problems) - 1} more" if len(report.problems) > 1 else ""
        raise _NotPublished(f"the assembled checkpoint fails verify: {report.problems[0]}{more}")


def _materialize_outside_blocks(model, weights, block_prefix: str, dtype) -> None:
    """Load the parameters outside the decoder blocks (embeddings, final norm, head) that are still on the meta
    device from ``weights`` in ``dtype``, and tie the head to the embedding when the checkpoint has no head."""
    for name, p in list(model.named_parameters()):
        if not name.startswith(block_prefix) and p.device.type == "meta" and name in weights:
            owner, _, _ = name.rpartition(".")
            materialize(model.get_submodule(owner), owner, weights, "cpu", dtype)
    _tie_output_embeddings(model)


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


def _write_configs(staging: Path, model_dir: Path, config, tokenizer, opts: QuantizeOptions, written: str) -> None:
    qdict = quantize_config_dict(opts.quant, opts.method)
    write_json(staging / "quantize_config.json", qdict)
    cfg = config.to_dict()
    cfg["quantization_config"] = qdict
    cfg["dtype"] = written
    cfg.pop("torch_dtype", None)
    write_json(staging / "config.json", cfg)
    tokenizer.save_pretrained(staging)
    gen = model_dir / "generation_config.json"
    if gen.is_file():
        shutil.copyfile(gen, staging / "generation_config.json")


def _report(opts, model_dir, calib, reports: list[LayerReport], device, started, record: dict, ranks: int) -> dict:
    """quant_report.json: the options as given, with the values the run resolved (nsamples, seqlen, batch size)
    in their place, and how it ran (threads per process, torchrun ranks)."""
    settings = {k: v for k, v in asdict(opts).items() if k not in ("quant", "progress")}
    for key in ("nsamples", "seqlen", "batch_size"):
        settings[key] = record["settings"][key]
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
        "threads": record["threads"],
        "ranks": ranks,
        "torch": torch.__version__,
        "platform": platform.platform(),
        "seconds": round(time.time() - started, 3),
        "total_loss": sum(r.loss for r in reports),
        "layers": [asdict(r) for r in reports],
    }
