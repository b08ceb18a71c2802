"""QLoRA through the callbacks, with a real Trainer on CPU: LoRAFinetuning(quantize=...) quantizes then injects before
the optimizer exists; TrainableParameters counts the 4-bit base at its dense size; MergeAndExport(merge_base=...)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from typing_extensions import override

from lightning_lora import LoRAConfig, QuantConfig, quantize_model
from lightning_lora.surgery import count_parameters, lora_layers
from lightning_lora.surgery.quant.bnb4bit import is_linear4bit
from lightning_lora.surgery.training.summary import summarize_parameters
from tests.factories import input_ids, tiny_llama

bnb = pytest.importorskip("bitsandbytes")
callbacks = pytest.importorskip("lightning_lora.callbacks")


class TinyLM(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = tiny_llama(num_layers=2).train()
        self.losses: list[float] = []

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss = self.model(input_ids=batch, labels=batch).loss
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-2)


class Snapshot(pl.Callback):
    """Records the model's frozen state and the optimizer's parameters when fit starts."""

    def __init__(self) -> None:
        self.frozen: dict[str, torch.Tensor] = {}
        self.optimized: list[torch.Tensor] = []

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.frozen = {k: v.clone() for k, v in pl_module.state_dict().items() if ".lora_" not in k}
        self.optimized = [p for group in trainer.optimizers[0].param_groups for p in group["params"]]


def data() -> torch.utils.data.DataLoader:
    ids = input_ids(batch=8, seq=16)
    return torch.utils.data.DataLoader(list(ids), batch_size=4)


def fit(tmp_path: Path, *extra: pl.Callback, **finetuning: Any) -> tuple[TinyLM, pl.Trainer]:
    module = TinyLM()
    lora = callbacks.LoRAFinetuning(LoRAConfig(r=4, targets="all-linear"), module="model", **finetuning)
    trainer = pl.Trainer(accelerator="cpu", max_steps=6, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                         callbacks=[lora, *extra])
    trainer.fit(module, data())
    return module, trainer


def test_lora_finetuning_quantizes_then_injects_before_the_optimizer(tmp_path: Path) -> None:
    snapshot = Snapshot()
    module, _ = fit(tmp_path, snapshot, quantize=QuantConfig())
    layers = lora_layers(module.model)
    assert len(layers) == 2 * 7 and all(is_linear4bit(layer.base_layer) for _, layer in layers)
    adapters = {id(p) for _, layer in layers for d in (layer.lora_A, layer.lora_B) for p in d.values()}
    assert {id(p) for p in snapshot.optimized} == adapters  # adapters only, all of them, fp32
    assert all(p.dtype == torch.float32 for p in snapshot.optimized)
    after = module.state_dict()
    for key, value in snapshot.frozen.items():  # the 4-bit base (packed data and statistics) did not move
        assert torch.equal(after[key], value), key
    assert module.losses[-1] < module.losses[0]


def test_lora_finetuning_accepts_quantize_as_a_mapping(tmp_path: Path) -> None:
    module, _ = fit(tmp_path, quantize={"quant_type": "fp4", "double_quant": False, "targets": ["q_proj", "v_proj"]})
    q_proj = module.model.model.layers[0].self_attn.q_proj.base_layer
    assert is_linear4bit(q_proj) and q_proj.weight.quant_state.quant_type == "fp4"
    assert not is_linear4bit(module.model.model.layers[0].mlp.up_proj.base_layer)


def test_trainable_parameters_counts_the_4bit_base_at_its_dense_size(tmp_path: Path) -> None:
    dense_total = count_parameters(tiny_llama(num_layers=2))[1]
    report = callbacks.TrainableParameters(log=False)
    fit(tmp_path, report, quantize=QuantConfig())
    adapter_params = 2 * (4 * (32 + 32) * 2 + 4 * (32 + 16) * 2 + 4 * (32 + 64) * 3)  # q,o + k,v + gate,up,down
    assert report.summary.adapter_params == report.summary.trainable == adapter_params
    assert report.summary.total == dense_total + adapter_params


def test_summary_with_bf16_quant_storage() -> None:
    model = nn.Sequential(nn.Linear(64, 64, bias=False))
    quantize_model(model, QuantConfig(targets="0", quant_storage="bfloat16"))
    assert model[0].weight.dtype == torch.bfloat16 and model[0].weight.numel() == 64 * 64 // 4
    assert summarize_parameters(model).total == 64 * 64 == count_parameters(model)[1]


@pytest.mark.parametrize("merge_base", ["dequantized", "requantize"])
def test_merge_and_export_passes_the_merge_base(tmp_path: Path, merge_base: str) -> None:
    export = callbacks.MergeAndExport(tmp_path / "export", module="model", merge_base=merge_base)
    module, _ = fit(tmp_path, export, quantize=QuantConfig())
    report = json.loads((tmp_path / "export" / "export.json").read_text())
    assert lora_layers(module.model) and is_linear4bit(module.model.model.layers[0].self_attn.q_proj.base_layer)
    if merge_base == "dequantized":
        assert report["max_abs_diff"] < 1e-4  # a dense model that reproduces the trained QLoRA model
        from transformers import AutoModelForCausalLM

        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "export" / "merged")
        assert type(merged.model.layers[0].self_attn.q_proj) is nn.Linear
    else:
        assert report["max_abs_diff"] > 1e-4  # the update is rounded into the 4-bit weights
        from transformers import AutoModelForCausalLM

        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "export" / "merged", device_map="cpu")
        assert is_linear4bit(merged.model.layers[0].self_attn.q_proj)  # saved with its BitsAndBytesConfig


@pytest.mark.parametrize("merge_base", ["original", "fp16"])
def test_merge_and_export_refuses_bases_it_cannot_do_before_training(tmp_path: Path, merge_base: str) -> None:
    with pytest.raises(ValueError, match=rf"MergeAndExport\(merge_base='{merge_base}'\): use 'dequantized' or 'requantize'"):
        callbacks.MergeAndExport(tmp_path, merge_base=merge_base)
