"""Tests for reading and validating JSONL instruction files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lightning_lora.data.jsonl import DataFileNotFoundError, DataFormatError, read_instruction_file

GOOD = {"prompt": "What is 2+2?", "response": "4"}


def write_lines(path: Path, lines: list[str | bytes]) -> Path:
    path.write_bytes(b"".join((line if isinstance(line, bytes) else line.encode()) + b"\n" for line in lines))
    return path


def records_to_lines(records: list[object]) -> list[str]:
    return [json.dumps(r) for r in records]


def test_reads_both_forms_skips_blank_lines_and_ignores_extra_keys(tmp_path: Path) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
    ]
    lines = [json.dumps({**GOOD, "id": 7}), "", "   ", json.dumps({"messages": messages}),
             json.dumps({"system": "S", "prompt": "P", "response": "R"})]  # fmt: skip
    conversations = read_instruction_file(write_lines(tmp_path / "ok.jsonl", lines))
    assert conversations == [
        [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}],
        messages,
        [{"role": "system", "content": "S"}, {"role": "user", "content": "P"}, {"role": "assistant", "content": "R"}],
    ]


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.jsonl"
    with pytest.raises(DataFileNotFoundError, match=r"nope\.jsonl: does not exist; expected a JSONL file") as info:
        read_instruction_file(path)
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, DataFormatError)


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(DataFormatError, match=r"is a directory, not a file"):
        read_instruction_file(tmp_path)


@pytest.mark.parametrize("content", [b"", b"\n\n  \n"])
def test_empty_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_bytes(content)
    with pytest.raises(DataFormatError, match=r"empty\.jsonl: file is empty; each line must be one JSON object"):
        read_instruction_file(path)


def test_invalid_json_names_file_line_and_expected_form(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "x.jsonl", [json.dumps(GOOD), '{"prompt": "a" "response": "b"}'])
    expected = (
        r"x\.jsonl:2: not valid JSON \(Expecting ',' delimiter at column 16\); "
        r'each line must be one JSON object like \{"prompt": \.\.\., "response": \.\.\.\}'
    )
    with pytest.raises(DataFormatError, match=expected) as info:
        read_instruction_file(path)
    assert info.value.problems[0][0] == 2


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        ([1, 2], r"expected a JSON object, got a list"),
        ("text", r"expected a JSON object, got a string"),
        ({"text": "hi"}, r'expected keys "prompt" and "response", or "messages"; got keys \[\'text\'\]'),
        ({"prompt": "p"}, r'missing "response"'),
        ({"response": "r"}, r'missing "prompt"'),
        ({"prompt": "p", "response": 5}, r'"response" must be a string, got a number 5'),
        ({"prompt": None, "response": "r"}, r'"prompt" must be a string, got null'),
        ({"prompt": "p", "response": "  "}, r'"response" is empty'),
        ({"prompt": "p", "response": "r", "system": ["s"]}, r'"system" must be a string, got a list'),
        ({"prompt": "p", "response": "r", "messages": []}, r'has both "messages" and "prompt"/"response"'),
        ({"messages": []}, r'"messages" must be a non-empty list, got a list'),
        ({"messages": {"role": "user"}}, r'"messages" must be a non-empty list, got an object'),
        ({"messages": ["hi"]}, r'messages\[0\] must be an object with "role" and "content", got a string'),
        ({"messages": [{"role": "bot", "content": "x"}]}, r"messages\[0\]\.role must be one of \['system', 'user', "),
        ({"messages": [{"role": "user"}]}, r'messages\[0\]: missing "content"'),
        ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]},
         r'messages\[1\]: "content" is empty'),
        ({"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}]},
         r"the last message must be from the assistant \(the answer to learn\), got role 'user'"),
        ({"messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}]},
         r"messages need at least one user message before the final assistant message"),
    ],
)  # fmt: skip
def test_bad_records(tmp_path: Path, record: object, expected: str) -> None:
    path = write_lines(tmp_path / "bad.jsonl", [json.dumps(GOOD), json.dumps(record)])
    with pytest.raises(DataFormatError, match=r"bad\.jsonl:2: " + expected):
        read_instruction_file(path)


def test_non_utf8_line(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "latin1.jsonl", [json.dumps(GOOD), '{"prompt": "caf\xe9", "response": "x"}'.encode("latin-1")])
    with pytest.raises(DataFormatError, match=r"latin1\.jsonl:2: not UTF-8 text \(invalid continuation byte"):
        read_instruction_file(path)


def test_collects_the_first_five_bad_lines_and_counts_the_rest(tmp_path: Path) -> None:
    lines = [json.dumps(GOOD)] + ["not json"] * 3 + [json.dumps({"prompt": "p"})] * 4
    with pytest.raises(DataFormatError) as info:
        read_instruction_file(write_lines(tmp_path / "many.jsonl", lines))
    message = str(info.value)
    assert message.startswith(f"{tmp_path / 'many.jsonl'}: 7 invalid lines:\n")
    for line in (2, 3, 4, 5, 6):
        assert f"many.jsonl:{line}: " in message
    assert "many.jsonl:7:" not in message
    assert "... and 2 more" in message
    assert message.rstrip().endswith('{"role": "assistant", "content": ...}]}')
    assert [line for line, _ in info.value.problems] == [2, 3, 4, 5, 6]
