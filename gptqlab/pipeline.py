"""``gptqlab quantize``: resolve the model, sample calibration data, run the layer-wise driver, and write
the checkpoint.

All input is validated before anything is written. Progress lives in ``OUT.partial/``: each finished block
is stored there as soon as it is done, and the final folder is assembled there and renamed to OUT at the
very end.
"""

from __future__ import annotations

import logging
import os
import platform
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from gptqlab import __version__
from gptqlab.arch import arch_for, block_list
from gptqlab.checkpoint import publish, write_json, write_manifest, write_shards
from gptqlab.driver import METHODS, LayerReport, QuantizedLinear, quantize_model
from gptqlab.errors import ConfigError, GptqlabError
from gptqlab.format import quantize_config_dict, to_checkpoint
from gptqlab.quant import QuantConfig
from gptqlab.weights import materialize, meta_parameters, open_weights

log = logging.getLogger("gptqlab")

DEFAULT_SEQLEN = 2048
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)B?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'2GB' → 2·10⁹ bytes; accepts B, KB, MB, GB, TB (powers of 1000) or a plain byte count."""
    m = _SIZE.match(text)
    if not m:
        raise ConfigError(f"cannot read size {text!r}; use a number with an optional KB/MB/GB unit, e.g. 2GB")
    return int(float(m.group(1)) * 1000 ** " KMGT".index(m.group(2).upper() or " "))


@dataclass
class QuantizeOptions:
    """Everything ``gptqlab quantize`` takes; CLI flags map one to one onto these fields."""

    model: str
    out: str
    bits: int = 4
    group_size: int = 128
    act_order: bool = False
    static_groups: bool = False
    sym: bool = True
    method: str = "gptq"
    calib: str = "peoples-daily"
    nsamples: int = 128
    seqlen: int | None = None
    device: str = "auto"
    seed: int = 0
    format: str = "gptq"
    damp_percent: float = 0.01
    true_sequential: bool = True
    mse: bool = False
    max_shard_size: str = "4GB"
    overwrite: bool = False
    trust_remote_code: bool = False
    progress: bool = True
    quant: QuantConfig = field(init=False)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"method must be gptq or rtn, got {self.method!r}")
        if self.nsamples <= 0:
            raise ConfigError(f"--nsamples must be positive, got {self.nsamples}")
        if self.seqlen is not None and self.seqlen <= 0:
            raise ConfigError(f"--seqlen must be positive, got {self.seqlen}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ConfigError(f"--device must be auto, cpu or cuda, got {self.device!r}")
        parse_size(self.max_shard_size)
        self.quant = QuantConfig(
            bits=self.bits,
            group_size=self.group_size,
            desc_act=self.act_order,
            static_groups=self.static_groups,
            sym=self.sym,
            damp_percent=self.damp_percent,
            true_sequential=self.true_sequential,
            mse=self.mse,
            checkpoint_format=self.format,
        )


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise GptqlabError("--device cuda was asked for, but torch sees no CUDA device; use --device cpu")
    return torch.device(name)


def resolve_model_dir(model: str) -> Path:
    """An embedded model name, a local folder, or a Hub id (downloaded through huggingface_hub)."""
    from gptqlab.embedded import resolve_model

    resolved = resolve_model(model)
    path = Path(resolved)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise GptqlabError(f"model folder {path} has no config.json")
        return path
    looks_like_path = (os.sep in model and not re.fullmatch(r"[\w.-]+/[\w.-]+", model)) or model.startswith((".", "~"))
    if looks_like_path or path.exists():
        raise GptqlabError(f"model path {model} does not exist")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
    except Exception as exc:  # network, auth and not-found errors come in many types
        raise GptqlabError(
            f"model {model!r} is not an embedded model, a local folder or a reachable Hub id ({type(exc).__name__})"
        ) from exc


def model_context(config, tokenizer) -> int | None:
    """The longest sequence the model was built for, or None when it has no fixed limit (ALiBi)."""
    for key in ("max_position_embeddings", "n_positions", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(tokenizer, "model_max_length", None)
    return limit if isinstance(limit, int) and 0 < limit < 1_000_000 else None


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise GptqlabError(f"output {out} already exists; pass --overwrite to replace it")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise GptqlabError(f"cannot create output {out}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise GptqlabError(f"cannot create output {out}: folder {parent} is not writable")


def _save_block(folder: Path, i: int, block, prefix: str, done: dict[str, QuantizedLinear], bits: int, fmt: str):
    tensors = {}
    for n, q in done.items():
        for key, t in to_checkpoint(q.result, bits, fmt, q.bias).items():
            tensors[f"{prefix}.{n}.{key}"] = t
    quantized = {f"{n}.{p}" for n in done for p in ("weight", "bias")}
    for name, p in block.named_parameters():
        if name not in quantized:
            tensors[f"{prefix}.{name}"] = p.detach().to("cpu", torch.float16).contiguous()
    tmp = folder / f"block-{i:05d}.safetensors.tmp"
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, folder / f"block-{i:05d}.safetensors")  # a block file exists only once complete


def _iter_partial(files: list[Path]):
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():
                yield k, h.get_tensor(k)


def quantize(opts: QuantizeOptions) -> Path:
    """Run ``gptqlab quantize``; returns the output folder."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from gptqlab.calib import load_calibration

    started = time.time()
    out = Path(opts.out).expanduser()
    _check_out(out, opts.overwrite)
    model_dir = resolve_model_dir(opts.model)
    device = resolve_device(opts.device)
    try:
        config = AutoConfig.from_pretrained(model_dir, trust_remote_code=opts.trust_remote_code)
    except ValueError as exc:
        if "trust_remote_code" in str(exc):
            raise GptqlabError(
                f"model {opts.model} uses custom code; pass --trust-remote-code if you trust it"
            ) from exc
        raise GptqlabError(f"cannot read the config of {opts.model}: {exc}") from exc
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=opts.trust_remote_code)

    context = model_context(config, tokenizer)
    seqlen = opts.seqlen
    if seqlen is None:
        seqlen = min(DEFAULT_SEQLEN, context or DEFAULT_SEQLEN)
    elif context is not None and seqlen > context:
        raise GptqlabError(f"--seqlen {seqlen} is longer than the model's context of {context} tokens")

    with meta_parameters():
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=opts.trust_remote_code)
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

    weights = open_weights(model_dir, prefix=model.base_model_prefix)
    dtype = torch.float32 if device.type == "cpu" else torch.float16
    block_prefix = arch.blocks + "."
    for name, p in list(model.named_parameters()):
        if not name.startswith(block_prefix) and p.device.type == "meta" and name in weights:
            owner, _, _ = name.rpartition(".")
            materialize(model.get_submodule(owner), owner, weights, "cpu", dtype)
    _tie_output_embeddings(model)

    partial = out.parent / f"{out.name}.partial"
    blocks_dir = partial / "blocks"
    if partial.exists():
        shutil.rmtree(partial)
    blocks_dir.mkdir(parents=True)
    try:
        reports = quantize_model(
            model,
            calib.input_ids,
            opts.quant,
            method=opts.method,
            device=device,
            dtype=dtype,
            weights=weights,
            on_block=lambda i, block, done: _save_block(
                blocks_dir, i, block, f"{arch.blocks}.{i}", done, opts.bits, opts.format
            ),
            progress=opts.progress,
        )
        staging = partial / "final"
        staging.mkdir()
        rest = {}
        tied = _tied(model)
        for name, p in model.named_parameters():
            if not name.startswith(block_prefix) and not (tied and name == "lm_head.weight"):
                rest[name] = p.detach().to("cpu", torch.float16).contiguous()
        save_file(rest, str(blocks_dir / "rest.safetensors"), metadata={"format": "pt"})
        files = [*sorted(blocks_dir.glob("block-*.safetensors")), blocks_dir / "rest.safetensors"]
        write_shards(staging, _iter_partial(files), parse_size(opts.max_shard_size))
        _write_configs(staging, model_dir, config, tokenizer, opts)
        write_json(staging / "quant_report.json", _report(opts, model_dir, calib, reports, device, started))
        write_manifest(staging)
        publish(staging, out, opts.overwrite)
    except GptqlabError:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    except OSError as exc:
        shutil.rmtree(partial, ignore_errors=True)
        raise GptqlabError(f"cannot write {out}: {exc.strerror or exc}") from exc
    shutil.rmtree(partial, ignore_errors=True)
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
