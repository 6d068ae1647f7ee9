"""Perplexity of a causal language model on a text, by sliding windows.

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

import math
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from gptqlab.errors import ConfigError

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


@torch.no_grad()
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
