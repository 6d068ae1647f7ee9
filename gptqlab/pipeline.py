"""``gptqlab quantize``: resolve the model, sample calibration data, run the layer-wise driver, and write
the checkpoint.

All input is validated before anything is written. Progress lives in ``OUT.partial/``, and the final
folder is assembled there and renamed to OUT at the very end.

Resuming. ``OUT.partial/`` holds

- ``run.json``: everything that decides the bytes of the result (settings, resolved seqlen, device type
  and dtype, gptqlab and torch versions, size and mtime of the model's config and weight files, and the
  SHA-256 of the calibration tokens);
- ``blocks/block-XXXXX.safetensors``: the packed tensors of each finished block;
- ``state.safetensors``: the inputs of the next block (the outputs of the last finished one) with, in its
  metadata, that block's number and the reports of the finished Linears.

Each file is written to ``*.tmp`` and renamed into place, and a block file is written before the state
that points past it, so a run killed at any moment (SIGKILL included) leaves a consistent folder. The block
keyword arguments (masks, rotary embeddings) are recomputed from the first calibration sample on resume.

- Re-running the same command continues after the last finished block; the result is byte-identical to
  an uninterrupted run. ``--resume`` does the same but fails when there is nothing to resume.
- ``--no-resume`` deletes ``OUT.partial`` and starts over.
- A ``OUT.partial`` whose ``run.json`` differs from this run is refused (exit 2) with the differences
  listed, and left untouched.
- Bad input found before any work leaves nothing behind. Bad input found during the run (NaN weights in
  block 30, a Hessian that no dampening fixes) deletes ``OUT.partial``: fixing it changes the model or
  the settings, so the progress could not be resumed. A write error (full disk) keeps ``OUT.partial`` when
  it holds at least one finished block and says how to resume; any other crash or Ctrl-C keeps it too.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import platform
import re
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from gptqlab import __version__
from gptqlab.arch import arch_for, block_list
from gptqlab.checkpoint import publish, save_atomic, write_json, write_manifest, write_shards
from gptqlab.driver import METHODS, LayerReport, QuantizedLinear, quantize_model
from gptqlab.errors import ConfigError, GptqlabError
from gptqlab.evaluate import model_context_length
from gptqlab.format import quantize_config_dict, to_checkpoint
from gptqlab.quant import QuantConfig
from gptqlab.weights import INDEX_FILE, materialize, model_config, model_skeleton, open_weights

log = logging.getLogger("gptqlab")

DEFAULT_SEQLEN = 2048
# Test-only hook: seconds to sleep after each block is quantized and before it is saved, so that
# tests/test_resume.py can kill a run in the middle of a block. Never set it otherwise.
SLOW_BLOCK_ENV = "GPTQLAB_TEST_SLOW_BLOCK"
# The QuantizeOptions fields that decide the block files; a resumed run must match them (see run.json).
RESUME_SETTINGS = (
    "bits",
    "group_size",
    "act_order",
    "static_groups",
    "sym",
    "method",
    "calib",
    "nsamples",
    "seed",
    "format",
    "damp_percent",
    "true_sequential",
    "mse",
)
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
    resume: bool | None = None
    """None: continue a matching OUT.partial if there is one; True: the same, but fail when there is none;
    False: delete any OUT.partial and start over."""
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
    """'auto' → cuda when torch sees one, else cpu; 'cpu'; 'cuda' or 'cuda:N' (an error without CUDA).
    The one device parser of the CLI, the benchmarks and :func:`gptqlab.load`."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} was asked for, but torch sees no CUDA device; use cpu")
    if name not in ("cpu", "cuda") and not re.fullmatch(r"cuda:\d+", name):
        raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {name!r}")
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
    if path.exists():
        raise GptqlabError(f"model path {model} is a file; give the folder that holds config.json and the weights")
    looks_like_path = (os.sep in model and not re.fullmatch(r"[\w.-]+/[\w.-]+", model)) or model.startswith((".", "~"))
    if looks_like_path:
        raise GptqlabError(f"model path {model} does not exist")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
    except Exception as exc:  # network, auth and not-found errors come in many types
        raise GptqlabError(
            f"model {model!r} is not an embedded model, a local folder or a reachable Hub id ({type(exc).__name__})"
        ) from exc


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


def partial_dir(out: Path) -> Path:
    """Where ``gptqlab quantize`` keeps the progress of a run that writes ``out``."""
    return out.parent / f"{out.name}.partial"


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


def _model_files(model_dir: Path) -> dict[str, list[int]]:
    """[size, mtime in ns] of the files that define the model: config.json and the weights."""
    files = {}
    for p in sorted(model_dir.iterdir()):
        if p.name in ("config.json", INDEX_FILE) or p.suffix in (".safetensors", ".bin"):
            st = p.stat()
            files[p.name] = [st.st_size, st.st_mtime_ns]
    return files


def run_record(opts: QuantizeOptions, model_dir: Path, input_ids: torch.Tensor, device, dtype, nblocks: int) -> dict:
    """What ``run.json`` holds: everything that decides the bytes of the block files (JSON types only)."""
    record = {
        "gptqlab": __version__,
        "torch": torch.__version__,
        "model": str(model_dir.resolve()),
        "model_files": _model_files(model_dir),
        "blocks": nblocks,
        "settings": {k: getattr(opts, k) for k in RESUME_SETTINGS} | {"seqlen": int(input_ids.shape[1])},
        "device": torch.device(device).type,
        "dtype": str(dtype),
        "calibration_sha256": hashlib.sha256(input_ids.contiguous().numpy().tobytes()).hexdigest(),
    }
    return json.loads(json.dumps(record))


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(old.keys() | new.keys()):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            name = f"{prefix}{key}"
            if name.startswith("model_files."):
                out.append(f"model file {name.removeprefix('model_files.')} changed")
            elif name == "calibration_sha256":
                out.append("the calibration tokens differ")
            else:
                out.append(f"{name.removeprefix('settings.')} {a!r} → {b!r}")
    return out


class PartialRun:
    """``OUT.partial``: the progress of one ``gptqlab quantize`` run (the layout is in the module docstring).

    ``finished`` blocks are stored; ``reports`` are their LayerReports; ``inputs`` are block ``finished``'s
    inputs ([hidden [1, seqlen, hidden_size]] * nsamples, on the CPU), or None when no block is finished.
    """

    def __init__(self, out: Path):
        self.folder = partial_dir(out)
        self.blocks = self.folder / "blocks"
        self.run_file = self.folder / "run.json"
        self.state_file = self.folder / "state.safetensors"
        self.finished = 0
        self.reports: list[LayerReport] = []
        self.inputs: list[torch.Tensor] | None = None

    def block_file(self, i: int) -> Path:
        return self.blocks / f"block-{i:05d}.safetensors"

    def open(self, record: dict, resume: bool | None) -> None:
        """Find the progress of a run with this ``record``, or decide on a fresh start.

        Raises GptqlabError, leaving the folder as it is, when it cannot be resumed. Only ``resume=False``
        changes anything here: it deletes the folder.
        """
        if resume is False:
            shutil.rmtree(self.folder, ignore_errors=True)
        if not self.folder.is_dir() or not any(p.is_file() for p in self.folder.rglob("*")):
            if resume:
                raise GptqlabError(f"--resume: there is no run in progress at {self.folder}")
            return
        redo = "pass --no-resume to delete it and start over"
        try:
            old = json.loads(self.run_file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise GptqlabError(f"{self.folder} is not a gptqlab run in progress (no run.json); {redo}") from None
        except (OSError, ValueError, RecursionError) as exc:
            raise GptqlabError(f"{self.run_file} is damaged ({exc}); {redo}") from None
        diffs = _differences(old, record) if isinstance(old, dict) else ["run.json is not an object"]
        if diffs:
            raise GptqlabError(
                f"{self.folder} holds a run with other settings ({'; '.join(diffs)}); rerun with the settings "
                f"it was started with to resume it, or {redo}"
            )
        if self.state_file.is_file():
            self._read_state(record, redo)
        if self.finished:
            log.info(
                "resuming %s: blocks 0-%d are done, continuing at block %d of %d",
                self.folder,
                self.finished - 1,
                self.finished,
                record["blocks"],
            )

    def _read_state(self, record: dict, redo: str) -> None:
        try:
            with safe_open(str(self.state_file), framework="pt") as h:
                meta = h.metadata() or {}
                finished = int(meta["next_block"])
                reports = [LayerReport(**r) for r in json.loads(meta["reports"])]
                inputs = [h.get_tensor(k) for k in sorted(h.keys(), key=lambda k: int(k.removeprefix("x.")))]
        except (SafetensorError, OSError, KeyError, TypeError, ValueError, RecursionError) as exc:
            raise GptqlabError(f"{self.state_file} is damaged ({type(exc).__name__}: {exc}); {redo}") from None
        missing = [i for i in range(finished) if not self.block_file(i).is_file()]
        nsamples = record["settings"]["nsamples"]
        if missing or not 0 < finished <= record["blocks"] or len(inputs) != nsamples:
            raise GptqlabError(
                f"{self.state_file} does not match the block files (next block {finished}, {len(inputs)} "
                f"inputs for {nsamples} samples, missing blocks {missing}); {redo}"
            )
        self.finished, self.reports, self.inputs = finished, reports, inputs

    def start(self, record: dict) -> None:
        """Create the folder for a fresh run, or clear what a killed run left beyond its last finished block."""
        if self.run_file.is_file():
            shutil.rmtree(self.folder / "final", ignore_errors=True)
            for p in [*self.folder.glob("*.tmp"), *self.blocks.glob("*.tmp"), self.blocks / "rest.safetensors"]:
                p.unlink(missing_ok=True)
            for p in self.blocks.glob("block-*.safetensors"):
                if int(p.name[6:11]) >= self.finished:
                    p.unlink()
            return
        shutil.rmtree(self.folder, ignore_errors=True)
        self.blocks.mkdir(parents=True)
        write_json(self.run_file, record)

    def save_block(self, i: int, tensors: dict[str, torch.Tensor], reports: list[LayerReport], outputs: list) -> None:
        """Store finished block ``i``, then the state that points past it (``outputs``: block i+1's inputs)."""
        save_atomic(tensors, self.block_file(i), metadata={"format": "pt"})
        reports = self.reports + reports
        state = {f"x.{j:05d}": x.detach().to("cpu").contiguous() for j, x in enumerate(outputs)}
        meta = {"next_block": str(i + 1), "reports": json.dumps([asdict(r) for r in reports])}
        save_atomic(state, self.state_file, metadata=meta)
        self.finished, self.reports = i + 1, reports

    def discard(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def _write_error(exc: OSError, run: PartialRun) -> GptqlabError:
    """A one-line message for a failed write, saying how to go on; deletes progress that cannot be resumed."""
    where = exc.filename or run.folder
    hint = ""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        hint = "; free disk space or write OUT to another disk"
    elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        hint = "; choose an OUT in a folder you can write"
    if run.finished:
        return GptqlabError(
            f"cannot write {where}: {exc.strerror or exc}{hint}; {run.finished} finished blocks are kept in "
            f"{run.folder}: rerun the same command to resume"
        )
    run.discard()
    return GptqlabError(f"cannot write {where}: {exc.strerror or exc}{hint}")


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
        raise _write_error(exc, run) from exc
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
