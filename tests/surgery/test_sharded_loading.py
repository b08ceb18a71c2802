"""Meta-device build + loading from save_pretrained files, in one process (the sharded case: tests/callbacks/test_fsdp.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from lightning_lora import CheckpointMismatchError, LoRAConfig, apply_lora
from lightning_lora.surgery.training.sharded_loading import (
    has_meta_parameters,
    materialize_and_load_,
    parameters_on_meta,
    weight_files,
)
from tests.factories import tiny_llama


@pytest.mark.parametrize("max_shard_size", [None, "20KB"], ids=["one-file", "index"])
def test_meta_build_with_lora_loads_the_files_exactly(tmp_path: Path, max_shard_size: str | None) -> None:
    reference = tiny_llama(num_layers=2, tie=True).eval()
    reference.save_pretrained(tmp_path, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    assert (len(set(weight_files(tmp_path).values())) > 1) == (max_shard_size is not None)
    with parameters_on_meta():
        model = AutoModelForCausalLM.from_config(reference.config)
    assert has_meta_parameters(model) and all(b.device.type == "cpu" for b in model.buffers())  # rotary: real
    apply_lora(model, LoRAConfig(r=4, targets=["q_proj", "v_proj"]))
    read = materialize_and_load_(model, tmp_path, seed=3)
    assert not has_meta_parameters(model) and read == sum(p.numel() * 4 for p in reference.parameters())
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # B = 0: the adapted model is the base
        torch.testing.assert_close(model.eval()(input_ids=ids).logits, reference(input_ids=ids).logits, rtol=0, atol=0)
    a = model.model.layers[0].self_attn.q_proj.lora_A["default"]
    assert a.abs().sum() > 0 and model.model.layers[0].self_attn.q_proj.lora_B["default"].abs().sum() == 0
    with parameters_on_meta():
        again = AutoModelForCausalLM.from_config(reference.config)
    apply_lora(again, LoRAConfig(r=4, targets=["q_proj", "v_proj"]))
    materialize_and_load_(again, tmp_path, seed=3)
    assert torch.equal(again.model.layers[0].self_attn.q_proj.lora_A["default"], a)  # same seed, same init


def test_files_of_another_model_are_refused_before_reading(tmp_path: Path) -> None:
    tiny_llama(num_layers=1).save_pretrained(tmp_path)
    with parameters_on_meta():
        model = AutoModelForCausalLM.from_config(tiny_llama(num_layers=2).config)
    with pytest.raises(CheckpointMismatchError, match=r"lacks \d+ weight\(s\).*layers\.1\."):
        materialize_and_load_(model, tmp_path)
    assert has_meta_parameters(model)  # nothing allocated
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        weight_files(tmp_path / "nothing")
