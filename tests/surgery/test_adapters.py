"""Saving and loading adapters: what fits is loaded exactly, what does not is refused by key, leaving the model as is."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lightning_lora.surgery import (
    AdapterLoadError,
    LoRAConfig,
    SurgeryError,
    adapter_configs,
    adapter_state_dict,
    apply_lora,
    load_adapter,
    lora_layers,
    save_adapter,
)
from lightning_lora.surgery.io.adapter_files import CONFIG_NAME, WEIGHTS_NAME
from tests.factories import input_ids, logits, perturb_lora_B, tiny_llama, unchanged

QV = LoRAConfig(r=4, alpha=8, targets=["q_proj", "v_proj"])
PREFIX = "base_model.model.model.layers"


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    model = tiny_llama()
    apply_lora(model, QV)
    perturb_lora_B(model)
    return save_adapter(model, tmp_path / "adapter")


def rewrite_weights(directory: Path, change) -> None:
    tensors = load_file(str(directory / WEIGHTS_NAME))
    change(tensors)
    save_file(tensors, str(directory / WEIGHTS_NAME))


def rewrite_config(directory: Path, **fields: object) -> None:
    body = json.loads((directory / CONFIG_NAME).read_text())
    body.update(fields)
    (directory / CONFIG_NAME).write_text(json.dumps(body))


def test_saved_files_use_peft_keys_and_config(saved: Path) -> None:
    keys = sorted(load_file(str(saved / WEIGHTS_NAME)))
    assert len(keys) == 16
    assert keys[0] == f"{PREFIX}.0.self_attn.q_proj.lora_A.weight"
    body = json.loads((saved / CONFIG_NAME).read_text())
    assert body["peft_type"] == "LORA" and body["r"] == 4 and body["lora_alpha"] == 8
    assert body["target_modules"] == ["q_proj", "v_proj"] and body["task_type"] == "CAUSAL_LM"


def test_shape_mismatch_lists_the_keys_and_changes_nothing(saved: Path) -> None:
    key = f"{PREFIX}.1.self_attn.v_proj.lora_A.weight"
    rewrite_weights(saved, lambda t: t.update({key: torch.zeros(4, 48)}))
    model = tiny_llama()
    match = rf"1 key\(s\) shape mismatch:\n    {key}: file \(4, 48\) vs model \(4, 32\)"
    with unchanged(model), pytest.raises(AdapterLoadError, match=match):
        load_adapter(model, saved)
    assert not lora_layers(model) and not adapter_configs(model)


def test_missing_and_unexpected_keys_are_listed(saved: Path) -> None:
    gone = f"{PREFIX}.2.self_attn.q_proj.lora_B.weight"
    extra = f"{PREFIX}.2.self_attn.k_proj.lora_A.weight"
    rewrite_weights(saved, lambda t: (t.pop(gone), t.update({extra: torch.zeros(4, 32)})))
    model = tiny_llama()
    with unchanged(model), pytest.raises(AdapterLoadError) as info:
        load_adapter(model, saved)
    message = str(info.value)
    assert "does not fit this model; nothing was changed" in message
    assert f"1 key(s) missing from the file:\n    {gone}" in message
    assert f"1 key(s) not in the model:\n    {extra}" in message


def test_adapter_for_a_deeper_model_lists_the_extra_blocks(saved: Path) -> None:
    model = tiny_llama(num_layers=2)
    match = rf"8 key\(s\) not in the model:\n    {PREFIX}\.2\.self_attn\.q_proj"
    with unchanged(model), pytest.raises(AdapterLoadError, match=match):
        load_adapter(model, saved)


def test_other_tensors_must_exist_in_the_model(saved: Path) -> None:
    rewrite_weights(saved, lambda t: t.update({"base_model.model.model.nope.bias": torch.zeros(3)}))
    model = tiny_llama()
    with unchanged(model), pytest.raises(AdapterLoadError, match=r"base_model\.model\.model\.nope\.bias: no such parameter"):
        load_adapter(model, saved)


def test_wrong_base_model_is_refused(saved: Path) -> None:
    model = nn.Sequential(nn.Linear(4, 4))
    with unchanged(model), pytest.raises(AdapterLoadError, match=r"none of target_modules=\['q_proj', 'v_proj'\] exists"):
        load_adapter(model, saved)


@pytest.mark.parametrize(("fields", "match"), [
    (dict(peft_type="IA3"), r"peft_type='IA3'; only LoRA adapters \('LORA'\) can be loaded"),
    (dict(use_dora=True), r"uses DoRA adapters, which lightning-lora does not support; load it with PEFT"),
    (dict(r=0), r"r=0: the rank must be a positive integer"),
])
def test_unsupported_configs_are_refused(saved: Path, fields: dict, match: str) -> None:
    rewrite_config(saved, **fields)
    model = tiny_llama()
    with unchanged(model), pytest.raises(ValueError, match=match):
        load_adapter(model, saved)


def test_missing_files(saved: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=rf"No {CONFIG_NAME} in"):
        load_adapter(tiny_llama(), tmp_path / "nowhere")
    (saved / WEIGHTS_NAME).unlink()
    model = tiny_llama()
    with unchanged(model), pytest.raises(FileNotFoundError, match=rf"No {WEIGHTS_NAME} in"):
        load_adapter(model, saved)


def test_loading_under_a_taken_name_is_refused_unless_replace(saved: Path) -> None:
    model = tiny_llama()
    load_adapter(model, saved)
    with unchanged(model), pytest.raises(SurgeryError, match=r"An adapter named 'default' is already loaded; pass replace=True"):
        load_adapter(model, saved)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B["default"].zero_()
    load_adapter(model, saved, replace=True)
    assert all(layer.lora_B["default"].abs().sum() > 0 for _, layer in lora_layers(model))


def test_second_adapter_under_another_name(saved: Path) -> None:
    model = tiny_llama()
    load_adapter(model, saved)
    load_adapter(model, saved, name="second", trainable=True)
    assert sorted(adapter_configs(model)) == ["default", "second"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(".second") for n in trainable)
    for key, value in adapter_state_dict(model, "second").items():
        assert torch.equal(value, adapter_state_dict(model, "default")[key])


@pytest.mark.parametrize("call", ["save_adapter", "adapter_state_dict"])
def test_unknown_adapter_name(call: str, tmp_path: Path) -> None:
    model = tiny_llama()
    apply_lora(model, QV)
    match = r"No adapter named 'nope' on this model \(adapters: \['default'\]\)"
    with unchanged(model), pytest.raises(SurgeryError, match=match):
        if call == "save_adapter":
            save_adapter(model, tmp_path / "x", name="nope")
        else:
            adapter_state_dict(model, "nope")
    assert not (tmp_path / "x").exists()


class Holder(nn.Module):
    """Stands in for a LightningModule that holds the adapted model as ``self.model``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model


def test_saving_from_a_holder_writes_the_same_keys_as_from_the_model(tmp_path: Path) -> None:
    model = tiny_llama()
    apply_lora(model, QV)
    perturb_lora_B(model)
    save_adapter(Holder(model), tmp_path / "holder")
    save_adapter(model, tmp_path / "model")
    held, direct = load_file(str(tmp_path / "holder" / WEIGHTS_NAME)), load_file(str(tmp_path / "model" / WEIGHTS_NAME))
    assert held.keys() == direct.keys() and all(torch.equal(held[k], direct[k]) for k in held)
    fresh = tiny_llama()
    load_adapter(fresh, tmp_path / "holder")
    ids = input_ids()
    assert torch.equal(logits(fresh, ids), logits(model, ids))
