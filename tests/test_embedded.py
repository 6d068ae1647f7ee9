"""The embedded models: they load offline by name and still score the perplexity recorded when they were trained."""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from gptqlab.calib import load_eval_text
from gptqlab.embedded import EMBEDDED_MODELS, models_dir, resolve_model
from gptqlab.errors import GptqlabError
from gptqlab.evaluate import perplexity

MAX_FOLDER_MB = 20


@pytest.fixture(scope="module", params=list(EMBEDDED_MODELS))
def embedded(request):
    """(name, folder, model in float32, tokenizer), loaded by name without the network."""
    folder = resolve_model(request.param)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    return request.param, Path(folder), model, tokenizer


def test_names_resolve_to_package_folders():
    assert set(EMBEDDED_MODELS) == {"tiny-zh-llama", "tiny-zh-bloom"}
    for name, folder in EMBEDDED_MODELS.items():
        assert resolve_model(name) == str(folder)
        assert folder.parent == models_dir()
        assert (folder / "config.json").is_file()


def test_local_directories_and_hub_ids_pass_through(tmp_path):
    assert resolve_model(str(tmp_path)) == str(tmp_path)
    assert resolve_model("Qwen/Qwen2.5-0.5B") == "Qwen/Qwen2.5-0.5B"


def test_an_embedded_model_that_is_not_built_says_how_to_build_it(monkeypatch, tmp_path):
    monkeypatch.setitem(EMBEDDED_MODELS, "tiny-zh-llama", tmp_path / "tiny-zh-llama")
    with pytest.raises(GptqlabError, match=r"python tools/train_embedded\.py --model tiny-zh-llama"):
        resolve_model("tiny-zh-llama")


def test_model_folder_is_small_and_complete(embedded):
    _, folder, model, tokenizer = embedded
    for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "eval.json"):
        assert (folder / name).is_file(), name
    assert sum(f.stat().st_size for f in folder.iterdir()) < MAX_FOLDER_MB * 2**20
    assert isinstance(tokenizer, PreTrainedTokenizerFast)
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("<s>", "</s>", "<pad>")
    assert len(tokenizer) == model.config.vocab_size
    assert model.config.hidden_size % 128 == 0


def test_heldout_perplexity_matches_the_recorded_value(embedded):
    name, folder, model, tokenizer = embedded
    recorded = json.loads((folder / "eval.json").read_text())["slice"]
    text = load_eval_text(recorded["text"])[1][: recorded["max_chars"]]
    got = perplexity(model, tokenizer, text, seqlen=recorded["seqlen"], progress=False, batch_size=8)
    assert got.tokens == recorded["tokens"]
    assert got.ppl == pytest.approx(recorded["ppl"], rel=0.01), name
    # a model that learned nothing predicts uniformly: perplexity = vocabulary size
    assert got.ppl < model.config.vocab_size / 10
