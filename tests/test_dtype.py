"""``--dtype``: the float type of a checkpoint's unquantized tensors and of its config, end to end on the CPU.
Scales stay fp16 whatever the dtype (docs/FORMAT.md)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from testkit import run_cli

import gptqlab


def _dtypes(out) -> dict[str, str]:
    with safe_open(str(out / "model.safetensors"), framework="pt") as h:
        return {k: h.get_slice(k).get_dtype() for k in h.keys()}


@pytest.mark.parametrize("dtype, stored", [("bfloat16", "BF16"), ("float16", "F16")])
def test_dtype_sets_unquantized_tensors_and_config(tmp_path, dtype, stored):
    out = tmp_path / "out"
    args = ["quantize", "tiny-zh-llama", str(out), "--nsamples", "4", "--seqlen", "64", "--dtype", dtype, "-q"]
    assert run_cli(args) == 0
    types = _dtypes(out)
    plain = {k: v for k, v in types.items() if k.endswith((".weight", ".bias"))}
    assert plain and set(plain.values()) == {stored}
    assert {v for k, v in types.items() if k.endswith(".scales")} == {"F16"}
    assert json.loads((out / "config.json").read_text())["dtype"] == dtype
    assert run_cli(["verify", str(out)]) == 0

    model = gptqlab.load(out, device="cpu", backend="torch")
    logits = model(torch.tensor([[5, 6, 7, 8]])).logits
    assert torch.isfinite(logits).all()


def test_default_dtype_is_the_models_own(tmp_path):
    out = tmp_path / "out"
    assert run_cli(["quantize", "tiny-zh-llama", str(out), "--nsamples", "4", "--seqlen", "64", "-q"]) == 0
    # tiny-zh-llama is stored in float16, so its checkpoint is float16 throughout
    assert set(_dtypes(out).values()) <= {"F16", "I32"}
    assert json.loads((out / "config.json").read_text())["dtype"] == "float16"


def test_resume_refuses_another_dtype(tmp_path, monkeypatch):
    import gptqlab.quantize.progress

    out = tmp_path / "out"
    args = ["quantize", "tiny-zh-llama", str(out), "--nsamples", "4", "--seqlen", "64", "-q"]
    real_save = gptqlab.quantize.progress.save_atomic

    def stop_at_block_1(tensors, path, metadata=None):
        if path.name == "block-00001.safetensors":
            raise KeyboardInterrupt
        real_save(tensors, path, metadata)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gptqlab.quantize.progress, "save_atomic", stop_at_block_1)
        assert run_cli(args) == 130
    assert run_cli([*args, "--dtype", "bfloat16"]) == 2
    assert run_cli(args) == 0
