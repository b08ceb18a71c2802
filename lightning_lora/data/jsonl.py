"""Read and validate JSONL instruction files.

Each non-blank line is one JSON object in one of two forms:

* ``{"prompt": str, "response": str}``, optionally with ``"system": str``;
* ``{"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}`` whose last message is
  the assistant's answer (the one the loss is computed on).

Both are returned as a list of messages (the chat form). A bad file raises one :class:`DataFormatError` that
names the file, the line numbers and what was expected, for up to :data:`MAX_REPORTED_PROBLEMS` lines at once.

Example:
    >>> conversations = read_instruction_file("examples/data/dates/val.jsonl")  # doctest: +SKIP
    >>> conversations[0][-1]["role"]  # doctest: +SKIP
    'assistant'
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Literal, TypedDict

log = logging.getLogger(__name__)

MAX_REPORTED_PROBLEMS = 5
ROLES = ("system", "user", "assistant")
EXPECTED_HINT = (
    'each line must be one JSON object like {"prompt": ..., "response": ...} '
    'or {"messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}]}'
)


class Message(TypedDict):
    """One chat turn."""

    role: Literal["system", "user", "assistant"]
    content: str


Conversation = list[Message]


class DataFormatError(ValueError):
    """An instruction data file is missing, empty or holds lines of the wrong form.

    Attributes:
        path: The file.
        problems: ``(line_number, description)`` pairs; line 0 means the file as a whole.
    """

    def __init__(self, path: str | Path, problems: list[tuple[int, str]], total: int | None = None) -> None:
        self.path = str(path)
        self.problems = problems
        total = len(problems) if total is None else total
        lines = [f"{self.path}:{line}: {what}" if line else f"{self.path}: {what}" for line, what in problems]
        if total == 1:
            message = lines[0]
        else:
            message = f"{self.path}: {total} invalid lines:\n  " + "\n  ".join(lines)
            if total > len(problems):
                message += f"\n  ... and {total - len(problems)} more"
        if any(line for line, _ in problems):
            message += f"; {EXPECTED_HINT}" if total == 1 else f"\n{EXPECTED_HINT}"
        super().__init__(message)


class DataFileNotFoundError(DataFormatError, FileNotFoundError):
    """The instruction data file does not exist (also a ``FileNotFoundError``)."""


def _type_name(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
    return names.get(type(value), "null" if value is None else f"a {type(value).__name__}")


def _check_text(record: dict[str, Any], key: str, required: bool = True) -> str | None:
    """Return a problem with ``record[key]`` (must be a non-blank string), or None."""
    if key not in record:
        return f'missing "{key}"' if required else None
    value = record[key]
    if not isinstance(value, str):
        return f'"{key}" must be a string, got {_type_name(value)} {json.dumps(value)[:40]}'
    if required and not value.strip():
        return f'"{key}" is empty'
    return None


def _check_message(index: int, message: Any) -> str | None:
    if not isinstance(message, dict):
        return f"messages[{index}] must be an object with \"role\" and \"content\", got {_type_name(message)}"
    role = message.get("role")
    if role not in ROLES:
        return f"messages[{index}].role must be one of {list(ROLES)}, got {role!r}"
    problem = _check_text(message, "content", required=role == "assistant")
    if problem is None and not isinstance(message.get("content"), str):
        problem = 'missing "content"'
    return problem and f"messages[{index}]: {problem}"


def _check_messages(messages: Any) -> str | None:
    if not isinstance(messages, list) or not messages:
        return f'"messages" must be a non-empty list, got {_type_name(messages)}'
    for index, message in enumerate(messages):
        if problem := _check_message(index, message):
            return problem
    if messages[-1]["role"] != "assistant":
        return f'the last message must be from the assistant (the answer to learn), got role {messages[-1]["role"]!r}'
    if not any(m["role"] == "user" for m in messages[:-1]):
        return "messages need at least one user message before the final assistant message"
    return None


def check_record(record: Any) -> str | None:
    """Describe what is wrong with one parsed line, or return None if it is a valid record.

    Args:
        record: The value ``json.loads`` returned for the line.

    Returns:
        A short description of the first problem found, or None.
    """
    if not isinstance(record, dict):
        return f"expected a JSON object, got {_type_name(record)}"
    if "messages" in record:
        if "prompt" in record or "response" in record:
            return 'has both "messages" and "prompt"/"response"; use one form per line'
        return _check_messages(record["messages"])
    if "prompt" not in record and "response" not in record:
        return f'expected keys "prompt" and "response", or "messages"; got keys {sorted(record)}'
    for key, required in (("prompt", True), ("response", True), ("system", False)):
        if problem := _check_text(record, key, required):
            return problem
    return None


def to_conversation(record: dict[str, Any]) -> Conversation:
    """Turn a valid record of either form into the list of messages it stands for."""
    if "messages" in record:
        return [Message(role=m["role"], content=m["content"]) for m in record["messages"]]
    messages = [Message(role="system", content=record["system"])] if record.get("system") else []
    messages.append(Message(role="user", content=record["prompt"]))
    messages.append(Message(role="assistant", content=record["response"]))
    return messages


def _parse_line(raw: bytes) -> tuple[Any, str | None]:
    try:
        return json.loads(raw.decode("utf-8")), None
    except UnicodeDecodeError as err:
        return None, f"not UTF-8 text ({err.reason} at byte {err.start})"
    except json.JSONDecodeError as err:
        # err's own text says "line 1": the line within this line. Report only the column.
        return None, f"not valid JSON ({err.msg} at column {err.colno})"


def read_instruction_file(path: str | Path) -> list[Conversation]:
    """Read, validate and normalise a JSONL instruction file.

    Blank lines are skipped. Keys other than the ones above (e.g. an ``"id"``) are ignored.

    Args:
        path: The ``.jsonl`` file.

    Returns:
        One conversation (list of messages, the last from the assistant) per record, in file order.

    Raises:
        DataFileNotFoundError: If ``path`` does not exist or is not a file.
        DataFormatError: If the file holds no records, or any line is not a valid record; the message lists
            the first :data:`MAX_REPORTED_PROBLEMS` bad lines and the total count.
    """
    path = Path(path)
    if not path.is_file():
        what = "is a directory, not a file" if path.is_dir() else "does not exist"
        raise DataFileNotFoundError(path, [(0, f"{what}; expected a JSONL file with one record per line")])
    conversations: list[Conversation] = []
    problems: list[tuple[int, str]] = []
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            record, problem = _parse_line(raw)
            problem = problem or check_record(record)
            if problem:
                problems.append((number, problem))
            else:
                conversations.append(to_conversation(record))
    if problems:
        raise DataFormatError(path, problems[:MAX_REPORTED_PROBLEMS], total=len(problems))
    if not conversations:
        raise DataFormatError(path, [(0, f"file is empty; {EXPECTED_HINT}")])
    log.debug("read %d records from %s", len(conversations), path)
    return conversations
