"""``gptqlab eval ppl``: perplexity and bits per character of a model (fp16 or GPTQ) on evaluation texts.

Every checkpoint that gptqlab reports on is scored by :func:`score`, so numbers from ``eval ppl`` and
``bench peers`` are comparable: same text, same windows (:func:`gptqlab.evaluate.perplexity`).
"""

from __future__ import annotations

import gc
from collections.abc import Sequence
from pathlib import Path

import torch

from gptqlab.benchmarks.common import check_positive, env_line, environment, table, write_json
from gptqlab.errors import ConfigError
from gptqlab.resolve import resolve_device

DEFAULT_DATASETS = ("peoples-daily-heldout",)
FIELDS = ("model", "dataset", "seqlen", "tokens", "chars", "ppl", "bits_per_char")


def model_label(name_or_path: str) -> str:
    """An embedded model's name as it is, a folder by its last component."""
    from gptqlab.embedded import EMBEDDED_MODELS

    return name_or_path if name_or_path in EMBEDDED_MODELS else Path(name_or_path).name or name_or_path


def eval_texts(datasets: Sequence[str], max_chars: int | None) -> list[tuple[str, str]]:
    """(display name, text) for each dataset, cut to its first ``max_chars`` characters; read once so
    that several models can be scored on the same texts."""
    from gptqlab.calib import load_eval_text

    check_positive(max_chars, "--max-chars")
    if not datasets:
        raise ConfigError("give at least one --dataset")
    texts = []
    for name in datasets:
        display, text = load_eval_text(name)
        texts.append((display, text if max_chars is None else text[:max_chars]))
    return texts


def check_context(model: str, seqlen: int) -> None:
    """Refuse a window longer than the model's context before any weights are loaded."""
    from transformers import AutoConfig

    from gptqlab.evaluate import model_context_length
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
    from gptqlab.evaluate import perplexity

    rows = []
    for display, text in texts:
        r = perplexity(model, tokenizer, text, seqlen=seqlen, stride=stride, progress=progress, batch_size=batch_size)
        rows.append(
            {
                "model": label,
                "dataset": display,
                "seqlen": r.seqlen,
                "stride": r.stride,
                "tokens": r.tokens,
                "chars": r.chars,
                "ppl": r.ppl,
                "bits_per_char": r.bits_per_char,
                "nll_sum": r.nll_sum,
            }
        )
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
) -> list[dict]:
    """Load ``path`` with :func:`gptqlab.load` (quantized or not), score it, and release it."""
    import gptqlab

    model = gptqlab.load(path, device=str(device))
    tokenizer = gptqlab.load_tokenizer(path)
    try:
        return score(model, tokenizer, label or model_label(path), texts, seqlen, stride, batch_size, progress)
    finally:
        del model
        gc.collect()


def run(
    model: str,
    datasets: Sequence[str] = DEFAULT_DATASETS,
    seqlen: int = 512,
    stride: int | None = None,
    device: str = "auto",
    max_chars: int | None = None,
    batch_size: int = 1,
    json_path: str | None = None,
    progress: bool = True,
) -> list[dict]:
    """Score ``model`` on each dataset, print a table, and write JSON when ``json_path`` is given: one
    object for one dataset, a list for several, each with the environment under ``env``."""
    check_positive(batch_size, "--batch-size")
    dev = resolve_device(device)
    texts = eval_texts(datasets, max_chars)
    check_context(model, seqlen)
    rows = load_and_score(model, texts, seqlen, stride, dev, batch_size, progress)
    env = environment(dev)
    print(env_line(env))
    headers = ["model", "dataset", "seqlen", "stride", "tokens", "chars", "ppl", "bits/char"]
    keys = ["model", "dataset", "seqlen", "stride", "tokens", "chars", "ppl", "bits_per_char"]
    print(table(headers, [[r[k] for k in keys] for r in rows]))
    if json_path is not None:
        records = [{**r, "env": env} for r in rows]
        path = write_json(json_path, records[0] if len(records) == 1 else records)
        print(f"wrote {path}")
    return rows
