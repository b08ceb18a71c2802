"""ForgettingMonitor in real Trainer runs: KL exactly 0 while nothing changed, growing as the adapter trains."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_lora import LoRAConfig, disable_adapters
from lightning_lora.callbacks import ForgettingMonitor, LoRAFinetuning
from lightning_lora.data.reference import GENERAL_REFERENCE
from tests.tiny_lm import build_tiny_causal_lm


class TinyLM(L.LightningModule):
    """A tiny Llama trained to repeat one token pattern (far from its random-init behaviour on general text)."""

    def __init__(self, lr: float = 0.02) -> None:
        super().__init__()
        self.model, self.tokenizer = build_tiny_causal_lm(seed=0)
        self.model.train()
        self.lr = lr

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.model(input_ids=batch[0], labels=batch[0]).loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        pass

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.lr)

    def train_dataloader(self) -> DataLoader:
        pattern = torch.arange(40, 56).repeat(4, 1)  # (4, 16)
        return DataLoader(TensorDataset(pattern), batch_size=2)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(torch.zeros(1, 2, dtype=torch.long)), batch_size=1)


def _fit(module: TinyLM, monitor: ForgettingMonitor, tmp_path: Path, lora: bool = True, steps: int = 6) -> L.Trainer:
    callbacks = ([LoRAFinetuning(LoRAConfig(r=4, targets="all-linear"), module="model")] if lora else []) + [monitor]
    trainer = L.Trainer(accelerator="cpu", max_steps=steps, val_check_interval=2, check_val_every_n_epoch=None,
                        logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, default_root_dir=tmp_path, num_sanity_val_steps=0,
                        callbacks=callbacks)
    trainer.fit(module)
    return trainer


def test_kl_is_exactly_zero_while_b_is_zero(tmp_path: Path) -> None:
    monitor = ForgettingMonitor(max_length=24)
    _fit(TinyLM(lr=0.0), monitor, tmp_path, steps=4)
    assert [h["kl"] for h in monitor.history] == [0.0, 0.0]


def test_kl_grows_as_the_adapter_trains_and_is_zero_with_adapters_disabled(tmp_path: Path) -> None:
    module, monitor = TinyLM(), ForgettingMonitor(max_length=24)
    _fit(module, monitor, tmp_path)
    kls = [h["kl"] for h in monitor.history]
    assert len(kls) == 3 and 0 < kls[0] < kls[1] < kls[2], kls
    assert monitor.history[-1]["ppl"] != monitor.history[0]["ppl"]  # a random-init base: either direction
    with disable_adapters(module.model):
        assert monitor.measure(module)["kl"] == 0.0


def test_cached_statistics_without_lora_and_as_a_lower_bound(tmp_path: Path) -> None:
    full = ForgettingMonitor(max_length=24, top_k=8)  # full fine-tuning: nothing to switch off, so cached
    _fit(TinyLM(lr=0.002), full, tmp_path, lora=False, steps=4)
    assert full._stats is not None and 0 < full.history[0]["kl"] < full.history[1]["kl"]
    module, live, cached = TinyLM(), ForgettingMonitor(max_length=24), ForgettingMonitor(max_length=24, base="cached")
    _fit(module, live, tmp_path, steps=2)
    with disable_adapters(module.model):
        cached.on_fit_start(None, module)  # type: ignore[arg-type] - statistics of the base, as at fit start
        assert cached.measure(module)["kl"] == 0.0
    assert 0 < cached.measure(module)["kl"] <= live.measure(module)["kl"]


def test_self_references_and_stop_threshold(tmp_path: Path) -> None:
    monitor = ForgettingMonitor("self", max_length=24, self_new_tokens=4, stop_kl=1e-9)
    trainer = _fit(TinyLM(), monitor, tmp_path)
    assert trainer.global_step == 2 and len(monitor.history) == 1  # stopped at the first validation above stop_kl
    assert len(monitor._ids or []) == len(GENERAL_REFERENCE) and all(len(ids) == 16 for ids in monitor._ids or [])


def test_state_round_trips_for_resume() -> None:
    monitor = ForgettingMonitor(max_length=8, base="cached")
    module = TinyLM()
    monitor.on_fit_start(None, module)  # type: ignore[arg-type]
    restored = ForgettingMonitor(max_length=8, base="cached")
    restored.load_state_dict(monitor.state_dict())
    restored.on_fit_start(None, module)  # type: ignore[arg-type]
    assert restored.measure(module) == monitor.measure(module)


def test_bad_options_are_named() -> None:
    with pytest.raises(ValueError, match="references='nope.txt'"):
        ForgettingMonitor("nope.txt")
    with pytest.raises(ValueError, match="base='both'"):
        ForgettingMonitor(base="both")  # type: ignore[arg-type]


def test_cached_statistics_on_a_bf16_frozen_base_with_fp32_trained_blocks() -> None:
    """dtype="auto" with layer freezing: frozen weights in bf16 beside fp32 trainable ones. A plain forward mixes
    dtypes and fails; the monitor measures under autocast, as the module's own steps do."""
    from lightning_lora.callbacks.forgetting import _mixed_precision_autocast
    from lightning_lora.modules.precision import cast_frozen_
    from lightning_lora.surgery.diagnostics.forgetting import ReferenceBatch, reference_statistics
    from tests.factories import tiny_llama

    model = tiny_llama(num_layers=2)
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith("model.norm"))
    cast_frozen_(model, torch.bfloat16)
    batch = ReferenceBatch(ids=torch.randint(3, 100, (2, 6)), mask=torch.ones(2, 6, dtype=torch.long))
    with pytest.raises(RuntimeError, match="dtype"):
        reference_statistics(model, batch, 4)
    with _mixed_precision_autocast(model):
        stats = reference_statistics(model, batch, 4)
    tensors = _tensors(stats)
    assert tensors and all(torch.isfinite(t).all() for t in tensors)


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return [t for v in vars(value).values() for t in _tensors(v)] if hasattr(value, "__dict__") else []
