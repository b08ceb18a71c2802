"""The surgery primitives: ``add_adapter`` changes nothing but the wrapping, ``adapter_parameters`` is the one answer
to "which tensors are adapter X's", configs are values, and each failure has one exception type everywhere."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lightning_lora import (
    LightningLoRAError,
    LoRAConfig,
    LoRAConfigError,
    QuantConfig,
    SurgeryError,
    UnknownAdapterError,
    adapter_configs,
    adapter_parameters,
    add_adapter,
    apply_lora,
    delete_adapter,
    get_active_adapters,
    list_adapters,
    merge_lora,
    mixed_batch,
    read_adapter,
    save_adapter,
    set_active_adapters,
    set_trainable,
)
from tests.factories import input_ids, logits, perturb_lora_B, tiny_gpt2, tiny_llama, unchanged

QV = LoRAConfig(r=4, alpha=8, targets=["q_proj", "v_proj"])


def test_add_adapter_wraps_and_records_only() -> None:
    model = tiny_llama(num_layers=2)
    apply_lora(model, QV, name="a")
    perturb_lora_B(model, adapter="a")
    grads = {id(p): p.requires_grad for p in model.parameters()}
    before = logits(model, input_ids())
    report = add_adapter(model, LoRAConfig(r=2, targets=["q_proj", "o_proj"]), "b")
    perturb_lora_B(model, adapter="b")  # even a trained-looking "b" must not act: it is not active
    assert report.replaced == ["model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.o_proj"]
    assert list_adapters(model) == ["a", "b"] and get_active_adapters(model) == ["a"]
    assert {id(p): p.requires_grad for p in model.parameters() if id(p) in grads} == grads
    assert not any(p.requires_grad for p in adapter_parameters(model, "b").values())
    torch.testing.assert_close(logits(model, input_ids()), before, rtol=0, atol=0)


def test_apply_lora_is_add_activate_and_set_trainable() -> None:
    model = tiny_llama(num_layers=2)
    apply_lora(model, QV, name="a")
    apply_lora(model, LoRAConfig(r=2, targets=["v_proj"]), name="b")
    assert get_active_adapters(model) == ["a", "b"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(adapter_parameters(model, "b")) and len(trainable) == 4


def test_adapter_parameters_finds_factors_saved_modules_and_biases() -> None:
    model = tiny_gpt2()
    apply_lora(model, LoRAConfig(r=2, targets=["c_attn"], bias="lora_only", modules_to_save=["ln_f"]), name="x")
    params = adapter_parameters(model, "x")
    assert set(params) == {
        "transformer.h.0.attn.c_attn.lora_A.x", "transformer.h.0.attn.c_attn.lora_B.x",
        "transformer.h.1.attn.c_attn.lora_A.x", "transformer.h.1.attn.c_attn.lora_B.x",
        "transformer.h.0.attn.c_attn.base_layer.bias", "transformer.h.1.attn.c_attn.base_layer.bias",
        "transformer.ln_f.weight", "transformer.ln_f.bias",
    }
    named = dict(model.named_parameters())
    assert all(named[k] is p for k, p in params.items())
    assert set(adapter_parameters(model, "x", factors_only=True)) == {k for k in params if ".lora_" in k}
    set_trainable(model, "x")
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(params)


def test_configs_are_frozen_values_and_recorded_as_copies(tmp_path) -> None:
    config = LoRAConfig(r=4, targets=["q_proj"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.r = 8  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        QuantConfig().blocksize = 32  # type: ignore[misc]
    model = tiny_llama(num_layers=1)
    apply_lora(model, config)
    config.targets.append("v_proj")  # the lists inside stay mutable; the recorded copy does not follow
    assert adapter_configs(model)["default"].targets == ["q_proj"]
    save_adapter(model, tmp_path)
    saved, tensors = read_adapter(tmp_path)
    assert saved.r == 4 and {tuple(t.shape) for k, t in tensors.items() if "lora_A" in k} == {(4, 32)}
    assert config.replace(r=8).r == 8
    with pytest.raises(LoRAConfigError, match="r=0"):
        config.replace(r=0)


def test_rank_pattern_key_that_matches_nothing_is_an_error_and_changes_nothing() -> None:
    model = tiny_llama(num_layers=2)
    with unchanged(model), pytest.raises(LoRAConfigError, match=r"rank_pattern key 'q_prj' matches none of the 4 "
                                                                 r"selected layers; closest: \['q_proj'"):
        apply_lora(model, LoRAConfig(targets=["q_proj", "v_proj"], rank_pattern={"q_prj": 2}))
    with unchanged(model), pytest.raises(LoRAConfigError, match="alpha_pattern key 'k_proj'"):
        apply_lora(model, LoRAConfig(targets=["q_proj"], alpha_pattern={"k_proj": 2.0}))


def test_adding_an_adapter_to_a_merged_layer_is_refused_before_any_change() -> None:
    model = tiny_llama(num_layers=2)
    apply_lora(model, QV, name="a")
    perturb_lora_B(model)
    merge_lora(model, unload=False)
    with unchanged(model), pytest.raises(SurgeryError, match=r"has adapters \['a'\] merged into its weight.*unmerge_lora"):
        apply_lora(model, LoRAConfig(targets=["q_proj", "k_proj"]), name="b")
    assert list_adapters(model) == ["a"]


@pytest.mark.parametrize("call", [
    lambda m: set_active_adapters(m, "nope"),
    lambda m: set_trainable(m, "nope"),
    lambda m: delete_adapter(m, "nope"),
    lambda m: merge_lora(m, adapters=["nope"]),
    lambda m: save_adapter(m, "/tmp/never-written", name="nope"),
    lambda m: mixed_batch(m.eval(), ["nope"]).__enter__(),
], ids=["set_active_adapters", "set_trainable", "delete_adapter", "merge_lora", "save_adapter", "mixed_batch"])
def test_an_unknown_adapter_is_one_error_type_everywhere(call) -> None:
    model = tiny_llama(num_layers=1)
    apply_lora(model, QV, name="a")
    with unchanged(model), pytest.raises(UnknownAdapterError, match="'nope'") as err:
        call(model)
    assert isinstance(err.value, SurgeryError) and isinstance(err.value, ValueError)
    assert isinstance(err.value, LightningLoRAError)
