"""End-to-end ``gptqlab quantize`` on tiny random models, and its bad-input handling."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from testkit import run_cli

from gptqlab.checkpoint.format import from_checkpoint

SMALL = ["--nsamples", "8", "--seqlen", "64", "--group-size", "64", "-q"]


def load_all(folder):
    tensors = {}
    for f in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors


@pytest.mark.parametrize("arch", ["llama", "bloom", "qwen2"])
def test_quantize_writes_complete_checkpoint(tiny_models, tmp_path, arch):
    out = tmp_path / "out"
    assert run_cli(["quantize", tiny_models[arch], out, *SMALL]) == 0
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "quantize_config.json", "quant_report.json", "SHA256SUMS"} <= names
    assert "tokenizer.json" in names
    assert not (tmp_path / "out.partial").exists()
    qcfg = json.loads((out / "quantize_config.json").read_text())
    assert qcfg["bits"] == 4 and qcfg["group_size"] == 64 and qcfg["checkpoint_format"] == "gptq"
    assert json.loads((out / "config.json").read_text())["quantization_config"] == qcfg
    report = json.loads((out / "quant_report.json").read_text())
    n_linear = 7 if arch != "bloom" else 4
    assert len(report["layers"]) == 2 * n_linear
    assert all(layer["loss"] >= 0 for layer in report["layers"])
    assert report["calibration"]["tokens_per_char"] > 0
    tensors = load_all(out)
    qweights = [k for k in tensors if k.endswith(".qweight")]
    assert len(qweights) == 2 * n_linear
    for k in qweights:
        assert tensors[k].dtype == torch.int32
        prefix = k.removesuffix(".qweight")
        assert tensors[prefix + ".scales"].dtype == torch.float16
        assert tensors[prefix + ".g_idx"].dtype == torch.int32
        assert prefix + ".weight" not in tensors
    # symmetric 4-bit v1 stores zero 8 as 7 in every nibble
    some_zeros = tensors[qweights[0].replace("qweight", "qzeros")]
    assert torch.all(some_zeros == 0x77777777)


def test_checkpoint_dequantizes_to_exactly_the_quantized_weights(tiny_models, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gptqlab.calib import load_calibration
    from gptqlab.quant import QuantConfig
    from gptqlab.quantize.driver import cpu_compute_dtype, quantize_model

    out = tmp_path / "out"
    assert run_cli(["quantize", tiny_models["llama"], out, *SMALL, "--act-order"]) == 0
    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"], dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(tiny_models["llama"])
    ids = load_calibration("peoples-daily", tok, 8, 64, 0).input_ids
    # as the CLI on the CPU: float16 layer inputs and the CPU's compute dtype (run.py), so both give the same codes
    quantize_model(
        model,
        ids,
        QuantConfig(bits=4, group_size=64, desc_act=True),
        act_dtype=torch.float16,
        compute_dtype=cpu_compute_dtype(),
        progress=False,
    )
    tensors = load_all(out)
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and f"{name}.qweight" in tensors:
            t = {k: tensors[f"{name}.{k}"] for k in ("qweight", "qzeros", "scales", "g_idx")}
            res = from_checkpoint(t, 4, "gptq")
            assert torch.equal(res.Q, mod.weight.data), name
            assert not torch.equal(res.g_idx, torch.arange(res.g_idx.numel(), dtype=torch.int32) // 64)


@pytest.mark.parametrize("bits", [2, 3, 8])
def test_other_bit_widths_and_v2_zeros(tiny_models, tmp_path, bits):
    out = tmp_path / "out"
    args = ["quantize", tiny_models["llama"], out, *SMALL, "--bits", bits, "--format", "gptq_v2", "--method", "rtn"]
    assert run_cli(args) == 0
    tensors = load_all(out)
    z = tensors["model.layers.0.mlp.down_proj.qzeros"]
    res = from_checkpoint(
        {k.split(".")[-1]: v for k, v in tensors.items() if "layers.0.mlp.down_proj." in k}, bits, "gptq_v2"
    )
    assert torch.all(res.zeros == 2 ** (bits - 1))
    assert z.shape == (256 // 64, 128 * bits // 32)


def test_sharding_writes_index(tiny_models, tmp_path):
    out = tmp_path / "out"
    assert run_cli(["quantize", tiny_models["qwen2"], out, *SMALL, "--max-shard-size", "100KB"]) == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) >= 3
    assert set(index["weight_map"].values()) == set(shards)
    assert len(index["weight_map"]) == len(load_all(out))


def _bad_jsonl(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"instruction": "你好", "output": "您好"}\n{not json\n', encoding="utf-8")
    return f"belle:{p}"


def _empty_txt(tmp_path):
    p = tmp_path / "empty.txt"
    p.write_text("", encoding="utf-8")
    return f"txt:{p}"


BAD_INPUTS = [
    ("missing model path", lambda m, t: ["quantize", t / "no-such-model", t / "o"], "does not exist"),
    ("unsupported bits", lambda m, t: ["quantize", m, t / "o", "--bits", "5"], "bits must be one of 2, 3, 4, 8"),
    ("group size not dividing", lambda m, t: ["quantize", m, t / "o", "--group-size", "96"], "does not divide"),
    ("empty calibration file", lambda m, t: ["quantize", m, t / "o", "--calib", _empty_txt(t)], "empty"),
    ("malformed jsonl line", lambda m, t: ["quantize", m, t / "o", "--calib", _bad_jsonl(t)], "line 2"),
    (
        "seqlen beyond context",
        lambda m, t: ["quantize", m, t / "o", "--seqlen", "300"],
        "longer than the model's context of 256",
    ),
    ("nsamples not positive", lambda m, t: ["quantize", m, t / "o", "--nsamples", "0"], "--nsamples must be positive"),
]


@pytest.mark.parametrize(("what", "argv", "message"), BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_exits_2_with_one_line(tiny_models, tmp_path, capsys, what, argv, message):
    work = tmp_path / "work"
    work.mkdir()
    code = run_cli(argv(tiny_models["llama"], work))
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("gptqlab: error:") and "\n" not in err and "Traceback" not in err
    assert message in err
    leftovers = [p.name for p in work.iterdir() if not p.name.endswith((".txt", ".jsonl"))]
    assert leftovers == []


def test_existing_output_needs_overwrite(tiny_models, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    assert run_cli(["quantize", tiny_models["llama"], out, *SMALL]) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "precious"
    assert run_cli(["quantize", tiny_models["llama"], out, *SMALL, "--overwrite"]) == 0
    assert (out / "model.safetensors").is_file() and not (out / "keep.txt").exists()
