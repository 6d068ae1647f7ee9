"""Test helpers shared by the test modules: a tiny Chinese tokenizer, tiny random LLaMA / BLOOM / Qwen2
checkpoints, an in-process CLI runner and a dequantized reference model.

A plain module (``from testkit import ...``) rather than conftest.py, because tests/calib has a conftest.py
of its own and two modules named ``conftest`` shadow each other. Nothing here downloads anything.
"""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 512


def build_tokenizer(folder: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from gptqlab.calib.sources import builtin_texts

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(builtin_texts("peoples-daily")[:1500], trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(folder)
    return fast


def tiny_config(arch: str):
    from transformers import BloomConfig, LlamaConfig, Qwen2Config

    common = {"vocab_size": VOCAB, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2}
    if arch == "llama":
        return LlamaConfig(
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            **common,
        )
    if arch == "bloom":
        return BloomConfig(hidden_size=128, n_layer=2, n_head=4, **common)
    if arch == "qwen2":
        return Qwen2Config(
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            **common,
        )
    raise ValueError(arch)


def build_model(folder: Path, arch: str, tokenizer_dir: Path, seed: int = 0) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch))
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(folder)
    return folder


def build_deep_llama(folder: Path, tokenizer_dir: Path, layers: int, seed: int) -> Path:
    """A random LLaMA of ``layers`` blocks (hidden 64, grouped KV heads) in ``folder``: deep enough that a
    run can be stopped with blocks before and after, small enough to quantize in seconds."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
    )
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(folder)
    return folder


def run_cli(argv) -> int:
    """Run ``gptqlab ARGV`` in-process; returns the exit code."""
    from gptqlab.cli import main

    try:
        main([str(a) for a in argv])
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def dequantized_reference(model_dir, checkpoint_dir, bits: int, fmt: str = "gptq"):
    """The original float32 model with every quantized Linear's weight replaced by the weight that the
    checkpoint in ``checkpoint_dir`` represents (decoded by gptqlab.checkpoint.format.from_checkpoint), and every other
    parameter rounded to fp16 as the checkpoint stores it."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from gptqlab.checkpoint.format import from_checkpoint

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    for p in model.parameters():
        p.data = p.data.half().float()
    tensors = {}
    for f in sorted(Path(checkpoint_dir).glob("*.safetensors")):
        tensors.update(load_file(f))
    replaced = 0
    for name, mod in model.named_modules():
        if f"{name}.qweight" in tensors:
            t = {k: tensors[f"{name}.{k}"] for k in ("qweight", "qzeros", "scales", "g_idx")}
            mod.weight.data = from_checkpoint(t, bits, fmt).Q
            replaced += 1
    assert replaced > 0
    return model.eval()
