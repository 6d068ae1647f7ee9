"""Perplexity of a causal language model on held-out text, by sliding windows: the library behind
``gptqlab eval ppl``, ``gptqlab bench peers`` and the demo, so every number is scored by the same code.

:func:`perplexity` scores one text with a model in memory; :func:`evaluate` loads a model by name,
reads the evaluation texts and returns one row per text (:data:`FIELDS`).

What is counted
---------------
The text is tokenized once, without special tokens. If the tokenizer has a BOS token it is put in front.
The *targets* are all ids but the first: every token of the text when there is a BOS, all but the first
token otherwise (it has nothing to be predicted from). Each target is scored exactly once.

Window k reads ids ``[k * stride, k * stride + seqlen)`` (the last one cut short at the end of the ids) in
one forward pass; its logits predict ids ``k * stride + 1 .. k * stride + seqlen``, and it scores those
that no earlier window scored: all of them in the first window, the last ``stride`` in later ones. A
target is thus predicted from at most ``seqlen`` ids of context and, after the first window, at least
``seqlen - stride + 1``. ``stride = seqlen`` reads disjoint windows (fastest; the first targets of each
window have little context); ``stride = 1`` gives every target a full window (slowest).

* ``nll_sum``: the summed negative log-likelihood of the targets, in nats, computed in float32.
* ``tokens``: the number of targets. ``ppl = exp(nll_sum / tokens)``.
* ``chars``: ``len(text)``, in Unicode code points. ``bits_per_char = nll_sum / ln 2 / chars``, which does
  not depend on the tokenizer, so it compares models with different vocabularies.
"""

from __future__ import annotations

import gc
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from gptqlab.errors import ConfigError

DEFAULT_DATASETS = ("peoples-daily-heldout",)
DEFAULT_MAX_CHARS = 40_000
"""Characters scored per text by ``gptqlab eval ppl``, taken as :data:`SPREAD_PIECES` stretches spread over
the text (:func:`spread`): about 28,000 tokens of the embedded models' tokenizer, fast on a CPU. The
held-out splits hold 181,151 (peoples-daily) and 136,123 (reviews) characters."""
SPREAD_PIECES = 8
FIELDS = ("model", "dataset", "seqlen", "tokens", "chars", "ppl", "bits_per_char")

_CONTEXT_ATTRS = ("max_position_embeddings", "n_positions", "seq_length", "max_sequence_length")


@dataclass(frozen=True)
class PerplexityResult:
    """The totals of one :func:`perplexity` run; see the module docstring for what each field counts."""

    ppl: float
    bits_per_char: float
    nll_sum: float
    tokens: int
    chars: int
    seqlen: int
    stride: int

    def to_dict(self) -> dict:
        return asdict(self)


def model_context_length(config) -> int | None:
    """The longest sequence the model's config allows, or None when it sets no limit (e.g. ALiBi)."""
    for attr in _CONTEXT_ATTRS:
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def window_plan(n_ids: int, seqlen: int, stride: int) -> list[tuple[int, int, int]]:
    """The windows that score ids ``1 .. n_ids - 1`` once each; see the module docstring.

    Returns ``(begin, end, n_new)`` triples: the window reads ids ``[begin, end)`` and scores the targets
    ``end - n_new + 1 .. end``, which its last ``n_new`` logits predict.
    """
    plan = []
    done = 0  # targets 1 .. done are scored
    begin = 0
    while done < n_ids - 1:
        end = min(begin + seqlen, n_ids - 1)
        plan.append((begin, end, end - done))
        done = end
        begin += stride
    return plan


def _batches(plan: list[tuple[int, int, int]], batch_size: int) -> list[list[tuple[int, int, int]]]:
    """Consecutive windows grouped by up to ``batch_size``; a group's windows share length and n_new."""
    groups: list[list[tuple[int, int, int]]] = []
    for w in plan:
        g = groups[-1] if groups else None
        if g and len(g) < batch_size and w[1] - w[0] == g[0][1] - g[0][0] and w[2] == g[0][2]:
            g.append(w)
        else:
            groups.append([w])
    return groups


@torch.inference_mode()
def perplexity(
    model,
    tokenizer,
    text: str,
    seqlen: int = 512,
    stride: int | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
    batch_size: int = 1,
) -> PerplexityResult:
    """Score ``text`` with a causal LM by sliding windows of ``seqlen`` tokens moved by ``stride``.

    model: a transformers causal LM (``model(input_ids).logits`` of shape [B, T, vocab]); it is run in
    eval mode on ``device`` (default: where its parameters are) and is not moved. tokenizer: its
    tokenizer. stride: tokens newly scored per window, 1 ≤ stride ≤ seqlen; None means seqlen.
    batch_size: windows of equal length run together in one forward pass (the logits take
    batch_size × seqlen × vocab floats); it changes the speed, not the result beyond rounding.
    """
    if not text:
        raise ConfigError("cannot compute perplexity of an empty text")
    if seqlen < 2:
        raise ConfigError(f"seqlen must be at least 2, got {seqlen}")
    stride = seqlen if stride is None else stride
    if not 1 <= stride <= seqlen:
        raise ConfigError(f"stride must be between 1 and seqlen={seqlen}, got {stride}")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
    context = model_context_length(model.config)
    if context is not None and seqlen > context:
        raise ConfigError(
            f"seqlen {seqlen} is longer than the model's context of {context} tokens; use a seqlen of at most {context}"
        )

    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    if tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id, *ids]
    if len(ids) < 2:
        raise ConfigError("the text is too short: it has no token to score after the first")

    device = torch.device(device) if device is not None else next(model.parameters()).device
    ids_t = torch.tensor(ids, dtype=torch.long, device=device)
    was_training = model.training
    model.eval()
    nll_sum = 0.0
    tokens = 0
    for group in tqdm(_batches(window_plan(len(ids), seqlen, stride), batch_size), desc="ppl", disable=not progress):
        n_new = group[0][2]
        inputs = torch.stack([ids_t[b:e] for b, e, _ in group])  # [B, T]
        targets = torch.stack([ids_t[e - n_new + 1 : e + 1] for _, e, _ in group])  # [B, n_new]
        logits = model(inputs).logits[:, -n_new:].float()  # [B, n_new, vocab]: the predictions of the targets
        nll_sum += torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum").item()
        tokens += targets.numel()
    model.train(was_training)

    chars = len(text)
    return PerplexityResult(
        ppl=math.exp(nll_sum / tokens),
        bits_per_char=nll_sum / math.log(2) / chars,
        nll_sum=nll_sum,
        tokens=tokens,
        chars=chars,
        seqlen=seqlen,
        stride=stride,
    )


def model_label(name_or_path: str) -> str:
    """An embedded model's name as it is, a folder by its last component."""
    from gptqlab.embedded import EMBEDDED_MODELS

    return name_or_path if name_or_path in EMBEDDED_MODELS else Path(name_or_path).name or name_or_path


def spread(text: str, max_chars: int, pieces: int = SPREAD_PIECES) -> str:
    """About ``max_chars`` characters of ``text`` as ``pieces`` runs of whole lines starting at evenly spaced
    offsets, joined by newlines; the whole text when it is not longer than ``max_chars``.

    A prefix can misrepresent a text that is sorted (the reviews split: its first 40,000 characters score
    a perplexity 34 % above the whole split's with tiny-zh-llama), so the default evaluation samples the
    whole text instead.
    """
    if len(text) <= max_chars:
        return text
    size = max_chars // pieces
    out = []
    for i in range(pieces):
        begin = i * len(text) // pieces
        if begin and text[begin - 1] != "\n":  # start at the next whole line
            newline = text.find("\n", begin)
            begin = begin if newline == -1 else newline + 1
        out.append(text[begin : begin + size])
    return "\n".join(out)


def eval_texts(datasets: Sequence[str], max_chars: int | None, spread_out: bool = False) -> list[tuple[str, str]]:
    """(display name, text) for each dataset, cut to ``max_chars`` characters (None: all): its first ones,
    or with ``spread_out`` the stretches of :func:`spread`. Read once so that several models can be scored
    on the same texts."""
    from gptqlab.calib import load_eval_text

    if max_chars is not None and max_chars <= 0:
        raise ConfigError(f"--max-chars must be positive, got {max_chars}")
    if not datasets:
        raise ConfigError("give at least one --dataset")
    texts = []
    for name in datasets:
        display, text = load_eval_text(name)
        if max_chars is not None:
            text = spread(text, max_chars) if spread_out else text[:max_chars]
        texts.append((display, text))
    return texts


def check_context(model: str, seqlen: int) -> None:
    """Refuse a window longer than the model's context before any weights are loaded."""
    from transformers import AutoConfig

    from gptqlab.resolve import resolve_model_dir

    context = model_context_length(AutoConfig.from_pretrained(resolve_model_dir(model)))
    if context is not None and seqlen > context:
        raise ConfigError(f"--seqlen {seqlen} is longer than the model's context of {context} tokens")


def score(
    model,
    tokenizer,
    label: str,
    texts: Sequence[tuple[str, str]],
    seqlen: int,
    stride: int | None = None,
    batch_size: int = 1,
    progress: bool = True,
) -> list[dict]:
    """One row per text: the fields of :data:`FIELDS` plus ``stride`` and ``nll_sum``."""
    rows = []
    for display, text in texts:
        r = perplexity(model, tokenizer, text, seqlen=seqlen, stride=stride, progress=progress, batch_size=batch_size)
        rows.append({"model": label, "dataset": display, **r.to_dict()})
    return rows


def load_and_score(
    path: str,
    texts: Sequence[tuple[str, str]],
    seqlen: int,
    stride: int | None,
    device: torch.device,
    batch_size: int = 1,
    progress: bool = True,
    label: str | None = None,
    backend: str = "auto",
) -> list[dict]:
    """Load ``path`` with :func:`gptqlab.load` (quantized or not; ``backend`` for its quantized layers),
    score it, and release it."""
    import gptqlab

    # float32 activations: the reported change against an unquantized model is then the quantization's alone
    # (the CPU loader's default for quantized models is bfloat16). threads: what the caller set.
    dtype = torch.float32 if device.type == "cpu" else None
    model = gptqlab.load(path, device=str(device), backend=backend, dtype=dtype, threads=torch.get_num_threads())
    tokenizer = gptqlab.load_tokenizer(path)
    try:
        return score(model, tokenizer, label or model_label(path), texts, seqlen, stride, batch_size, progress)
    finally:
        del model
        gc.collect()


def _param_count(model: str) -> int:
    """Parameters of a model from its config, without loading weights (the meta skeleton)."""
    from gptqlab.modelfiles import model_config, model_skeleton
    from gptqlab.resolve import resolve_model_dir

    config = model_config(resolve_model_dir(model))
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config
    return sum(p.numel() for p in model_skeleton(config).parameters())


def evaluate(
    model: str,
    datasets: Sequence[str] = DEFAULT_DATASETS,
    seqlen: int = 512,
    stride: int | None = None,
    device: str = "auto",
    max_chars: int | None = DEFAULT_MAX_CHARS,
    spread_out: bool = True,
    batch_size: int | None = None,
    threads: int | None = None,
    backend: str = "auto",
    progress: bool = True,
) -> tuple[list[dict], torch.device, int]:
    """Score ``model`` (an embedded name or a folder, quantized or not) on each dataset.

    max_chars: characters per text (None: all), spread over it (:func:`spread`) or, without ``spread_out``,
    its first ones. batch_size: windows per forward pass; None means 8 on CUDA and 1 on the CPU, where
    batching does not help. threads: torch CPU threads while scoring; None means
    :func:`gptqlab.loader.default_cpu_threads`.
    backend: for the quantized layers, as in :func:`gptqlab.load`. Returns the rows (:func:`score`), the
    device and the CPU threads used.
    """
    from gptqlab.resolve import resolve_device, torch_threads

    if batch_size is not None and batch_size < 1:
        raise ConfigError(f"--batch-size must be positive, got {batch_size}")
    if threads is not None and threads < 1:
        raise ConfigError(f"--threads must be positive, got {threads}")
    dev = resolve_device(device)
    texts = eval_texts(datasets, max_chars, spread_out)
    check_context(model, seqlen)
    batch_size = batch_size or (8 if dev.type == "cuda" else 1)
    if threads is None and dev.type == "cpu":
        from gptqlab.loader import default_cpu_threads

        threads = default_cpu_threads(_param_count(model))
    with torch_threads(threads):
        rows = load_and_score(model, texts, seqlen, stride, dev, batch_size, progress, backend=backend)
        return rows, dev, torch.get_num_threads()
