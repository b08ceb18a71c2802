"""merge_lora(safe=True): each merged weight computed once, checked in the dtype written, nothing changed on error
(issues 10 and 15); a 4-bit merge with unload=False keeps packed tensors, not dense copies (issue 10)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lightning_lora.surgery import (
    LoRAConfig,
    MergeError,
    apply_lora,
    lora_layers,
    merge_lora,
    unmerge_lora,
)
from tests.factories import (
    input_ids,
    logits,
    perturb_lora_B,
    state_snapshot,
    tiny_gpt2,
    tiny_llama,
    unchanged,
)

QV = LoRAConfig(r=2, alpha=2, targets=["q_proj", "v_proj"])


def _adapted(dtype: torch.dtype) -> nn.Module:
    model = tiny_llama(num_layers=2).to(dtype)
    apply_lora(model, QV)
    perturb_lora_B(model, std=0.05)
    return model


def _overflow_fp16(layer: nn.Module) -> None:
    """A weight of 65000 plus an update of +1000 at [0, 0]: finite in fp32 (66000), inf in fp16 (max 65504)."""
    with torch.no_grad():
        layer.base_layer.weight[0, 0] = 65000.0
        layer.lora_A["default"].zero_()
        layer.lora_B["default"].zero_()
        layer.lora_A["default"][0, 0] = 1000.0
        layer.lora_B["default"][0, 0] = 1.0  # scale alpha / r = 1


@pytest.mark.parametrize("unload", [True, False])
def test_fp16_overflow_is_refused_after_the_cast_and_nothing_changes(unload: bool) -> None:
    model = _adapted(torch.float16)
    _overflow_fp16(model.model.layers[1].self_attn.v_proj)  # the last layer: the earlier ones would merge fine
    with unchanged(model), pytest.raises(MergeError, match=r"model\.layers\.1\.self_attn\.v_proj: merging adapters "
                                                           r"\['default'\] gives non-finite weights \(inf or NaN\) in "
                                                           r"torch\.float16"):
        merge_lora(model, unload=unload)
    assert all(not layer.merged_adapters for _, layer in lora_layers(model))


@pytest.mark.parametrize("bad", [3e38, float("inf")])  # (NaN != NaN would defeat unchanged())
def test_values_the_bound_cannot_clear_are_checked_exactly(bad: float) -> None:
    model = _adapted(torch.float32)
    layer = model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        layer.base_layer.weight[0, 0] = bad
        layer.lora_B["default"][0] = 1.0
        layer.lora_A["default"][:, 0] = 3e38  # 3e38 + 2 * 3e38 overflows fp32 (scale alpha / r = 1)
    with unchanged(model), pytest.raises(MergeError, match=r"model\.layers\.0\.self_attn\.q_proj: .* in torch\.float32"):
        merge_lora(model)


def test_large_but_finite_results_still_merge() -> None:
    model = _adapted(torch.float16)
    layer = model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        layer.base_layer.weight[0, 0] = 60000.0  # above half of fp16's max: the bound fails, the exact check passes
    expected = (layer.base_layer.weight.float() + layer.delta_weight("default")).half()
    merge_lora(model)
    torch.testing.assert_close(model.model.layers[0].self_attn.q_proj.weight, expected, rtol=0, atol=64)
    assert torch.isfinite(model.model.layers[0].self_attn.q_proj.weight).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_merge_matches_fp32_reference_and_unmerges_bitwise(dtype: torch.dtype) -> None:
    model = _adapted(dtype)
    before = state_snapshot(model)
    layer = model.model.layers[1].self_attn.v_proj
    expected = (layer.base_layer.weight.float() + layer.delta_weight("default")).to(dtype)  # fp32, cast once
    merge_lora(model, unload=False)
    merged = layer.base_layer.weight
    assert merged.dtype == dtype
    torch.testing.assert_close(merged.float(), expected.float(), rtol=torch.finfo(dtype).eps, atol=1e-6)
    unmerge_lora(model)
    for key, value in before.items():
        assert torch.equal(model.state_dict()[key], value), key


def test_conv1d_merge_equals_unmerged_outputs() -> None:
    model = tiny_gpt2()
    apply_lora(model, LoRAConfig(r=2, targets=["c_attn", "c_fc"]))
    perturb_lora_B(model)
    ids = input_ids()
    reference = logits(model, ids)
    merged = merge_lora(copy.deepcopy(model))
    torch.testing.assert_close(logits(merged, ids), reference, rtol=1e-5, atol=1e-5)


def test_requantize_without_unload_keeps_packed_tensors_not_dense_copies() -> None:
    pytest.importorskip("bitsandbytes")
    from lightning_lora.surgery import QuantConfig, quantize_model

    model = tiny_llama(num_layers=2)
    quantize_model(model, QuantConfig())
    apply_lora(model, QV)
    perturb_lora_B(model, std=0.05)
    before = state_snapshot(model)
    merge_lora(model, merge_base="requantize", unload=False)
    for _, layer in lora_layers(model):
        kept = [t for t in _tensors_held(layer) if t.is_floating_point() and t.shape == (layer.out_features, layer.in_features)]
        assert not kept, "a dense copy of the 4-bit weight is kept"
    unmerge_lora(model)
    for key, value in before.items():
        assert torch.equal(model.state_dict()[key], value), key


def _tensors_held(layer: nn.Module) -> list[torch.Tensor]:
    """Every tensor the wrapper holds outside its registered parameters and buffers (attributes, tuples)."""
    found, todo = [], [v for k, v in vars(layer).items() if not k.startswith("_modules") and k not in ("_parameters",
                                                                                                         "_buffers")]
    while todo:
        value = todo.pop()
        if isinstance(value, torch.Tensor):
            found.append(value)
        elif isinstance(value, (tuple, list)):
            todo.extend(value)
    return found
