"""A table of bad inputs: each gives its exit code and one actionable line, and leaves nothing behind.

Exit codes: ``quantize`` exits 2 for bad input (its model, weights, calibration data, flags or OUT).
``verify`` exits 1 when the checkpoint is unsound (problems on stdout, one per line, and a one-line summary
on stderr) and 2 for a usage error (no such folder, custom code not allowed). ``gptqlab.load`` raises
CheckpointError where ``verify`` exits 1 (tests/test_verify.py).

"Nothing left behind, no input changed": the working folder (models, calibration files, OUT's parent), the
tiny model, the calibration file and the sound checkpoint hold exactly the same files with the same SHA-256
before and after the command: no OUT, no OUT.partial, no lock, no hidden staging or probe folders.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from testkit import run_cli

from gptqlab.calib.sources import builtin_texts

MARKER = "PWNED"  # a file that malicious inputs would create if their code ran


@dataclass
class Ctx:
    """What a table entry builds its input from: the tiny LLaMA, a good calibration file, a sound
    checkpoint, and the working folder in which everything it makes lives."""

    model: Path
    calib: Path
    checkpoint: Path
    work: Path
    monkeypatch: pytest.MonkeyPatch
    cleanup: list = field(default_factory=list)

    def small(self, *extra) -> list:
        return ["--nsamples", "8", "--seqlen", "64", "--group-size", "64", "-q", "--calib", f"txt:{self.calib}", *extra]

    def quantize(self, model, *extra) -> list:
        return ["quantize", model, self.work / "o", *self.small(*extra)]

    def model_copy(self, tensors=None, config=None) -> Path:
        """A copy of the tiny LLaMA; ``tensors(dict)`` and ``config(dict)`` edit its weights and config."""
        folder = shutil.copytree(self.model, self.work / "model")
        if tensors is not None:
            state = load_file(folder / "model.safetensors")
            tensors(state)
            save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
        if config is not None:
            cfg = json.loads((folder / "config.json").read_text())
            config(cfg)
            (folder / "config.json").write_text(json.dumps(cfg))
        return folder

    def checkpoint_copy(self) -> Path:
        return shutil.copytree(self.checkpoint, self.work / "ckpt")

    def file(self, name: str, data: bytes | str) -> Path:
        path = self.work / name
        if isinstance(data, str):
            data = data.encode("utf-8")
        path.write_bytes(data)
        return path


# ---- builders for inputs that take more than one line ----


def _fill(name: str, value: float):
    def edit(state):
        state[name] = torch.full_like(state[name], value)

    return edit


def _set_one(name: str, value: float):
    def edit(state):
        state[name].view(-1)[7] = value

    return edit


def _drop(name: str):
    def edit(state):
        del state[name]

    return edit


def _truncated_weights(c: Ctx) -> Path:
    folder = c.model_copy()
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[:-100])
    return folder


def _rewrite_header(path: Path, edit) -> None:
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + n])
    edit(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])


def _broken_config(c: Ctx) -> Path:
    folder = c.model_copy()
    (folder / "config.json").write_text('{"model_type": "llama", "hidden_size": ')
    return folder


def _lying_header(c: Ctx) -> Path:
    """The header claims a bigger shape for one tensor than its byte range holds."""
    folder = c.model_copy()

    def edit(header):
        header["model.norm.weight"]["shape"] = [256]

    _rewrite_header(folder / "model.safetensors", edit)
    return folder


def _custom_code(c: Ctx, checkpoint: bool = False) -> Path:
    """The tiny LLaMA (or the sound checkpoint) with an architecture that only its own code defines."""
    folder = c.checkpoint_copy() if checkpoint else c.model_copy()
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_type"] = "evil-llama"
    cfg["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig", "AutoModelForCausalLM": "modeling_evil.Evil"}
    (folder / "config.json").write_text(json.dumps(cfg))
    code = f"from pathlib import Path\nPath({str(c.work / MARKER)!r}).write_text('ran')\n"
    (folder / "configuration_evil.py").write_text(code)
    (folder / "modeling_evil.py").write_text(code)
    return folder


class _RunsCode:
    """Unpickling this object would write the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "ran"))


def _malicious_bin(c: Ctx, zip_format: bool) -> Path:
    """A model folder whose only weights are a pickle that runs code when loaded with weights_only=False."""
    folder = c.model_copy()
    (folder / "model.safetensors").unlink()
    state = {"model.embed_tokens.weight": torch.zeros(2, 2), "evil": _RunsCode(c.work / MARKER)}
    path = folder / "pytorch_model.bin"
    if zip_format:
        torch.save(state, path)
    else:
        path.write_bytes(pickle.dumps(state))
    return folder


def _belle(c: Ctx, text: str, name: str = "data.jsonl") -> str:
    return f"belle:{c.file(name, text)}"


def _full_disk(c: Ctx) -> Path:
    """safetensors reports a full disk as SafetensorError("... (os error 28)"); this is that error."""
    import gptqlab.checkpoint.write

    def no_space(tensors, filename, metadata=None):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    c.monkeypatch.setattr(gptqlab.checkpoint.write, "save_file", no_space)
    return c.model


def _existing_out(c: Ctx) -> Path:
    (c.work / "o").mkdir()
    (c.work / "o" / "keep.txt").write_text("precious")
    return c.model


def _partial_is_file(c: Ctx) -> Path:
    c.file("o.partial", "mine")
    return c.model


def _wrong_bits_config(c: Ctx) -> Path:
    ckpt = c.checkpoint_copy()
    for name in ("quantize_config.json", "config.json"):
        cfg = json.loads((ckpt / name).read_text())
        (cfg.get("quantization_config") or cfg)["bits"] = 3
        (ckpt / name).write_text(json.dumps(cfg))
    return ckpt


def _truncated_checkpoint(c: Ctx) -> Path:
    ckpt = c.checkpoint_copy()
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[: len(data) // 2])
    return ckpt


def _negative_scale(c: Ctx) -> Path:
    ckpt = c.checkpoint_copy()
    state = load_file(ckpt / "model.safetensors")
    state["model.layers.1.mlp.up_proj.scales"][0, 3] = -1.0
    save_file(state, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    return ckpt


def _missing_layer(c: Ctx) -> Path:
    ckpt = c.checkpoint_copy()
    state = load_file(ckpt / "model.safetensors")
    for key in [k for k in state if k.startswith("model.layers.0.self_attn.k_proj.")]:
        del state[key]
    save_file(state, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    return ckpt


# ---- issue 12: inputs never written, cross-checks before heavy work, safe names ----


def _model_named(c: Ctx, name: str) -> Path:
    return shutil.copytree(c.model, c.work / name)


def _out_symlink_to_model(c: Ctx) -> list:
    model = c.model_copy()
    (c.work / "link").symlink_to(model, target_is_directory=True)
    return ["quantize", model, c.work / "link", *c.small("--overwrite")]


def _sharded(c: Ctx, duplicate: bool) -> Path:
    """The tiny LLaMA in two shards with an index. ``duplicate``: shard 2 also holds a different tensor under
    a name that the index maps to shard 1; else the index maps a tensor to the shard that lacks it."""
    folder = c.model_copy()
    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    names = sorted(state)
    first, second = names[: len(names) // 2], names[len(names) // 2 :]
    shard2 = {k: state[k] for k in second}
    weight_map = {k: "model-00001-of-00002.safetensors" for k in first}
    weight_map |= {k: "model-00002-of-00002.safetensors" for k in second}
    victim = "model.layers.0.self_attn.q_proj.weight"
    assert victim in first
    if duplicate:
        shard2[victim] = torch.zeros_like(state[victim])
    else:
        weight_map[victim] = "model-00002-of-00002.safetensors"
    save_file({k: state[k] for k in first}, str(folder / "model-00001-of-00002.safetensors"))
    save_file(shard2, str(folder / "model-00002-of-00002.safetensors"))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return folder


def _small_vocab(state):
    for k in ("model.embed_tokens.weight", "lm_head.weight"):
        if k in state:
            state[k] = state[k][:256].clone()


def _to_int8(name: str):
    def edit(state):
        state[name] = state[name].to(torch.int8)

    return edit


def _narrow_mlp(state):
    """intermediate_size 240: 3-bit packing needs multiples of 32."""
    for i in (0, 1):
        for n in ("gate_proj", "up_proj"):
            key = f"model.layers.{i}.mlp.{n}.weight"
            state[key] = state[key][:240].clone()
        key = f"model.layers.{i}.mlp.down_proj.weight"
        state[key] = state[key][:, :240].clone()


def _fifo(c: Ctx, name: str) -> Path:
    path = c.work / name
    os.mkfifo(path)
    return path


def _fifo_weights(c: Ctx) -> Path:
    folder = c.model_copy()
    (folder / "model.safetensors").unlink()
    os.mkfifo(folder / "model.safetensors")
    return folder


def _locked(c: Ctx) -> Path:
    """Another run holds the lock on OUT (flock conflicts between two opens, even in one process)."""
    path = c.work / ".o.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    os.write(fd, b"4242\n")
    fcntl.flock(fd, fcntl.LOCK_EX)
    c.cleanup.append(lambda: os.close(fd))
    return c.model


def _partial_symlink(c: Ctx) -> Path:
    (c.work / "elsewhere").mkdir()
    (c.work / "elsewhere" / "keep.txt").write_text("precious")
    (c.work / "o.partial").symlink_to(c.work / "elsewhere", target_is_directory=True)
    return c.model


def _lock_symlink(c: Ctx) -> Path:
    (c.work / ".o.lock").symlink_to(c.file("precious.txt", "precious"))
    return c.model


ESCAPES = "evil\x1b[2J\nOK all good"


L1 = "model.layers.1"

# (id, argv builder, exit code, message): the message must appear in the one-line error (exit 2) or among
# the problems (exit 1).
BAD_INPUTS = [
    # -- the model
    ("missing model", lambda c: c.quantize(c.work / "no-such-model"), 2, "no-such-model does not exist"),
    ("model is a file", lambda c: c.quantize(c.file("model.bin", "x")), 2, "is a file; give the folder"),
    ("model folder without config", lambda c: c.quantize(c.work), 2, "has no config.json"),
    (
        "config not JSON",
        lambda c: c.quantize(_broken_config(c)),
        2,
        "config.json: cannot be used: It looks like the config file at",
    ),
    (
        "config value of the wrong type",
        lambda c: c.quantize(c.model_copy(config=lambda cfg: cfg.update(num_attention_heads=3))),
        2,
        "config.json: cannot be used: Class validation error",
    ),
    (
        "unknown architecture",
        lambda c: c.quantize(c.model_copy(config=lambda cfg: cfg.update(model_type="lhama"))),
        2,
        "config.json: cannot be used: The checkpoint you are trying to load has model type `lhama`",
    ),
    (
        "custom code without --trust-remote-code",
        lambda c: c.quantize(_custom_code(c)),
        2,
        "runs custom code (configuration_evil.py, modeling_evil.py); read it, and pass --trust-remote-code",
    ),
    # -- its weights
    (
        "truncated safetensors",
        lambda c: c.quantize(_truncated_weights(c)),
        2,
        "model.safetensors: cannot read safetensors file (Error while deserializing header: incomplete metadata",
    ),
    (
        "safetensors header lies about sizes",
        lambda c: c.quantize(_lying_header(c)),
        2,
        "cannot read safetensors file (Error while deserializing header: invalid shape, data type, or offset",
    ),
    (
        "malicious pickle .bin (torch zip)",
        lambda c: c.quantize(_malicious_bin(c, zip_format=True)),
        2,
        "pytorch_model.bin: cannot be read safely as weights (UnpicklingError",
    ),
    (
        "malicious pickle .bin (raw pickle)",
        lambda c: c.quantize(_malicious_bin(c, zip_format=False)),
        2,
        "pytorch_model.bin: cannot be read safely as weights",
    ),
    (
        "weights do not fit the config",
        lambda c: c.quantize(c.model_copy(config=lambda cfg: cfg.update(intermediate_size=384))),
        2,
        "tensor 'model.layers.0.mlp.gate_proj.weight' has shape (256, 128), the config expects (384, 128)",
    ),
    (
        "tensor missing in block 1",
        lambda c: c.quantize(c.model_copy(tensors=_drop(f"{L1}.mlp.up_proj.weight"))),
        2,
        f"tensor '{L1}.mlp.up_proj.weight' is missing from the checkpoint",
    ),
    (
        "NaN in the weights of block 1",
        lambda c: c.quantize(c.model_copy(tensors=_set_one(f"{L1}.self_attn.v_proj.weight", float("nan")))),
        2,
        f"tensor '{L1}.self_attn.v_proj.weight' contains NaN or Inf; the checkpoint is damaged",
    ),
    (
        "Inf in the embeddings",
        lambda c: c.quantize(c.model_copy(tensors=_set_one("model.embed_tokens.weight", float("inf")))),
        2,
        "tensor 'model.embed_tokens.weight' contains NaN or Inf",
    ),
    (
        "singular Hessian (norm weight 3e18: no dampening helps)",
        lambda c: c.quantize(c.model_copy(tensors=_fill(f"{L1}.post_attention_layernorm.weight", 3e18))),
        2,
        # Which Linear of block 1 fails first, and how, is the driver's business (it changes with its numerics).
        f"layer {L1}.",
    ),
    (
        "non-finite Hessian (norm weight 1e30 overflows x xᵀ)",
        lambda c: c.quantize(c.model_copy(tensors=_fill(f"{L1}.post_attention_layernorm.weight", 1e30))),
        2,
        f"layer {L1}.mlp.gate_proj: the Hessian contains NaN or Inf",
    ),
    # -- OUT
    ("OUT exists", lambda c: c.quantize(_existing_out(c)), 2, "already exists; pass --overwrite to replace it"),
    (
        "OUT's parent is a file",
        lambda c: ["quantize", c.model, c.file("parent", "x") / "o", *c.small()],
        2,
        "parent is a file, not a folder",
    ),
    (
        "OUT's parent does not exist",
        lambda c: ["quantize", c.model, c.work / "nope" / "o", *c.small()],
        2,
        "nope does not exist",
    ),
    (
        "OUT not writable (sysfs refuses even root)",
        lambda c: ["quantize", c.model, "/sys/gptqlab-test-out", *c.small()],
        2,
        "folder /sys is not writable",
    ),
    ("OUT.partial is a file", lambda c: c.quantize(_partial_is_file(c)), 2, "o.partial is in the way"),
    (
        "full disk while writing block 0",
        lambda c: c.quantize(_full_disk(c)),
        2,
        "block-00000.safetensors.tmp: No space left on device; free disk space or write OUT to another disk",
    ),
    ("--resume without a run", lambda c: c.quantize(c.model, "--resume"), 2, "--resume: there is no run in progress"),
    # -- calibration data
    (
        "calibration not UTF-8",
        lambda c: c.quantize(c.model, "--calib", f"txt:{c.file('gbk.txt', '人民日报社论。'.encode('gb18030'))}"),
        2,
        "gbk.txt is not UTF-8: byte 0xc8 at byte offset 0 (line 1); convert it, e.g. iconv -f GB18030 -t UTF-8",
    ),
    (
        "empty JSONL",
        lambda c: c.quantize(c.model, "--calib", _belle(c, "\n\n")),
        2,
        "data.jsonl is empty; give a file with text in it",
    ),
    (
        "JSONL records without the expected fields",
        lambda c: c.quantize(c.model, "--calib", _belle(c, '{"question": "你好", "answer": "您好"}\n')),
        2,
        "data.jsonl line 1: record has neither 'instruction'/'input' with 'output' nor 'conversations' "
        "(its keys: 'question', 'answer')",
    ),
    (
        "JSONL field of the wrong type",
        lambda c: c.quantize(c.model, "--calib", _belle(c, '{"instruction": 5, "output": "好"}\n')),
        2,
        "data.jsonl line 1: field 'instruction' must be a string, got a number",
    ),
    (
        "JSONL line that is not JSON",
        lambda c: c.quantize(c.model, "--calib", _belle(c, '{"instruction": "你好", "output": "好"}\n{oops\n')),
        2,
        "data.jsonl line 2: not valid JSON",
    ),
    (
        "calibration shorter than nsamples x seqlen",
        lambda c: c.quantize(c.model, "--calib", f"txt:{c.file('short.txt', '今天天气很好。')}"),
        2,
        "but its 8 samples x seqlen 64 need 512; lower --nsamples or --seqlen, or add text to the source",
    ),
    (
        "calibration file missing",
        lambda c: c.quantize(c.model, "--calib", f"txt:{c.work / 'nope.txt'}"),
        2,
        "nope.txt: no such file; check the path",
    ),
    (
        "unknown calibration source",
        lambda c: c.quantize(c.model, "--calib", "wiki"),
        2,
        "unknown calibration source 'wiki'",
    ),
    # -- issue 12: inputs are never written, with or without --overwrite
    (
        "OUT is the model folder (--overwrite)",
        lambda c: ["quantize", (m := c.model_copy()), m, *c.small("--overwrite")],
        2,
        "is the model folder",
    ),
    (
        "OUT inside the model folder",
        lambda c: ["quantize", (m := c.model_copy()), m / "q", *c.small()],
        2,
        "lies inside the model folder",
    ),
    (
        "OUT contains the model folder (--overwrite)",
        lambda c: ["quantize", _model_named(c, "sub/model"), c.work / "sub", *c.small("--overwrite")],
        2,
        "contains the model folder",
    ),
    ("OUT is a symlink to the model folder (--overwrite)", _out_symlink_to_model, 2, "is the model folder"),
    (
        "OUT.partial would be the model folder",
        lambda c: ["quantize", _model_named(c, "m.partial"), c.work / "m", *c.small()],
        2,
        "m.partial is the model folder",
    ),
    (
        "OUT is the calibration file (--overwrite)",
        lambda c: ["quantize", c.model, c.calib, *c.small("--overwrite")],
        2,
        "is calibration source txt:",
    ),
    # -- issue 12: the model cross-checked before any heavy work
    (
        "the same tensor name in two shards",
        lambda c: c.quantize(_sharded(c, duplicate=True)),
        2,
        "tensor 'model.layers.0.self_attn.q_proj.weight' is stored twice, in model-00001-of-00002.safetensors "
        "and in model-00002-of-00002.safetensors",
    ),
    (
        "index maps a tensor to the wrong shard",
        lambda c: c.quantize(_sharded(c, duplicate=False)),
        2,
        "maps tensor 'model.layers.0.self_attn.q_proj.weight' to model-00002-of-00002.safetensors, but it is in "
        "model-00001-of-00002.safetensors",
    ),
    (
        "config claims 100000 layers",
        lambda c: c.quantize(c.model_copy(config=lambda cfg: cfg.update(num_hidden_layers=100_000))),
        2,
        "says the model has 100000 decoder layers (num_hidden_layers), but its weights hold 2",
    ),
    (
        "tokenizer bigger than the embedding",
        lambda c: c.quantize(c.model_copy(tensors=_small_vocab, config=lambda cfg: cfg.update(vocab_size=256))),
        2,
        "the tokenizer has 512 tokens, but the model's embedding has 256 rows",
    ),
    (
        "int8 Linear weight",
        lambda c: c.quantize(c.model_copy(tensors=_to_int8(f"{L1}.self_attn.o_proj.weight"))),
        2,
        f"tensor '{L1}.self_attn.o_proj.weight' is stored as torch.int8; gptqlab quantizes float16, bfloat16 or "
        "float32 weights",
    ),
    (
        "layer shape that 3-bit cannot pack",
        lambda c: c.quantize(
            c.model_copy(tensors=_narrow_mlp, config=lambda cfg: cfg.update(intermediate_size=240)), "--bits", "3"
        ),
        2,
        "layer model.layers.0.mlp.gate_proj has 128 inputs and 240 outputs, but 3-bit packing needs both to be "
        "multiples of 32",
    ),
    ("weights file is a FIFO", lambda c: c.quantize(_fifo_weights(c)), 2, "model.safetensors is a FIFO (named pipe)"),
    # -- issue 12: calibration input
    (
        "calibration file is a FIFO",
        lambda c: c.quantize(c.model, "--calib", f"txt:{_fifo(c, 'pipe.txt')}"),
        2,
        "pipe.txt is not a regular file (a FIFO, socket or device)",
    ),
    (
        "unpaired surrogate in a JSONL record",
        lambda c: c.quantize(c.model, "--calib", _belle(c, '{"instruction": "你\\ud800好", "output": "好"}\n')),
        2,
        "data.jsonl line 1: malformed Unicode: an unpaired surrogate \\ud800",
    ),
    (
        "control characters in a calibration path",
        lambda c: c.quantize(c.model, "--calib", f"txt:{c.work / ESCAPES}.txt"),
        2,
        "evil\\x1b[2J\\nOK all good.txt: no such file",
    ),
    # -- issue 12: OUT names the filesystem refuses, and a run in progress
    (
        "OUT name too long for the filesystem",
        lambda c: ["quantize", c.model, c.work / ("o" * 250), *c.small()],
        2,
        "is too long: gptqlab also writes",
    ),
    ("OUT with a NUL character", lambda c: ["quantize", c.model, f"{c.work}/o\0x", *c.small()], 2, "contains a NUL"),
    ("OUT.partial is a symlink", lambda c: c.quantize(_partial_symlink(c)), 2, "o.partial is a symbolic link"),
    (
        "OUT's lock file is a symlink to a file",
        lambda c: c.quantize(_lock_symlink(c)),
        2,
        ".o.lock cannot be created (Too many levels of symbolic links)",
    ),
    (
        "OUT being written by another run",
        lambda c: c.quantize(_locked(c)),
        2,
        "another gptqlab quantize is writing",
    ),
    # -- flags
    ("bits 5", lambda c: c.quantize(c.model, "--bits", "5"), 2, "bits must be one of 2, 3, 4, 8, got 5"),
    ("group size not dividing", lambda c: c.quantize(c.model, "--group-size", "96"), 2, "does not divide"),
    ("damp 0", lambda c: c.quantize(c.model, "--damp-percent", "0"), 2, "damp_percent must be in (0, 1"),
    ("seqlen beyond context", lambda c: c.quantize(c.model, "--seqlen", "300"), 2, "longer than the model's context"),
    ("nsamples 0", lambda c: c.quantize(c.model, "--nsamples", "0"), 2, "--nsamples must be positive, got 0"),
    ("bad shard size", lambda c: c.quantize(c.model, "--max-shard-size", "lots"), 2, "cannot read size 'lots'"),
    ("--device cuda without CUDA", lambda c: c.quantize(c.model, "--device", "cuda"), 2, "torch sees no CUDA device"),
    # -- verify
    ("verify: no such folder", lambda c: ["verify", c.work / "nope"], 2, "nope is not a folder"),
    (
        "verify: custom code without --trust-remote-code",
        lambda c: ["verify", _custom_code(c, checkpoint=True), "--no-hashes"],
        2,
        "runs custom code",
    ),
    (
        "verify: config with the wrong bits",
        lambda c: ["verify", _wrong_bits_config(c), "--no-hashes"],
        1,
        "model.safetensors: model.layers.0.mlp.down_proj.qweight: shape [32, 128], expected [24, 128] for bits=3, "
        "group_size=64, in_features=256, out_features=128; the rows fit bits=4: is bits in the config wrong?",
    ),
    (
        "verify: truncated shard",
        lambda c: ["verify", _truncated_checkpoint(c)],
        1,
        "model.safetensors: cannot read safetensors file (Error while deserializing header",
    ),
    (
        "verify: negative scale",
        lambda c: ["verify", _negative_scale(c)],
        1,
        "model.safetensors: model.layers.1.mlp.up_proj.scales: 1 of 512 scales are not finite and positive",
    ),
    (
        "verify: quantized layer missing",
        lambda c: ["verify", _missing_layer(c), "--no-hashes"],
        1,
        "model.safetensors: model.layers.0.self_attn.k_proj.qweight: missing: the architecture quantizes this Linear",
    ),
]


def listing(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))


def snapshot(*folders: Path) -> dict[str, str]:
    """Path → SHA-256 (or the kind of entry) of everything under ``folders``: what "no input changed and
    nothing left behind" compares."""
    found = {}
    for folder in folders:
        for p in [folder, *folder.rglob("*")] if folder.is_dir() else [folder]:
            if p.is_symlink():
                found[str(p)] = f"link to {os.readlink(p)}"
            elif p.is_file():
                found[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
            else:
                found[str(p)] = "folder" if p.is_dir() else "special"
    return found


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text("\n".join(builtin_texts("peoples-daily")[:40]), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def checkpoint(tiny_models, calib_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("checkpoint") / "ckpt"
    args = ["--nsamples", "8", "--seqlen", "64", "--group-size", "64", "-q", "--calib", f"txt:{calib_file}"]
    assert run_cli(["quantize", tiny_models["llama"], out, "--method", "rtn", *args]) == 0
    return out


# Each class of bad input that issue 12 lists, and the rows of the table that cover it.
ISSUE_12_CLASSES = {
    "input modified": ["OUT is the model folder (--overwrite)", "OUT is the calibration file (--overwrite)"],
    "duplicate tensors across shards": ["the same tensor name in two shards"],
    "config vs weights before the skeleton": ["config claims 100000 layers"],
    "tokenizer vs embedding": ["tokenizer bigger than the embedding"],
    "dtypes the quantizer cannot take": ["int8 Linear weight"],
    "shapes that cannot be packed": ["layer shape that 3-bit cannot pack"],
    "malformed Unicode": ["unpaired surrogate in a JSONL record"],
    "names the filesystem refuses": ["OUT name too long for the filesystem", "OUT with a NUL character"],
    "concurrent runs": ["OUT being written by another run"],
    "control characters echoed": ["control characters in a calibration path"],
    "non-regular files": ["weights file is a FIFO", "calibration file is a FIFO"],
}


def test_the_table_covers_every_class_of_issue_12():
    ids = [b[0] for b in BAD_INPUTS]
    assert len(set(ids)) == len(ids), "two rows share an id"
    missing = {cls: [r for r in rows if r not in ids] for cls, rows in ISSUE_12_CLASSES.items()}
    assert {cls: rows for cls, rows in missing.items() if rows} == {}
    # A row's message must say something specific, so that it cannot match any error.
    assert [b[0] for b in BAD_INPUTS if len(b[3]) < 12] == []


@pytest.mark.parametrize(("what", "argv", "code", "message"), BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input(tiny_models, calib_file, checkpoint, tmp_path, monkeypatch, capsys, what, argv, code, message):
    if "cuda" in what and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    work = tmp_path / "work"
    work.mkdir()
    ctx = Ctx(tiny_models["llama"], calib_file, checkpoint, work, monkeypatch)
    try:
        args = argv(ctx)
        inputs = (work, tiny_models["llama"], calib_file, checkpoint)
        before = snapshot(*inputs)
        assert run_cli(args) == code
        after = snapshot(*inputs)
    finally:
        for undo in ctx.cleanup:
            undo()
    out, err = capsys.readouterr()
    err = err.strip()
    assert "Traceback" not in err and "\n" not in err and "\x1b" not in err, err
    if code == 2:
        assert err.startswith("gptqlab: error: ") and message in err, err
    else:
        assert err == f"gptqlab: {args[1]} is not sound: {len(out.splitlines())} problem(s)"
        assert any(message in line for line in out.splitlines()), out
    assert after == before
    assert not (work / MARKER).exists()


def test_real_write_error_from_safetensors(tiny_models, calib_file, tmp_path):
    """A real failing write, not a monkeypatch: a file-size limit makes the first state file fail with
    EFBIG inside safetensors' Rust writer (SIGXFSZ ignored), in a child process."""
    work = tmp_path / "work"
    work.mkdir()
    script = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (110_000, 110_000))\n"
        "from gptqlab.cli import main\n"
        "main(sys.argv[1:])\n"
    )
    args = ["quantize", str(tiny_models["llama"]), str(work / "o")]
    args += ["--nsamples", "8", "--seqlen", "64", "--group-size", "64", "-q", "--calib", f"txt:{calib_file}"]
    proc = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, env=os.environ)
    err = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2, proc.stderr
    assert err.startswith("gptqlab: error: cannot write ") and "File too large; free disk space" in err
    assert listing(work) == []


def test_load_refuses_a_checkpoint_whose_weights_are_a_malicious_pickle(checkpoint, tmp_path):
    import gptqlab
    from gptqlab.errors import CheckpointError

    folder = shutil.copytree(checkpoint, tmp_path / "ckpt")
    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save({**state, "evil": _RunsCode(tmp_path / MARKER)}, folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin: cannot be read safely as weights"):
        gptqlab.load(str(folder), device="cpu")
    assert not (tmp_path / MARKER).exists()
