"""Calibration input under misuse: bounded memory for long lines, streaming reads, FIFOs, malformed Unicode."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import textwrap

import pytest

import gptqlab.calib.readers as readers
from gptqlab.calib.loader import CHUNK_CHARS, text_pieces, tokenize_paragraphs
from gptqlab.calib.readers import (
    MAX_PARAGRAPH_CHARS,
    belle_paragraphs,
    read_lines,
    txt_paragraphs,
)
from gptqlab.errors import CalibrationError

LINE = "人民日报社论新年贺词" * 10  # 100 characters, no spaces


def test_a_long_line_becomes_paragraphs_of_bounded_length(tmp_path):
    n = MAX_PARAGRAPH_CHARS * 2 + 123
    text = ("中" * n) + "\n短行\n"
    path = tmp_path / "long.txt"
    path.write_text(text, encoding="utf-8")
    got = txt_paragraphs(str(path))
    assert [len(p) for p in got] == [MAX_PARAGRAPH_CHARS, MAX_PARAGRAPH_CHARS, 123, 2]
    assert "".join(got[:3]) == "中" * n


def test_streaming_read_gives_the_same_lines_across_chunk_boundaries(tmp_path, monkeypatch):
    monkeypatch.setattr(readers, "READ_BYTES", 7)  # cut inside multi-byte characters and line ends
    lines = ["\ufeff第一行", "", "second line", "第四行 with mixed 文字", "末行"]
    path = tmp_path / "t.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert list(read_lines(str(path), 1000, cut=True)) == [(1, "第一行"), (2, ""), *enumerate(lines[2:], 3)]


def test_non_utf8_offset_is_exact_when_the_error_is_in_a_later_chunk(tmp_path, monkeypatch):
    monkeypatch.setattr(readers, "READ_BYTES", 5)
    data = "第一行\n第二".encode() + b"\xff" + "行".encode()  # 10 + 6 UTF-8 bytes, then a bad byte at offset 16
    path = tmp_path / "bad.txt"
    path.write_bytes(data)
    with pytest.raises(CalibrationError, match=r"bad\.txt is not UTF-8: byte 0xff at byte offset 16 \(line 2\)"):
        txt_paragraphs(str(path))


def test_a_jsonl_record_beyond_the_limit_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(readers, "MAX_RECORD_CHARS", 1000)
    record = {"instruction": "写", "output": "中" * 2000}
    path = tmp_path / "big.jsonl"
    path.write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(CalibrationError, match=r"big\.jsonl line 2 is longer than 1,000 characters"):
        belle_paragraphs(str(path))


@pytest.mark.parametrize("name", ["pipe.txt", "pipe.jsonl", "pipe.json"])
def test_a_fifo_is_refused_without_blocking(tmp_path, name):
    path = tmp_path / name
    os.mkfifo(path)
    read = txt_paragraphs if name.endswith(".txt") else belle_paragraphs
    with pytest.raises(CalibrationError, match=r"pipe\.\w+ is not a regular file \(a FIFO, socket or device\)"):
        read(str(path))


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ('{"instruction": "好\\ud800", "output": "x"}\n', "line 1"),
        ('{"instruction": "a", "output": "b"}\n{"output": "\\udfff", "input": ""}\n', "line 2"),
    ],
)
def test_unpaired_surrogates_in_records_are_refused(tmp_path, text, where):
    path = tmp_path / "s.jsonl"
    path.write_text(text, encoding="utf-8")
    message = rf"s\.jsonl {where}: malformed Unicode: an unpaired surrogate \\u[0-9a-f]+"
    with pytest.raises(CalibrationError, match=message):
        belle_paragraphs(str(path))


def test_a_surrogate_pair_is_fine(tmp_path):
    path = tmp_path / "ok.jsonl"
    path.write_text('{"instruction": "\\ud83d\\ude00", "output": "好"}\n', encoding="utf-8")
    assert belle_paragraphs(str(path)) == ["Human: \U0001f600\n\nAssistant: 好"]


class _Spy:
    """A tokenizer that records the length of the longest text it is given (one id per character)."""

    def __init__(self):
        self.longest = 0
        self.calls = 0

    def __call__(self, texts, add_special_tokens=False, verbose=False):
        self.calls += 1
        self.longest = max(self.longest, *(len(t) for t in texts))
        return {"input_ids": [[ord(c) % 1000 for c in t] for t in texts]}


def test_the_tokenizer_never_sees_more_than_a_piece():
    spy = _Spy()
    paragraphs = ["短", "中" * (CHUNK_CHARS * 3 + 5), "尾"]
    ids, characters = tokenize_paragraphs(spy, paragraphs)
    assert spy.longest <= CHUNK_CHARS
    assert characters == len("\n".join(paragraphs)) == ids.numel()
    assert "".join(text_pieces(paragraphs)) == "\n".join(paragraphs)


def test_pieces_of_ordinary_paragraphs_are_unchanged(paragraphs):
    """Paragraphs shorter than a piece are never cut, and every piece but the last ends a paragraph."""
    pieces = list(text_pieces(paragraphs))
    assert len(pieces) > 1 and all(p.endswith("\n") for p in pieces[:-1])
    assert "".join(pieces) == "\n".join(paragraphs)
    assert all(len(p) <= CHUNK_CHARS for p in pieces)


@pytest.mark.skipif(sys.platform != "linux", reason="reads VmHWM from /proc")
def test_memory_for_a_20mb_line_stays_bounded(tmp_path):
    """One 20 MB line of Chinese without a newline (issue 12 measured a 5.2 GB peak for it): the peak RSS of
    reading and tokenizing it with a byte-level BPE tokenizer stays under 8x the file size."""
    path = tmp_path / "one-line.txt"
    path.write_text(LINE * (20_000_000 // (len(LINE) * 3)), encoding="utf-8")
    size = path.stat().st_size
    script = textwrap.dedent(
        f"""
        import re
        from tokenizers import Tokenizer, models, pre_tokenizers, trainers
        from transformers import PreTrainedTokenizerFast
        from gptqlab.calib import load_calibration
        bpe = Tokenizer(models.BPE())
        bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      show_progress=False)
        bpe.train_from_iterator([{LINE!r}] * 50, trainer=trainer)
        tok = PreTrainedTokenizerFast(tokenizer_object=bpe)
        def rss():
            return int(re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) * 1024
        base = rss()
        calib = load_calibration("txt:{path}", tok, nsamples=4, seqlen=128)
        print(base, rss(), calib.input_ids.shape[0])
        """
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAYON_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env=env,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30)),
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    base, peak, samples = map(int, proc.stdout.split())
    assert samples == 4
    assert peak - base < 8 * size, f"peak grew by {(peak - base) / 2**20:.0f} MiB for a {size / 2**20:.0f} MiB line"
