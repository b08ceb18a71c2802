"""merge_lora(merge_base=...) on a 4-bit base and compare_merge_bases: what each base gives and costs."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lightning_lora import LoRAConfig, MergeError, QuantConfig, apply_lora, compare_merge_bases, merge_lora, quantize_model
from lightning_lora.surgery import LoRALayer, lora_layers, unmerge_lora
from lightning_lora.surgery.quant.bnb4bit import dequantize, is_linear4bit, weight_bytes
from tests.factories import input_ids, logits, perturb_lora_B, state_snapshot, tiny_llama

bnb = pytest.importorskip("bitsandbytes")

QV = LoRAConfig(r=4, alpha=8, targets=["q_proj", "v_proj"])


@pytest.fixture
def full() -> nn.Module:
    return tiny_llama(num_layers=2)


@pytest.fixture
def qlora(full: nn.Module) -> nn.Module:
    """All linear layers 4-bit (head excluded), LoRA on q/v only, B perturbed so that merges change something."""
    model = copy.deepcopy(full)
    quantize_model(model, QuantConfig())
    apply_lora(model, QV)
    perturb_lora_B(model, std=0.05)
    return model


def plain(model: nn.Module) -> bool:
    return not any(isinstance(m, LoRALayer) for m in model.modules())


def test_dequantized_gives_plain_dense_layers_that_reproduce_the_qlora_model(qlora: nn.Module) -> None:
    ids = input_ids()
    reference = logits(qlora, ids)
    q_proj = qlora.model.layers[0].self_attn.q_proj
    expected = dequantize(q_proj.base_layer) + q_proj.delta_weight("default")
    merged = merge_lora(qlora)  # the default base
    assert merged is qlora and plain(merged)
    assert not any(is_linear4bit(m) for m in merged.modules())  # unadapted 4-bit layers are dequantized too
    layer = merged.model.layers[0].self_attn.q_proj
    assert type(layer) is nn.Linear and layer.weight.dtype == torch.float32 and not layer.weight.requires_grad
    torch.testing.assert_close(layer.weight, expected, rtol=0, atol=0)
    torch.testing.assert_close(logits(merged, ids), reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("as_state_dict", [True, False])
def test_original_merges_onto_the_high_precision_weights(qlora: nn.Module, full: nn.Module, as_state_dict: bool) -> None:
    q_proj = qlora.model.layers[1].self_attn.q_proj
    delta = q_proj.delta_weight("default")
    source = full.state_dict() if as_state_dict else full
    merged = merge_lora(qlora, merge_base="original", original=source)
    assert plain(merged) and not any(is_linear4bit(m) for m in merged.modules())
    expected = full.model.layers[1].self_attn.q_proj.weight + delta
    torch.testing.assert_close(merged.model.layers[1].self_attn.q_proj.weight, expected, rtol=0, atol=1e-7)
    torch.testing.assert_close(merged.model.layers[1].mlp.up_proj.weight, full.model.layers[1].mlp.up_proj.weight,
                               rtol=0, atol=0)  # unadapted 4-bit layers get their original weights back


def test_original_accepts_keys_under_another_prefix(qlora: nn.Module, full: nn.Module) -> None:
    wrapped = {f"backbone.{k}": v for k, v in full.state_dict().items()}  # e.g. saved from a LightningModule
    merged = merge_lora(qlora, merge_base="original", original=wrapped)
    torch.testing.assert_close(merged.model.layers[0].mlp.down_proj.weight, full.model.layers[0].mlp.down_proj.weight)


def test_requantize_stays_4bit_and_rounds_the_update(qlora: nn.Module) -> None:
    before_bytes = weight_bytes(qlora) - sum(p.numel() * 4 for n, p in qlora.named_parameters() if ".lora_" in n)
    q_proj = qlora.model.layers[0].self_attn.q_proj
    target = dequantize(q_proj.base_layer) + q_proj.delta_weight("default")
    merged = merge_lora(qlora, merge_base="requantize")
    assert plain(merged)
    layer = merged.model.layers[0].self_attn.q_proj
    assert is_linear4bit(layer) and layer.weight.dtype == torch.uint8
    assert weight_bytes(merged) == before_bytes  # as small as the 4-bit base
    assert "_lora_previous_packed" not in vars(layer)  # no undo copy kept when the wrappers are gone
    error = (dequantize(layer) - target).abs().max()
    assert 0 < error < 0.5 * target.abs().max()  # quantized again: close, not exact


def test_requantize_without_unload_keeps_wrappers_and_unmerges_exactly(qlora: nn.Module) -> None:
    ids = input_ids()
    reference = logits(qlora, ids)
    before = state_snapshot(qlora)
    merge_lora(qlora, merge_base="requantize", unload=False)
    layers = lora_layers(qlora)
    assert layers and all(layer.merged_adapters == ["default"] for _, layer in layers)
    assert not torch.equal(qlora.state_dict()["model.layers.0.self_attn.q_proj.base_layer.weight"],
                           before["model.layers.0.self_attn.q_proj.base_layer.weight"])
    unmerge_lora(qlora)
    for key, value in before.items():  # packed data and double-quantized scales: bit for bit
        assert torch.equal(qlora.state_dict()[key], value), key
    torch.testing.assert_close(logits(qlora, ids), reference, rtol=0, atol=0)


def test_dense_model_ignores_merge_base(full: nn.Module) -> None:
    a, b = copy.deepcopy(full), copy.deepcopy(full)
    for model in (a, b):
        torch.manual_seed(0)  # same A
        apply_lora(model, QV)
        perturb_lora_B(model)
    merge_lora(a)
    merge_lora(b, merge_base="requantize")
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"merge_base": "fp16"}, r"merge_base='fp16': must be one of \['dequantized', 'original', 'requantize'\]"),
        ({"merge_base": "original"}, r"merge_base='original' needs the high-precision weights: pass original="),
        ({"original": {}}, r"`original` was given with merge_base='dequantized'"),
        ({"merge_base": "original", "original": [1]}, r"original=list: pass an nn.Module or a state dict"),
        ({"unload": False}, r"merge_base='dequantized' replaces the 4-bit layers by dense ones.*unload=True"),
    ],
)
def test_bad_merge_arguments_change_nothing(qlora: nn.Module, kwargs: dict, match: str) -> None:
    before = state_snapshot(qlora)
    with pytest.raises(MergeError, match=match):
        merge_lora(qlora, **kwargs)
    assert len(lora_layers(qlora)) == 4 and all(torch.equal(v, qlora.state_dict()[k]) for k, v in before.items())


def test_original_that_does_not_fit_is_refused_naming_layers(qlora: nn.Module, full: nn.Module) -> None:
    state = dict(full.state_dict())
    del state["model.layers.0.mlp.up_proj.weight"]
    state["model.layers.1.self_attn.q_proj.weight"] = torch.zeros(3, 3)
    with pytest.raises(MergeError, match=r"(?s)model.layers.0.mlp.up_proj: no 'model.layers.0.mlp.up_proj.weight'.*"
                                         r"model.layers.1.self_attn.q_proj: original\[.*\] is \(3, 3\)"):
        merge_lora(qlora, merge_base="original", original=state)
    assert len(lora_layers(qlora)) == 4 and is_linear4bit(qlora.model.layers[0].mlp.up_proj)


def test_non_finite_merge_is_refused(qlora: nn.Module) -> None:
    with torch.no_grad():
        qlora.model.layers[1].self_attn.v_proj.lora_B["default"].fill_(float("inf"))
    with pytest.raises(MergeError, match=r"model.layers.1.self_attn.v_proj: merging adapters \['default'\] gives non-finite"):
        merge_lora(qlora)
    assert is_linear4bit(qlora.model.layers[0].self_attn.q_proj.base_layer)


def test_compare_merge_bases_reports_each_cost_without_touching_the_model(qlora: nn.Module, full: nn.Module) -> None:
    ids = input_ids()
    before = state_snapshot(qlora)
    qlora.train()
    table = compare_merge_bases(qlora, {"input_ids": ids}, original=full)
    assert qlora.training and all(torch.equal(v, qlora.state_dict()[k]) for k, v in before.items())
    dq, orig, rq = table.row("dequantized"), table.row("original"), table.row("requantize")
    assert dq.max_abs_diff < 1e-4 and dq.kl < 1e-9  # reproduces the trained model
    assert orig.max_abs_diff > 10 * dq.max_abs_diff and orig.kl > 0  # the base the adapter never saw
    assert rq.max_abs_diff > 10 * dq.max_abs_diff and rq.weight_bytes < dq.weight_bytes
    assert orig.weight_bytes == dq.weight_bytes > table.unmerged_bytes
    text = str(table)
    assert "| dequantized |" in text and "| requantize |" in text


def test_compare_merge_bases_without_original_leaves_that_row_empty(qlora: nn.Module) -> None:
    table = compare_merge_bases(qlora, input_ids())
    assert table.row("original").max_abs_diff is None and "pass original=" in str(table)
    assert table.row("requantize").kl is not None
