"""Saving and loading several adapters at once, in PEFT's multi-adapter layout, both ways with PEFT."""

from __future__ import annotations

import json

import pytest
import torch

from lightning_lora import (
    AdapterLoadError,
    LoRAConfig,
    SurgeryError,
    UnknownAdapterError,
    apply_lora,
    get_active_adapters,
    list_adapters,
    load_adapter,
    load_adapters,
    save_adapters,
    use_adapters,
)
from lightning_lora.surgery.io.adapter_dirs import find_adapters
from lightning_lora.surgery.io.adapter_files import adapter_state_dict
from lightning_lora.surgery.lora.inventory import lora_layers
from tests.factories import input_ids, logits, perturb_lora_B, tiny_gpt2, tiny_llama

CONFIGS = {
    "default": LoRAConfig(r=4, targets=["q_proj", "v_proj"]),
    "legal": LoRAConfig(r=8, alpha=4, targets=["q_proj", "down_proj"]),
    "medical": LoRAConfig(r=2, targets="all-linear"),
}


@pytest.fixture
def model() -> torch.nn.Module:
    m = tiny_llama(num_layers=2)
    for name, cfg in CONFIGS.items():
        apply_lora(m, cfg, name=name)
    perturb_lora_B(m, std=0.3)
    return m.eval()


def _adapter_logits(model: torch.nn.Module, names: list[str], ids: torch.Tensor) -> dict[str, torch.Tensor]:
    out = {}
    for name in names:
        with use_adapters(model, name):
            out[name] = logits(model, ids)
    return out


def test_layout_matches_peft(model, tmp_path):
    written = save_adapters(model, tmp_path / "multi")
    root = tmp_path / "multi"
    assert written == {"default": root, "legal": root / "legal", "medical": root / "medical"}
    for directory in written.values():
        assert (directory / "adapter_config.json").is_file() and (directory / "adapter_model.safetensors").is_file()
    assert sorted(p.name for p in root.iterdir()) == ["adapter_config.json", "adapter_model.safetensors", "legal", "medical"]
    assert json.loads((root / "legal" / "adapter_config.json").read_text())["r"] == 8
    assert find_adapters(root) == written


def test_round_trip_is_bit_exact(model, tmp_path):
    save_adapters(model, tmp_path / "multi")
    fresh = tiny_llama(num_layers=2)
    reports = load_adapters(fresh, tmp_path / "multi")
    assert list(reports) == ["default", "legal", "medical"] and list_adapters(fresh) == ["default", "legal", "medical"]
    assert get_active_adapters(fresh) == ["default"]  # PEFT activates the default adapter
    for name in CONFIGS:
        theirs, ours = adapter_state_dict(model, name), adapter_state_dict(fresh, name)
        assert theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in theirs)
    ids = input_ids(2, 6)
    expected, got = _adapter_logits(model, list(CONFIGS), ids), _adapter_logits(fresh, list(CONFIGS), ids)
    for name in CONFIGS:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0)


def test_subset_and_active(model, tmp_path):
    save_adapters(model, tmp_path / "multi", names=["legal", "medical"])
    assert not (tmp_path / "multi" / "adapter_config.json").exists()
    fresh = tiny_llama(num_layers=2)
    load_adapters(fresh, tmp_path / "multi", names=["medical"], active=["medical"])
    assert list_adapters(fresh) == ["medical"] and get_active_adapters(fresh) == ["medical"]
    load_adapters(fresh, tmp_path / "multi", names=["legal"])
    assert get_active_adapters(fresh) == ["medical"]  # loading more keeps what was active


def test_load_refuses_existing_names_unless_replace(model, tmp_path):
    save_adapters(model, tmp_path / "multi")
    with pytest.raises(SurgeryError, match=r"\['default', 'legal', 'medical'\] are already on the model.*replace=True"):
        load_adapters(model, tmp_path / "multi")
    with pytest.raises(SurgeryError, match="'legal' is already loaded; pass replace=True"):
        load_adapter(model, tmp_path / "multi" / "legal", name="legal")
    other = tiny_llama(num_layers=2)
    apply_lora(other, CONFIGS["legal"], name="legal")  # B = 0
    load_adapters(other, tmp_path / "multi", names=["legal"], replace=True)
    assert torch.equal(adapter_state_dict(other, "legal")[next(iter(adapter_state_dict(model, "legal")))],
                       next(iter(adapter_state_dict(model, "legal").values())))


def test_load_checks_every_adapter_before_changing_anything(model, tmp_path):
    save_adapters(model, tmp_path / "multi")
    gpt2 = tiny_gpt2()
    apply_lora(gpt2, LoRAConfig(r=2, targets=["c_attn"]), name="zz")
    save_adapters(gpt2, tmp_path / "gpt2")
    (tmp_path / "gpt2" / "zz").rename(tmp_path / "multi" / "zz")  # loaded last: the others would fit
    fresh = tiny_llama(num_layers=2)
    with pytest.raises(AdapterLoadError, match="target_modules=.*c_attn.*right base model"):
        load_adapters(fresh, tmp_path / "multi")
    assert list_adapters(fresh) == [] and not lora_layers(fresh)
    shallow = tiny_llama(num_layers=1)  # layer-1 keys of every adapter do not fit
    with pytest.raises(AdapterLoadError, match="not in the model.*nothing was changed|nothing was changed"):
        load_adapters(shallow, tmp_path / "multi", names=["default", "legal"])
    assert list_adapters(shallow) == []


def test_bad_directories_and_names(model, tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        load_adapters(model, tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="No adapter in"):
        find_adapters(tmp_path / "empty")
    save_adapters(model, tmp_path / "multi", names=["legal"])
    with pytest.raises(UnknownAdapterError, match=r"\['nope'\] not found.*\['legal'\]"):
        load_adapters(tiny_llama(num_layers=2), tmp_path / "multi", names=["nope"])
    with pytest.raises(UnknownAdapterError, match="active=.*'zz'"):
        load_adapters(tiny_llama(num_layers=2), tmp_path / "multi", active="zz")
    with pytest.raises(UnknownAdapterError, match="'nope'"):
        save_adapters(model, tmp_path / "x", names=["nope"])
    apply_lora(model, LoRAConfig(r=2), name="a/b")
    with pytest.raises(SurgeryError, match=r"\['a/b'\] cannot be directory names"):
        save_adapters(model, tmp_path / "y")
    assert not (tmp_path / "y").exists()


def test_peft_loads_our_multi_adapter_dir(model, tmp_path):
    peft = pytest.importorskip("peft")
    save_adapters(model, tmp_path / "multi")
    ids = input_ids(2, 6)
    expected = _adapter_logits(model, list(CONFIGS), ids)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(num_layers=2), str(tmp_path / "multi"))
    for name in ("legal", "medical"):
        theirs.load_adapter(str(tmp_path / "multi" / name), adapter_name=name)
    for name in CONFIGS:
        theirs.set_adapter(name)
        torch.testing.assert_close(logits(theirs, ids), expected[name], rtol=1e-5, atol=1e-5)
    single = peft.PeftModel.from_pretrained(tiny_llama(num_layers=2), str(tmp_path / "multi" / "legal"), adapter_name="legal")
    torch.testing.assert_close(logits(single, ids), expected["legal"], rtol=1e-5, atol=1e-5)


def test_we_load_peft_multi_adapter_save(tmp_path):
    peft = pytest.importorskip("peft")
    theirs = peft.get_peft_model(
        tiny_llama(num_layers=2), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    )
    theirs.add_adapter("legal", peft.LoraConfig(r=2, lora_alpha=2, target_modules=["down_proj"]))
    perturb_lora_B(theirs, std=0.3)
    theirs.save_pretrained(str(tmp_path / "peft"))
    assert (tmp_path / "peft" / "legal" / "adapter_config.json").is_file()  # PEFT's layout, as we write it
    ours = tiny_llama(num_layers=2)
    load_adapters(ours, tmp_path / "peft")
    assert list_adapters(ours) == ["default", "legal"]
    ids = input_ids(2, 6)
    for name in ("default", "legal"):
        theirs.set_adapter(name)
        with use_adapters(ours, name):
            torch.testing.assert_close(logits(ours, ids), logits(theirs, ids), rtol=1e-5, atol=1e-5)
