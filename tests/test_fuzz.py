"""Fuzzing with hypothesis: the quantization-config parser, the calibration readers, the checkpoint
loader and ``verify`` on mutated real files, and ``gptqlab quantize`` resuming from a mutated ``OUT.partial``.
Whatever the input, nothing may raise anything but the documented error (a GptqlabError subclass), a damaged
checkpoint is never passed as sound, and a resumed run either refuses in one line or writes exactly the
checkpoint of an uninterrupted run.

The CI run draws a fixed, derandomized set of about 500 examples, 9 of them resumed quantize runs (about a
minute in all). For a longer random run, scale every test's example count, e.g.::

    GPTQLAB_FUZZ_SCALE=20 pytest tests/test_fuzz.py -p no:cacheprovider
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import gptqlab
from gptqlab.calib.readers import belle_paragraphs, txt_paragraphs
from gptqlab.calib.sources import builtin_texts
from gptqlab.checkpoint.config import CheckpointError, CheckpointQuantConfig, parse_quant_config, read_quant_config
from gptqlab.checkpoint.verify import verify
from gptqlab.cli import main
from gptqlab.errors import CalibrationError, GptqlabError
from gptqlab.quant.config import CHECKPOINT_FORMATS, SUPPORTED_BITS

SCALE = int(os.environ.get("GPTQLAB_FUZZ_SCALE", "1"))
LONG = SCALE > 1


def budget(examples: int):
    """Settings for ``examples`` CI examples (times GPTQLAB_FUZZ_SCALE); derandomized unless scaled up."""
    return settings(
        max_examples=examples * SCALE,
        deadline=None,
        derandomize=not LONG,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


# ---- strategies ----

scalars = (
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12)
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10,
)
# What random generation almost never reaches but real files do: deep nesting, very long numbers.
pathological_json = st.one_of(
    st.integers(1_000, 200_000).map(lambda n: "[" * n + "]" * n),
    st.integers(1_000, 200_000).map(lambda n: '{"a":' * n + "1" + "}" * n),
    st.integers(4_000, 20_000).map(lambda n: "1" * n),
    st.integers(4_000, 20_000).map(lambda n: '{"bits": ' + "4" * n + "}"),
)

QUANT_KEYS = (
    "quant_method",
    "bits",
    "group_size",
    "desc_act",
    "sym",
    "checkpoint_format",
    "format",
    "is_marlin_format",
    "static_groups",
)
quant_values = st.sampled_from([2, 3, 4, 8, 4.0, True, False, -1, 0, 128, "gptq", "gptq_v2", "awq", None]) | json_values
quant_dicts = st.dictionaries(st.sampled_from(QUANT_KEYS) | st.text(max_size=6), quant_values, max_size=8)

BELLE_KEYS = ("instruction", "input", "output", "conversations", "from", "value", "role", "content")
belle_values = st.recursive(
    scalars | st.sampled_from(["human", "gpt", "user", "assistant", "", "你好"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(BELLE_KEYS), inner, max_size=4),
    max_leaves=10,
)


def belle_text(values) -> st.SearchStrategy[str]:
    return st.lists(values.map(json.dumps), max_size=5).map("\n".join)


file_bytes = st.one_of(
    st.binary(max_size=300),
    st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass")),
    json_values.map(lambda v: json.dumps(v).encode()),
    pathological_json.map(str.encode),
)


# ---- 1. the quantization-config parser ----


@budget(150)
@given(raw=quant_dicts)
def test_parse_quant_config(raw):
    try:
        qc = parse_quant_config(raw, "quantize_config.json")
    except CheckpointError as exc:
        assert str(exc).startswith("quantize_config.json: ") and "\n" not in str(exc)
        return
    assert isinstance(qc, CheckpointQuantConfig)
    assert type(qc.bits) is int and qc.bits in SUPPORTED_BITS
    assert type(qc.group_size) is int and (qc.group_size == -1 or qc.group_size > 0)
    assert type(qc.desc_act) is bool and type(qc.sym) is bool
    assert qc.checkpoint_format in CHECKPOINT_FORMATS


@budget(100)
@given(
    name=st.sampled_from(["quantize_config.json", "quant_config.json", "config.json"]),
    data=file_bytes | quant_dicts.map(lambda d: json.dumps({"quantization_config": d}).encode()),
)
def test_read_quant_config(name, data):
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / name).write_bytes(data)
        try:
            qc = read_quant_config(tmp)
        except CheckpointError as exc:
            assert "\n" not in str(exc)
            return
    if qc is None:
        # "Unquantized" only for a config.json that is a JSON object without a quantization_config.
        assert name == "config.json"
        parsed = json.loads(data.decode("utf-8"))
        assert isinstance(parsed, dict) and parsed.get("quantization_config") is None
    else:
        assert type(qc.bits) is int and qc.bits in SUPPORTED_BITS
        assert qc.checkpoint_format in CHECKPOINT_FORMATS


# ---- 2. the calibration readers ----


def _read(reader, suffix: str, data: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"data{suffix}"
        path.write_bytes(data)
        try:
            paragraphs = reader(str(path))
        except CalibrationError as exc:
            assert "\n" not in str(exc)
            return
    assert paragraphs and all(isinstance(p, str) and p for p in paragraphs)


@budget(150)
@given(
    suffix=st.sampled_from([".jsonl", ".json"]),
    data=file_bytes | belle_text(belle_values).map(str.encode) | belle_text(json_values).map(str.encode),
)
def test_belle_reader(suffix, data):
    _read(belle_paragraphs, suffix, data)


@budget(50)
@given(data=file_bytes)
def test_txt_reader(data):
    _read(txt_paragraphs, ".txt", data)


# ---- 3. the checkpoint loader and verify, on mutated real files ----


@pytest.fixture(scope="module")
def checkpoint(tiny_models, tmp_path_factory) -> Path:
    calib = tmp_path_factory.mktemp("calib") / "calib.txt"
    calib.write_text("\n".join(builtin_texts("peoples-daily")[:40]), encoding="utf-8")
    out = tmp_path_factory.mktemp("fuzz") / "ckpt"
    args = ["--nsamples", "8", "--seqlen", "64", "--group-size", "64", "-q", "--calib", f"txt:{calib}"]
    with pytest.raises(SystemExit) as info:
        main(["quantize", str(tiny_models["llama"]), str(out), "--method", "rtn", *args])
        raise SystemExit(0)
    assert info.value.code == 0
    return out


def _header_end(data: bytes) -> int:
    return 8 + struct.unpack("<Q", data[:8])[0]


mutations = st.tuples(
    st.sampled_from(["model.safetensors"] * 3 + ["config.json", "quantize_config.json"]),
    st.sampled_from(["flip", "flip", "truncate", "set"]),
    st.floats(0, 1, exclude_max=True),  # where, as a fraction of the header (safetensors) or the file
    st.booleans(),  # safetensors: aim at the header (True) or anywhere
    st.integers(1, 255),  # xor mask / byte value
)


def _mutate(folder: Path, mutation) -> bool:
    """Damage one file in place; returns whether its bytes changed."""
    name, op, where, in_header, byte = mutation
    path = folder / name
    data = bytearray(path.read_bytes())
    span = _header_end(data) if name.endswith(".safetensors") and in_header else len(data)
    pos = min(int(where * span), len(data) - 1)
    before = bytes(data)
    if op == "flip":
        data[pos] ^= byte
    elif op == "set":
        data[pos] = byte
    else:
        del data[pos:]
    path.write_bytes(bytes(data))
    return bytes(data) != before


@budget(40)
@given(mutation=mutations)
def test_mutated_checkpoint(checkpoint, mutation):
    with tempfile.TemporaryDirectory() as tmp:
        folder = shutil.copytree(checkpoint, Path(tmp) / "ckpt")
        changed = _mutate(folder, mutation)
        try:
            full = verify(folder)
            cheap = verify(folder, hashes=False)
        except GptqlabError as exc:  # verify's only refusal: a config (model_type flipped) that needs custom code
            assert "runs custom code" in str(exc)
            return
        assert full.problems or not changed, "a damaged checkpoint passed verify"
        try:
            gptqlab.load(str(folder), device="cpu")
            loaded = True
        except GptqlabError:
            loaded = False
        assert loaded or cheap.problems, "load refused a checkpoint whose cheap checks found nothing"
        assert not loaded or not cheap.problems, "load accepted a checkpoint with problems"


# ---- 4. gptqlab quantize resuming from a mutated OUT.partial ----

PROGRESS_ARGS = ["--nsamples", "4", "--seqlen", "32", "--group-size", "32", "-q"]
PROGRESS_FILES = ("run.json", "state.safetensors", "blocks/block-00000.safetensors")
# What a user, another program or a crash may leave in the progress folder.
STRAYS = (
    "notes.txt",
    "blocks/block-00001.safetensors",
    "blocks/block-x.safetensors",
    "blocks/rest.safetensors",
    "final",
    "final/model.safetensors",
    "state.safetensors.tmp",
)


@pytest.fixture(scope="module")
def progress(tiny_models, tmp_path_factory) -> dict:
    """An OUT.partial interrupted after block 0 of the 2-block tiny LLaMA, and an uninterrupted reference."""
    from testkit import run_cli

    import gptqlab.quantize.progress
    from gptqlab.quantize.progress import partial_dir

    root = tmp_path_factory.mktemp("progress")
    calib = root / "calib.txt"
    calib.write_text("\n".join(builtin_texts("peoples-daily")[:20]), encoding="utf-8")
    args = [*PROGRESS_ARGS, "--calib", f"txt:{calib}"]
    model = tiny_models["llama"]
    assert run_cli(["quantize", model, root / "reference", *args]) == 0
    real_save = gptqlab.quantize.progress.save_atomic

    def interrupt_at_block_1(tensors, path, metadata=None):
        if path.name == "block-00001.safetensors":
            raise KeyboardInterrupt
        real_save(tensors, path, metadata)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gptqlab.quantize.progress, "save_atomic", interrupt_at_block_1)
        assert run_cli(["quantize", model, root / "interrupted", *args]) == 130
    return {"model": model, "args": args, "partial": partial_dir(root / "interrupted"), "reference": root / "reference"}


def _tensors(folder: Path) -> dict[str, bytes]:
    from safetensors.torch import load_file

    return {
        k: t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
        for k, t in load_file(folder / "model.safetensors").items()
    }


progress_mutations = st.one_of(
    st.tuples(
        st.just("damage"),
        st.sampled_from(PROGRESS_FILES),
        st.sampled_from(["flip", "truncate", "set"]),
        st.floats(0, 1, exclude_max=True),
        st.integers(1, 255),
    ),
    st.tuples(st.just("stray"), st.sampled_from(STRAYS), st.sampled_from(["file", "folder"]), st.just(0.0), st.just(0)),
    st.tuples(st.just("delete"), st.sampled_from(PROGRESS_FILES), st.just(""), st.just(0.0), st.just(0)),
)


def _mutate_progress(partial: Path, mutation) -> None:
    kind, name, op, where, byte = mutation
    path = partial / name
    if kind == "delete":
        path.unlink()
    elif kind == "stray":
        if path.exists():
            path.unlink()
        path.parent.mkdir(parents=True, exist_ok=True)
        if op == "folder":
            (path / "inner").mkdir(parents=True)
        else:
            path.write_bytes(b"not written by gptqlab")
    else:
        data = bytearray(path.read_bytes())
        pos = min(int(where * len(data)), len(data) - 1)
        if op == "flip":
            data[pos] ^= byte
        elif op == "set":
            data[pos] = byte
        else:
            del data[pos:]
        path.write_bytes(bytes(data))


@budget(6)
@given(mutation=progress_mutations)
@example(mutation=("damage", "blocks/block-00000.safetensors", "flip", 0.7, 1))
@example(mutation=("damage", "state.safetensors", "truncate", 0.5, 0))
@example(mutation=("stray", "blocks/rest.safetensors", "folder", 0.0, 0))
def test_resume_from_a_mutated_progress_folder(progress, mutation):
    import sys

    from gptqlab.quantize.progress import partial_dir

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        shutil.copytree(progress["partial"], partial_dir(out))
        _mutate_progress(partial_dir(out), mutation)
        err = []
        real_stderr = sys.stderr
        sys.stderr = _Capture(err)
        try:
            try:
                main(["quantize", str(progress["model"]), str(out), *progress["args"]])
                code = 0
            except SystemExit as exc:
                code = int(exc.code or 0)
        finally:
            sys.stderr = real_stderr
        text = "".join(err).strip()
        assert code in (0, 2), (code, text)
        if code == 2:
            assert text.startswith("gptqlab: error: ") and "\n" not in text, text
            assert not out.exists()
        else:
            assert _tensors(out) == _tensors(progress["reference"]), "a resumed run wrote other tensors"
            assert verify(out).sound
            assert not partial_dir(out).exists()


class _Capture:
    """A stand-in for sys.stderr that keeps what is written (capsys does not mix with hypothesis)."""

    def __init__(self, sink: list):
        self.sink = sink

    def write(self, text: str) -> int:
        self.sink.append(text)
        return len(text)

    def flush(self) -> None:
        pass
