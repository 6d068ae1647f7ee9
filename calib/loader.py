"""Calibration samples and evaluation text from a spec.

``load_calibration`` reads each source of a spec (see :mod:`gptqlab.calib.spec`), tokenizes it once and
draws non-overlapping windows of ``seqlen`` tokens from it, as many as the source's weight asks for. The
result is a :class:`CalibSet`: the token tensor plus per-source statistics for reports. Everything is
deterministic for a given seed.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gptqlab.calib.readers import source_paragraphs
from gptqlab.calib.sources import BUILTIN_SOURCES, builtin_texts
from gptqlab.calib.spec import SourceSpec, kind_from_extension, parse_hf_ref, parse_spec
from gptqlab.errors import CalibrationError, printable

# Characters tokenized in one piece. Pieces bound the memory of one tokenizer call and let a fast tokenizer
# encode them in parallel. They are not sized by model_max_length: a SentencePiece tokenizer adds a prefix
# space at the start of every piece, so pieces of a few hundred characters would add a token every few
# hundred characters and bias tokens_per_char. The length warning is switched off instead (verbose=False).
# A paragraph longer than a piece is cut, so no single line of text can make one call large.
CHUNK_CHARS = 16_384
# Pieces per tokenizer call; the ids of a call are turned into a tensor before the next, so Python's lists of
# ints (about 40 bytes per token) never hold more than one batch.
BATCH_PIECES = 16
EVAL_BUILTINS = {f"{name}-heldout": name for name in BUILTIN_SOURCES}
EVAL_HF_DEFAULT_SPLIT = "test"


@dataclass(frozen=True)
class SourceStats:
    """What one source contributed: ``samples`` windows, drawn from ``tokens`` tokens of its text.

    ``characters`` and ``tokens`` measure the whole tokenized text (paragraphs joined by "\\n"), not only
    the windows drawn from it.
    """

    source: SourceSpec
    samples: int
    paragraphs: int
    characters: int
    tokens: int

    @property
    def tokens_per_char(self) -> float:
        """Tokens per character of the source text; lower means a vocabulary that covers Chinese better."""
        return self.tokens / self.characters


@dataclass(frozen=True)
class CalibSet:
    """Calibration samples drawn from a spec.

    input_ids: int64 [nsamples, seqlen], rows in a seeded random order, no special tokens.
    source_index: int64 [nsamples]; row i was drawn from ``sources[source_index[i]]``.
    sources: per-source statistics, in spec order.
    spec, seed: the arguments that produced the set.
    """

    input_ids: torch.Tensor
    source_index: torch.Tensor
    sources: tuple[SourceStats, ...]
    spec: str
    seed: int

    @property
    def nsamples(self) -> int:
        return self.input_ids.shape[0]

    @property
    def seqlen(self) -> int:
        return self.input_ids.shape[1]

    @property
    def tokens_per_char(self) -> float:
        """Tokens per character over the text of all sources."""
        return sum(s.tokens for s in self.sources) / sum(s.characters for s in self.sources)

    def description(self) -> dict[str, Any]:
        """A JSON-ready dict for reports: the arguments, per-source statistics and totals."""
        return {
            "spec": self.spec,
            "seed": self.seed,
            "nsamples": self.nsamples,
            "seqlen": self.seqlen,
            "tokens_sampled": self.nsamples * self.seqlen,
            "characters": sum(s.characters for s in self.sources),
            "tokens": sum(s.tokens for s in self.sources),
            "tokens_per_char": self.tokens_per_char,
            "sources": [
                {
                    "name": s.source.kind,
                    "path": s.source.path,
                    "split": s.source.split,
                    "column": s.source.column,
                    "weight": s.source.weight,
                    "samples": s.samples,
                    "paragraphs": s.paragraphs,
                    "characters": s.characters,
                    "tokens": s.tokens,
                    "tokens_per_char": s.tokens_per_char,
                }
                for s in self.sources
            ],
        }

    def summary(self) -> str:
        """A short table per source, then the totals: samples and the tokens they hold (samples x seqlen, what
        calibration uses), then the size of the source text (characters and tokens) and its tokens/char.
        Source names are printed with control characters escaped."""
        rows = [
            (
                printable(s.source.label),
                f"{s.source.weight:.2f}",
                s.samples,
                s.samples * self.seqlen,
                s.characters,
                s.tokens,
                s.tokens_per_char,
            )
            for s in self.sources
        ]
        total_tokens = sum(s.tokens for s in self.sources)
        total_chars = sum(s.characters for s in self.sources)
        sampled = self.nsamples * self.seqlen
        rows.append(("total", "1.00", self.nsamples, sampled, total_chars, total_tokens, self.tokens_per_char))
        width = max(len("source"), *(len(r[0]) for r in rows))
        lines = [
            f"calibration: {self.nsamples} samples x {self.seqlen} tokens, seed {self.seed}",
            f"{'source':<{width}}  weight  samples  {'tokens':>9}  {'text chars':>11}  {'text tokens':>11}  "
            "tokens/char",
        ]
        for label, weight, samples, tokens, chars, text_tokens, ratio in rows:
            lines.append(
                f"{label:<{width}}  {weight:>6}  {samples:>7}  {tokens:>9,}  {chars:>11,}  {text_tokens:>11,}  "
                f"{ratio:>11.3f}"
            )
        return "\n".join(lines)


def allocate_samples(weights: Sequence[float], nsamples: int) -> list[int]:
    """Split ``nsamples`` among sources in proportion to ``weights`` by largest-remainder rounding.

    When ``nsamples >= len(weights)`` every source gets at least one sample, taken from the source that
    rounding favoured most. Ties go to the earlier source. Returns counts that sum to ``nsamples``.
    """
    total = sum(weights)
    quotas = [w / total * nsamples for w in weights]
    counts = [math.floor(q) for q in quotas]
    by_remainder = sorted(range(len(quotas)), key=lambda i: (counts[i] - quotas[i], i))
    for i in by_remainder[: nsamples - sum(counts)]:
        counts[i] += 1
    if nsamples >= len(counts):
        for i in range(len(counts)):
            if counts[i] == 0:
                # A donor with 2 or more exists: the counts sum to nsamples >= sources and one is 0.
                donor = max((j for j in range(len(counts)) if counts[j] > 1), key=lambda j: (counts[j] - quotas[j], -j))
                counts[donor] -= 1
                counts[i] = 1
    return counts


def _generator(seed: int, stream: str) -> torch.Generator:
    """A generator for one named random stream of ``seed``.

    Hashing keeps streams independent: with seed + index, source 1 at seed 0 would repeat source 0 at seed 1.
    """
    digest = hashlib.sha256(f"{seed}/{stream}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def text_pieces(paragraphs: Iterable[str]) -> Iterator[str]:
    """``"\\n".join(paragraphs)`` cut into pieces of at most :data:`CHUNK_CHARS` characters.

    Pieces end between paragraphs, each but the last keeping its trailing "\\n"; a paragraph longer than
    ``CHUNK_CHARS`` is cut into pieces of exactly that length, and its remainder starts the next piece.
    """
    current: list[str] = []
    size = 0
    for paragraph in paragraphs:
        while len(paragraph) > CHUNK_CHARS:
            if current:
                yield "\n".join(current) + "\n"
                current, size = [], 0
            yield paragraph[:CHUNK_CHARS]
            paragraph = paragraph[CHUNK_CHARS:]
        if current and size + len(paragraph) > CHUNK_CHARS:
            yield "\n".join(current) + "\n"
            current, size = [], 0
        current.append(paragraph)
        size += len(paragraph) + 1
    yield "\n".join(current)


def tokenize_paragraphs(tokenizer: Any, paragraphs: Iterable[str]) -> tuple[torch.Tensor, int]:
    """Token ids of ``"\\n".join(paragraphs)`` without special tokens, and the number of characters.

    tokenizer: a Hugging Face tokenizer (called as ``tokenizer(list_of_str, add_special_tokens=False)``).
    The text is tokenized in pieces (:func:`text_pieces`), :data:`BATCH_PIECES` pieces per call. Returns
    int64 [T] and the number of characters tokenized.

    Memory: 8 bytes per token for the result, plus one call's work on at most ``BATCH_PIECES x CHUNK_CHARS``
    characters, whatever the length of a paragraph.
    """
    parts: list[torch.Tensor] = []
    characters = 0
    pieces = text_pieces(paragraphs)
    while batch := list(itertools.islice(pieces, BATCH_PIECES)):
        characters += sum(len(p) for p in batch)
        # verbose=False: a piece longer than model_max_length is expected; windows of seqlen are cut later.
        encoded = tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]
        parts.append(torch.tensor(list(itertools.chain.from_iterable(encoded)), dtype=torch.long))
    return torch.cat(parts), characters


def draw_windows(ids: torch.Tensor, count: int, seqlen: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` non-overlapping windows of ``seqlen`` tokens from ``ids`` (int64 [T]) → int64 [count, seqlen].

    The stream is cut into consecutive windows from a random offset in [0, seqlen), reduced where needed so
    that ``count`` windows still fit, and ``count`` of the windows are chosen at random. The caller checks
    that ``count * seqlen <= T``.
    """
    slack = ids.numel() - count * seqlen
    offset = int(torch.randint(min(seqlen, slack + 1), (), generator=generator))
    nwindows = (ids.numel() - offset) // seqlen
    windows = ids[offset : offset + nwindows * seqlen].view(nwindows, seqlen)
    return windows[torch.randperm(nwindows, generator=generator)[:count]]


def _check_positive(value: Any, flag: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise CalibrationError(f"{flag} must be a positive integer, got {value!r}")


def load_calibration(spec: str, tokenizer: Any, nsamples: int, seqlen: int, seed: int = 0) -> CalibSet:
    """Draw ``nsamples`` windows of exactly ``seqlen`` tokens from the sources of ``spec``.

    tokenizer: a Hugging Face tokenizer; no special tokens are added. Each source gets its weight's share
    of ``nsamples`` (:func:`allocate_samples`) and its windows never overlap each other. Returns a
    :class:`CalibSet` whose ``input_ids`` is int64 [nsamples, seqlen]. Raises CalibrationError for a bad
    spec or file, and for a source with too few tokens for its share.
    """
    _check_positive(nsamples, "--nsamples")
    _check_positive(seqlen, "--seqlen")
    sources = parse_spec(spec)
    counts = allocate_samples([s.weight for s in sources], nsamples)
    stats, samples = [], []
    for index, (source, count) in enumerate(zip(sources, counts, strict=True)):
        paragraphs = source_paragraphs(source)
        ids, characters = tokenize_paragraphs(tokenizer, paragraphs)
        if count * seqlen > ids.numel():
            raise CalibrationError(
                f"calibration source {source.label!r} has {ids.numel()} tokens ({characters} characters), but its "
                f"{count} samples x seqlen {seqlen} need {count * seqlen}; lower --nsamples or --seqlen, "
                "or add text to the source"
            )
        samples.append(draw_windows(ids, count, seqlen, _generator(seed, f"source{index}")))  # [count, seqlen]
        stats.append(SourceStats(source, count, len(paragraphs), characters, ids.numel()))
    input_ids = torch.cat(samples)  # [nsamples, seqlen]
    source_index = torch.repeat_interleave(torch.arange(len(sources)), torch.tensor(counts))  # [nsamples]
    order = torch.randperm(nsamples, generator=_generator(seed, "order"))
    return CalibSet(input_ids[order], source_index[order], tuple(stats), spec, seed)


def _looks_like_hub_name(name: str) -> bool:
    """'org/dataset', possibly followed by @CONFIG, #COLUMN or :SPLIT."""
    head = name.split(":")[0].split("@")[0].split("#")[0]
    parts = head.split("/")
    return len(parts) == 2 and all(parts) and not Path(head).exists()


def load_eval_text(name: str) -> tuple[str, str]:
    """(display name, text) of an evaluation text; paragraphs are joined by "\\n".

    name: ``peoples-daily-heldout`` or ``reviews-heldout`` (the held-out splits of the built-ins), a local
    ``.txt`` file, a BELLE ``.json``/``.jsonl`` file, ``hf:NAME[@CONFIG][#COLUMN][:SPLIT]`` (split ``test``
    unless given; NAME may be a directory written by ``save_to_disk``), or a Hub name ``org/name`` with
    the same optional suffixes.
    """
    name = name.strip()
    if name in EVAL_BUILTINS:
        return name, "\n".join(builtin_texts(EVAL_BUILTINS[name], "heldout"))
    kind = kind_from_extension(name)
    if kind is not None:
        source = SourceSpec(kind, name)
    elif name.startswith("hf:") or _looks_like_hub_name(name) or Path(name).is_dir():
        path, config, column, split = parse_hf_ref(name.removeprefix("hf:"), name)
        source = SourceSpec("hf", path, split=split or EVAL_HF_DEFAULT_SPLIT, config=config, column=column)
    else:
        raise CalibrationError(
            f"unknown evaluation text {name!r}; choose {', '.join(EVAL_BUILTINS)}, a .txt, .json or .jsonl file, "
            "or a Hugging Face dataset hf:NAME[@CONFIG][#COLUMN][:SPLIT]"
        )
    return source.label if kind is None else name, "\n".join(source_paragraphs(source))
