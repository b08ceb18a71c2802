"""TrainableParameters: the report's numbers against a hand count, printing on rank zero, logging."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from lightning_lora import LoRAConfig
from lightning_lora.callbacks import LoRAFinetuning, TrainableParameters
from lightning_lora.surgery.training.summary import summarize_parameters
from tests.callbacks.models import TinyLlamaModule, trainer

# tiny_llama(num_layers=2): hidden 32, 4 heads of 8, 2 KV heads (k/v out 16), MLP 64, vocab 128, untied head.
BASE = 128 * 32 + 2 * (32 * 32 + 32 * 16 + 32 * 16 + 32 * 32 + 3 * 32 * 64 + 2 * 32) + 32 + 128 * 32  # 26,784
# LoRA r=4 on q_proj (32 -> 32) and v_proj (32 -> 16): r * (in + out) each, two blocks.
Q, V = 4 * (32 + 32), 4 * (32 + 16)
ADAPTER = 2 * (Q + V)  # 896


def test_report_matches_a_hand_count_and_is_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    callback = TrainableParameters()
    t = trainer(tmp_path, [LoRAFinetuning(LoRAConfig(r=4, targets=["q_proj", "v_proj"]), module="model"), callback],
                max_steps=1, logger=CSVLogger(tmp_path, name="logs"))
    with caplog.at_level(logging.INFO):
        t.fit(TinyLlamaModule())
    summary = callback.summary
    assert (summary.trainable, summary.total) == (ADAPTER, BASE + ADAPTER)
    assert summary.percent == pytest.approx(100 * 896 / 27680)
    assert summary.by_kind == {"q_proj": 2 * Q, "v_proj": 2 * V}
    assert summary.by_block == {"block 0": Q + V, "block 1": Q + V}
    assert (summary.adapter_params, summary.adapter_bytes) == (ADAPTER, ADAPTER * 4)
    assert summary.gradient_bytes == ADAPTER * 4
    assert (summary.optimizer, summary.optimizer_states, summary.optimizer_bytes) == ("AdamW", 2, 2 * ADAPTER * 4)
    assert summary.weight_bytes >= (BASE + ADAPTER) * 4
    assert "Trainable parameters: 896 of 27,680 (3.2370%)" in caplog.text
    assert "by kind:  q_proj 512, v_proj 384" in caplog.text
    t.loggers[0].save()
    rows = list(csv.DictReader(open(Path(t.loggers[0].log_dir) / "metrics.csv")))
    assert float(rows[0]["params/trainable"]) == ADAPTER and float(rows[0]["params/total"]) == BASE + ADAPTER


def test_full_fine_tuning_counts_everything_and_sgd_without_momentum_has_no_state() -> None:
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    summary = summarize_parameters(model, torch.optim.SGD(model.parameters(), lr=0.1))
    assert (summary.trainable, summary.total) == (4 * 3 + 3 + 3 * 2 + 2,) * 2
    assert summary.by_kind == {"0": 15, "1": 8} and summary.by_block == {"other": 23}
    assert (summary.optimizer_states, summary.optimizer_bytes) == (0, 0)
    assert summarize_parameters(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)).optimizer_bytes == 23 * 4


def test_4bit_packed_weights_count_two_parameters_per_byte() -> None:
    pytest.importorskip("bitsandbytes")
    from lightning_lora.surgery.quant.config import QuantConfig
    from lightning_lora.surgery.quant.quantize import quantize_model

    model = nn.Sequential(nn.Linear(64, 64, bias=False), nn.Linear(64, 8))
    quantize_model(model, QuantConfig(targets=["0"], compute_dtype="float32"))
    summary = summarize_parameters(model)
    assert summary.total == 64 * 64 + 64 * 8 + 8
    packed = model[0].weight
    assert packed.numel() * packed.element_size() == 64 * 64 // 2  # half a byte per weight
    assert summary.weight_bytes >= 64 * 64 // 2 + (64 * 8 + 8) * 4


def test_uniform_blocks_are_one_entry_in_the_report() -> None:
    from lightning_lora import LoRAConfig, apply_lora
    from tests.factories import tiny_llama

    model = tiny_llama()
    apply_lora(model, LoRAConfig(r=2, targets=["q_proj"]))
    table = summarize_parameters(model).table()
    per_block = summarize_parameters(model).by_block["block 0"]
    assert f"by block: blocks 0-3 {per_block:,} each" in table
    model = tiny_llama()
    apply_lora(model, LoRAConfig(r=2, targets=["q_proj"], rank_pattern={r"layers\.1\.self_attn\.q_proj": 4}))
    by_block = summarize_parameters(model).by_block
    assert f"by block: block 0 {per_block:,}, block 1 {by_block['block 1']:,}, blocks 2-3 {per_block:,} each" in (
        summarize_parameters(model).table())
