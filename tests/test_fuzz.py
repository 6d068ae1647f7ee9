"""Fuzzing with hypothesis: the quantization-config parser, the calibration readers, and the checkpoint
loader and ``verify`` on mutated real files. Whatever the input, nothing may raise anything but the
documented error (a GptqlabError subclass), and a damaged checkpoint is never passed as sound.

The CI run draws a fixed, derandomized set of about 500 examples (under a minute). For a longer random
run, scale every test's example count, e.g.::

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
from hypothesis import HealthCheck, given, settings
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
        except CheckpointError:
            return
    assert qc is None or type(qc.bits) is int


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
