"""MergeAndExport: a transformers export that from_pretrained loads with the same logits; plain modules keep names."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lightning_lora import LoRAConfig, SurgeryError, load_adapter
from lightning_lora.callbacks import LoRAFinetuning, MergeAndExport
from lightning_lora.surgery.lora.layer import LoRALayer
from tests.callbacks.models import TinyLlamaModule, TinyModule, TinyNet, adapter_tensors, trainer
from tests.factories import input_ids, tiny_llama


def test_transformers_export_loads_and_matches_the_trained_model(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    module = TinyLlamaModule(lr=0.05)
    export = MergeAndExport(tmp_path / "export", module="model")
    lora = LoRAFinetuning(LoRAConfig(r=4, targets="all-linear"), module="model")
    trainer(tmp_path, [lora, export], max_steps=3).fit(module)
    trained = adapter_tensors(module)
    assert all(t.abs().sum() > 0 for n, t in trained.items() if ".lora_B." in n)

    # the model in memory is untouched: still wrapped, adapters unmerged and trainable
    assert isinstance(module.model.model.layers[0].self_attn.q_proj, LoRALayer)
    assert module.model.model.layers[0].self_attn.q_proj.merged_adapters == []
    assert all(p.requires_grad for n, p in module.named_parameters() if ".lora_" in n)

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "export" / "merged").eval()
    assert not any(isinstance(m, LoRALayer) for m in merged.modules())
    ids = input_ids(batch=2, seq=12)
    module.model.eval()
    with torch.no_grad():
        expected, got = module.model(input_ids=ids).logits, merged(input_ids=ids).logits
    diff = (expected - got).abs().max().item()
    assert diff < 1e-5
    assert export.report.format == "transformers" and export.report.max_abs_diff < 1e-5
    assert json.loads((tmp_path / "export" / "export.json").read_text())["max_abs_diff"] == export.report.max_abs_diff

    # the PEFT-format adapter reproduces the same model on a fresh base
    base = tiny_llama(num_layers=2)
    load_adapter(base, tmp_path / "export" / "adapter")
    with torch.no_grad():
        assert torch.allclose(base(input_ids=ids).logits, expected, atol=1e-5)


def test_plain_module_export_keeps_the_original_names(tmp_path: Path) -> None:
    module = TinyModule()
    export = MergeAndExport(tmp_path / "export")
    trainer(tmp_path, [LoRAFinetuning(LoRAConfig(r=4), module="model"), export], max_steps=3).fit(module)
    tensors = load_file(tmp_path / "export" / "merged" / "model.safetensors")
    assert sorted(tensors) == sorted(TinyNet().state_dict())  # the adapted module's own names, no lora / base_layer
    fresh = TinyNet()
    fresh.load_state_dict(tensors)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    module.eval()
    with torch.no_grad():
        assert torch.allclose(fresh(ids), module(ids), atol=1e-5)
    assert export.report.max_abs_diff is None  # no probe input for a plain module
    assert (tmp_path / "export" / "adapter" / "adapter_config.json").is_file()
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # atomic: no temporary directory left


def test_export_without_an_adapter_fails_before_training(tmp_path: Path) -> None:
    with pytest.raises(SurgeryError, match=r"(?s)no LoRA adapter 'default'.*HINT: add LoRAFinetuning"):
        trainer(tmp_path, [MergeAndExport(tmp_path / "export")]).fit(TinyModule())
    assert not (tmp_path / "export").exists()
