"""``gptqlab quantize``'s calibration size: 32 x 512 for models under 100 M parameters, else 128 x 2048, the
sequence capped at the model's context; given values win; the resolved values reach run.json."""

from __future__ import annotations

import json

import pytest
import torch
from testkit import run_cli

from gptqlab.errors import ConfigError
from gptqlab.quantize.options import QuantizeOptions, calibration_size
from gptqlab.quantize.progress import partial_dir
from gptqlab.quantize.run import SLOW_BLOCK_ENV


def opts(**kw) -> QuantizeOptions:
    return QuantizeOptions("m", "o", **kw)


@pytest.mark.parametrize(
    ("params", "context", "want"),
    [
        (99_999_999, 4096, (32, 512)),
        (100_000_000, 4096, (128, 2048)),
        (7_000_000_000, None, (128, 2048)),  # no context limit (ALiBi)
        (1_000_000, 256, (32, 256)),
        (7_000_000_000, 1024, (128, 1024)),
    ],
)
def test_defaults_follow_the_model_size_and_context(params, context, want):
    assert calibration_size(opts(), params, context) == want


def test_given_values_win_and_a_long_seqlen_is_refused():
    assert calibration_size(opts(nsamples=8, seqlen=64), 7_000_000_000, 4096) == (8, 64)
    assert calibration_size(opts(seqlen=1024), 1_000, 4096) == (32, 1024)
    with pytest.raises(ConfigError, match="--seqlen 300 is longer than the model's context of 256 tokens"):
        calibration_size(opts(seqlen=300), 1_000, 256)


def test_run_json_holds_the_resolved_defaults(tiny_models, tmp_path, monkeypatch):
    """A tiny model without --nsamples/--seqlen: 32 samples of min(512, its 256-token context); the run is
    stopped after its first block is stored (Ctrl-C), so only run.json and the state are read."""
    import gptqlab.quantize.progress

    real = gptqlab.quantize.progress.save_atomic

    def stop_after_first_state(tensors, path, metadata=None):
        real(tensors, path, metadata=metadata)
        if path.name == "state.safetensors":
            raise KeyboardInterrupt

    monkeypatch.setattr(gptqlab.quantize.progress, "save_atomic", stop_after_first_state)
    monkeypatch.delenv(SLOW_BLOCK_ENV, raising=False)
    out = tmp_path / "out"
    assert run_cli(["quantize", tiny_models["llama"], out, "--group-size", "64", "--method", "rtn", "-q"]) == 130
    record = json.loads((partial_dir(out) / "run.json").read_text())
    assert record["settings"]["nsamples"] == 32 and record["settings"]["seqlen"] == 256
    assert record["settings"]["batch_size"] >= 1 and record["threads"] == 1
    assert record["act_dtype"] == str(torch.float16)
