"""``AdapterHealth``: catch the silent failures of adapter training while it runs.

Thin over :mod:`lightning_lora.surgery.diagnostics.health`. Hooks, in ``fit`` order:

* ``on_fit_start`` (the optimizer exists): every trainable adapter tensor is in an optimizer, the adapter is active,
  its scale (alpha / r) is finite and > 0, and not all of its tensors are zero -- else :class:`AdapterHealthError`;
  layers that train only some of their tensors get a warning (LoRA-FA freezes A on purpose).
* ``on_before_backward``: remembers whether the loss is finite.
* ``on_after_backward``, first time only: every adapter *layer* got a non-zero gradient in one of its tensors (per
  layer: with B = 0 at start, A's first gradient is zero by design); the layers that got none are named in a warning.
* ``on_before_optimizer_step``: a non-finite loss or adapter gradient stops training (``on_nonfinite="stop"``, raising
  :class:`~lightning_lora.surgery.errors.NonFiniteError` naming the layers and step) or skips the optimizer step
  (``"skip"``). Under DDP the decision is reduced across ranks, so every rank stops or skips together.
* ``on_train_batch_end``: adapter weights must stay finite; every ``log_every_n_steps`` the per-layer relative update
  ``||scale * B A||_F / ||W||_F`` goes to the loggers, with a warning naming the layers still at exactly zero.
* ``on_train_end``: a one-line summary.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

from lightning_lora.callbacks._checked_io import install_checked_io
from lightning_lora.surgery.diagnostics.health import (
    AdapterUnit,
    adapter_units,
    describe,
    nonfinite_tensors,
    partly_frozen,
    pre_training_problems,
    relative_update_sizes,
    units_without_grad,
)
from lightning_lora.surgery.errors import NonFiniteError

log = logging.getLogger(__name__)


class AdapterHealthError(RuntimeError):
    """The adapters cannot learn as set up (not in the optimizer, inactive, zero scale, all-zero factors)."""


class AdapterHealth(Callback):
    """Check that adapters train: in the optimizer, receiving gradients, changing the model, and staying finite.

    On by default in the ``lightning-lora`` CLI (``--health null`` turns it off). In Python, add it to the Trainer's
    callbacks next to :class:`~lightning_lora.callbacks.LoRAFinetuning`.

    Args:
        log_every_n_steps: Log the per-layer relative update size every this many optimizer steps. Default: 50.
        on_nonfinite: What a non-finite loss or adapter gradient does: ``"stop"`` raises ``NonFiniteError`` naming
            the layers and the step; ``"skip"`` drops that batch's gradients and skips the optimizer step, as
            mixed-precision training does with an overflow. Default: ``"stop"``.
        log_per_layer: Log one metric per layer (``adapter_health/update/<layer>``) besides the mean and max.
            Default: True.

    Example:
        >>> import lightning as L
        >>> from lightning_lora.callbacks import AdapterHealth, LoRAFinetuning
        >>> trainer = L.Trainer(callbacks=[LoRAFinetuning(module="model"), AdapterHealth(on_nonfinite="skip")])
    """

    def __init__(self, log_every_n_steps: int = 50, on_nonfinite: Literal["stop", "skip"] = "stop",
                 log_per_layer: bool = True) -> None:
        if not isinstance(log_every_n_steps, int) or log_every_n_steps < 1:
            raise ValueError(f"log_every_n_steps={log_every_n_steps!r}: give a positive integer, e.g. 50.")
        if on_nonfinite not in ("stop", "skip"):
            raise ValueError(f"on_nonfinite={on_nonfinite!r}: valid values are 'stop' and 'skip'.")
        self.log_every_n_steps = log_every_n_steps
        self.on_nonfinite = on_nonfinite
        self.log_per_layer = log_per_layer
        self.update_sizes: dict[str, float] = {}
        self.skipped_steps: list[int] = []
        self._units: list[AdapterUnit] = []
        self._grads_checked = False
        self._loss_nonfinite = False
        self._warned_zero: set[str] = set()
        self._last_logged_step = -1

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        install_checked_io(trainer)

    # ------------------------------------------------------------------------------------------------ before training
    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._units = adapter_units(pl_module)
        self._grads_checked = False
        if not self._units:
            log.info("AdapterHealth: the model has no adapter layers; only the loss is checked.")
            return
        frozen = partly_frozen(self._units)
        if frozen:
            rank_zero_warn(f"AdapterHealth: {len(frozen)} adapter layer(s) train only part of their tensors (frozen: "
                           f"{describe(frozen)}). Intended for LoRA-FA (A frozen); otherwise call "
                           "set_trainable(model, name) after changing requires_grad.")
        params = [p for opt in trainer.optimizers for group in opt.param_groups for p in group["params"]]
        problems = pre_training_problems(self._units, params)
        if problems:
            raise AdapterHealthError(
                f"{len(problems)} adapter problem(s) would make training a silent no-op for these layers:\n  - "
                + "\n  - ".join(problems[:20])
                + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
                + "\nHINT: build the optimizer in configure_optimizers from `p for p in self.parameters() if "
                "p.requires_grad`; keep adapters active (set_active_adapters / no disable_adapters around training); "
                "use alpha > 0.")

    # ------------------------------------------------------------------------------------------------ each step
    @override
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        if not bool(torch.isfinite(loss.detach()).all()):
            self._loss_nonfinite = True

    @override
    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._grads_checked or not self._units or self._loss_nonfinite:
            return
        self._grads_checked = True
        silent = units_without_grad(self._units)
        if silent:
            rank_zero_warn(
                f"AdapterHealth: {len(silent)} of {len(self._units)} adapter layer(s) got no gradient in the first "
                f"backward pass: {describe([u.label for u in silent])}.\nThe usual causes: the layer is not on the "
                "path from the inputs to the loss (e.g. a pooler or head the loss does not use, or blocks after an early "
                "exit), the adapter is disabled or not active in forward, or the module's forward bypasses the "
                "wrapper (a fused kernel reading the base weight directly).\nHINT: target only the layers the loss "
                "depends on, and check `lightning-lora plan` for what is wrapped.")

    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        bad_grads = [] if _scaler_handles_overflow(trainer) else nonfinite_tensors(self._units, grads=True)
        local = self._loss_nonfinite or bool(bad_grads)
        self._loss_nonfinite = False
        if not trainer.strategy.reduce_boolean_decision(local, all=False):  # any rank: every rank acts together
            return
        step = trainer.global_step
        where = "loss" if not bad_grads else f"gradients of {describe(bad_grads)}"
        if self.on_nonfinite == "skip":
            optimizer.zero_grad(set_to_none=True)  # params without a gradient are left alone by the step
            self.skipped_steps.append(step)
            rank_zero_warn(f"AdapterHealth: non-finite {where} at step {step}; skipped this optimizer step "
                           f"({len(self.skipped_steps)} skipped so far).")
            return
        raise NonFiniteError(
            f"Non-finite {where} at step {step} (on this or another rank); training stopped before the optimizer "
            "step, so the adapters are still finite.\nHINT: lower the learning rate, clip gradients "
            "(Trainer(gradient_clip_val=1.0)), use bf16 instead of fp16, or pass AdapterHealth(on_nonfinite='skip') "
            "to skip such batches.")

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not self._units:
            return
        bad = nonfinite_tensors(self._units)
        if trainer.strategy.reduce_boolean_decision(bool(bad), all=False):
            raise NonFiniteError(f"Non-finite adapter weights at step {trainer.global_step}: "
                                 f"{describe(bad) or '(on another rank)'}.\nHINT: lower the learning rate or clip "
                                 "gradients; resume from the last checkpoint.")
        step = trainer.global_step
        if step > 0 and step % self.log_every_n_steps == 0 and step != self._last_logged_step:
            self._last_logged_step = step  # once per optimizer step, also under gradient accumulation
            self._log_update_sizes(trainer, step)

    def _log_update_sizes(self, trainer: pl.Trainer, step: int) -> None:
        self.update_sizes = relative_update_sizes(self._units)
        if not self.update_sizes:
            return
        values = list(self.update_sizes.values())
        metrics = {"adapter_health/update_mean": sum(values) / len(values), "adapter_health/update_max": max(values)}
        if self.log_per_layer:
            metrics.update({f"adapter_health/update/{label}": v for label, v in self.update_sizes.items()})
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)
        zero = [label for label, v in self.update_sizes.items() if v == 0 and label not in self._warned_zero]
        if zero:
            self._warned_zero.update(zero)
            rank_zero_warn(f"AdapterHealth: after {step} step(s), {len(zero)} adapter layer(s) have not changed the "
                           f"model at all (||scale * B A|| = 0): {describe(zero)}.\nHINT: check that these layers get "
                           "gradients and that the learning rate is not 0.")

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._units:
            return
        sizes = relative_update_sizes(self._units)
        self.update_sizes = sizes
        changed = sum(1 for v in sizes.values() if v > 0)
        biggest = max(sizes.values(), default=math.nan)
        skipped = f", {len(self.skipped_steps)} step(s) skipped for non-finite values" if self.skipped_steps else ""
        rank_zero_info(f"AdapterHealth: {len(self._units)} adapter layer(s), all in the optimizer and active; "
                       f"{changed}/{len(sizes)} changed the model (largest ||scale*BA||/||W|| = {biggest:.3g}); "
                       f"no non-finite adapter values{skipped}.")


def _scaler_handles_overflow(trainer: pl.Trainer) -> bool:
    # fp16 mixed precision: GradScaler finds inf gradients itself and skips that step, lowering the scale; an
    # occasional overflow is normal there, not a failure.
    return getattr(trainer.precision_plugin, "scaler", None) is not None
