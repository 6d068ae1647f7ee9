"""Train the embedded Chinese models ``tiny-zh-llama`` and ``tiny-zh-bloom`` from scratch on a CPU.

No pretrained model can be downloaded where gptqlab is tested, and a randomly initialised model cannot tell
a good quantizer from a bad one, so gptqlab ships two small models trained here on the calibration splits
of its built-in corpora (never on held-out text):

1. A byte-level BPE tokenizer (``VOCAB_SIZE`` ids, shared by both models) is trained on that text.
2. The text is cut into documents of ``DOC_PARAGRAPHS`` paragraphs joined by newlines (the way
   :func:`gptqlab.calib.load_eval_text` joins held-out text), each ``<s> … </s>``, and the
   token stream is cut into training sequences.
3. The model trains for a wall-clock budget: the learning rates follow a linear warmup and a cosine decay
   over the fraction of the budget used, so they reach their floor when time is up however busy the
   machine is. ``--steps`` trains a fixed number of steps instead, for an exactly repeatable run.
   The decoder matrices train with Muon, the embeddings and the rest with AdamW. With the CPU shared by
   other jobs a model sees only about a million tokens; with AdamW alone it stayed near the unigram loss
   and 3-bit RTN changed its perplexity by 0.1 %, so it could not tell quantizers apart. See
   :func:`build_model` for why the embeddings are tied.
4. The model is saved in float16 with its tokenizer, then measured from the saved files: held-out
   perplexity and bits per character, the fixed slice that the tests check (``eval.json``), and the
   perplexity rise under 3-bit round-to-nearest (the quality bar: it must exceed 5 %) and under GPTQ.
   The model card ``README.md`` is written from those measurements; ``--measure-only`` redoes them.

Usage: ``python tools/train_embedded.py --model all``. Each model takes about
``--minutes`` of training, plus a few minutes of tokenizer training and measurement.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm.auto import tqdm
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BloomConfig,
    BloomForCausalLM,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from gptqlab.calib import BUILTIN_SOURCES, builtin_texts, load_calibration, load_eval_text
from gptqlab.embedded import EMBEDDED_MODELS, models_dir
from gptqlab.evaluate import PerplexityResult, perplexity
from gptqlab.quant import rtn
from gptqlab.quant.config import QuantConfig
from gptqlab.quantize.driver import quantize_model

VOCAB_SIZE = 8000
SPECIAL_TOKENS = ("<s>", "</s>", "<pad>")  # ids 0, 1, 2
BOS, EOS, PAD = 0, 1, 2
DOC_PARAGRAPHS = 50
TRAIN_SOURCES = BUILTIN_SOURCES  # calibration splits only
EVAL_SEQLEN = 512
EVAL_BATCH = 8  # windows per forward pass while measuring
SLICE = {"text": "peoples-daily-heldout", "max_chars": 20_000, "seqlen": 256}  # checked by tests
QUALITY_BAR = {"bits": 3, "group_size": 128, "min_ppl_rise": 0.05}
GPTQ_CALIBRATION = {"spec": "peoples-daily", "nsamples": 64, "seqlen": 512, "seed": 0}


@dataclass(frozen=True)
class TrainConfig:
    """One training run. CLI flags map onto these fields."""

    model: str
    minutes: float = 11.0
    steps: int | None = None
    batch_size: int = 4
    seqlen: int = 512
    lr: float = 3e-3
    embed_lr: float = 0.05
    muon_lr: float = 0.05
    min_lr_ratio: float = 0.1
    warmup: float = 0.03
    seed: int = 0
    threads: int = 1
    bf16: bool = True

    def __post_init__(self) -> None:
        if self.model not in EMBEDDED_MODELS:
            raise ValueError(f"unknown model {self.model!r}; choose from {', '.join(EMBEDDED_MODELS)}")
        if self.minutes <= 0 or (self.steps is not None and self.steps <= 0):
            raise ValueError("--minutes and --steps must be positive")
        if not 0.0 <= self.warmup < 1.0:
            raise ValueError(f"warmup is a fraction of training in [0, 1), got {self.warmup}")
        if min(self.lr, self.embed_lr, self.muon_lr) <= 0:
            raise ValueError("learning rates must be positive")


# ---------------------------------------------------------------------------------------------- data


def training_documents() -> list[str]:
    """The calibration paragraphs of every training source, grouped into newline-joined documents."""
    docs = []
    for source in TRAIN_SOURCES:
        paras = builtin_texts(source, "calibration")
        docs += ["\n".join(paras[i : i + DOC_PARAGRAPHS]) for i in range(0, len(paras), DOC_PARAGRAPHS)]
    return docs


def train_tokenizer(docs: list[str], max_length: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with ``VOCAB_SIZE`` ids; encodes no special tokens by itself."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer)
    bos, eos, pad = SPECIAL_TOKENS
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad, model_max_length=max_length
    )


def token_stream(tokenizer: PreTrainedTokenizerFast, docs: list[str]) -> torch.Tensor:
    """All documents as one stream of ids [n], each document as ``<s> text </s>``."""
    ids = []
    for enc in tokenizer(docs, add_special_tokens=False)["input_ids"]:
        ids += [BOS, *enc, EOS]
    return torch.tensor(ids, dtype=torch.long)


def batches(stream: torch.Tensor, batch_size: int, seqlen: int, seed: int):
    """Endless batches [batch_size, seqlen] of the stream: each epoch cuts it at a new random offset into
    sequences and shuffles them."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        offset = int(torch.randint(seqlen, (1,), generator=gen))
        n = (len(stream) - offset) // seqlen
        seqs = stream[offset : offset + n * seqlen].view(n, seqlen)
        order = torch.randperm(n, generator=gen)
        for i in range(0, n - batch_size + 1, batch_size):
            yield seqs[order[i : i + batch_size]]


# ---------------------------------------------------------------------------------------------- models


def build_model(name: str, max_length: int) -> torch.nn.Module:
    """The untrained model; both have hidden size 256 and tied input and output embeddings.

    Tied embeddings are what make the decoder matter: with an output head of its own, the model learns the
    bigram statistics on the direct path from input embedding to head and barely uses its blocks (3-bit RTN
    raised its perplexity by 2-3 %); with tied ones the mapping from a token to what follows it has to be
    computed by the blocks' Linears.
    """
    common = {"vocab_size": VOCAB_SIZE, "bos_token_id": BOS, "eos_token_id": EOS, "pad_token_id": PAD}
    if name == "tiny-zh-llama":
        cfg = LlamaConfig(
            hidden_size=256,
            intermediate_size=768,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=max_length,
            tie_word_embeddings=True,
            **common,
        )
        return LlamaForCausalLM(cfg)
    # BLOOM: ALiBi positions, fused query_key_value, MLP 4 × hidden = 1024
    cfg = BloomConfig(hidden_size=256, n_layer=4, n_head=4, tie_word_embeddings=True, **common)
    return BloomForCausalLM(cfg)


def lr_factor(progress: float, warmup: float, min_ratio: float) -> float:
    """Learning-rate multiplier at ``progress`` ∈ [0, 1] of training: linear warmup, then cosine decay."""
    if progress < warmup:
        return progress / warmup
    t = min(1.0, (progress - warmup) / (1.0 - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))


def orthogonalize(G: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Approximately U Vᵀ for G = U S Vᵀ [m, n], by a quintic Newton–Schulz iteration in bfloat16.

    The coefficients (3.4445, -4.7750, 2.0315) are those of Keller Jordan's Muon: they push every singular
    value into roughly [0.7, 1.2] in five steps, which is all an update direction needs.
    """
    X = G.bfloat16()
    wide = X.shape[0] <= X.shape[1]
    X = X if wide else X.T  # iterate on the smaller Gram matrix X Xᵀ
    X = X / (X.norm() + 1e-7)
    a, b, c = 3.4445, -4.7750, 2.0315
    for _ in range(steps):
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    return (X if wide else X.T).to(G.dtype)


class Muon(torch.optim.Optimizer):
    """Momentum with orthogonalized updates, for the 2-D weights inside the decoder blocks.

    Each step adds Nesterov momentum to the gradient and replaces the result by its orthogonalization, so
    that every direction of the weight moves at the same rate. On these tiny CPU budgets it reaches a given
    loss in far fewer steps than AdamW, and the blocks' weights grow large enough for quantization to
    matter (see the module docstring).
    """

    def __init__(self, params, lr: float, momentum: float = 0.95):
        super().__init__(params, {"lr": lr, "momentum": momentum})

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                buf = self.state[p].setdefault("momentum", torch.zeros_like(p))
                buf.mul_(group["momentum"]).add_(p.grad)
                update = orthogonalize(p.grad.add(buf, alpha=group["momentum"]))
                p.add_(update, alpha=-group["lr"] * max(1.0, p.shape[0] / p.shape[1]) ** 0.5)


def optimizers(model: torch.nn.Module, cfg: TrainConfig) -> list[torch.optim.Optimizer]:
    """Muon for the matrices in the decoder blocks; AdamW for the tied embedding (at ``embed_lr``), norms
    and biases (at ``lr``). No weight decay. Each group keeps its peak lr in ``base_lr``."""
    emb = model.get_input_embeddings().weight
    matrices = [p for p in model.parameters() if p.dim() == 2 and p is not emb]
    vectors = [p for p in model.parameters() if p.dim() < 2]
    adam = torch.optim.AdamW(
        [{"params": [emb], "lr": cfg.embed_lr}, {"params": vectors, "lr": cfg.lr}], betas=(0.9, 0.95), weight_decay=0.0
    )
    opts = [adam, Muon(matrices, lr=cfg.muon_lr)]
    for opt in opts:
        for group in opt.param_groups:
            group["base_lr"] = group["lr"]
    return opts


def train(model: torch.nn.Module, stream: torch.Tensor, cfg: TrainConfig) -> list[dict]:
    """Train in place until the time budget (or ``cfg.steps``) is used; returns the per-step log."""
    opts = optimizers(model, cfg)
    budget = cfg.minutes * 60.0
    log = []
    model.train()
    bar = tqdm(total=cfg.steps or round(budget), unit="step" if cfg.steps else "s", desc=cfg.model)
    start = time.perf_counter()
    step = 0
    for batch in batches(stream, cfg.batch_size, cfg.seqlen, cfg.seed):
        elapsed = time.perf_counter() - start
        progress = step / cfg.steps if cfg.steps else elapsed / budget
        if progress >= 1.0:
            break
        factor = lr_factor(progress, cfg.warmup, cfg.min_lr_ratio)
        for opt in opts:
            for group in opt.param_groups:
                group["lr"] = group["base_lr"] * factor
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        for opt in opts:
            opt.step()
            opt.zero_grad(set_to_none=True)
        step += 1
        elapsed = time.perf_counter() - start
        log.append({"step": step, "loss": round(loss.item(), 4), "lr_factor": factor, "elapsed": round(elapsed, 2)})
        bar.update(1 if cfg.steps else round(elapsed) - bar.n)
        bar.set_postfix(step=step, loss=f"{loss.item():.3f}", lr_factor=f"{factor:.3f}")
    bar.close()
    return log


# ---------------------------------------------------------------------------------------------- measurements


def load(folder: Path) -> tuple[torch.nn.Module, PreTrainedTokenizerFast]:
    """The saved model in float32 (its float16 weights upcast) and its tokenizer."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(folder)


@torch.no_grad()
def rtn_fake_quantize_(model: torch.nn.Module, bits: int, group_size: int) -> int:
    """Round every decoder Linear weight to ``bits`` (asymmetric min/max per group) and back, in place.

    The output head is left alone, as GPTQ leaves it. Returns the number of
    Linears quantized.
    """
    qcfg = QuantConfig(bits=bits, group_size=group_size, sym=False, checkpoint_format="gptq_v2")
    head = model.get_output_embeddings()
    n = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and module is not head:
            module.weight.copy_(rtn(module.weight, qcfg).Q.to(module.weight.dtype))
            n += 1
    return n


def slice_perplexity(model, tokenizer) -> PerplexityResult:
    """Perplexity on ``SLICE``, the quick check that ``tests/test_embedded.py`` repeats."""
    text = load_eval_text(SLICE["text"])[1][: SLICE["max_chars"]]
    return perplexity(model, tokenizer, text, SLICE["seqlen"], progress=False, batch_size=EVAL_BATCH)


def heldout_perplexity(model, tokenizer) -> dict[str, PerplexityResult]:
    """Perplexity on the held-out split of every built-in source at ``EVAL_SEQLEN``."""
    return {
        s: perplexity(model, tokenizer, load_eval_text(f"{s}-heldout")[1], EVAL_SEQLEN, batch_size=EVAL_BATCH)
        for s in BUILTIN_SOURCES
    }


def gptq_quantize_(model: torch.nn.Module, tokenizer, bits: int, group_size: int) -> int:
    """Quantize every decoder Linear with GPTQ through :func:`gptqlab.quantize.driver.quantize_model`, in place (the
    weights become their dequantized values). Returns the number of Linears quantized."""
    c = GPTQ_CALIBRATION
    calib = load_calibration(c["spec"], tokenizer, c["nsamples"], c["seqlen"], c["seed"])
    qcfg = QuantConfig(bits=bits, group_size=group_size, sym=False, checkpoint_format="gptq_v2")
    return len(quantize_model(model, calib.input_ids, qcfg, method="gptq"))


def measure(folder: Path) -> dict:
    """The test slice, held-out perplexity of every source, and the same after 3-bit RTN and GPTQ."""
    model, tokenizer = load(folder)
    base = heldout_perplexity(model, tokenizer)
    result = {
        "slice": {**SLICE, **slice_perplexity(model, tokenizer).to_dict()},
        "heldout": {s: r.to_dict() for s, r in base.items()},
    }
    bits, gs = QUALITY_BAR["bits"], QUALITY_BAR["group_size"]
    n_rtn = rtn_fake_quantize_(model, bits, gs)
    rtn_ppl = heldout_perplexity(model, tokenizer)
    result["rtn"] = {
        "bits": bits,
        "group_size": gs,
        "sym": False,
        "linears": n_rtn,
        **{
            s: {"ppl": r.ppl, "bits_per_char": r.bits_per_char, "rise": r.ppl / base[s].ppl - 1}
            for s, r in rtn_ppl.items()
        },
    }
    model, tokenizer = load(folder)
    n_gptq = gptq_quantize_(model, tokenizer, bits, gs)
    gptq_ppl = heldout_perplexity(model, tokenizer)
    result["gptq"] = {
        "bits": bits,
        "group_size": gs,
        "sym": False,
        "linears": n_gptq,
        "calibration": GPTQ_CALIBRATION,
        **{
            s: {
                "ppl": r.ppl,
                "bits_per_char": r.bits_per_char,
                "rise": r.ppl / base[s].ppl - 1,
                "recovered": (rtn_ppl[s].ppl - r.ppl) / (rtn_ppl[s].ppl - base[s].ppl),  # of RTN's rise
            }
            for s, r in gptq_ppl.items()
        },
    }
    result["quality_bar_met"] = all(result["rtn"][s]["rise"] > QUALITY_BAR["min_ppl_rise"] for s in base)
    return result


# ---------------------------------------------------------------------------------------------- files


def save(model, tokenizer, folder: Path) -> None:
    """float16 safetensors, config, generation config and tokenizer files."""
    folder.mkdir(parents=True, exist_ok=True)
    copy.deepcopy(model).to(torch.float16).save_pretrained(folder, safe_serialization=True)
    GenerationConfig(bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD, max_new_tokens=64).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    # transformers 5 writes its own class name, which transformers 4 cannot load; both know this one
    config_path = folder / "tokenizer_config.json"
    tok_config = json.loads(config_path.read_text())
    tok_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(tok_config, indent=2) + "\n")


def architecture_line(c) -> str:
    """One line describing the model that config ``c`` builds."""
    if c.model_type == "llama":
        return (
            f"LlamaForCausalLM: {c.num_hidden_layers} layers, hidden {c.hidden_size}, intermediate "
            f"{c.intermediate_size}, {c.num_attention_heads} heads of {c.hidden_size // c.num_attention_heads}, "
            f"RoPE, RMSNorm, SwiGLU, context {c.max_position_embeddings}, tied embeddings"
        )
    return (
        f"BloomForCausalLM: {c.n_layer} layers, hidden {c.hidden_size}, MLP {4 * c.hidden_size}, {c.n_head} heads of "
        f"{c.hidden_size // c.n_head}, ALiBi, fused query_key_value, LayerNorm, GELU, tied embeddings"
    )


def write_card(folder: Path, config, cfg: TrainConfig, info: dict, ev: dict) -> None:
    """The model card, from the training record and the measurements."""
    rtn_, gptq_ = ev["rtn"], ev["gptq"]
    rows = "\n".join(
        f"| {s} | {r['tokens']:,} | {r['chars']:,} | {r['ppl']:.2f} | {r['bits_per_char']:.4f} |"
        f" {rtn_[s]['ppl']:.2f} (+{100 * rtn_[s]['rise']:.1f} %) |"
        f" {gptq_[s]['ppl']:.2f} (+{100 * gptq_[s]['rise']:.1f} %, {100 * gptq_[s]['recovered']:.0f} % of RTN's rise"
        " recovered) |"
        for s, r in ev["heldout"].items()
    )
    gc = gptq_["calibration"]
    setting = f"w{rtn_['bits']} g{rtn_['group_size']}"
    header = f"| held-out split | tokens | characters | perplexity | bits / char | RTN {setting} | GPTQ {setting} |"
    sl = ev["slice"]
    facts = [
        ("Architecture", architecture_line(config)),
        ("Parameters", f"{info['parameters']:,} (embeddings {info['embedding_parameters']:,})"),
        ("Weights", f"`model.safetensors`, float16, {info['file_mb']:.1f} MB"),
        (
            "Tokenizer",
            f"byte-level BPE, {VOCAB_SIZE} ids (`<s>` 0, `</s>` 1, `<pad>` 2), trained on the training text; "
            f"{info['tokens_per_char']:.3f} tokens per character",
        ),
        (
            "Training text",
            f"calibration splits of {', '.join(f'`{s}`' for s in TRAIN_SOURCES)} ({info['train_chars']:,} "
            f"characters, {info['train_tokens']:,} tokens); no held-out text",
        ),
        (
            "Training",
            f"{info['steps']:,} steps of {cfg.batch_size} × {cfg.seqlen} tokens ({info['tokens_seen']:,} tokens, "
            f"{info['epochs']:.2f} epochs) in {info['train_seconds'] / 60:.1f} min",
        ),
        (
            "Optimizer",
            f"Muon (lr {cfg.muon_lr:g}, Nesterov momentum 0.95) for the decoder matrices; AdamW (β 0.9, 0.95) for "
            f"the tied embedding (lr {cfg.embed_lr:g}), norms and biases (lr {cfg.lr:g}); no weight decay; "
            f"warmup {cfg.warmup:.0%} then cosine to {cfg.min_lr_ratio:g} × peak over the budget; grad clip 1.0; "
            f"{'bf16 autocast' if cfg.bf16 else 'float32'}",
        ),
        ("Seed", str(cfg.seed)),
        ("Final training loss", f"{info['final_loss']:.3f} (mean of the last 20 steps)"),
        ("Trained", f"{info['date']} on {info['machine']}"),
    ]
    table = "\n".join(f"| {k} | {v} |" for k, v in facts)
    text = f"""# {cfg.model}

A small Chinese causal language model trained from scratch by `python tools/train_embedded.py
--model {cfg.model}`, shipped with gptqlab so that quantizers can be compared where no pretrained model can be
downloaded. It is a test subject, not a useful language model.

| | |
|---|---|
{table}

## Held-out perplexity

Measured {info["date"]} on {info["machine"]} with `gptqlab.evaluate.perplexity`, seqlen {EVAL_SEQLEN}, disjoint
windows, on the held-out splits (paragraphs joined by newlines), from the saved float16 weights run in
float32. Bits per character are the total negative log-likelihood in bits over the characters of the text.
The last two columns quantize every decoder Linear ({rtn_["linears"]} of them; the output head is kept) to
{rtn_["bits"]} bits, asymmetric, one scale and zero per group of {rtn_["group_size"]} input channels, and run the
dequantized weights: RTN rounds each weight to the nearest level of its group's min/max grid
(`gptqlab.quant.rtn`); GPTQ runs `gptqlab.quantize.driver.quantize_model` (true-sequential, no act-order) on
{gc["nsamples"]} × {gc["seqlen"]} calibration tokens from `{gc["spec"]}` (its calibration split, seed {gc["seed"]}).

{header}
|---|---|---|---|---|---|---|
{rows}

## Test slice

`eval.json` holds the numbers above and a quick check that `tests/test_embedded.py` repeats: the first
{sl["max_chars"]:,} characters of `{sl["text"]}` at seqlen {sl["seqlen"]}: perplexity
{sl["ppl"]:.3f} ({sl["ppl_before_fp16"]:.3f} with the trained float32 weights before saving in float16).
`train_log.json` has the loss of every step.
"""
    (folder / "README.md").write_text(text, encoding="utf-8")


def write_index(root: Path) -> None:
    """``models/README.md``: one row per trained embedded model, from its ``eval.json``."""
    rows = []
    for name in EMBEDDED_MODELS:
        path = root / name / "eval.json"
        if path.exists():
            ev = json.loads(path.read_text())
            pd_, rv = ev["heldout"]["peoples-daily"], ev["heldout"]["reviews"]
            rows.append(
                f"| [{name}]({name}/README.md) | {ev['architecture']} | {ev['parameters'] / 1e6:.2f} M |"
                f" {pd_['ppl']:.1f} / {pd_['bits_per_char']:.3f} | {rv['ppl']:.1f} / {rv['bits_per_char']:.3f} |"
                f" +{100 * ev['rtn']['peoples-daily']['rise']:.1f} % |"
                f" +{100 * ev['gptq']['peoples-daily']['rise']:.1f} % |"
            )
    text = f"""# Embedded models

Small Chinese models trained from scratch on the calibration splits of the built-in corpora by
`python tools/train_embedded.py`, so that quantizers can be compared offline. Load one by name:
`AutoModelForCausalLM.from_pretrained(gptqlab.embedded.resolve_model("tiny-zh-llama"))`.

Held-out perplexity / bits per character at seqlen {EVAL_SEQLEN}; the last columns are the perplexity rise on
`peoples-daily` when every decoder Linear is quantized to 3 bits (group size 128) by round-to-nearest and by
GPTQ. Details in each card.

| model | architecture | parameters | peoples-daily | reviews | RTN w3 g128 | GPTQ w3 g128 |
|---|---|---|---|---|---|---|
{chr(10).join(rows)}
"""
    (root / "README.md").write_text(text, encoding="utf-8")


# ---------------------------------------------------------------------------------------------- main


@dataclass(frozen=True)
class TrainingData:
    """The tokenizer trained on the training text, and that text as one token stream [n]."""

    tokenizer: PreTrainedTokenizerFast
    stream: torch.Tensor
    stats: dict


def prepare_data(max_length: int) -> TrainingData:
    """Train the tokenizer and tokenize the training text (both models share the result)."""
    docs = training_documents()
    tokenizer = train_tokenizer(docs, max_length)
    stream = token_stream(tokenizer, docs)
    chars = sum(len(d) for d in docs)
    stats = {
        "sources": list(TRAIN_SOURCES),
        "split": "calibration",
        "documents": len(docs),
        "chars": chars,
        "tokens": len(stream),
        "tokens_per_char": (len(stream) - 2 * len(docs)) / chars,  # without <s> and </s>
    }
    print(f"training text: {len(docs)} documents, {chars:,} characters, {len(stream):,} tokens")
    return TrainingData(tokenizer, stream, stats)


def machine(threads: int) -> str:
    """'2-core x86_64 CPU shared with other jobs, 1 thread': where a model was trained."""
    plural = "s" if threads > 1 else ""
    return f"{os.cpu_count()}-core {platform.machine()} CPU shared with other jobs, {threads} thread{plural}"


def train_model(cfg: TrainConfig, data: TrainingData, out: Path) -> Path:
    """Train one model and save it with its tokenizer and ``train_log.json``; returns its folder."""
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    tokenizer, stream = data.tokenizer, data.stream
    model = build_model(cfg.model, max_length=2 * cfg.seqlen)
    start = time.perf_counter()
    log = train(model, stream, cfg)
    train_seconds = time.perf_counter() - start
    folder = out / cfg.model
    save(model, tokenizer, folder)
    record = {
        "config": asdict(cfg),
        "date": datetime.date.today().isoformat(),
        "machine": machine(cfg.threads),
        "data": data.stats,
        "train_seconds": train_seconds,
        "slice_ppl_before_fp16": slice_perplexity(model.eval(), tokenizer).ppl,  # the float32 weights
        "log": log,
    }
    (folder / "train_log.json").write_text(json.dumps(record, indent=1) + "\n")
    return folder


def describe(folder: Path) -> dict:
    """Measure a saved model; write its ``eval.json``, its card and the models index."""
    record = json.loads((folder / "train_log.json").read_text())
    cfg, log, data = TrainConfig(**record["config"]), record["log"], record["data"]
    torch.set_num_threads(cfg.threads)
    model = AutoModelForCausalLM.from_pretrained(folder)
    info = {
        "model": cfg.model,
        "architecture": type(model).__name__,
        "parameters": sum(p.numel() for p in model.parameters()),
        "embedding_parameters": model.get_input_embeddings().weight.numel(),
        "file_mb": (folder / "model.safetensors").stat().st_size / 1e6,
        "tokens_per_char": data["tokens_per_char"],
        "train_chars": data["chars"],
        "train_tokens": data["tokens"],
        "steps": len(log),
        "tokens_seen": len(log) * cfg.batch_size * cfg.seqlen,
        "epochs": len(log) * cfg.batch_size * cfg.seqlen / data["tokens"],
        "train_seconds": record["train_seconds"],
        "final_loss": sum(x["loss"] for x in log[-20:]) / len(log[-20:]),
        "date": record["date"],
        "machine": record["machine"],
    }
    ev = {**info, **measure(folder)}
    ev["slice"]["ppl_before_fp16"] = record["slice_ppl_before_fp16"]
    (folder / "eval.json").write_text(json.dumps(ev, indent=1) + "\n")
    write_card(folder, model.config, cfg, info, ev)
    write_index(folder.parent)
    return ev


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python tools/train_embedded.py",
        description="Train gptqlab's embedded Chinese models on the built-in calibration text and write them, "
        "with their tokenizer, measurements and model card, to OUT/<name>/.",
    )
    p.add_argument(
        "--model",
        required=True,
        choices=[*EMBEDDED_MODELS, "all"],
        help="which model to train; all trains them one after the other",
    )
    p.add_argument(
        "--minutes",
        type=float,
        default=11.0,
        help="wall-clock training budget per model (default 11); the LR schedule spans it",
    )
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="train exactly this many steps instead of for --minutes (repeatable runs)",
    )
    p.add_argument("--batch-size", type=int, default=4, help="sequences per step (default 4)")
    p.add_argument(
        "--seqlen",
        type=int,
        default=512,
        help="tokens per training sequence (default 512); the model context is twice this",
    )
    p.add_argument(
        "--lr", type=float, default=3e-3, help="peak AdamW learning rate of the norms and biases (default 3e-3)"
    )
    p.add_argument(
        "--embed-lr", type=float, default=0.05, help="peak AdamW learning rate of the tied embedding (default 0.05)"
    )
    p.add_argument(
        "--muon-lr", type=float, default=0.05, help="peak Muon learning rate of the decoder matrices (default 0.05)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed for initialisation and data order (default 0)")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: on a 2-core machine shared with other jobs, 2 threads ran 4x slower "
        "than 1 because each thread waits for the other at every barrier)",
    )
    p.add_argument("--fp32", action="store_true", help="train in float32 instead of bfloat16 autocast")
    p.add_argument(
        "--out", type=Path, default=models_dir(), help="output folder (default: the package's models/ folder)"
    )
    p.add_argument(
        "--measure-only",
        action="store_true",
        help="do not train: measure the models already in OUT again and rewrite their eval.json and cards",
    )
    args = p.parse_args(argv)
    names = list(EMBEDDED_MODELS) if args.model == "all" else [args.model]
    torch.set_num_threads(args.threads)
    data = None if args.measure_only else prepare_data(max_length=2 * args.seqlen)
    for name in names:
        cfg = TrainConfig(
            model=name,
            minutes=args.minutes,
            steps=args.steps,
            batch_size=args.batch_size,
            seqlen=args.seqlen,
            lr=args.lr,
            embed_lr=args.embed_lr,
            muon_lr=args.muon_lr,
            seed=args.seed,
            threads=args.threads,
            bf16=not args.fp32,
        )
        folder = args.out / name if data is None else train_model(cfg, data, args.out)
        ev = describe(folder)
        print(
            json.dumps(
                {k: ev[k] for k in ("model", "parameters", "steps", "train_seconds", "heldout", "rtn", "gptq")},
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
