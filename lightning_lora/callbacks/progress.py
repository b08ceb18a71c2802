"""Progress a user can read in a log file, and labels that make sense for step-based runs.

* :class:`LineProgressBar` prints one plain line every ``every_n_steps`` optimizer steps (step, loss, it/s, ETA), for
  output that is not a terminal (CI logs, ``nohup``, ``| tee``), where a live bar shows nothing until the end.
* :class:`StepRichProgressBar` is Lightning's rich bar without ``v_num`` and without ``Epoch 0/-2`` when the run is
  limited by ``max_steps`` (``max_epochs=-1``).
* :class:`CompactModelSummary` is Lightning's model summary without the FLOPs column and ``Total FLOPs: 0`` line
  when nothing measured FLOPs.

``lightning-lora fit`` picks the progress bar by whether standard output is a terminal.
"""

from __future__ import annotations

import sys
import time
from datetime import timedelta
from typing import Any, TextIO

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelSummary, ProgressBar, RichProgressBar
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.model_summary import get_human_readable_count
from typing_extensions import override

_HIDDEN_METRICS = ("v_num",)


def _visible(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if k not in _HIDDEN_METRICS}


class LineProgressBar(ProgressBar):
    """One line every ``every_n_steps`` training steps: ``step 10/40 | train_loss 0.512 | 2.31 it/s | ETA 0:00:13``.

    Args:
        every_n_steps: Print every this many optimizer steps (and at the last one). Default: the Trainer's
            ``log_every_n_steps``.
        stream: Where to write. Default: standard output.
    """

    def __init__(self, every_n_steps: int | None = None, stream: TextIO | None = None) -> None:
        super().__init__()
        self.every_n_steps = every_n_steps
        self._stream = stream
        self._enabled = True
        self._start = 0.0
        self._first_step = 0
        self._last_printed = -1

    def disable(self) -> None:
        """Stop printing (Lightning calls this on ranks other than zero)."""
        self._enabled = False

    def enable(self) -> None:
        """Print again."""
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        """Whether lines are printed."""
        return self._enabled

    def _write(self, line: str) -> None:
        stream = self._stream or sys.stdout
        stream.write(line + "\n")
        stream.flush()

    def total_steps(self, trainer: pl.Trainer) -> int | None:
        """Optimizer steps the run will take, when known (``max_steps``, or batches x epochs)."""
        if trainer.max_steps and trainer.max_steps > 0:
            return int(trainer.max_steps)
        batches = trainer.num_training_batches
        if trainer.max_epochs and trainer.max_epochs > 0 and batches != float("inf"):
            return int(batches * trainer.max_epochs) // max(1, trainer.accumulate_grad_batches)
        return None

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = time.monotonic()
        self._first_step = trainer.global_step
        self._last_printed = -1
        if self._enabled:
            total = self.total_steps(trainer)
            every = self._every(trainer)
            self._write(f"Training: {total if total is not None else 'unknown number of'} steps "
                        f"(a progress line every {every} steps)")

    def _every(self, trainer: pl.Trainer) -> int:
        return max(1, int(self.every_n_steps or trainer.log_every_n_steps or 1))

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        total = self.total_steps(trainer)
        if not self._enabled or step == self._last_printed:
            return
        if step % self._every(trainer) == 0 or (total is not None and step >= total):
            self._last_printed = step
            self._write(self.progress_line(trainer, pl_module, step, total))

    def progress_line(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int, total: int | None) -> str:
        """``step 10/40 | train_loss 0.5123 | 2.31 it/s | ETA 0:00:13``."""
        elapsed = max(time.monotonic() - self._start, 1e-9)
        done = step - self._first_step
        rate = done / elapsed
        parts = [f"step {step}/{total}" if total is not None else f"step {step}"]
        metrics = _visible(self.get_metrics(trainer, pl_module))
        parts += [f"{k} {_fmt(v)}" for k, v in metrics.items() if not k.startswith(("val_", "val/"))]
        parts.append(f"{rate:.2f} it/s" if rate >= 1 else f"{1 / rate:.2f} s/it" if rate > 0 else "- it/s")
        if total is not None and rate > 0:
            parts.append(f"ETA {timedelta(seconds=round((total - step) / rate))}")
        return " | ".join(parts)

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._enabled and not trainer.sanity_checking:
            shown = {k: v for k, v in _visible(self.get_metrics(trainer, pl_module)).items() if k.startswith("val")}
            if shown:
                self._write("validation | " + " | ".join(f"{k} {_fmt(v)}" for k, v in shown.items()))

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._enabled:
            seconds = time.monotonic() - self._start
            self._write(f"Training done: {trainer.global_step - self._first_step} steps in {timedelta(seconds=round(seconds))}")


def _fmt(value: Any) -> str:
    if hasattr(value, "item"):
        value = value.item()
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _count(n: float) -> str:
    return get_human_readable_count(int(n)).strip()


class StepRichProgressBar(RichProgressBar):
    """Lightning's rich progress bar; ``Training`` instead of ``Epoch 0/-2`` for step-limited runs, no ``v_num``."""

    @override
    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        return _visible(super().get_metrics(trainer, pl_module))

    # Lightning builds the label in a private method (rich_progress.py, 2.6): "Epoch {n}/{max_epochs - 1}", which
    # reads "Epoch 0/-2" when max_epochs is -1. tests/callbacks/test_progress.py fails if this stops applying.
    def _get_train_description(self, current_epoch: int) -> str:
        if self.trainer.max_epochs is None or self.trainer.max_epochs < 0:
            return f"Epoch {current_epoch}" if current_epoch else "Training"
        return super()._get_train_description(current_epoch)


class CompactModelSummary(ModelSummary):
    """Lightning's model summary as plain text, without FLOPs when none were measured."""

    @staticmethod
    @override
    @rank_zero_only
    def summarize(summary_data: list[tuple[str, list[str]]], total_parameters: int, trainable_parameters: int,
                  model_size: float, total_training_modes: dict[str, int], total_flops: int, **kwargs: Any) -> None:
        columns = [(name, values) for name, values in summary_data if total_flops or name != "FLOPs"]
        widths = [max(len(name), *(len(v) for v in values)) if values else len(name) for name, values in columns]
        rows = [" | ".join(f"{name:<{w}}" for (name, _), w in zip(columns, widths, strict=True))]
        rows.append("-" * len(rows[0]))
        for i in range(len(columns[0][1]) if columns else 0):
            rows.append(" | ".join(f"{values[i]:<{w}}" for (_, values), w in zip(columns, widths, strict=True)))
        rows.append(f"Trainable params: {_count(trainable_parameters)} | non-trainable: "
                    f"{_count(total_parameters - trainable_parameters)} | total: {_count(total_parameters)} "
                    f"({model_size:,.3f} MB)")
        if total_flops:
            rows.append(f"Total FLOPs: {_count(total_flops)}")
        sys.stdout.write("\n".join(row.rstrip() for row in rows) + "\n")
