"""prepare_for_kbit_training: each option explicit, its change and cost reported; checkpointing keeps the gradients."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lightning_lora import LoRAConfig, QuantConfig, apply_lora, prepare_for_kbit_training, quantize_model
from lightning_lora.surgery import KbitConfigError, SurgeryError, lora_layers
from tests.factories import input_ids, tiny_llama

bnb = pytest.importorskip("bitsandbytes")


def qlora_llama(dtype: torch.dtype = torch.float32) -> nn.Module:
    model = tiny_llama(num_layers=2).to(dtype)
    quantize_model(model, QuantConfig())
    torch.manual_seed(0)
    apply_lora(model, LoRAConfig(r=4, targets="all-linear"))
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B["default"].normal_(std=0.05)
    return model


def adapter_grads(model: nn.Module, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    model.train()
    model.zero_grad()
    model(input_ids=ids, labels=ids).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_norms_fp32_upcasts_only_norms_and_reports_the_bytes() -> None:
    model = qlora_llama(torch.bfloat16)
    report = prepare_for_kbit_training(model)  # defaults: norms only
    step = report.step("norms_fp32")
    assert step.enabled and len(step.changed) == 2 * 2 + 1  # two per block + the final norm
    assert step.param_bytes == report.param_bytes == 5 * 32 * 2  # 160 norm weights, bf16 -> fp32
    assert model.model.norm.weight.dtype == torch.float32
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16 and model.lm_head.weight.dtype == torch.bfloat16
    assert not report.step("input_grads").enabled and not report.step("gradient_checkpointing").enabled
    assert "norms_fp32" in str(report) and "+320 B" in str(report)
    again = prepare_for_kbit_training(model)
    assert again.step("norms_fp32").changed == [] and again.param_bytes == 0


def test_nothing_asked_changes_nothing() -> None:
    model = qlora_llama(torch.bfloat16)
    report = prepare_for_kbit_training(model, norms_fp32=False)
    assert report.param_bytes == 0 and all(not s.enabled for s in report.steps)
    assert model.model.norm.weight.dtype == torch.bfloat16


def test_input_grads_makes_embedding_output_require_grad_once() -> None:
    model = qlora_llama()
    report = prepare_for_kbit_training(model, norms_fp32=False, input_grads=True)
    assert report.step("input_grads").changed == ["model.embed_tokens"]
    prepare_for_kbit_training(model, norms_fp32=False, input_grads=True)
    assert len(model.model.embed_tokens._forward_hooks) == 1  # idempotent
    assert model.model.embed_tokens(input_ids()).requires_grad
    assert not model.model.embed_tokens.weight.requires_grad


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_keeps_adapter_gradients(reentrant: bool) -> None:
    model = qlora_llama()
    ids = input_ids(batch=2, seq=12)
    expected = adapter_grads(copy.deepcopy(model), ids)
    report = prepare_for_kbit_training(model, norms_fp32=False, gradient_checkpointing=True, reentrant=reentrant,
                                       input_grads=reentrant)
    assert report.step("gradient_checkpointing").enabled and model.model.gradient_checkpointing
    assert ("non-reentrant" in report.step("gradient_checkpointing").cost) != reentrant
    if not reentrant:  # transformers turns input gradients on by itself; not asked for, so turned off again
        assert not getattr(model, "_require_grads_hooks", None)
    got = adapter_grads(model, ids)
    assert got.keys() == expected.keys() and len(got) == 2 * 14
    for name, grad in expected.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_reentrant_checkpointing_without_input_grads_is_refused() -> None:
    model = qlora_llama()
    with pytest.raises(KbitConfigError, match=r"reentrant=True gradient checkpointing needs input_grads=True"):
        prepare_for_kbit_training(model, gradient_checkpointing=True, reentrant=True)
    assert not model.model.gradient_checkpointing


def test_models_without_embeddings_or_checkpointing_support_are_refused_before_any_change() -> None:
    mlp = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8)).to(torch.bfloat16)
    with pytest.raises(SurgeryError, match=r"input_grads=True: the model has no input embedding"):
        prepare_for_kbit_training(mlp, input_grads=True)
    with pytest.raises(SurgeryError, match=r"gradient_checkpointing=True: no module inside Sequential supports it"):
        prepare_for_kbit_training(mlp, gradient_checkpointing=True)
    assert mlp[1].weight.dtype == torch.bfloat16  # validated first: the norms were not upcast either
