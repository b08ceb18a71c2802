"""The health primitives: one structural finder per method, and the measures the callback and the doctor use."""

from __future__ import annotations

import torch

from lightning_lora import LoRAConfig, apply_lora
from lightning_lora.surgery import lora_layers
from lightning_lora.surgery.diagnostics.health import (
    adapter_units,
    nonfinite_tensors,
    pre_training_problems,
    relative_update_sizes,
)
from tests.factories import tiny_llama


def test_lora_units_are_found_structurally_with_their_update() -> None:
    model = tiny_llama(num_layers=1)
    apply_lora(model, LoRAConfig(r=4, alpha=8, targets=["q_proj", "v_proj"]))
    units = adapter_units(model)
    assert [u.path for u in units] == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]
    assert relative_update_sizes(units) == {u.label: 0.0 for u in units}  # B = 0
    layer = lora_layers(model)[0][1]
    torch.nn.init.normal_(layer.lora_B["default"])
    expected = (2.0 * layer.lora_B["default"] @ layer.lora_A["default"]).norm() / layer.base_layer.weight.norm()
    assert abs(relative_update_sizes(units)[units[0].label] - expected.item()) < 1e-5
    layer.lora_A["default"].data[1, 2] = float("inf")
    assert nonfinite_tensors(units) == ["model.layers.0.self_attn.q_proj.lora_A"]


def test_other_methods_are_adapter_units_and_every_check_covers_them() -> None:
    from lightning_lora import PromptTuningConfig, apply_peft

    model = tiny_llama(num_layers=1)
    apply_peft(model, PromptTuningConfig(num_virtual_tokens=4), name="p")
    units = adapter_units(model)
    assert [(u.method, u.adapter, sorted(u.tensors)) for u in units] == [("prompt tuning", "p", ["encoders.p.embedding.weight"])]
    assert pre_training_problems(units, []) == [
        f"{units[0].label}: encoders.p.embedding.weight in no optimizer param group (never updated)"
    ]
    assert relative_update_sizes(units) == {}  # no dense update for this method: skipped, not an error
