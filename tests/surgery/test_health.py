"""The health primitives: one structural finder per method, and the measures the callback and the doctor use."""

from __future__ import annotations

import torch
from torch import nn

from lightning_lora import LoRAConfig, apply_lora
from lightning_lora.surgery import lora_layers
from lightning_lora.surgery.diagnostics.health import (
    AdapterUnit,
    adapter_units,
    nonfinite_tensors,
    pre_training_problems,
    register_adapter_finder,
    relative_update_sizes,
    remove_adapter_finder,
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


class PromptTokens(nn.Module):
    """A stand-in for a future method (prompt tuning): trainable virtual-token embeddings."""

    def __init__(self) -> None:
        super().__init__()
        self.virtual = nn.Parameter(torch.randn(4, 8))


def _prompt_units(model: nn.Module) -> list[AdapterUnit]:
    return [AdapterUnit(path=p, method="prompt", adapter="default", tensors={"virtual": m.virtual}, active=True)
            for p, m in model.named_modules() if isinstance(m, PromptTokens)]


def test_a_new_method_registers_one_finder_and_every_check_covers_it() -> None:
    model = nn.Sequential(nn.Linear(8, 8), PromptTokens())
    assert adapter_units(model) == []
    register_adapter_finder(_prompt_units)
    try:
        units = adapter_units(model)
        assert [(u.path, u.method) for u in units] == [("1", "prompt")]
        assert pre_training_problems(units, []) == ["1: virtual in no optimizer param group (never updated)"]
        assert relative_update_sizes(units) == {}  # no dense update for this method: skipped, not an error
    finally:
        remove_adapter_finder(_prompt_units)
    assert adapter_units(model) == []
