"""A gptqlab checkpoint loads unchanged in transformers (through optimum + GPTQModel), and its logits match
gptqlab's own dequantized model."""

from __future__ import annotations

import pytest
import torch
from testkit import dequantized_reference

from gptqlab.cli import main

pytest.importorskip("gptqmodel")
pytest.importorskip("optimum")


@pytest.mark.parametrize(("arch", "extra"), [("llama", []), ("llama", ["--act-order"]), ("qwen2", ["--bits", "8"])])
def test_transformers_loads_gptqlab_checkpoint(tiny_models, tmp_path, monkeypatch, arch, extra):
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("GPTQMODEL_CPU_WORKERS", "2")
    monkeypatch.chdir(tmp_path)  # GPTQModel writes ./logs
    out = tmp_path / "q"
    argv = ["quantize", str(tiny_models[arch]), str(out), "--nsamples", "8", "--seqlen", "64", "--group-size", "64"]
    with pytest.raises(SystemExit) as exc:
        main([*argv, "-q", *extra])
        raise SystemExit(0)
    assert exc.value.code == 0
    bits = 8 if "--bits" in extra else 4
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    theirs = AutoModelForCausalLM.from_pretrained(out, device_map="cpu")
    assert any("qweight" in n for n, _ in theirs.named_buffers())
    with torch.no_grad():
        got = theirs(ids).logits.float()
        want = dequantized_reference(tiny_models[arch], out, bits)(ids).logits
    # transformers runs in fp16, the reference in fp32: allow fp16 rounding of activations.
    err = (got - want).abs().max().item()
    scale = want.abs().max().item()
    assert err < 0.02 * scale, (err, scale)
    # The tolerance must be able to tell quantized from unquantized weights.
    with torch.no_grad():
        original = AutoModelForCausalLM.from_pretrained(tiny_models[arch], dtype=torch.float32)(ids).logits
    assert (original - want).abs().max().item() > 3 * err
