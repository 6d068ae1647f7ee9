"""Serving rules (gptqlab.checkpoint.engines) on real checkpoints written by gptqlab from the tiny models,
``gptqlab verify --engine``, the static-groups rewrite of desc_act, and damp_percent's bounds.

The tiny LLaMA: hidden 128, intermediate 256, 4 attention heads and 2 KV heads of 32 dimensions.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from testkit import run_cli

import gptqlab
from gptqlab.checkpoint.engines import (
    Settings,
    Shapes,
    quantize_warnings,
    read_checkpoint,
    serving_problems,
    summary_line,
    tp_problems,
)
from gptqlab.errors import ConfigError
from gptqlab.quant import QuantConfig

SMALL = ["--nsamples", "4", "--seqlen", "32", "-q"]
IDS = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def ckpts(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("engines")
    variants = {
        "w4g128": ("llama", ["--method", "rtn"]),
        "w3g128": ("llama", ["--method", "rtn", "--bits", "3"]),
        "w4-asym": ("llama", ["--method", "rtn", "--no-sym"]),
        "w4-act": ("llama", ["--act-order"]),
        "w4-act-static": ("llama", ["--act-order", "--static-groups"]),
        "bloom": ("bloom", ["--method", "rtn"]),
    }
    for name, (arch, extra) in variants.items():
        assert run_cli(["quantize", tiny_models[arch], root / name, *SMALL, *extra]) == 0
    return root


def reasons(folder, engine: str, tp: int = 1) -> list[str]:
    return serving_problems(read_checkpoint(folder), engine, tp)


def test_four_bit_symmetric_g128_is_served_everywhere(ckpts, capsys):
    for engine in ("vllm", "sglang", "transformers"):
        assert reasons(ckpts / "w4g128", engine) == []
    assert run_cli(["verify", ckpts / "w4g128", "--engine", "vllm"]) == 0
    assert "vLLM 0.33.0 can serve it on 1 GPU(s)" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("name", "engine", "start"),
    [
        ("w3g128", "vllm", "3-bit symmetric is not served: only 4- and 8-bit symmetric GPTQ is"),
        ("w3g128", "sglang", "3-bit symmetric is not served"),
        ("w4-asym", "vllm", "4-bit asymmetric is not served"),
        ("w4-act", "vllm", "desc_act with group size 128 is refused"),
        ("bloom", "vllm", "BLOOM cannot load: vLLM's BLOOM loader reshapes dimension 0"),
        ("bloom", "sglang", "BLOOM is not served: SGLang has no native BLOOM model"),
    ],
)
def test_refusals_name_their_reason_and_source(ckpts, name, engine, start, capsys):
    (reason,) = reasons(ckpts / name, engine)
    assert reason.startswith(start) and reason.endswith("]")  # "[<file in the engine's source>]"
    assert run_cli(["verify", ckpts / name, "--engine", engine]) == 1
    out, err = capsys.readouterr()
    assert out.splitlines() == [reason]
    assert err.startswith("gptqlab: ") and "cannot serve" in err and err.endswith("1 reason(s)\n")


def test_transformers_serves_what_vllm_refuses(ckpts):
    for name in ("w3g128", "w4-asym", "w4-act", "bloom"):
        assert reasons(ckpts / name, "transformers") == []


def test_sglang_serves_act_order_with_groups(ckpts):
    assert reasons(ckpts / "w4-act", "sglang") == []  # its Marlin path keeps g_idx


def test_tensor_parallel_degrees(ckpts, capsys):
    folder = ckpts / "w4g128"
    assert reasons(folder, "vllm", 3) == [
        "--tp 3: 4 attention heads do not split evenly over 3 GPUs",
        "--tp 3: 2 KV heads can neither be split over nor replicated onto 3 GPUs (2 must be a multiple or a "
        "divisor of 3)",
    ]
    # two GPUs split the heads, but o_proj and down_proj then get 64 and 128 inputs each: o_proj's 64 is
    # below Marlin's tile of 128 inputs
    assert reasons(folder, "vllm", 2) == ["--tp 2: o_proj gets 64 inputs per GPU; Marlin needs a multiple of 128"]
    assert run_cli(["verify", folder, "--engine", "sglang", "--tp", "3"]) == 1
    assert len(capsys.readouterr().out.splitlines()) == 2
    assert reasons(folder, "transformers", 3) == []  # not a tensor-parallel server here


def test_tp_rules_on_llama_7b_shapes():
    """LLaMA-7B (32 heads, hidden 4096, MLP 11008): 1 and 2 GPUs serve it at group size 128; at 4 the
    down_proj share of 11008 / 4 = 2752 inputs is not a multiple of 128 (86 groups do not split 4 ways)."""
    lin = (
        ("self_attn.q_proj", 4096, 4096),
        ("self_attn.k_proj", 4096, 4096),
        ("self_attn.v_proj", 4096, 4096),
        ("self_attn.o_proj", 4096, 4096),
        ("mlp.gate_proj", 4096, 11008),
        ("mlp.up_proj", 4096, 11008),
        ("mlp.down_proj", 11008, 4096),
    )
    from gptqlab.arch import ARCHS

    a = ARCHS["llama"]
    shapes = Shapes(32, 32, 128, lin, a.row_parallel, a.fused, a.kv)
    assert [tp_problems(shapes, 128, tp) for tp in (1, 2)] == [[], []]
    assert tp_problems(shapes, 128, 4) == [
        "--tp 4: down_proj gets 2752 inputs per GPU; Marlin needs a multiple of 128",
        "--tp 4: down_proj gets 2752 inputs per GPU, which group size 128 does not divide",
    ]
    # Llama-3-8B's shapes (8 KV heads of 128, MLP 14336): 16 GPUs replicate the KV heads, and every share fits
    gqa_lin = (
        ("self_attn.q_proj", 4096, 4096),
        ("self_attn.k_proj", 4096, 1024),
        ("self_attn.v_proj", 4096, 1024),
        ("self_attn.o_proj", 4096, 4096),
        ("mlp.gate_proj", 4096, 14336),
        ("mlp.up_proj", 4096, 14336),
        ("mlp.down_proj", 14336, 4096),
    )
    gqa = Shapes(32, 8, 128, gqa_lin, a.row_parallel, a.fused, a.kv)
    assert tp_problems(gqa, 128, 16) == []
    assert tp_problems(gqa, 128, 32) == [
        "--tp 32: down_proj gets 448 inputs per GPU; Marlin needs a multiple of 128",
        "--tp 32: down_proj gets 448 inputs per GPU, which group size 128 does not divide",
    ]


def test_plain_verify_prints_which_engines_serve(ckpts, capsys):
    assert run_cli(["verify", ckpts / "bloom"]) == 0
    line = capsys.readouterr().out.splitlines()[-1]
    assert line == (
        "engines: vLLM 0.33.0 no; SGLang 0.5.23 no; transformers 5 yes (details: gptqlab verify DIR --engine NAME)"
    )
    assert summary_line(read_checkpoint(ckpts / "w4g128")).startswith(
        "engines: vLLM 0.33.0 yes (--tp 1); SGLang 0.5.23 yes (--tp 1); transformers 5 yes"
    )


def test_static_groups_write_desc_act_false_and_mean_the_same(ckpts, tmp_path):
    static = ckpts / "w4-act-static"
    qc = json.loads((static / "quantize_config.json").read_text())
    assert (qc["desc_act"], qc["static_groups"]) == (False, True)
    assert json.loads((static / "config.json").read_text())["quantization_config"]["desc_act"] is False
    assert reasons(static, "vllm") == []
    # the same tensors declared as act-order load to the same logits
    declared = shutil.copytree(static, tmp_path / "declared")
    for name in ("quantize_config.json", "config.json"):
        cfg = json.loads((declared / name).read_text())
        (cfg.get("quantization_config") or cfg)["desc_act"] = True
        (declared / name).write_text(json.dumps(cfg))
    (declared / "SHA256SUMS").unlink()
    with torch.inference_mode():
        a = gptqlab.load(str(static), device="cpu")(IDS).logits
        b = gptqlab.load(str(declared), device="cpu")(IDS).logits
    assert torch.equal(a, b)


def test_static_groups_checkpoint_in_transformers(ckpts, monkeypatch, tmp_path):
    pytest.importorskip("gptqmodel")
    pytest.importorskip("optimum")
    from transformers import AutoModelForCausalLM

    monkeypatch.chdir(tmp_path)  # GPTQModel writes ./logs
    static = ckpts / "w4-act-static"
    theirs = AutoModelForCausalLM.from_pretrained(static, device_map="cpu")
    with torch.inference_mode():
        want = theirs(IDS).logits.float()
        got = gptqlab.load(str(static), device="cpu")(IDS).logits.float()
    err = (got - want).abs().max().item()
    assert err < 0.02 * want.abs().max().item(), err  # GPTQModel runs fp16 on the CPU, gptqlab fp32


def test_damp_percent_bounds(ckpts, tiny_models, tmp_path, capsys):
    QuantConfig(damp_percent=0.999)
    for bad in (0.0, 1.0, 1.5):
        with pytest.raises(ConfigError, match=r"damp_percent must be in \(0, 1\)"):
            QuantConfig(damp_percent=bad)
    assert run_cli(["quantize", tiny_models["llama"], tmp_path / "o", "--damp-percent", "1", *SMALL]) == 2
    assert "damp_percent must be in (0, 1), got 1.0" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    folder = shutil.copytree(ckpts / "w4g128", tmp_path / "damp1")  # a checkpoint another tool wrote
    for name in ("quantize_config.json", "config.json"):
        cfg = json.loads((folder / name).read_text())
        (cfg.get("quantization_config") or cfg)["damp_percent"] = 1.0
        (folder / name).write_text(json.dumps(cfg))
    (reason,) = reasons(folder, "transformers")
    assert reason.startswith("damp_percent 1.0 is refused: GPTQConfig requires 0 < damp_percent < 1")


def test_quantize_warnings_name_each_engine_that_will_refuse():
    assert quantize_warnings(QuantConfig(bits=4, group_size=128), "llama") == []
    lines = quantize_warnings(QuantConfig(bits=3, group_size=128, desc_act=True), "llama")
    assert [line.split(" will not serve")[0] for line in lines] == ["vLLM 0.33.0", "SGLang 0.5.23"]
    assert "3-bit symmetric is not served" in lines[0] and "desc_act with group size 128 is refused" in lines[0]
    static = QuantConfig(bits=4, group_size=128, desc_act=True, static_groups=True)
    assert quantize_warnings(static, "llama") == []  # written as desc_act: false
    assert quantize_warnings(QuantConfig(), "bloom")[0].startswith("vLLM 0.33.0 will not serve this checkpoint: BLOOM")


def test_settings_rules_on_group_sizes():
    s = Settings(4, 256, False, True, "gptq", 0.01, "llama")
    shapes = Shapes(4, 4, 32, ())
    from gptqlab.checkpoint.engines import Checkpoint

    (reason,) = serving_problems(Checkpoint(s, shapes), "vllm")
    assert reason.startswith("group size 256 is not served: Marlin takes -1, 32, 64 or 128")


def test_quantize_warns_before_the_work_and_still_writes(tiny_models, tmp_path, capsys):
    args = ["--method", "rtn", "--bits", "3", "--nsamples", "4", "--seqlen", "32"]
    assert run_cli(["quantize", tiny_models["llama"], tmp_path / "loud", *args]) == 0
    warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning: ")]
    assert [w.split(" will not serve")[0] for w in warnings] == ["warning: vLLM 0.33.0", "warning: SGLang 0.5.23"]
    assert (tmp_path / "loud" / "model.safetensors").is_file()  # a warning, not a refusal
    assert run_cli(["quantize", tiny_models["llama"], tmp_path / "quiet", *args, "-q"]) == 0
    assert "warning" not in capsys.readouterr().out
