"""AdapterHealth in real Trainer runs: each injected silent failure gives its named error or warning; none when healthy."""

from __future__ import annotations

import dataclasses
import logging
import math
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from lightning_lora import LoRAConfig, apply_lora
from lightning_lora.callbacks import AdapterHealth, AdapterHealthError, LoRAFinetuning
from lightning_lora.surgery import lora_layers
from lightning_lora.surgery.diagnostics.health import adapter_units, relative_update_sizes
from lightning_lora.surgery.errors import NonFiniteError
from tests.callbacks.models import TinyModule, trainer

LORA = LoRAConfig(r=4, alpha=8)


def _health_warnings(record: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in record if "AdapterHealth" in str(w.message)]


def _fit(tmp_path: Path, module: Any, health: AdapterHealth, *, lora: bool = True, extra: list | None = None,
         **kwargs: Any) -> list[str]:
    callbacks = ([LoRAFinetuning(LORA, module="model")] if lora else []) + (extra or []) + [health]
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer(tmp_path, callbacks, **kwargs).fit(module)
    return _health_warnings(record)


def test_healthy_run_logs_update_sizes_and_warns_nothing(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    health = AdapterHealth(log_every_n_steps=2)
    logger = CSVLogger(tmp_path, name="csv")
    with caplog.at_level(logging.INFO):
        found = _fit(tmp_path, TinyModule(), health, max_steps=4, logger=logger)
    assert found == []
    assert len(health.update_sizes) == 4 and all(v > 0 for v in health.update_sizes.values())  # 2 layers x (q, v)
    metrics = (Path(logger.log_dir) / "metrics.csv").read_text()
    assert "adapter_health/update_mean" in metrics and "adapter_health/update/model.layers.0.q_proj" in metrics
    assert any("AdapterHealth: 4 adapter layer(s)" in r.getMessage() for r in caplog.records)


def test_adapters_missing_from_the_optimizer_are_named(tmp_path: Path) -> None:
    module = TinyModule(optimizer_params="captured")  # optimizer built before the adapters existed
    apply_lora(module.model, LORA)
    with pytest.raises(AdapterHealthError, match=r"layers\.0\.q_proj: lora_A, lora_B in no optimizer param group"):
        _fit(tmp_path, module, AdapterHealth(), lora=False)


class _Inject(Callback):
    """Changes the adapters right after the LoRA surgery (at fit start, before AdapterHealth looks)."""

    def __init__(self, change: Any) -> None:
        self.change = change

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        self.change(pl_module)


def _first_layer(pl_module: Any) -> Any:
    return lora_layers(pl_module)[0][1]


@pytest.mark.parametrize(("change", "message"), [
    (lambda m: setattr(_first_layer(m), "disabled", True), r"layers\.0\.q_proj: adapter 'default' is not active"),
    (lambda m: _first_layer(m).specs.update(default=dataclasses.replace(_first_layer(m).specs["default"], alpha=0.0)),
     r"layers\.0\.q_proj: scale 0\.0 \(alpha / r\) must be finite and > 0"),
    (lambda m: _first_layer(m).lora_A["default"].data.zero_(), r"layers\.0\.q_proj: all of lora_A, lora_B are zero"),
], ids=["disabled", "alpha-zero", "both-zero"])
def test_setup_problems_stop_before_the_first_step(tmp_path: Path, change: Any, message: str) -> None:
    with pytest.raises(AdapterHealthError, match=message):
        _fit(tmp_path, TinyModule(), AdapterHealth(), extra=[_Inject(change)])


def test_partly_frozen_adapter_is_a_warning_not_an_error(tmp_path: Path) -> None:
    found = _fit(tmp_path, TinyModule(), AdapterHealth(),
                 extra=[_Inject(lambda m: _first_layer(m).lora_A["default"].requires_grad_(False))])  # LoRA-FA style
    assert len(found) == 1 and "train only part of their tensors (frozen: model.layers.0.q_proj: lora_A)" in found[0]


class _WithUnusedLayer(TinyModule):
    """An adapted layer that is not on the path to the loss."""

    def __init__(self) -> None:
        super().__init__()
        self.model.unused = nn.Linear(32, 32)


def test_layer_without_gradient_is_named(tmp_path: Path) -> None:
    config = LoRAConfig(r=4, targets=["q_proj", "unused"])
    module = _WithUnusedLayer()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer(tmp_path, [LoRAFinetuning(config, module="model"), AdapterHealth()], max_steps=1).fit(module)
    found = _health_warnings(record)
    assert len(found) == 1 and "1 of 3 adapter layer(s) got no gradient" in found[0] and "model.unused" in found[0]
    assert "q_proj" not in found[0].split("first backward pass:")[1].split("\n")[0]


def test_layers_that_never_change_are_warned(tmp_path: Path) -> None:
    found = _fit(tmp_path, TinyModule(lr=0.0), AdapterHealth(log_every_n_steps=2), max_steps=2)
    assert len(found) == 1 and "4 adapter layer(s) have not changed the model" in found[0]
    assert "model.layers.1.v_proj" in found[0]


class _NaNAt(TinyModule):
    """Loss becomes NaN (through the graph) or +inf (a constant: gradients stay finite) at one step."""

    def __init__(self, step: int, kind: str = "nan", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.bad_step, self.kind = step, kind

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        if self.trainer.global_step == self.bad_step:
            loss = loss * math.nan if self.kind == "nan" else loss + math.inf
        return loss


def test_nan_loss_stops_at_that_step_with_adapters_still_finite(tmp_path: Path) -> None:
    module = _NaNAt(step=1)
    with pytest.raises(NonFiniteError, match=r"Non-finite gradients of model\.layers\.0\.q_proj\.lora_A.* at step 1"):
        _fit(tmp_path, module, AdapterHealth(), max_steps=4)
    assert all(torch.isfinite(t).all() for u in adapter_units(module) for t in u.tensors.values())


def test_inf_loss_with_finite_gradients_stops_naming_the_loss(tmp_path: Path) -> None:
    with pytest.raises(NonFiniteError, match=r"Non-finite loss at step 2"):
        _fit(tmp_path, _NaNAt(step=2, kind="inf"), AdapterHealth(), max_steps=4)


def test_skip_drops_the_batch_and_trains_on(tmp_path: Path) -> None:
    module, health = _NaNAt(step=1), AdapterHealth(on_nonfinite="skip")
    found = _fit(tmp_path, module, health, max_steps=3)
    assert health.skipped_steps == [1] and len(found) == 1 and "step 1; skipped" in found[0]
    assert all(v > 0 and math.isfinite(v) for v in relative_update_sizes(adapter_units(module)).values())


def test_nonfinite_gradient_names_the_layer(tmp_path: Path) -> None:
    def poison(pl_module: Any) -> None:
        lora_layers(pl_module)[3][1].lora_B["default"].register_hook(lambda g: g * math.inf)

    with pytest.raises(NonFiniteError, match=r"gradients of model\.layers\.1\.v_proj\.lora_B at step 0"):
        _fit(tmp_path, TinyModule(), AdapterHealth(), extra=[_Inject(poison)])


class _PoisonWeightAfterStep(Callback):
    def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
        if trainer.global_step == 2:
            lora_layers(pl_module)[2][1].lora_A["default"].data[0, 0] = math.nan


def test_nonfinite_weight_names_the_layer_and_step(tmp_path: Path) -> None:
    with pytest.raises(NonFiniteError, match=r"weights at step 2: model\.layers\.1\.q_proj\.lora_A"):
        _fit(tmp_path, TinyModule(), AdapterHealth(), extra=[_PoisonWeightAfterStep()], max_steps=4)


def test_bad_options_are_named() -> None:
    with pytest.raises(ValueError, match="on_nonfinite='halt'"):
        AdapterHealth(on_nonfinite="halt")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="log_every_n_steps=0"):
        AdapterHealth(log_every_n_steps=0)


def test_fp16_gradscaler_overflow_is_left_to_the_scaler(tmp_path: Path) -> None:
    """Under fp16 mixed precision an occasional overflow is normal: GradScaler skips the step and lowers the scale."""
    from lightning.pytorch.plugins import MixedPrecision

    def overflow_at_step_1(pl_module: Any) -> None:
        trainer_ref = pl_module.trainer
        lora_layers(pl_module)[0][1].lora_B["default"].register_hook(
            lambda g: g * math.inf if trainer_ref.global_step == 1 else g)

    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    health = AdapterHealth()
    found = _fit(tmp_path, TinyModule(), health, extra=[_Inject(overflow_at_step_1)], max_steps=3, plugins=[plugin])
    assert found == [] and health.skipped_steps == [] and plugin.scaler.get_scale() < 65536.0
