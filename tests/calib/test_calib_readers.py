"""Reading sources into paragraphs: plain text, BELLE records, local Hugging Face datasets, and errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gptqlab.calib import BUILTIN_SOURCES, SourceSpec, builtin_texts
from gptqlab.calib.readers import belle_paragraphs, hf_paragraphs, source_paragraphs, txt_paragraphs
from gptqlab.errors import CalibrationError

INSTRUCTION_RECORDS = [
    {"instruction": "把这句话翻译成英文。", "input": "今天天气很好。", "output": "The weather is nice today."},
    {"instruction": "写一首关于春天的诗。", "input": "", "output": "春风吹绿江南岸。"},
    {"instruction": "", "input": "一加一等于几？", "output": "二。"},
    {"instruction": "介绍北京。", "input": None, "output": "北京是中国的首都。"},
]
INSTRUCTION_TEXTS = [
    "Human: 把这句话翻译成英文。\n今天天气很好。\n\nAssistant: The weather is nice today.",
    "Human: 写一首关于春天的诗。\n\nAssistant: 春风吹绿江南岸。",
    "Human: 一加一等于几？\n\nAssistant: 二。",
    "Human: 介绍北京。\n\nAssistant: 北京是中国的首都。",
]
CONVERSATION_RECORDS = [
    {
        "id": "1",
        "conversations": [
            {"from": "human", "value": "你好"},
            {"from": "gpt", "value": "你好！有什么可以帮你？"},
            {"from": "human", "value": "讲个笑话。"},
            {"from": "assistant", "value": "从前有座山。"},
        ],
    },
    {"conversations": [{"role": "user", "content": "1+1=?"}, {"role": "assistant", "content": "2"}]},
]
CONVERSATION_TEXTS = [
    "Human: 你好\n\nAssistant: 你好！有什么可以帮你？\n\nHuman: 讲个笑话。\n\nAssistant: 从前有座山。",
    "Human: 1+1=?\n\nAssistant: 2",
]


def _write(path: Path, text: str | bytes) -> str:
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return str(path)


def _jsonl(records: list) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


@pytest.mark.parametrize("source", BUILTIN_SOURCES)
def test_builtin_sources_give_their_calibration_split(source):
    paragraphs = source_paragraphs(SourceSpec(source))
    assert paragraphs == list(builtin_texts(source, "calibration"))
    assert set(paragraphs).isdisjoint(source_paragraphs(SourceSpec(source), "heldout"))


def test_txt_non_empty_lines_are_paragraphs(tmp_path):
    path = _write(tmp_path / "a.txt", "\ufeff第一段。\r\n\n   \n  第二段，有空格。 \n第三段\n")
    assert txt_paragraphs(path) == ["第一段。", "第二段，有空格。", "第三段"]


def test_belle_jsonl_renders_both_record_styles(tmp_path):
    path = _write(tmp_path / "belle.jsonl", _jsonl(INSTRUCTION_RECORDS + CONVERSATION_RECORDS) + "\n\n")
    assert belle_paragraphs(path) == INSTRUCTION_TEXTS + CONVERSATION_TEXTS


def test_belle_json_list_single_record_and_json_lines(tmp_path):
    records = INSTRUCTION_RECORDS[:2] + CONVERSATION_RECORDS[:1]
    listed = _write(tmp_path / "list.json", json.dumps(records, ensure_ascii=False, indent=2))
    single = _write(tmp_path / "single.json", json.dumps(INSTRUCTION_RECORDS[0], indent=2))
    # BELLE's own downloads are named .json but hold one record per line.
    lines = _write(tmp_path / "lines.json", _jsonl(records))
    expected = [*INSTRUCTION_TEXTS[:2], CONVERSATION_TEXTS[0]]
    assert belle_paragraphs(listed) == expected
    assert belle_paragraphs(single) == INSTRUCTION_TEXTS[:1]
    assert belle_paragraphs(lines) == expected


@pytest.mark.parametrize("name", ["missing.txt", "missing.jsonl"])
def test_missing_file(tmp_path, name):
    read = txt_paragraphs if name.endswith(".txt") else belle_paragraphs
    with pytest.raises(CalibrationError, match=r"missing\.\w+: no such file; check the path"):
        read(str(tmp_path / name))


def test_directory_instead_of_file(tmp_path):
    (tmp_path / "d.txt").mkdir()
    with pytest.raises(CalibrationError, match=r"d\.txt is a directory; give a file"):
        txt_paragraphs(str(tmp_path / "d.txt"))


def test_unreadable_file(tmp_path, monkeypatch):
    path = _write(tmp_path / "secret.txt", "文本")

    def refuse(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))

    # Tests may run as root, which chmod cannot lock out, so the refusal is simulated.
    monkeypatch.setattr(Path, "open", refuse)
    with pytest.raises(CalibrationError, match=r"cannot read .*secret\.txt: Permission denied; check that"):
        txt_paragraphs(path)


@pytest.mark.parametrize("name", ["gbk.txt", "gbk.jsonl"])
def test_non_utf8_names_byte_offset_and_line(tmp_path, name):
    text = "第一行\n".encode() + "第二行是GBK".encode("gbk")  # 10 UTF-8 bytes, then GBK from offset 10
    read = txt_paragraphs if name.endswith(".txt") else belle_paragraphs
    path = _write(tmp_path / name, text)
    with pytest.raises(CalibrationError, match=r"is not UTF-8: byte 0xb5 at byte offset 10 \(line 2\); convert it"):
        read(path)


@pytest.mark.parametrize(("name", "text"), [("e.txt", ""), ("e.txt", " \n\n\t\n"), ("e.jsonl", "\n"), ("e.json", "")])
def test_empty_file(tmp_path, name, text):
    read = txt_paragraphs if name.endswith(".txt") else belle_paragraphs
    with pytest.raises(CalibrationError, match=r"e\.jsonl? is empty; give a file with text in it|e\.txt is empty"):
        read(_write(tmp_path / name, text))


def test_malformed_jsonl_line_number(tmp_path):
    text = _jsonl(INSTRUCTION_RECORDS[:2]) + "\n" + '{"instruction": "缺少引号, "output": "x"}\n'
    path = _write(tmp_path / "bad.jsonl", text)
    with pytest.raises(CalibrationError, match=r"bad\.jsonl line 4: not valid JSON \(Expecting ',' delimiter at col"):
        belle_paragraphs(path)


def test_record_without_fields_line_number(tmp_path):
    path = _write(tmp_path / "bad.jsonl", _jsonl([INSTRUCTION_RECORDS[0], {"question": "问", "answer": "答"}]))
    with pytest.raises(
        CalibrationError,
        match=r"bad\.jsonl line 2: record has neither 'instruction'/'input' with 'output' nor 'conversations' "
        r"\(its keys: 'question', 'answer'\)",
    ):
        belle_paragraphs(path)


def test_json_list_record_errors_give_the_line_the_record_starts_on(tmp_path):
    records = [INSTRUCTION_RECORDS[0], {"instruction": "没有输出"}]
    path = _write(tmp_path / "list.json", json.dumps(records, ensure_ascii=False, indent=2))
    # indent=2: '[' on line 1, the first record on lines 2-6, the second starts on line 7.
    with pytest.raises(CalibrationError, match=r"list\.json line 7: record has neither"):
        belle_paragraphs(path)


def test_malformed_json_list_line_number(tmp_path):
    path = _write(tmp_path / "bad.json", '[\n  {"instruction": "a", "output": "b"},\n  {"instruction": }\n]')
    with pytest.raises(CalibrationError, match=r"bad\.json line 3: not valid JSON \(Expecting value at column 19\)"):
        belle_paragraphs(path)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[]", r"holds no records; give a file with at least one BELLE record"),
        ('"text"', r"expected a JSON list of BELLE records, or one record per line"),
        ('[{"instruction": "a", "output": "b"}] x', r"line 1: not valid JSON \(Extra data at column 39\)"),
        ('{\n"instruction": "a",\n"output": 3\n}', r"line 1: field 'output' must be a string, got a number"),
        ('[["a", "b"]]', r"line 1: expected a BELLE record \(a JSON object\), got a list"),
        ('{"conversations": []}', r"line 1: 'conversations' must be a non-empty list of turns"),
        (
            '{"conversations": [{"from": "system", "value": "你是助手"}]}',
            r"line 1: conversation turn 1 has speaker 'system'; use 'from' \(or 'role'\) with one of human, user",
        ),
        (
            '{"conversations": [{"from": "human", "value": "a"}, {"from": "gpt"}]}',
            r"line 1: conversation turn 2 needs a string 'value' \(or 'content'\), got null",
        ),
    ],
)
def test_bad_belle_json(tmp_path, text, message):
    with pytest.raises(CalibrationError, match=message):
        belle_paragraphs(_write(tmp_path / "x.json", text))


@pytest.fixture(scope="module")
def saved_datasets(tmp_path_factory):
    """A saved Dataset and a saved DatasetDict ({train, test}), written with save_to_disk."""
    datasets = pytest.importorskip("datasets")
    root = tmp_path_factory.mktemp("hf")
    rows = {"text": ["  第一条。 ", "", None, "第二条。"], "content": ["甲", "乙", "丙", "丁"], "label": [0, 1, 0, 1]}
    single = datasets.Dataset.from_dict(rows)
    single.save_to_disk(str(root / "single"))
    datasets.DatasetDict({"train": single, "test": datasets.Dataset.from_dict({"text": ["测试。"]})}).save_to_disk(
        str(root / "dict")
    )
    return root


def test_hf_local_dataset_columns_and_splits(saved_datasets):
    single, splits = str(saved_datasets / "single"), str(saved_datasets / "dict")
    assert hf_paragraphs(single, "train") == ["第一条。", "第二条。"]
    assert hf_paragraphs(single, "train", column="content") == ["甲", "乙", "丙", "丁"]
    assert hf_paragraphs(splits, "train") == ["第一条。", "第二条。"]
    assert hf_paragraphs(splits, "test") == ["测试。"]


def test_hf_errors(saved_datasets, tmp_path):
    single, splits = str(saved_datasets / "single"), str(saved_datasets / "dict")
    with pytest.raises(CalibrationError, match=r"has no split 'validation'; its splits are train, test; choose one"):
        hf_paragraphs(splits, "validation")
    with pytest.raises(CalibrationError, match=r"has no column 'body'; its columns are text, content, label; choose"):
        hf_paragraphs(single, "train", column="body")
    with pytest.raises(CalibrationError, match=r"column 'label' row 0 is a number, not text; choose a text column"):
        hf_paragraphs(single, "train", column="label")
    # A local directory that is not a saved dataset and holds no data files; nothing goes to the network.
    (tmp_path / "nothing").mkdir()
    with pytest.raises(CalibrationError, match=r"cannot load Hugging Face dataset .*nothing' \(split 'train'\)"):
        hf_paragraphs(str(tmp_path / "nothing"), "train")
