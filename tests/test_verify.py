"""``gptqlab verify`` and the checks that ``gptqlab.load`` runs on every load: one concern per test, each
damage made on a copy of a real checkpoint and named back by file and tensor."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from testkit import run_cli

import gptqlab
from gptqlab.calib.sources import builtin_texts
from gptqlab.checkpoint.verify import Problem, verify
from gptqlab.checkpoint.write import write_manifest
from gptqlab.errors import CheckpointError

Q = "model.layers.1.mlp.up_proj"  # K = 128, N = 256; with group size 64: G = 2


@pytest.fixture(scope="module")
def calib_args(tmp_path_factory) -> list[str]:
    calib = tmp_path_factory.mktemp("calib") / "calib.txt"
    calib.write_text("\n".join(builtin_texts("peoples-daily")[:40]), encoding="utf-8")
    return ["--nsamples", "8", "--seqlen", "64", "--group-size", "64", "-q", "--calib", f"txt:{calib}"]


@pytest.fixture(scope="module")
def checkpoints(tiny_models, calib_args, tmp_path_factory) -> dict[str, Path]:
    """Sound checkpoints: 'sym4' (GPTQ, act-order), 'asym3' (RTN, v2), 'asym8' (RTN, v1), 'bloom' (sharded)."""
    root = tmp_path_factory.mktemp("checkpoints")
    variants = {
        "sym4": ("llama", ["--act-order"]),
        "asym3": ("llama", ["--method", "rtn", "--bits", "3", "--no-sym", "--format", "gptq_v2"]),
        "asym8": ("llama", ["--method", "rtn", "--bits", "8", "--no-sym"]),
        "bloom": ("bloom", ["--method", "rtn", "--max-shard-size", "100KB"]),
    }
    for name, (arch, extra) in variants.items():
        assert run_cli(["quantize", tiny_models[arch], root / name, *calib_args, *extra]) == 0
    return {name: root / name for name in variants}


def copy(checkpoints, tmp_path, name: str = "sym4") -> Path:
    return shutil.copytree(checkpoints[name], tmp_path / name)


def edit_tensors(folder: Path, edit, manifest: bool = True) -> None:
    """Apply ``edit(state)`` to model.safetensors; rewrite SHA256SUMS so only the cheap checks can object."""
    state = load_file(folder / "model.safetensors")
    edit(state)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    if manifest:
        write_manifest(folder)


def edit_json(folder: Path, name: str, edit) -> None:
    cfg = json.loads((folder / name).read_text())
    edit(cfg)
    (folder / name).write_text(json.dumps(cfg))
    write_manifest(folder)


def problems(folder: Path, hashes: bool = True) -> list[str]:
    return [str(p) for p in verify(folder, hashes=hashes).problems]


def load_error(folder: Path) -> str:
    with pytest.raises(CheckpointError) as info:
        gptqlab.load(str(folder), device="cpu")
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("name", ["sym4", "asym3", "asym8", "bloom"])
def test_sound_checkpoints_verify_and_load(checkpoints, name, capsys):
    folder = checkpoints[name]
    report = verify(folder)
    assert report.problems == []
    assert report.hashed == len((folder / "SHA256SUMS").read_text().splitlines())
    assert report.layers == (8 if name == "bloom" else 14)
    assert run_cli(["verify", folder]) == 0
    summary = f"sound ({report.hashed} files match SHA256SUMS, {report.layers} quantized layers checked)"
    first, engines = capsys.readouterr().out.strip().splitlines()
    assert first == f"{folder}: {summary}"
    assert engines.startswith("engines: vLLM 0.33.0 ") and "transformers 5 yes" in engines
    gptqlab.load(str(folder), device="cpu")


def test_a_flipped_payload_bit_is_caught_by_the_hash_only(checkpoints, tmp_path):
    """qweight codes are bounded by their packing, so a flipped code bit passes every cheap check: only the
    SHA-256 manifest sees it, and that is why ``gptqlab verify`` hashes."""
    folder = copy(checkpoints, tmp_path)
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[-5] ^= 0x10  # inside the last tensor's data
    (folder / "model.safetensors").write_bytes(bytes(data))
    assert problems(folder) == ["model.safetensors: SHA-256 differs from SHA256SUMS: the file was changed or damaged"]
    assert problems(folder, hashes=False) == []


def test_manifest_problems(checkpoints, tmp_path):
    folder = copy(checkpoints, tmp_path)
    lines = (folder / "SHA256SUMS").read_text().splitlines()
    lines = [line for line in lines if not line.endswith("  tokenizer.json")]
    lines += ["not a line", "0" * 64 + "  ../outside.json", "0" * 64 + "  gone.safetensors"]
    (folder / "SHA256SUMS").write_text("\n".join(lines) + "\n")
    assert problems(folder) == [
        f"SHA256SUMS: line {len(lines) - 2} is not '<sha256>  <file>'",
        f"SHA256SUMS: line {len(lines) - 1} names '../outside.json', which is outside the folder",
        "gone.safetensors: listed in SHA256SUMS but missing",
        "tokenizer.json: not listed in SHA256SUMS, so its integrity cannot be checked",
    ]
    (folder / "SHA256SUMS").unlink()
    assert problems(folder)[0].startswith("SHA256SUMS: missing, so file integrity cannot be checked")
    assert problems(folder, hashes=False) == []


def test_wrong_bits_in_the_config(checkpoints, tmp_path):
    folder = copy(checkpoints, tmp_path)
    for name in ("quantize_config.json", "config.json"):
        edit_json(folder, name, lambda cfg: (cfg.get("quantization_config") or cfg).update(bits=8))
    found = problems(folder)
    assert len(found) == 28  # qweight and qzeros of each of the 14 Linears
    assert (
        f"model.safetensors: {Q}.qweight: shape [16, 256], expected [32, 256] for bits=8, group_size=64, "
        "in_features=128, out_features=256; the rows fit bits=4: is bits in the config wrong?"
    ) in found
    message = load_error(folder)
    assert message.startswith(f"{folder}/model.safetensors: model.layers.0.mlp.down_proj.qweight: shape [32, 128]")
    assert message.endswith(f"(and 27 more; run gptqlab verify {folder})")


def test_configs_that_disagree(checkpoints, tmp_path):
    folder = copy(checkpoints, tmp_path)
    edit_json(folder, "config.json", lambda cfg: cfg["quantization_config"].update(group_size=128, sym=False))
    expected = (
        "config.json: quantization_config says group_size=128, sym=False but quantize_config.json says "
        "group_size=64, sym=True; transformers reads the first, gptqlab and GPTQModel the second"
    )
    assert problems(folder) == [expected]
    assert expected in load_error(folder)


def test_sym_zero_points_must_be_the_midpoint(checkpoints, tmp_path):
    folder = copy(checkpoints, tmp_path)
    edit_tensors(folder, lambda s: s[f"{Q}.qzeros"][1].__ifloordiv__(7))  # 0x77777777 // 7 = 0x11111111
    expected = (
        f"model.safetensors: {Q}.qzeros: 256 of 512 zero points differ from 8, the only zero of sym 4-bit "
        "(checkpoint_format 'gptq' stores it as 7)"
    )
    assert problems(folder) == [expected]
    assert f"{Q}.qzeros: 256 of 512 zero points differ from 8" in load_error(folder)


def test_scales_must_be_finite_and_positive(checkpoints, tmp_path):
    folder = copy(checkpoints, tmp_path, "asym3")
    edit_tensors(folder, lambda s: s[f"{Q}.scales"][0, :3].copy_(torch.tensor([float("nan"), 0.0, -1.0])))
    assert problems(folder) == [f"model.safetensors: {Q}.scales: 3 of 512 scales are not finite and positive"]
    load_error(folder)


def test_g_idx_range_and_order(checkpoints, tmp_path):
    out_of_range = copy(checkpoints, tmp_path, "sym4")
    edit_tensors(out_of_range, lambda s: s[f"{Q}.g_idx"].__setitem__(5, 2))
    assert problems(out_of_range) == [f"model.safetensors: {Q}.g_idx: group indices must lie in [0, 2), found 0 … 2"]
    load_error(out_of_range)

    no_act_order = copy(checkpoints, tmp_path / "b", "asym8")
    edit_tensors(no_act_order, lambda s: s[f"{Q}.g_idx"].copy_(s[f"{Q}.g_idx"].flip(0)))
    assert problems(no_act_order) == [
        f"model.safetensors: {Q}.g_idx: not k // group_size, but the config says desc_act is false"
    ]


def test_every_quantized_linear_must_be_present(checkpoints, tmp_path):
    folder = copy(checkpoints, tmp_path)

    def drop_layer(state):
        for key in [k for k in state if k.startswith("model.layers.0.self_attn.k_proj.")]:
            del state[key]

    edit_tensors(folder, drop_layer)
    assert problems(folder) == [
        "model.safetensors: model.layers.0.self_attn.k_proj.qweight: missing: the architecture quantizes this "
        "Linear in every block",
    ]
    assert "model.layers.0.self_attn.k_proj.qweight: missing" in load_error(folder)


def test_dtypes_and_plain_tensors(checkpoints, tmp_path):
    folder = copy(checkpoints, tmp_path)

    def damage(state):
        state[f"{Q}.qweight"] = state[f"{Q}.qweight"].to(torch.int64)
        state["model.norm.weight"][3] = float("inf")
        state["model.layers.0.input_layernorm.weight"] = state["model.layers.0.input_layernorm.weight"][:64].clone()

    edit_tensors(folder, damage)
    assert problems(folder) == [
        f"model.safetensors: {Q}.qweight: dtype torch.int64, expected int32",
        "model.safetensors: model.layers.0.input_layernorm.weight: shape [64], the config expects [128]",
        "model.safetensors: model.norm.weight: contains NaN or Inf",
    ]


def test_shard_index_must_stay_in_the_folder(checkpoints, tmp_path):
    folder = copy(checkpoints, tmp_path, "bloom")
    edit_json(
        folder,
        "model.safetensors.index.json",
        lambda index: index["weight_map"].update({"transformer.ln_f.weight": "../elsewhere.safetensors"}),
    )
    assert problems(folder) == [
        "model.safetensors.index.json: tensor 'transformer.ln_f.weight' maps to '../elsewhere.safetensors', "
        "not a .safetensors file in this folder"
    ]
    assert "not a .safetensors file in this folder" in load_error(folder)


def test_cli_lists_problems_one_per_line_and_exits_1(checkpoints, tmp_path, capsys):
    folder = copy(checkpoints, tmp_path)
    edit_tensors(folder, lambda s: s[f"{Q}.scales"].neg_(), manifest=False)
    assert run_cli(["verify", folder]) == 1
    out, err = capsys.readouterr()
    assert out.splitlines() == [
        "model.safetensors: SHA-256 differs from SHA256SUMS: the file was changed or damaged",
        f"model.safetensors: {Q}.scales: 512 of 512 scales are not finite and positive",
    ]
    assert err == f"gptqlab: {folder} is not sound: 2 problem(s)\n"
    assert run_cli(["verify", folder, "--no-hashes"]) == 1


def test_problem_names_file_and_tensor():
    assert str(Problem("model.safetensors", "a.qweight", "missing")) == "model.safetensors: a.qweight: missing"
    assert str(Problem("SHA256SUMS", "", "missing")) == "SHA256SUMS: missing"


def test_v1_asym_zero_point_outside_the_bit_width(checkpoints, tmp_path):
    """v1 stores z - 1, so an all-ones 8-bit field decodes to z = 256, which no 8-bit code range holds."""
    folder = copy(checkpoints, tmp_path, "asym8")
    edit_tensors(folder, lambda s: s[f"{Q}.qzeros"][0, :2].fill_(-1))  # 8 fields of 0xFF
    expected = (
        f"model.safetensors: {Q}.qzeros: 8 of 512 zero points decode to 256, outside 0 … 255 for 8 bits "
        "(checkpoint_format 'gptq' stores z - 1, so the stored field 255 is invalid)"
    )
    assert problems(folder) == [expected]
    assert f"{Q}.qzeros: 8 of 512 zero points decode to 256" in load_error(folder)


def test_act_order_needs_g_idx(checkpoints, tmp_path):
    folder = copy(checkpoints, tmp_path, "sym4")
    edit_tensors(folder, lambda s: s.pop(f"{Q}.g_idx"))
    expected = f"model.safetensors: {Q}.g_idx: missing, but desc_act is true: the act-order permutation would be lost"
    assert problems(folder) == [expected]
    assert f"{Q}.g_idx: missing, but desc_act is true" in load_error(folder)


def test_names_with_control_characters_stay_on_one_line(checkpoints, tmp_path, capsys):
    folder = copy(checkpoints, tmp_path)
    (folder / "x\nmodel.safetensors: sound\x1b[2K.json").write_text("{}")
    assert run_cli(["verify", folder]) == 1
    out = capsys.readouterr().out
    assert out.splitlines() == [
        "x\\nmodel.safetensors: sound\\x1b[2K.json: not listed in SHA256SUMS, so its integrity cannot be checked"
    ]
