"""``gptqlab.load`` on every checkpoint kind of docs/FORMAT.md, on CPU (torch backend).

Kinds: gptqlab's own (v1 and v2, act-order, 8-bit), GPTQModel's v1 output (act-order), and a legacy
AutoGPTQ layout (``gptq_model-4bit-64g.safetensors``, ``is_marlin_format``, zero biases, no ``sym``).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from testkit import dequantized_reference, run_cli

import gptqlab
from gptqlab.qlinear import QuantLinear

SMALL = ["--nsamples", "8", "--seqlen", "64", "--group-size", "64", "-q"]
IDS = torch.randint(0, 512, (2, 20), generator=torch.Generator().manual_seed(1))


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits.float()


@pytest.fixture(scope="module")
def ckpts(tiny_models, tmp_path_factory):
    """gptqlab checkpoints of the tiny llama: v1 act-order, v2, 8-bit."""
    root = tmp_path_factory.mktemp("ckpts")
    variants = {
        "v1-act-order": ["--act-order"],
        "v2": ["--format", "gptq_v2", "--no-sym"],
        "8bit": ["--bits", "8"],
    }
    for name, extra in variants.items():
        assert run_cli(["quantize", tiny_models["llama"], root / name, *SMALL, *extra]) == 0
    return root


@pytest.mark.parametrize(
    ("kind", "bits", "fmt"), [("v1-act-order", 4, "gptq"), ("v2", 4, "gptq_v2"), ("8bit", 8, "gptq")]
)
def test_load_matches_dequantized_reference(tiny_models, ckpts, kind, bits, fmt):
    # the torch backend keeps the exact GPTQ weight; the CPU default (torch's int4 kernel, bf16 scales) is
    # bounded against it in tests/kernels
    model = gptqlab.load(str(ckpts / kind), device="cpu", backend="torch")
    q = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(q) == 14
    want = logits(dequantized_reference(tiny_models["llama"], ckpts / kind, bits, fmt))
    got = logits(model)
    # Both run in float32 from the same fp16 scales; only summation order differs.
    assert (got - want).abs().max().item() < 1e-4 * max(1.0, want.abs().max().item())


def test_act_order_is_reordered_at_load(ckpts):
    model = gptqlab.load(str(ckpts / "v1-act-order"), device="cpu")
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.perm is not None and layer.g_idx is None  # groups made contiguous, kernels never see g_idx


def test_weights_stay_packed(ckpts):
    model = gptqlab.load(str(ckpts / "v1-act-order"), device="cpu")
    q = [m for m in model.modules() if isinstance(m, QuantLinear)]
    fp16_bytes = sum(m.in_features * m.out_features * 2 for m in q)
    packed = sum(m.packed_nbytes() for m in q)
    # 4-bit codes are 1/4 of fp16; scales, zeros and the act-order permutation add a little.
    assert packed < 0.35 * fp16_bytes, packed / fp16_bytes


def test_generate_runs(ckpts):
    model = gptqlab.load(str(ckpts / "8bit"), device="cpu")
    out = model.generate(IDS[:1, :5], max_new_tokens=6, do_sample=False)
    assert out.shape == (1, 11)


def make_legacy_autogptq(src, dst):
    """Rewrite a gptqlab v1 checkpoint the way AutoGPTQ 0.x saved it."""
    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    for key in [k for k in tensors if k.endswith(".qweight")]:
        prefix = key.removesuffix(".qweight")
        if prefix + ".bias" not in tensors:
            tensors[prefix + ".bias"] = torch.zeros(tensors[prefix + ".scales"].shape[1], dtype=torch.float16)
    os.remove(dst / "model.safetensors")
    save_file(tensors, str(dst / "gptq_model-4bit-64g.safetensors"), metadata={"format": "pt"})
    qc = json.loads((dst / "quantize_config.json").read_text())
    for key in ("sym", "checkpoint_format", "format", "meta", "pack_dtype", "lm_head"):
        qc.pop(key, None)
    qc.update({"is_marlin_format": False, "model_file_base_name": "gptq_model-4bit-64g", "model_name_or_path": None})
    (dst / "quantize_config.json").write_text(json.dumps(qc))
    cfg = json.loads((dst / "config.json").read_text())
    cfg.pop("quantization_config")
    (dst / "config.json").write_text(json.dumps(cfg))
    (dst / "SHA256SUMS").unlink()


def test_legacy_autogptq_layout(tiny_models, ckpts, tmp_path):
    legacy = tmp_path / "legacy"
    make_legacy_autogptq(ckpts / "v1-act-order", legacy)
    model = gptqlab.load(str(legacy), device="cpu")
    assert model.model.layers[0].mlp.down_proj.bias is None  # the all-zero bias is dropped
    want = logits(gptqlab.load(str(ckpts / "v1-act-order"), device="cpu"))
    assert torch.allclose(logits(model), want, atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def gptqmodel_ckpt(tiny_models, tmp_path_factory):
    """A checkpoint written by GPTQModel itself (v1, act-order), from our calibration tokens."""
    gptqmodel = pytest.importorskip("gptqmodel")
    from transformers import AutoTokenizer

    from gptqlab.calib import load_calibration

    root = tmp_path_factory.mktemp("gptqmodel")
    cwd = os.getcwd()
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    os.chdir(root)  # GPTQModel writes ./logs
    try:
        tok = AutoTokenizer.from_pretrained(tiny_models["llama"])
        ids = load_calibration("peoples-daily", tok, 8, 64, 0).input_ids
        calib = [{"input_ids": r.tolist(), "attention_mask": [1] * len(r)} for r in ids]
        qc = gptqmodel.QuantizeConfig(bits=4, group_size=64, desc_act=True)
        model = gptqmodel.GPTQModel.load(str(tiny_models["llama"]), qc)
        model.quantize(calib, batch_size=1)
        model.save(str(root / "out"))
    finally:
        os.chdir(cwd)
    return root / "out"


def test_gptqmodel_checkpoint_matches_gptqmodel_logits(gptqmodel_ckpt, monkeypatch, tmp_path):
    from transformers import AutoModelForCausalLM

    monkeypatch.chdir(tmp_path)
    ours = gptqlab.load(str(gptqmodel_ckpt), device="cpu")
    g_idx_nonmonotonic = any(m.perm is not None for m in ours.modules() if isinstance(m, QuantLinear))
    assert g_idx_nonmonotonic  # GPTQModel's act-order checkpoint really exercises the reordering
    theirs = AutoModelForCausalLM.from_pretrained(gptqmodel_ckpt, device_map="cpu")
    want = logits(theirs)
    got = logits(ours)
    # GPTQModel runs in fp16 on CPU, gptqlab in bf16 (its CPU default on the int4 kernel).
    err = (got - want).abs().max().item()
    assert err < 0.02 * want.abs().max().item(), err


@pytest.fixture(scope="module")
def transformers_v2_ckpt(tiny_models, tmp_path_factory):
    """A checkpoint from transformers' own GPTQConfig path (optimum + GPTQModel), which writes gptq_v2."""
    pytest.importorskip("gptqmodel")
    pytest.importorskip("optimum")
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPTQConfig

    from gptqlab.calib.sources import builtin_texts

    root = tmp_path_factory.mktemp("tf_v2")
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        tok = AutoTokenizer.from_pretrained(tiny_models["llama"])
        qc = GPTQConfig(bits=4, group_size=64, dataset=list(builtin_texts("peoples-daily")[:16]), tokenizer=tok)
        model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"], quantization_config=qc, device_map="cpu")
        model.save_pretrained(root / "out")
        tok.save_pretrained(root / "out")
    finally:
        os.chdir(cwd)
    return root / "out"


def test_transformers_gptq_v2_checkpoint(transformers_v2_ckpt, monkeypatch, tmp_path):
    from transformers import AutoModelForCausalLM

    monkeypatch.chdir(tmp_path)
    qc = json.loads((transformers_v2_ckpt / "config.json").read_text())["quantization_config"]
    assert qc["checkpoint_format"] == "gptq_v2"
    ours = gptqlab.load(str(transformers_v2_ckpt), device="cpu")
    assert ours.gptqlab_quant_config.zero_offset == 0
    theirs = AutoModelForCausalLM.from_pretrained(transformers_v2_ckpt, device_map="cpu")
    want = logits(theirs)
    err = (logits(ours) - want).abs().max().item()
    assert err < 0.02 * want.abs().max().item(), err


class _WritesMarker:
    """Unpickling this object (torch.load with weights_only=False) would create ``marker``."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "unpickled"))


def test_unquantized_pickle_only_folder_is_refused_without_unpickling(tmp_path):
    from gptqlab.embedded import resolve_model
    from gptqlab.errors import CheckpointError

    folder = shutil.copytree(resolve_model("tiny-zh-llama"), tmp_path / "model")
    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "MARKER"
    torch.save({**state, "evil": _WritesMarker(marker)}, folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin: cannot be read safely as weights") as info:
        gptqlab.load(str(folder), device="cpu")
    assert "\n" not in str(info.value) and "weights_only=False" not in str(info.value)
    assert not marker.exists()


def test_default_dtype(ckpts):
    from gptqlab.kernels import cpu

    assert gptqlab.load("tiny-zh-llama", device="cpu").dtype == torch.float32  # unquantized: as before
    assert gptqlab.load(str(ckpts / "v2"), device="cpu", backend="torch").dtype == torch.float32  # the exact path
    fast = gptqlab.load(str(ckpts / "v2"), device="cpu")
    assert fast.dtype == (torch.bfloat16 if cpu.kernel_available() else torch.float32)
    assert gptqlab.load(str(ckpts / "v2"), device="cpu", dtype=torch.float32).dtype == torch.float32
