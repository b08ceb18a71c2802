"""A broken adapter directory ends as an AdapterLoadError naming the file, field or tensor, model unchanged (issue 10)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lightning_lora.surgery import (
    AdapterLoadError,
    LoRAConfig,
    apply_lora,
    load_adapter,
    read_adapter,
    save_adapter,
)
from tests.factories import perturb_lora_B, tiny_llama, unchanged


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = tiny_llama(num_layers=1)
    apply_lora(model, LoRAConfig(r=2, targets=["q_proj", "v_proj"]))
    perturb_lora_B(model)
    return save_adapter(model, tmp_path_factory.mktemp("adapter") / "good")


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for file in src.iterdir():
        (dst / file.name).write_bytes(file.read_bytes())
    return dst


def _edit_config(edit: Callable[[dict], object]) -> Callable[[Path], None]:
    def apply(directory: Path) -> None:
        file = directory / "adapter_config.json"
        file.write_text(json.dumps(edit(json.loads(file.read_text()))))
    return apply


def _poison(value: float) -> Callable[[Path], None]:
    def apply(directory: Path) -> None:
        file = directory / "adapter_model.safetensors"
        tensors = load_file(str(file))
        key = min(tensors)
        tensors[key][0, 0] = value
        save_file(tensors, str(file))
    return apply


CASES = {
    "invalid_json": (lambda d: (d / "adapter_config.json").write_text('{"r": 8,'),
                     r"adapter_config\.json' is not valid JSON"),
    "json_list": (lambda d: (d / "adapter_config.json").write_text("[1, 2]"),
                  r"adapter_config\.json' holds a JSON list, not an object"),
    "r_not_int": (_edit_config(lambda c: {**c, "r": "abc"}), (r"adapter_config\.json: invalid adapter config(.|\n)*'r': 'abc' "
                                                             r"is not a positive integer")),
    "r_negative": (_edit_config(lambda c: {**c, "r": -2}), r"adapter_config\.json: the adapter config is invalid(.|\n)*r=-2"),
    "alpha_string": (_edit_config(lambda c: {**c, "lora_alpha": "16"}), r"'lora_alpha': '16' is not a positive number"),
    "empty_weights": (lambda d: (d / "adapter_model.safetensors").write_bytes(b""),
                      r"adapter_model\.safetensors' \(0 bytes\) is not a readable safetensors file"),
    "not_safetensors": (lambda d: (d / "adapter_model.safetensors").write_bytes(b"PK\x03\x04 a zip, not safetensors" * 4),
                        r"adapter_model\.safetensors' \(\d+ bytes\) is not a readable safetensors file"),
    "nan_tensor": (_poison(float("nan")), r"inf or NaN: base_model\.model\.model\.layers\.0\.self_attn\.q_proj\.lora_A\.weight"),
    "inf_tensor": (_poison(float("inf")), r"inf or NaN: base_model\.model\.model\.layers\.0\.self_attn\.q_proj\.lora_A\.weight"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_broken_adapter_is_refused_naming_the_problem(case: str, saved: Path, tmp_path: Path) -> None:
    damage, match = CASES[case]
    directory = _copy(saved, tmp_path / "broken")
    damage(directory)
    files = {f.name: f.read_bytes() for f in directory.iterdir()}
    with pytest.raises(AdapterLoadError, match=match):
        read_adapter(directory)
    model = tiny_llama(num_layers=1)
    with unchanged(model), pytest.raises(AdapterLoadError, match=match):
        load_adapter(model, directory)
    assert {f.name: f.read_bytes() for f in directory.iterdir()} == files  # the files are left as they were


def test_the_intact_copy_still_loads(saved: Path, tmp_path: Path) -> None:
    model = tiny_llama(num_layers=1)
    load_adapter(model, _copy(saved, tmp_path / "ok"))
    assert torch.isfinite(model.model.layers[0].self_attn.q_proj.lora_B["default"]).all()
