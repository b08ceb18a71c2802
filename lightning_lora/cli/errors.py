"""Short command-line errors: what is wrong, what is valid, a close match; exit status 2.

jsonargparse reports a bad value as a nested "Does not validate against any of the Union subtypes" block followed by
the whole usage; a bad LoRA setting raised during instantiation comes as a 60-line traceback. The functions here turn
both into one or two lines, and fix two argument forms argparse cannot read (``--lora.layers -8:``) before parsing.
Set ``LIGHTNING_LORA_DEBUG=1`` to get the original tracebacks.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

EXIT_USAGE = 2
DEBUG_ENV = "LIGHTNING_LORA_DEBUG"


class CommandLineError(ValueError):
    """A bad command line or config file; ``main`` prints the message and exits with status 2."""


def debug_enabled() -> bool:
    """Whether ``LIGHTNING_LORA_DEBUG`` asks for full tracebacks."""
    return os.environ.get(DEBUG_ENV, "").lower() not in ("", "0", "false", "no")


# A slice such as "-8:", ":4", "-8:-2", "::2": argparse takes a leading "-" for an option, jsonargparse reads "-8:" as
# a YAML mapping. Quoted, it is a plain string that LoRAConfig (and LayerFreezing) accept.
_SLICE_VALUE = re.compile(r"^-?\d*:-?\d*(?::-?\d*)?$")
_LAYERS_KEY = re.compile(r"^--[\w.]*layers$")


def rewrite_slices(argv: Sequence[str]) -> list[str]:
    """``--lora.layers -8:`` and ``--lora.layers=-8:`` -> ``--lora.layers="-8:"`` (a quoted string)."""
    out: list[str] = []
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        key, eq, value = arg.partition("=")
        if _LAYERS_KEY.match(key) and eq and _SLICE_VALUE.match(value):
            out.append(f'{key}="{value}"')
        elif _LAYERS_KEY.match(arg) and i + 1 < len(args) and _SLICE_VALUE.match(args[i + 1]):
            out.append(f'{arg}="{args[i + 1]}"')
            i += 1
        else:
            out.append(arg)
        i += 1
    return out


def config_paths(argv: Sequence[str]) -> list[str]:
    """The files given with ``--config``/``-c`` (both ``--config x`` and ``--config=x``)."""
    paths = []
    for i, arg in enumerate(argv):
        if arg in ("--config", "-c") and i + 1 < len(argv):
            paths.append(argv[i + 1])
        elif arg.startswith("--config="):
            paths.append(arg.split("=", 1)[1])
    return paths


def check_yaml_files(paths: Iterable[str]) -> None:
    """Read each YAML config file; a syntax error names the file and line and, for a bare slice, the fix.

    Raises:
        CommandLineError: On the first file that is not valid YAML.
    """
    import yaml

    for path in paths:
        file = Path(path)
        if not file.is_file():  # jsonargparse reports a missing file, and also accepts inline YAML here
            continue
        text = file.read_text()
        try:
            yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise CommandLineError(_yaml_message(path, text, err)) from err


def _yaml_message(path: str, text: str, err: Any) -> str:
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    line_no = mark.line + 1 if mark is not None else None
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    where = f"{path}:{line_no}" if line_no else path
    lines = text.splitlines()
    line = lines[line_no - 1] if line_no and line_no <= len(lines) else ""
    message = f"{where}: not valid YAML ({problem}): {line.strip()!r}"
    bare = re.match(r"^(\s*)([\w.]+):\s*(-?\d*:-?\d*(?::-?\d*)?)\s*$", line)
    if bare:
        message += f'\n  Quote the slice: {bare.group(2)}: "{bare.group(3)}"'
    return message


def short_parse_error(message: str, options: Iterable[str] = ()) -> str:
    """One or two lines from a jsonargparse error message, with a close match for an unknown option."""
    unknown = _unknown_option(message)
    if unknown is not None:
        names = [o[2:] for o in options if o.startswith("--")]
        close = difflib.get_close_matches(unknown.lstrip("-"), names, n=1, cutoff=0.7)
        hint = f"; did you mean --{close[0]}?" if close else ""
        return f"unknown option {unknown}{hint} (see --help for the valid options)"
    own = _own_validation_lines(message)
    if own:
        return "\n".join(own)
    bad_value = _bad_value(message)
    if bad_value is not None:
        return bad_value
    kept = [line.strip() for line in message.splitlines() if line.strip() and not _is_noise(line)]
    return "\n".join(kept[:3])


def _bad_value(message: str) -> str | None:
    """``Parser key "lora": ... Parser key "bias": Expected a Literal[...]. Got value: x`` -> one line."""
    expected = re.search(r"Expected a (.+?)\. Got value: (.*)", message)
    if expected is None:
        return None
    keys: list[str] = []
    for key in re.findall(r'Parser key "([\w.]+)"', message[:expected.start()]):
        keys.append(key[len(keys[-1]) + 1:] if keys and key.startswith(f"{keys[-1]}.") else key)
    option = f"--{'.'.join(keys)}" if keys else "a value"
    wanted, got = expected.group(1), expected.group(2).strip()
    literal = re.fullmatch(r"typing\.Literal\[(.*)\]", wanted)
    kind = re.fullmatch(r"<class '([\w.]+)'>", wanted)
    wanted = f"one of {literal.group(1)}" if literal else f"a value of type {kind.group(1)}" if kind else wanted
    return f"{option}: expected {wanted}, got {got!r}"


def _unknown_option(message: str) -> str | None:
    match = re.search(r"(?i)unrecognized arguments:\s*(--?[\w.\-]+)", message)
    if match:
        return match.group(1)
    key = re.search(r'Parser key "([\w.]+)"', message)
    option = re.search(r"Option '([\w.]+)' is not accepted|No action for key \"([\w.]+)\"", message)
    if option:
        name = option.group(1) or option.group(2)
        return f"--{key.group(1)}.{name}" if key and not name.startswith(key.group(1)) else f"--{name}"
    return None


def _own_validation_lines(message: str) -> list[str]:
    """Our config classes' own problem lines (``r=-3: the rank must be...``), without jsonargparse's wrapping."""
    lines = message.splitlines()
    for i, line in enumerate(lines):
        match = re.search(r"Invalid (\w+Config):?\s*$", line.strip())
        if match:
            problems = []
            for item in lines[i + 1:]:
                text = item.strip()
                if not text.startswith("- ") or "Expected a <class" in text:
                    break
                problems.append(text[2:])
            if problems:
                return [f"invalid {match.group(1)}: {p}" for p in problems]
    return []


_NOISE = ("Does not validate against any of the Union subtypes", "Subtypes:", "Errors:", "Given value",
          "- Problem with given class_path",
          "Expected a <class 'NoneType'>", "- Expected a <class 'NoneType'>")


def _is_noise(line: str) -> bool:
    text = line.strip()
    return any(text.startswith(n) for n in _NOISE)


def user_error_message(err: BaseException) -> str | None:
    """The message to print for an error the user can fix (bad config, data, model path), else None."""
    from lightning_lora.surgery.errors import (
        AdapterLoadError,
        LoRAConfigError,
        QuantizationError,
        TargetMatchError,
    )

    chain: list[BaseException] = []
    current: BaseException | None = err
    while current is not None and current not in chain:
        chain.append(current)
        current = current.__cause__ or current.__context__
    for exc in chain:
        if isinstance(exc, TargetMatchError):  # its hint names the Python API; on the command line that is `plan`
            return re.sub(r"\s*Run plan_lora\(model, config\) to see what a config selects\.", "", str(exc))
        if isinstance(exc, (CommandLineError, LoRAConfigError, AdapterLoadError, QuantizationError)):
            return str(exc)
        if type(exc).__name__ in ("DataFormatError", "DataFileNotFoundError") or isinstance(exc, FileNotFoundError):
            return str(exc)
    if isinstance(err, ValueError):  # jsonargparse's instantiation errors carry our validation text
        own = _own_validation_lines(str(err))
        if own:
            return "\n".join(own)
    return None
