"""load_calibration (allocation, windows, determinism, statistics) and load_eval_text."""

from __future__ import annotations

import json
import logging

import pytest
import torch
import transformers

from gptqlab.calib import CalibSet, builtin_texts, load_calibration, load_eval_text
from gptqlab.calib.loader import CHUNK_CHARS, allocate_samples, tokenize_paragraphs
from gptqlab.errors import CalibrationError

SEQLEN = 64


@pytest.fixture
def two_files(tmp_path, paragraphs):
    """Two plain-text sources of 150 paragraphs each (about 14,000 characters, 17,000 tokens)."""
    first, second = tmp_path / "a.txt", tmp_path / "b.txt"
    first.write_text("\n".join(paragraphs[:150]) + "\n", encoding="utf-8")
    second.write_text("\n\n".join(paragraphs[150:]), encoding="utf-8")
    return str(first), str(second)


def _starts(stream: torch.Tensor, rows: torch.Tensor) -> list[int]:
    """Start position in ``stream`` (int64 [T]) of each row of ``rows`` (int64 [n, seqlen]); -1 if absent."""
    windows = stream.unfold(0, rows.shape[1], 1)  # [T - seqlen + 1, seqlen]
    starts = []
    for row in rows:
        hits = (windows == row).all(dim=1).nonzero().flatten()
        starts.append(int(hits[0]) if hits.numel() else -1)
    return starts


@pytest.mark.parametrize(
    ("weights", "nsamples", "expected"),
    [
        ([0.7, 0.3], 10, [7, 3]),
        ([1, 1, 1], 10, [4, 3, 3]),
        ([0.5, 0.25, 0.25], 6, [3, 2, 1]),  # remainders .0, .5, .5: the tie goes to the earlier source
        ([0.98, 0.01, 0.01], 10, [8, 1, 1]),  # at least one each, taken from the largest
        ([0.98, 0.01, 0.01], 3, [1, 1, 1]),
        ([1, 1, 1], 2, [1, 1, 0]),  # fewer samples than sources
        ([0.25, 0.25, 0.5], 128, [32, 32, 64]),
    ],
)
def test_allocate_samples(weights, nsamples, expected):
    assert allocate_samples(weights, nsamples) == expected


def test_chunked_tokenization_matches_one_call(tokenizer, paragraphs, caplog):
    text = "\n".join(paragraphs)
    assert len(text) > CHUNK_CHARS  # so that the text is cut into pieces
    transformers.logging.enable_propagation()  # transformers' log records reach caplog only through the root
    try:
        with caplog.at_level(logging.WARNING):
            ids, characters = tokenize_paragraphs(tokenizer, paragraphs)
    finally:
        transformers.logging.disable_propagation()
    # Pieces are far longer than model_max_length (512), and no length warning is printed.
    assert [r.getMessage() for r in caplog.records] == []
    assert characters == len(text)
    assert ids.tolist() == tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    assert ids.dtype == torch.int64


def test_shape_dtype_and_windows_come_from_the_stream(tokenizer, two_files, paragraphs):
    calib = load_calibration(f"txt:{two_files[0]}", tokenizer, nsamples=12, seqlen=SEQLEN, seed=3)
    assert isinstance(calib, CalibSet)
    assert calib.input_ids.shape == (12, SEQLEN)
    assert calib.input_ids.dtype == torch.int64
    stream, _ = tokenize_paragraphs(tokenizer, paragraphs[:150])
    starts = _starts(stream, calib.input_ids)
    # Every window is a slice of the stream, on one grid of seqlen-chunks, and no two overlap.
    assert -1 not in starts
    assert len({s % SEQLEN for s in starts}) == 1
    assert len(set(starts)) == 12


def test_same_seed_same_samples_other_seed_other_samples(tokenizer, two_files):
    spec = f"{two_files[0]}:0.5,{two_files[1]}:0.5"
    first = load_calibration(spec, tokenizer, nsamples=8, seqlen=SEQLEN, seed=0)
    again = load_calibration(spec, tokenizer, nsamples=8, seqlen=SEQLEN, seed=0)
    other = load_calibration(spec, tokenizer, nsamples=8, seqlen=SEQLEN, seed=1)
    assert torch.equal(first.input_ids, again.input_ids)
    assert torch.equal(first.source_index, again.source_index)
    assert not torch.equal(first.input_ids, other.input_ids)


def test_weights_set_per_source_sample_counts(tokenizer, two_files):
    calib = load_calibration(f"txt:{two_files[0]}:0.7,txt:{two_files[1]}:0.3", tokenizer, 10, SEQLEN)
    assert torch.bincount(calib.source_index).tolist() == [7, 3]
    assert [s["samples"] for s in calib.description()["sources"]] == [7, 3]
    # The rows are shuffled, not grouped by source.
    assert calib.source_index.tolist() != sorted(calib.source_index.tolist())


@pytest.mark.slow  # tokenizes both built-in corpora, 2.8 million characters: about 4 s on 2 cores
def test_builtin_sources_end_to_end(tokenizer):
    calib = load_calibration("peoples-daily:0.7,reviews:0.3", tokenizer, nsamples=10, seqlen=128, seed=0)
    assert calib.input_ids.shape == (10, 128)
    assert torch.bincount(calib.source_index).tolist() == [7, 3]
    daily, reviews = calib.description()["sources"]
    assert daily["paragraphs"] == len(builtin_texts("peoples-daily"))
    assert reviews["characters"] == len("\n".join(builtin_texts("reviews")))


def test_description_and_tokens_per_char(tokenizer, two_files, paragraphs):
    spec = f"txt:{two_files[0]},txt:{two_files[1]}"
    described = load_calibration(spec, tokenizer, nsamples=6, seqlen=SEQLEN, seed=0).description()
    first, second = described["sources"]
    assert (described["spec"], described["nsamples"], described["seqlen"]) == (spec, 6, SEQLEN)
    assert described["tokens_sampled"] == 6 * SEQLEN
    assert (first["name"], first["path"], first["weight"], first["samples"]) == ("txt", two_files[0], 0.5, 3)
    assert first["paragraphs"] == second["paragraphs"] == 150
    assert first["characters"] == len("\n".join(paragraphs[:150]))
    assert first["tokens"] == len(
        tokenizer("\n".join(paragraphs[:150]), add_special_tokens=False, verbose=False)["input_ids"]
    )
    for source in (first, second):
        assert source["tokens_per_char"] == source["tokens"] / source["characters"]
        # A 1000-entry byte-level vocabulary cannot cover Chinese well: more than one token per character.
        assert 1.0 < source["tokens_per_char"] < 3.0
    assert described["characters"] == first["characters"] + second["characters"]
    assert described["tokens"] == first["tokens"] + second["tokens"]
    assert described["tokens_per_char"] == described["tokens"] / described["characters"]
    json.dumps(described)  # a report can store it as is


def test_summary_table(tokenizer, two_files):
    calib = load_calibration(f"txt:{two_files[0]}:3,txt:{two_files[1]}:1", tokenizer, 4, SEQLEN)
    lines = calib.summary().split("\n")
    assert lines[0] == f"calibration: 4 samples x {SEQLEN} tokens, seed 0"
    assert lines[1].split() == "source weight samples tokens text chars text tokens tokens/char".split()
    first = calib.sources[0]
    # The tokens column counts what calibration uses (3 samples x SEQLEN), not the whole text (issue 11).
    assert lines[2].split() == [
        f"txt:{two_files[0]}",
        "0.75",
        "3",
        f"{3 * SEQLEN:,}",
        f"{first.characters:,}",
        f"{first.tokens:,}",
        f"{first.tokens_per_char:.3f}",
    ]
    assert first.tokens > 3 * SEQLEN
    assert lines[4].split()[:4] == ["total", "1.00", "4", f"{4 * SEQLEN:,}"]
    assert lines[4].split()[-1] == f"{calib.tokens_per_char:.3f}"


def test_too_few_tokens(tokenizer, tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("人民日报\n\n新年贺词\n", encoding="utf-8")
    tokens = len(tokenizer("人民日报\n新年贺词", add_special_tokens=False)["input_ids"])
    with pytest.raises(
        CalibrationError,
        match=rf"source 'txt:.*short\.txt' has {tokens} tokens \(9 characters\), but its 2 samples x seqlen "
        rf"{SEQLEN} need {2 * SEQLEN}; lower --nsamples or --seqlen, or add text to the source",
    ):
        load_calibration(f"txt:{path}", tokenizer, nsamples=2, seqlen=SEQLEN)


@pytest.mark.parametrize("seed", range(4))
def test_offset_shrinks_when_tokens_are_tight(tokenizer, tmp_path, paragraphs, seed):
    path = tmp_path / "tight.txt"
    path.write_text("\n".join(paragraphs[:3]), encoding="utf-8")
    stream, _ = tokenize_paragraphs(tokenizer, paragraphs[:3])
    total = stream.numel()
    whole = load_calibration(str(path), tokenizer, nsamples=1, seqlen=total, seed=seed)
    assert torch.equal(whole.input_ids[0], stream)
    seqlen = total // 3
    starts = sorted(_starts(stream, load_calibration(str(path), tokenizer, 3, seqlen, seed=seed).input_ids))
    assert starts == [starts[0], starts[0] + seqlen, starts[0] + 2 * seqlen]
    assert 0 <= starts[0] <= total - 3 * seqlen


@pytest.mark.parametrize(
    ("nsamples", "seqlen", "message"),
    [
        (0, 8, "--nsamples must be a positive integer, got 0"),
        (2.5, 8, "--nsamples must be a positive integer, got 2.5"),
        (4, -1, "--seqlen must be a positive integer, got -1"),
    ],
)
def test_bad_sizes(tokenizer, nsamples, seqlen, message):
    with pytest.raises(CalibrationError, match=message):
        load_calibration("reviews", tokenizer, nsamples, seqlen)


def test_hf_source_from_a_saved_dataset(tokenizer, tmp_path, paragraphs):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"body": list(paragraphs[:100])}).save_to_disk(str(tmp_path / "zh"))
    calib = load_calibration(f"hf:{tmp_path / 'zh'}#body", tokenizer, nsamples=4, seqlen=SEQLEN)
    assert calib.input_ids.shape == (4, SEQLEN)
    (source,) = calib.description()["sources"]
    assert (source["name"], source["split"], source["column"], source["paragraphs"]) == ("hf", "train", "body", 100)


def test_eval_text_builtin_heldout():
    name, text = load_eval_text("reviews-heldout")
    assert name == "reviews-heldout"
    assert text == "\n".join(builtin_texts("reviews", "heldout"))


def test_eval_text_files(tmp_path, paragraphs):
    txt = tmp_path / "eval.txt"
    txt.write_text("\n\n".join(paragraphs[:3]), encoding="utf-8")
    belle = tmp_path / "eval.jsonl"
    belle.write_text(json.dumps({"instruction": "问", "output": "答"}) + "\n", encoding="utf-8")
    assert load_eval_text(str(txt)) == (str(txt), "\n".join(paragraphs[:3]))
    assert load_eval_text(str(belle)) == (str(belle), "Human: 问\n\nAssistant: 答")


def test_eval_text_hf_defaults_to_the_test_split(tmp_path):
    datasets = pytest.importorskip("datasets")
    splits = {"train": ["训练。"], "test": ["测试一。", "测试二。"], "validation": ["验证。"]}
    datasets.DatasetDict({k: datasets.Dataset.from_dict({"text": v}) for k, v in splits.items()}).save_to_disk(
        str(tmp_path / "ds")
    )
    assert load_eval_text(f"hf:{tmp_path / 'ds'}") == (f"hf:{tmp_path / 'ds'}#text:test", "测试一。\n测试二。")
    assert load_eval_text(f"hf:{tmp_path / 'ds'}:validation")[1] == "验证。"
    # An existing dataset directory works without the hf: prefix.
    assert load_eval_text(str(tmp_path / "ds"))[1] == "测试一。\n测试二。"


def test_eval_text_unknown():
    with pytest.raises(
        CalibrationError,
        match=r"unknown evaluation text 'peoples-daily'; choose peoples-daily-heldout, reviews-heldout, a \.txt",
    ):
        load_eval_text("peoples-daily")
