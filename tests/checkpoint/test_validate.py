"""The one validation of a quantized Linear (gptqlab.checkpoint.validate) on tensors in memory: every rule
raises a CheckpointError that names the tensor, and a sound Linear passes."""

from __future__ import annotations

import pytest
import torch

from gptqlab.checkpoint.validate import InMemory, LinearRules, check_linear, linear_problems
from gptqlab.errors import CheckpointError
from gptqlab.quant.pack import pack_cols, pack_rows

K, N, GS = 64, 32, 32  # G = 2


def tensors(bits: int = 4, zero: int = 7, act_order: bool = False) -> dict[str, torch.Tensor]:
    """A sound v1 Linear: codes 0..maxq, zero field ``zero`` everywhere, scales 0.01."""
    codes = torch.arange(K * N).reshape(K, N) % 2**bits
    g_idx = torch.arange(K, dtype=torch.int32) // GS
    return {
        "qweight": pack_rows(codes, bits),
        "qzeros": pack_cols(torch.full((K // GS, N), zero), bits),
        "scales": torch.full((K // GS, N), 0.01, dtype=torch.float16),
        "g_idx": g_idx.flip(0) if act_order else g_idx,
    }


def error(t: dict, rules: LinearRules) -> str:
    with pytest.raises(CheckpointError) as info:
        check_linear(t, rules, K, N, name="layer")
    return str(info.value)


SYM_V1 = LinearRules(bits=4, group_size=GS, zero_offset=1, sym=True, desc_act=False)
ASYM_V1 = LinearRules(bits=4, group_size=GS, zero_offset=1, sym=False, desc_act=False)


def test_sound_linears_pass():
    check_linear(tensors(), SYM_V1, K, N)
    check_linear(tensors(zero=14), ASYM_V1, K, N)  # z = 15, the largest a 4-bit zero can be
    check_linear(tensors(act_order=True), LinearRules(4, GS, 1, True, True), K, N)
    check_linear(tensors(zero=8), LinearRules(4, GS, 0, True, False), K, N)  # v2 stores z itself


def test_each_rule_names_its_tensor():
    t = tensors()
    t["scales"][1, 3] = 0.0
    assert error(t, SYM_V1) == "layer.scales: 1 of 64 scales are not finite and positive"
    assert error(tensors(zero=6), SYM_V1).startswith("layer.qzeros: 64 of 64 zero points differ from 8")
    assert error(tensors(zero=15), ASYM_V1).startswith("layer.qzeros: 64 of 64 zero points decode to 16, outside")
    assert error(tensors(act_order=True), SYM_V1) == (
        "layer.g_idx: not k // group_size, but the config says desc_act is false"
    )
    no_g_idx = {k: v for k, v in tensors().items() if k != "g_idx"}
    assert error(no_g_idx, LinearRules(4, GS, 1, True, True)).startswith("layer.g_idx: missing, but desc_act is true")
    check_linear(no_g_idx, SYM_V1, K, N)  # without act-order g_idx is optional
    t = tensors()
    t["qweight"] = t["qweight"].to(torch.int64)
    assert error(t, SYM_V1) == "layer.qweight: dtype torch.int64, expected int32"
    assert error(tensors(), LinearRules(3, GS, 1)) == (
        "layer.qweight: shape [8, 32], expected [6, 32] for bits=3, group_size=32, in_features=64, out_features=32; "
        "the rows fit bits=4: is bits in the config wrong? (and 1 more)"
    )
    with pytest.raises(CheckpointError, match=r"^layer.qweight: 8-bit packing needs in_features \(64\) and "):
        check_linear(tensors(), LinearRules(8, GS, 1), K, N + 2, name="layer")


def test_unknown_sym_and_desc_act_skip_their_rules():
    rules = LinearRules(bits=4, group_size=GS, zero_offset=1)
    check_linear(tensors(zero=3, act_order=True), rules, K, N)
    assert linear_problems(InMemory(tensors(zero=15)), "", K, N, rules) == [
        (
            "qzeros",
            "64 of 64 zero points decode to 16, outside 0 … 15 for 4 bits (checkpoint_format 'gptq' stores "
            "z - 1, so the stored field 15 is invalid)",
        )
    ]
