"""Architecture discovery: decoder-only models outside the table go through the generic path; models
without Linear decoder blocks get a clear error naming the architecture."""

from __future__ import annotations

import torch
from testkit import VOCAB, run_cli

import gptqlab
from gptqlab.arch import ARCHS, arch_for, discover
from gptqlab.qlinear import QuantLinear


def test_table_architectures_are_found(tiny_models):
    from transformers import AutoModelForCausalLM

    for name, folder in tiny_models.items():
        model = AutoModelForCausalLM.from_pretrained(folder)
        assert arch_for(model) is ARCHS[name]


def test_generic_path_quantizes_opt(tokenizer_dir, tmp_path):
    from transformers import AutoTokenizer, OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    cfg = OPTConfig(
        vocab_size=VOCAB,
        hidden_size=128,
        ffn_dim=256,
        word_embed_proj_dim=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=256,
    )
    model = OPTForCausalLM(cfg)
    arch = discover(model)
    assert arch.blocks == "model.decoder.layers"
    assert arch.linears == (
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.q_proj",
        "self_attn.out_proj",
        "fc1",
        "fc2",
    )
    src = tmp_path / "opt"
    model.save_pretrained(src)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(src)
    out = tmp_path / "q"
    assert run_cli(["quantize", src, out, "--nsamples", "4", "--seqlen", "64", "--group-size", "64", "-q"]) == 0
    loaded = gptqlab.load(str(out), device="cpu")
    assert sum(isinstance(m, QuantLinear) for m in loaded.modules()) == 12
    ids = torch.randint(0, VOCAB, (1, 12))
    with torch.no_grad():
        assert torch.isfinite(loaded(ids).logits).all()


def test_checkpoint_keys_that_transformers_renames(tokenizer_dir, tmp_path):
    """transformers 5 stores GPT-NeoX's ``lm_head`` as ``embed_out``; the lazy reader follows its renaming."""
    from transformers import AutoTokenizer, GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    cfg = GPTNeoXConfig(
        vocab_size=VOCAB,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=256,
    )
    src = tmp_path / "neox"
    GPTNeoXForCausalLM(cfg).save_pretrained(src)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(src)
    out = tmp_path / "q"
    assert run_cli(["quantize", src, out, "--nsamples", "4", "--seqlen", "64", "--group-size", "64", "-q"]) == 0
    loaded = gptqlab.load(str(out), device="cpu")
    assert sum(isinstance(m, QuantLinear) for m in loaded.modules()) == 8
    assert run_cli(["verify", out]) == 0


def test_model_without_linear_blocks_is_named_in_the_error(tokenizer_dir, tmp_path, capsys):
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    src = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=1, n_head=2, n_positions=128)).save_pretrained(src)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(src)
    assert run_cli(["quantize", src, tmp_path / "q", "--nsamples", "4", "--seqlen", "32", "-q"]) == 2
    err = capsys.readouterr().err
    assert "architecture 'gpt2' is not supported" in err
    assert not (tmp_path / "q").exists()
