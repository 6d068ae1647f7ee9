"""parse_spec: the spec grammar, weights, and the messages for bad specs."""

import dataclasses

import pytest

from gptqlab.calib import SourceSpec, parse_spec
from gptqlab.errors import CalibrationError


def test_example_spec():
    sources = parse_spec("peoples-daily:0.7,belle:path/to/data.jsonl:0.3")
    assert [(s.kind, s.path) for s in sources] == [("peoples-daily", None), ("belle", "path/to/data.jsonl")]
    assert [s.weight for s in sources] == pytest.approx([0.7, 0.3], abs=1e-12)


def test_weights_default_to_equal():
    sources = parse_spec(" peoples-daily , reviews , txt:notes.txt ")
    assert [s.label for s in sources] == ["peoples-daily", "reviews", "txt:notes.txt"]
    assert [s.weight for s in sources] == pytest.approx([1 / 3] * 3, abs=1e-12)


def test_weights_are_normalised():
    sources = parse_spec("peoples-daily:7,reviews:2,txt:a.txt:1")
    assert [s.weight for s in sources] == pytest.approx([0.7, 0.2, 0.1], abs=1e-12)


def test_bare_paths_are_recognised_by_extension():
    sources = parse_spec("data/a.txt:1,b.JSON:2,c.jsonl:2")
    assert [(s.kind, s.path) for s in sources] == [("txt", "data/a.txt"), ("belle", "b.JSON"), ("belle", "c.jsonl")]
    assert [s.weight for s in sources] == pytest.approx([0.2, 0.4, 0.4], abs=1e-12)


def test_hf_items():
    full, short, with_weight = parse_spec("hf:wikitext@wikitext-2-raw-v1#page:validation:2,hf:org/zh:1,hf:org/b:1")
    assert (full.path, full.config, full.column, full.split) == ("wikitext", "wikitext-2-raw-v1", "page", "validation")
    assert (short.path, short.config, short.column, short.split) == ("org/zh", None, "text", "train")
    assert (with_weight.path, with_weight.split) == ("org/b", "train")
    assert [s.weight for s in (full, short, with_weight)] == pytest.approx([0.5, 0.25, 0.25], abs=1e-12)
    assert full.label == "hf:wikitext@wikitext-2-raw-v1#page:validation"
    (split_only,) = parse_spec("hf:org/zh:test")
    assert (split_only.path, split_only.split, split_only.weight) == ("org/zh", "test", 1.0)


def test_path_with_colon_needs_an_explicit_weight():
    (source,) = parse_spec("txt:logs/2024:05.txt:1")
    assert (source.kind, source.path, source.weight) == ("txt", "logs/2024:05.txt", 1.0)
    with pytest.raises(CalibrationError, match=r"weight '05\.txt' .* not a number; if the path contains ':'"):
        parse_spec("txt:logs/2024:05.txt")


def test_source_spec_is_frozen_and_validated():
    source = SourceSpec("reviews", weight=2.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        source.weight = 1.0  # type: ignore[misc]
    with pytest.raises(CalibrationError, match="weight of 'reviews' must be a positive finite number, got 0"):
        SourceSpec("reviews", weight=0)
    with pytest.raises(CalibrationError, match="unknown calibration source kind 'csv'"):
        SourceSpec("csv", "a.csv")
    with pytest.raises(CalibrationError, match="split, config and column apply to hf: sources only"):
        SourceSpec("txt", "a.txt", split="train")


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("", "empty calibration spec; give at least one source"),
        (" ,", r"has an empty item \(item 1\); remove the comma"),
        ("peoples-daily,,reviews", r"has an empty item \(item 2\)"),
        ("wikipedia", "unknown calibration source 'wikipedia' in spec item 'wikipedia'; use peoples-daily"),
        ("wiki:0.5", "unknown calibration source 'wiki' in spec item 'wiki:0.5'"),
        ("data.csv", "unknown calibration source 'data.csv'"),
        ("peoples-daily-heldout", "held-out text is for evaluation only"),
        ("peoples-daily:abc", "weight 'abc' in calibration spec item 'peoples-daily:abc' is not a number"),
        ("peoples-daily:", "weight '' in calibration spec item 'peoples-daily:' is not a number"),
        ("peoples-daily:0", "weight '0' in calibration spec item 'peoples-daily:0' must be a positive number"),
        ("reviews:-0.5", "weight '-0.5' .* must be a positive number"),
        ("reviews:nan", "weight 'nan' .* must be a positive number"),
        ("reviews:inf", "weight 'inf' .* must be a positive number"),
        ("peoples-daily:1:2", "has too many ':' fields; write peoples-daily"),
        ("belle:data.jsonl:abc", "weight 'abc' in calibration spec item 'belle:data.jsonl:abc' is not a number"),
        ("data.txt:x", "weight 'x' in calibration spec item 'data.txt:x' is not a number"),
        ("hf:org/ds:train:x", "weight 'x' .* is not a number; write hf:NAME"),
        ("hf:", r"cannot read Hugging Face source 'hf:'; write hf:NAME\[@CONFIG\]"),
        ("belle:data.csv", "BELLE file 'data.csv' must end in .json or .jsonl"),
        ("txt:", "calibration source 'txt' needs a path or name: txt:PATH"),
        ("peoples-daily:0.6,reviews", "gives weights to some sources but not to reviews; give a weight to every"),
        ("reviews,reviews", "calibration source 'reviews' is listed twice"),
        ("a.txt:1,txt:a.txt:2", "calibration source 'txt:a.txt' is listed twice"),
    ],
)
def test_bad_specs(spec, message):
    with pytest.raises(CalibrationError, match=message):
        parse_spec(spec)
