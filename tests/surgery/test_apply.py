"""apply / merge / unmerge / unload / set_trainable: adapter names, several adapters, and the errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_lora.surgery import (
    LoRAConfig,
    LoRALayer,
    SurgeryError,
    UnknownAdapterError,
    apply_lora,
    lora_layers,
    merge_lora,
    set_trainable,
    unload_lora,
    unmerge_lora,
)
from tests.factories import input_ids, logits, perturb_lora_B, tiny_llama, unchanged

QV = LoRAConfig(r=2, alpha=4, targets=["q_proj", "v_proj"])


def test_report_counts_and_trainable_parameters() -> None:
    model = tiny_llama()
    total = sum(p.numel() for p in model.parameters())
    report = apply_lora(model, QV)
    adapter = 4 * (2 * (32 + 32) + 2 * (32 + 16))  # q: 32 -> 32, v: 32 -> 16 (2 KV heads of 8)
    assert report.adapter_params == report.trainable_params == adapter
    assert report.total_params == total + adapter
    assert len(report.replaced) == 8 and report.extended == [] and report.skipped == []
    assert "8 layers adapted" in str(report)


@pytest.mark.parametrize("name", ["", "a.b", "copy", "keys", "to", "training", 3])
def test_unusable_adapter_names_are_refused_before_any_change(name: object) -> None:
    model = tiny_llama()
    match = r"Adapter name .* cannot be used: give a non-empty name without '\.'"
    with unchanged(model), pytest.raises(SurgeryError, match=match):
        apply_lora(model, QV, name=name)  # type: ignore[arg-type]
    assert not lora_layers(model)


def test_unknown_adapter_name_in_merge_is_refused_and_changes_nothing() -> None:
    """Before the fix, a typo merged nothing and (unload=True) silently removed every adapter."""
    model = tiny_llama()
    apply_lora(model, QV)
    perturb_lora_B(model)
    for unload in (True, False):
        match = r"merge_lora: no adapter named 'nope' on this model; its adapters are \['default'\]"
        with unchanged(model), pytest.raises(UnknownAdapterError, match=match):
            merge_lora(model, adapters=["default", "nope"], unload=unload)


def test_unknown_adapter_name_in_set_trainable_is_refused_and_changes_nothing() -> None:
    model = tiny_llama()
    apply_lora(model, QV)
    with unchanged(model), pytest.raises(SurgeryError, match=r"set_trainable: no adapter named 'nope'"):
        set_trainable(model, "nope")
    assert any(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("call", [merge_lora, unmerge_lora, unload_lora])
def test_functions_need_lora_layers(call) -> None:
    model = tiny_llama(num_layers=1)
    with unchanged(model), pytest.raises(SurgeryError, match=rf"{call.__name__}: the model has no LoRA layers; apply_lora"):
        call(model)


def test_second_adapter_freezes_the_first_and_merges_separately() -> None:
    model, ids = tiny_llama(), input_ids()
    apply_lora(model, QV, name="a")
    report = apply_lora(model, LoRAConfig(r=2, targets=["v_proj", "o_proj"]), name="b")
    assert len(report.extended) == 4 and len(report.replaced) == 4  # v_proj extended, o_proj newly wrapped
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(".b") for n in trainable)
    perturb_lora_B(model)
    both = logits(model, ids)
    merge_lora(model, adapters=["a"], unload=False)
    assert {tuple(layer.merged_adapters) for _, layer in lora_layers(model)} == {("a",), ()}
    torch.testing.assert_close(logits(model, ids), both, rtol=0, atol=1e-5)
    unmerge_lora(model)
    assert torch.equal(logits(model, ids), both)


def test_merge_and_unload_gives_plain_layers() -> None:
    model = tiny_llama()
    apply_lora(model, QV)
    merged = merge_lora(model)
    assert merged is model and not lora_layers(model)
    assert type(model.model.layers[0].self_attn.q_proj) is nn.Linear
    assert not any(isinstance(m, LoRALayer) for m in model.modules())
