"""The README's surgery example runs as written (the callback example is examples/callback_quickstart.py)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_block_after(heading: str) -> str:
    text = README.read_text()
    section = text[text.index(heading):]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, f"no python block after {heading!r}"
    return match.group(1)


def test_surgery_api_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(_python_block_after("## The surgery API"), "README.md", "exec"), namespace)  # noqa: S102
    assert (tmp_path / "out/adapter/adapter_model.safetensors").is_file()
    assert len(namespace["report"].replaced) == 14


def test_callback_example_is_the_script() -> None:
    script = (README.parent / "examples/callback_quickstart.py").read_text()
    assert _python_block_after("## Add one callback to your Trainer").strip() in script


def test_several_adapters_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(_python_block_after("## Several adapters on one base"), "README.md", "exec"), namespace)  # noqa: S102
    assert (tmp_path / "adapters/legal/adapter_config.json").is_file()
    assert namespace["tokens"].shape == (3, 13)
