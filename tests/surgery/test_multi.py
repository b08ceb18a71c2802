"""Several named adapters on one model: list, activate, disable, delete."""

from __future__ import annotations

import pytest
import torch

from lightning_lora import (
    LoRAConfig,
    LoRALayer,
    SurgeryError,
    UnknownAdapterError,
    apply_lora,
    delete_adapter,
    disable_adapters,
    get_active_adapters,
    list_adapters,
    merge_lora,
    set_active_adapters,
    unmerge_lora,
    use_adapters,
)
from lightning_lora.surgery.lora.inventory import adapter_configs, lora_layers
from tests.factories import assert_same_state, input_ids, logits, perturb_lora_B, state_snapshot, tiny_llama


@pytest.fixture
def model() -> torch.nn.Module:
    """A tiny Llama with three adapters of different ranks and targets, all with non-zero B."""
    m = tiny_llama(num_layers=2)
    apply_lora(m, LoRAConfig(r=4, targets=["q_proj", "v_proj"]), name="legal")
    apply_lora(m, LoRAConfig(r=8, alpha=4, targets=["q_proj", "down_proj"]), name="medical")
    apply_lora(m, LoRAConfig(r=2, targets="all-linear", use_rslora=True), name="code")
    perturb_lora_B(m, std=0.3)
    return m.eval()


def _only(model: torch.nn.Module, name: str, ids: torch.Tensor) -> torch.Tensor:
    with use_adapters(model, name):
        return logits(model, ids)


def test_list_and_active(model):
    assert list_adapters(model) == ["legal", "medical", "code"]
    assert get_active_adapters(model) == ["legal", "medical", "code"]  # apply_lora activates each new adapter
    set_active_adapters(model, "medical")
    assert get_active_adapters(model) == ["medical"]
    layers = dict(lora_layers(model))
    assert layers["model.layers.0.self_attn.q_proj"].active_adapters == ["medical"]
    assert layers["model.layers.0.self_attn.v_proj"].active_adapters == []  # medical does not adapt v_proj
    set_active_adapters(model, ["code", "legal"])
    assert get_active_adapters(model) == ["code", "legal"]


def test_active_adapters_change_outputs_and_sum(model):
    ids = input_ids(2, 6)
    with disable_adapters(model):
        base = logits(model, ids)
    outs = {n: _only(model, n, ids) for n in list_adapters(model)}
    assert all(not torch.allclose(out, base, atol=1e-4) for out in outs.values())
    set_active_adapters(model, [])
    torch.testing.assert_close(logits(model, ids), base, rtol=0, atol=0)


def test_unknown_name_lists_known(model):
    with pytest.raises(UnknownAdapterError, match=r"no adapter named 'legl'.*\['legal', 'medical', 'code'\]"):
        set_active_adapters(model, ["legl"])
    with pytest.raises(UnknownAdapterError, match="'nope'"):
        delete_adapter(model, "nope")
    with pytest.raises(UnknownAdapterError, match="legl"):
        with use_adapters(model, "legl"):
            pass


def test_use_adapters_restores_state(model):
    set_active_adapters(model, ["legal", "code"])
    before = [list(layer.active_adapters) for _, layer in lora_layers(model)]
    with pytest.raises(RuntimeError, match="boom"):
        with use_adapters(model, "medical"):
            assert get_active_adapters(model) == ["medical"]
            raise RuntimeError("boom")
    assert [list(layer.active_adapters) for _, layer in lora_layers(model)] == before


def test_disable_adapters_is_the_base_and_restores_exactly(model):
    ids = input_ids(2, 6)
    reference = tiny_llama(num_layers=2)
    set_active_adapters(model, ["medical", "code"])
    before_out, before_state = logits(model, ids), state_snapshot(model)
    flags = [(list(layer.active_adapters), layer.disabled) for _, layer in lora_layers(model)]
    with disable_adapters(model) as same:
        assert same is model
        torch.testing.assert_close(logits(model, ids), logits(reference, ids), rtol=0, atol=0)
        with disable_adapters(model):  # nested
            pass
        assert all(layer.disabled for _, layer in lora_layers(model))
    assert [(list(layer.active_adapters), layer.disabled) for _, layer in lora_layers(model)] == flags
    assert_same_state(before_state, model)
    torch.testing.assert_close(logits(model, ids), before_out, rtol=0, atol=0)


def test_disable_adapters_restores_after_error(model):
    with pytest.raises(ValueError, match="inside"):
        with disable_adapters(model):
            raise ValueError("inside")
    assert not any(layer.disabled for _, layer in lora_layers(model))


def test_disable_adapters_as_dpo_reference_keeps_gradients_to_policy(model):
    ids = input_ids(2, 6)
    model.train()
    set_active_adapters(model, "code")
    for name, p in model.named_parameters():
        p.requires_grad_(".lora_" in name and ".code" in name)
    with torch.no_grad(), disable_adapters(model):
        ref = model(input_ids=ids).logits
    policy = model(input_ids=ids).logits
    (policy - ref).pow(2).mean().backward()
    grads = [p.grad for n, p in model.named_parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads)


def test_refuses_merged_and_missing_layers(model):
    merge_lora(model, adapters=["legal"], unload=False)
    with pytest.raises(SurgeryError, match=r"\['legal'\] are merged.*unmerge_lora"):
        with disable_adapters(model):
            pass
    with pytest.raises(SurgeryError, match="merged"):
        set_active_adapters(model, "medical")
    with pytest.raises(SurgeryError, match="'legal' is merged"):
        delete_adapter(model, "legal")
    unmerge_lora(model)
    set_active_adapters(model, "medical")
    with pytest.raises(SurgeryError, match="no LoRA layers"):
        with disable_adapters(torch.nn.Linear(2, 2)):
            pass


def test_delete_adapter(model):
    ids = input_ids(2, 6)
    set_active_adapters(model, "legal")
    expected = logits(model, ids)
    delete_adapter(model, "medical")
    assert list_adapters(model) == ["legal", "code"]
    assert "medical" not in adapter_configs(model)
    assert all("medical" not in layer.lora_A for _, layer in lora_layers(model))
    torch.testing.assert_close(logits(model, ids), expected, rtol=0, atol=0)
    delete_adapter(model, "code")  # down_proj etc. now hold no adapter: unwrapped
    assert {p.rsplit(".", 1)[-1] for p, _ in lora_layers(model)} == {"q_proj", "v_proj"}
    delete_adapter(model, "legal")
    assert lora_layers(model) == [] and list_adapters(model) == []
    assert not any(isinstance(m, LoRALayer) for m in model.modules())
    torch.testing.assert_close(logits(model, ids), logits(tiny_llama(num_layers=2), ids), rtol=0, atol=0)
    apply_lora(model, LoRAConfig(r=2), name="legal")  # the name is free again
