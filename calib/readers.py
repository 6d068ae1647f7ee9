"""Read each kind of source into paragraphs: a list of non-empty strings, in file order.

Every problem with a file (missing, unreadable, not a regular file, not UTF-8, empty, malformed, malformed
Unicode, a record without the expected fields) raises :class:`CalibrationError` naming the file and, where
there is one, the 1-based line number.

Memory. Plain text and JSON-lines files are read as a stream, :data:`READ_BYTES` at a time, so memory
never grows with the length of one line: a ``.txt`` line longer than :data:`MAX_PARAGRAPH_CHARS`
characters becomes several paragraphs of at most that length, and a ``.jsonl`` line longer than
:data:`MAX_RECORD_CHARS` is refused. The paragraphs of a source are held in memory (about the size of the
text); a ``.json`` list is decoded whole, so large BELLE files are better given as ``.jsonl``.
"""

from __future__ import annotations

import codecs
import json
import os
import re
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from gptqlab.calib.sources import BUILTIN_SOURCES, builtin_texts
from gptqlab.calib.spec import SourceSpec
from gptqlab.errors import CalibrationError

# BELLE's prompt template; turns of a multi-turn conversation are joined by a blank line in the same way.
HUMAN = "Human"
ASSISTANT = "Assistant"
TURN_SEPARATOR = "\n\n"
HUMAN_ROLES = ("human", "user")
ASSISTANT_ROLES = ("gpt", "assistant")

# A paragraph of plain text holds at most this many characters; a longer line is cut into several. The
# tokenizer sees one paragraph at a time at most, and a byte-level BPE tokenizer's memory grows quickly with
# the length of a run of text without spaces (Chinese has none): 20 MB in one line took 5 GB.
MAX_PARAGRAPH_CHARS = 16_384
# A JSON-lines record (one line) longer than this is refused rather than decoded.
MAX_RECORD_CHARS = 4_000_000
READ_BYTES = 1 << 20  # bytes read from a file at a time

_JSON_TYPES = {dict: "an object", list: "a list", str: "a string", int: "a number", float: "a number"}
_WHITESPACE = re.compile(r"[ \t\n\r]*")  # what JSON allows between values


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    return "null" if value is None else _JSON_TYPES.get(type(value), type(value).__name__)


def _open(path: str) -> IO[bytes]:
    """``path`` opened for binary reading, after refusing what is not a regular file (a FIFO or a device
    would block or never end)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise CalibrationError(f"{path}: no such file; check the path") from None
    except (OSError, ValueError) as exc:  # ValueError: a NUL in the path
        raise CalibrationError(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from None
    if stat.S_ISDIR(mode):
        raise CalibrationError(f"{path} is a directory; give a file")
    if not stat.S_ISREG(mode):
        raise CalibrationError(f"{path} is not a regular file (a FIFO, socket or device); give a file")
    try:
        return Path(path).open("rb")
    except OSError as exc:
        raise CalibrationError(f"cannot read {path}: {exc.strerror}; check that the file is readable") from None


def _not_utf8(path: str, data: bytes, start: int, offset: int, line: int) -> CalibrationError:
    return CalibrationError(
        f"{path} is not UTF-8: byte 0x{data[start]:02x} at byte offset {offset} (line {line}); "
        "convert it, e.g. iconv -f GB18030 -t UTF-8"
    )


def read_lines(path: str, max_chars: int, cut: bool) -> Iterator[tuple[int, str]]:
    """(1-based line number, text) of each line of a UTF-8 file, read as a stream (a leading byte-order mark
    is dropped; the text has no "\\n").

    A line longer than ``max_chars`` characters is yielded in consecutive pieces of at most ``max_chars``
    under the same line number when ``cut``, else refused. Memory: ``READ_BYTES`` plus ``max_chars``.
    """
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    number, consumed, pending, first = 1, 0, [], True
    size = 0
    with _open(path) as f:
        while True:
            try:
                chunk = f.read(READ_BYTES)
            except OSError as exc:
                raise CalibrationError(f"cannot read {path}: {exc.strerror}") from None
            try:
                text = decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as exc:
                held = len(exc.object) - len(chunk)  # bytes of an unfinished character from the last chunk
                line = number + exc.object[: exc.start].count(b"\n")
                raise _not_utf8(path, exc.object, exc.start, consumed - held + exc.start, line) from None
            consumed += len(chunk)
            if first:
                text, first = text.removeprefix("\ufeff"), False
            parts = text.split("\n")
            for k, part in enumerate(parts):
                while size + len(part) > max_chars:
                    if not cut:
                        raise CalibrationError(
                            f"{path} line {number} is longer than {max_chars:,} characters; one record per line "
                            "must be shorter: split the record"
                        )
                    room = max_chars - size
                    pending.append(part[:room])
                    yield number, "".join(pending)
                    part, pending, size = part[room:], [], 0
                if part:
                    pending.append(part)
                    size += len(part)
                if k < len(parts) - 1:  # a newline ends the line
                    yield number, "".join(pending)
                    number, pending, size = number + 1, [], 0
            if not chunk:
                break
    if pending:
        yield number, "".join(pending)


def read_utf8(path: str) -> str:
    """The whole text of ``path``, decoded as UTF-8 (a leading byte-order mark is dropped); never empty.
    Memory: the size of the file, twice."""
    with _open(path) as f:
        try:
            data = f.read()
        except OSError as exc:
            raise CalibrationError(f"cannot read {path}: {exc.strerror}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise _not_utf8(path, data, exc.start, exc.start, line) from None
    # Windows editors write a BOM; it is not part of the first paragraph.
    text = text.removeprefix("\ufeff")
    if not text.strip():
        raise CalibrationError(f"{path} is empty; give a file with text in it")
    return text


def txt_paragraphs(path: str) -> list[str]:
    """Non-empty lines of a UTF-8 text file, stripped of surrounding whitespace; a line longer than
    :data:`MAX_PARAGRAPH_CHARS` becomes several paragraphs."""
    paragraphs = [p for _, line in read_lines(path, MAX_PARAGRAPH_CHARS, cut=True) if (p := line.strip())]
    if not paragraphs:
        raise CalibrationError(f"{path} is empty; give a file with text in it")
    return paragraphs


def check_unicode(text: str, where: str) -> str:
    """``text`` unchanged, or CalibrationError when it holds an unpaired surrogate (JSON's ``"\\ud800"``
    decodes to one), which no tokenizer can encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = ascii(text[exc.start])[1:-1]
        raise CalibrationError(
            f"{where}: malformed Unicode: an unpaired surrogate {bad} at character {exc.start}; fix the record"
        ) from None
    return text


def _turn(turn: Any, where: str, number: int) -> str:
    if not isinstance(turn, dict):
        raise CalibrationError(f"{where}: conversation turn {number} is {_json_type(turn)}, not an object")
    role = turn.get("from", turn.get("role"))
    value = turn.get("value", turn.get("content"))
    if role in HUMAN_ROLES:
        speaker = HUMAN
    elif role in ASSISTANT_ROLES:
        speaker = ASSISTANT
    else:
        raise CalibrationError(
            f"{where}: conversation turn {number} has speaker {role!r}; "
            f"use 'from' (or 'role') with one of {', '.join(HUMAN_ROLES + ASSISTANT_ROLES)}"
        )
    if not isinstance(value, str):
        raise CalibrationError(
            f"{where}: conversation turn {number} needs a string 'value' (or 'content'), got {_json_type(value)}"
        )
    return f"{speaker}: {value}"


def render_belle(record: Any, where: str) -> str:
    """One BELLE record as training text: ``Human: {input}\\n\\nAssistant: {output}``.

    Accepts ``instruction``/``input``/``output`` records (instruction and input joined by a newline when
    both are non-empty) and ``conversations`` lists of ``{"from": "human"|"gpt"|"assistant", "value": ...}``
    or ``{"role": ..., "content": ...}`` turns. ``where`` (e.g. ``"data.jsonl line 3"``) starts error messages.
    """
    if not isinstance(record, dict):
        raise CalibrationError(f"{where}: expected a BELLE record (a JSON object), got {_json_type(record)}")
    if "conversations" in record:
        turns = record["conversations"]
        if not isinstance(turns, list) or not turns:
            raise CalibrationError(f"{where}: 'conversations' must be a non-empty list of turns")
        return TURN_SEPARATOR.join(_turn(turn, where, n) for n, turn in enumerate(turns, 1))
    if "output" in record and ("instruction" in record or "input" in record):
        fields = {}
        for key in ("instruction", "input", "output"):
            value = record.get(key)
            # BELLE exports write "input": "" or null when a task has no separate input.
            if value is not None and not isinstance(value, str):
                raise CalibrationError(f"{where}: field {key!r} must be a string, got {_json_type(value)}")
            fields[key] = value or ""
        prompt = "\n".join(x for x in (fields["instruction"], fields["input"]) if x)
        return f"{HUMAN}: {prompt}{TURN_SEPARATOR}{ASSISTANT}: {fields['output']}"
    raise CalibrationError(
        f"{where}: record has neither 'instruction'/'input' with 'output' nor 'conversations' "
        f"(its keys: {', '.join(map(repr, record)) or 'none'}); fix or remove the record"
    )


def _undecodable(exc: ValueError | RecursionError) -> str:
    """Why json rejected well-formed text: Python limits nesting depth and the digits of an integer."""
    if isinstance(exc, RecursionError):
        return "nested too deeply to decode"
    return "holds an integer too long to convert"


def _jsonl_records(lines: Iterator[tuple[int, str]], path: str) -> Iterator[tuple[int, Any]]:
    """(1-based line number, decoded record) for every non-blank line."""
    for number, line in lines:
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as exc:
            raise CalibrationError(
                f"{path} line {number}: not valid JSON ({exc.msg} at column {exc.colno}); "
                "each line of a JSON-lines file must hold one record"
            ) from None
        except (ValueError, RecursionError) as exc:
            raise CalibrationError(f"{path} line {number}: the record {_undecodable(exc)}") from None


def _text_lines(text: str) -> Iterator[tuple[int, str]]:
    # split("\n"), not splitlines(): JSON strings may hold U+2028 and similar, which splitlines breaks on.
    return enumerate(text.split("\n"), 1)


def _json_array_records(text: str, path: str) -> Iterator[tuple[int, Any]]:
    """(1-based line number where the record starts, decoded record) for each element of a JSON list."""
    decoder = json.JSONDecoder()
    pos = _WHITESPACE.match(text).end() + 1  # past '['
    line, counted = 1, 0
    try:
        pos = _WHITESPACE.match(text, pos).end()
        if text.startswith("]", pos):
            pos += 1
        else:
            while True:
                record, end = decoder.raw_decode(text, pos)
                # Count newlines incrementally: counting from the start for every record would be quadratic.
                line, counted = line + text.count("\n", counted, pos), pos
                yield line, record
                pos = _WHITESPACE.match(text, end).end()
                if text.startswith("]", pos):
                    pos += 1
                    break
                if not text.startswith(",", pos):
                    raise json.JSONDecodeError("Expecting ',' delimiter", text, pos)
                pos = _WHITESPACE.match(text, pos + 1).end()
        pos = _WHITESPACE.match(text, pos).end()
        if pos != len(text):
            raise json.JSONDecodeError("Extra data", text, pos)
    except json.JSONDecodeError as exc:
        raise CalibrationError(f"{path} line {exc.lineno}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    except (ValueError, RecursionError) as exc:
        line = text.count("\n", 0, pos) + 1
        raise CalibrationError(f"{path} line {line}: the record {_undecodable(exc)}") from None


def _json_records(text: str, path: str) -> Iterator[tuple[int, Any]]:
    """Records of a .json file: a list of records, a single record, or (as many BELLE downloads named .json
    are) one record per line."""
    start = text.lstrip()
    if start.startswith("["):
        return _json_array_records(text, path)
    if not start.startswith("{"):
        raise CalibrationError(f"{path}: expected a JSON list of BELLE records, or one record per line")
    first_line = text.count("\n", 0, text.index("{")) + 1
    try:
        return iter([(first_line, json.loads(text))])
    except json.JSONDecodeError as exc:
        error = exc
    except (ValueError, RecursionError) as exc:
        raise CalibrationError(f"{path} line {first_line}: the record {_undecodable(exc)}") from None
    # Many BELLE downloads named .json hold one record per line; then the first line is a whole record.
    try:
        json.loads(start.split("\n", 1)[0])
    except (ValueError, RecursionError):  # JSONDecodeError is a ValueError
        raise CalibrationError(
            f"{path} line {error.lineno}: not valid JSON ({error.msg} at column {error.colno})"
        ) from None
    return _jsonl_records(_text_lines(text), path)


def belle_paragraphs(path: str) -> list[str]:
    """Rendered records of a BELLE .json or .jsonl file, one paragraph per record. A ``.jsonl`` file is read
    as a stream, one line at a time (see the module docstring for the memory this takes)."""
    if Path(path).suffix.lower() == ".jsonl":
        records = _jsonl_records(read_lines(path, MAX_RECORD_CHARS, cut=False), path)
    else:
        records = _json_records(read_utf8(path), path)
    paragraphs = []
    for line, record in records:
        where = f"{path} line {line}"
        paragraphs.append(check_unicode(render_belle(record, where), where))
    if not paragraphs and Path(path).suffix.lower() == ".jsonl":
        raise CalibrationError(f"{path} is empty; give a file with text in it")
    if not paragraphs:
        raise CalibrationError(f"{path} holds no records; give a file with at least one BELLE record")
    return paragraphs


def hf_paragraphs(path: str, split: str, config: str | None = None, column: str = "text") -> list[str]:
    """Non-empty values (stripped) of one text column of a Hugging Face dataset split.

    ``path`` is a dataset name for ``datasets.load_dataset`` or a local directory written by
    ``save_to_disk``. A saved single ``Dataset`` has no splits, so ``split`` applies to a saved
    ``DatasetDict`` and to ``load_dataset`` only. ``datasets`` is imported here, only when it is needed.
    """
    try:
        import datasets
    except ImportError:
        raise CalibrationError("hf: sources need the 'datasets' package: pip install datasets") from None
    local = Path(path)
    try:
        if (local / "dataset_dict.json").is_file() or (local / "state.json").is_file():
            dataset = datasets.load_from_disk(str(local))
            if isinstance(dataset, datasets.DatasetDict):
                if split not in dataset:
                    raise CalibrationError(
                        f"dataset {path} has no split {split!r}; its splits are {', '.join(dataset)}; "
                        f"choose one with hf:{path}:SPLIT"
                    )
                dataset = dataset[split]
        else:
            dataset = datasets.load_dataset(path, config, split=split)
    # datasets reports a missing dataset, split or config, and an unreachable Hub, as OSError or ValueError.
    except (OSError, ValueError) as exc:
        reason = str(exc).strip().split("\n")[0]
        raise CalibrationError(
            f"cannot load Hugging Face dataset {path!r} (split {split!r}): {reason}; "
            "check the name and split, or use a local copy written by save_to_disk"
        ) from None
    if column not in dataset.column_names:
        raise CalibrationError(
            f"dataset {path} has no column {column!r}; its columns are {', '.join(dataset.column_names)}; "
            f"choose one with hf:{path}#COLUMN"
        )
    paragraphs = []
    # One bulk read: iterating dataset[column] converts row by row and is ~100x slower.
    values = dataset.select_columns([column]).to_dict()[column]
    for row, value in enumerate(values):
        if value is None:
            continue
        if not isinstance(value, str):
            raise CalibrationError(
                f"dataset {path} column {column!r} row {row} is {_json_type(value)}, not text; "
                f"choose a text column with hf:{path}#COLUMN"
            )
        if value.strip():
            paragraphs.append(value.strip())
    if not paragraphs:
        raise CalibrationError(f"dataset {path} split {split!r} column {column!r} holds no text")
    return paragraphs


def source_paragraphs(source: SourceSpec, builtin_split: str = "calibration") -> list[str]:
    """Paragraphs of one source; built-ins give their ``builtin_split`` (``calibration`` or ``heldout``)."""
    if source.kind in BUILTIN_SOURCES:
        return list(builtin_texts(source.kind, builtin_split))
    if source.kind == "txt":
        return txt_paragraphs(source.path)
    if source.kind == "belle":
        return belle_paragraphs(source.path)
    return hf_paragraphs(source.path, source.split, source.config, source.column)
