"""LoRA on a tied lm_head (GPT-2; Llama with tie_word_embeddings, as SmolLM2): merging must not write into the input
embedding, the export must reload with the same outputs, and the plan says the head is tied (issue 10)."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from lightning_lora.surgery import (
    LoRAConfig,
    apply_lora,
    export_merged,
    merge_lora,
    plan_lora,
    unmerge_lora,
)
from tests.factories import input_ids, logits, perturb_lora_B, tiny_gpt2, tiny_llama

CASES: dict[str, tuple[Callable[[], nn.Module], list[str], str]] = {
    "gpt2": (tiny_gpt2, ["c_attn", "lm_head"], "transformer.wte.weight"),
    "llama_tied": (lambda: tiny_llama(num_layers=2, tie=True), ["q_proj", "lm_head"], "model.embed_tokens.weight"),
}


@pytest.fixture(scope="module", params=list(CASES))
def adapted(request: pytest.FixtureRequest) -> tuple[nn.Module, str]:
    build, targets, embedding = CASES[request.param]
    model = build()
    assert model.lm_head.weight is model.get_input_embeddings().weight  # the premise: tied
    apply_lora(model, LoRAConfig(r=2, targets=targets))
    perturb_lora_B(model, std=0.2)
    return model, embedding


def test_plan_says_the_head_is_tied() -> None:
    for build, targets, embedding in CASES.values():
        plan = plan_lora(build(), LoRAConfig(r=2, targets=targets))
        head = next(layer for layer in plan.layers if layer.name == "lm_head")
        assert head.tied_with == (embedding,)
        assert f"lm_head: weight tied with {embedding}; merging unties it" in plan.table()
        assert all(not layer.tied_with for layer in plan.layers if layer.name != "lm_head")


def test_merge_unties_the_head_and_leaves_the_embedding_alone(adapted: tuple[nn.Module, str]) -> None:
    model, embedding = adapted
    ids = input_ids()
    reference = logits(model, ids)
    embedding_before = model.get_submodule(embedding.rsplit(".", 1)[0]).weight.detach().clone()
    merged = merge_lora(copy.deepcopy(model))
    torch.testing.assert_close(logits(merged, ids), reference, rtol=1e-4, atol=1e-4)  # was ~20 with the tie kept
    assert torch.equal(merged.get_input_embeddings().weight, embedding_before)
    assert merged.lm_head.weight is not merged.get_input_embeddings().weight
    assert merged.config.tie_word_embeddings is False


def test_unmerge_ties_the_head_again(adapted: tuple[nn.Module, str]) -> None:
    model = copy.deepcopy(adapted[0])
    ids = input_ids()
    reference = logits(model, ids)
    merge_lora(model, unload=False)
    torch.testing.assert_close(logits(model, ids), reference, rtol=1e-4, atol=1e-4)
    unmerge_lora(model)
    assert model.lm_head.base_layer.weight is model.get_input_embeddings().weight
    assert torch.equal(logits(model, ids), reference)


def test_export_reloads_with_from_pretrained_to_the_same_outputs(adapted: tuple[nn.Module, str], tmp_path: Path) -> None:
    model, _ = adapted
    ids = input_ids()
    reference = logits(model, ids)
    report = export_merged(model, tmp_path / "export")
    assert report.max_abs_diff is not None and report.max_abs_diff < 1e-4
    config = json.loads((tmp_path / "export" / "merged" / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "export" / "merged").eval()
    assert reloaded.lm_head.weight is not reloaded.get_input_embeddings().weight
    torch.testing.assert_close(logits(reloaded, ids), reference, rtol=1e-4, atol=1e-4)
    assert model.lm_head.base_layer.weight is model.get_input_embeddings().weight  # the model in memory: still tied


def test_qlora_merge_leaves_the_tied_embedding_alone() -> None:
    pytest.importorskip("bitsandbytes")
    from lightning_lora.surgery import QuantConfig, quantize_model

    model = tiny_llama(num_layers=2, tie=True)
    quantize_model(model, QuantConfig())  # the head stays dense (and tied)
    apply_lora(model, LoRAConfig(r=2, targets=["q_proj", "lm_head"]))
    perturb_lora_B(model, std=0.2)
    ids = input_ids()
    reference = logits(model, ids)
    embedding = model.get_input_embeddings().weight.detach().clone()
    merged = merge_lora(model)  # the quantized-base merge path
    assert torch.equal(merged.get_input_embeddings().weight, embedding)
    torch.testing.assert_close(logits(merged, ids), reference, rtol=1e-4, atol=1e-4)
