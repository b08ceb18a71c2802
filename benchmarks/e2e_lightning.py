"""Our side of ``benchmarks/e2e.py``: a callback added to ``lightning-lora fit`` that evaluates held-out exact match
every N steps (the same evaluation as the PEFT side) and stops training once the target is reached."""

from __future__ import annotations

import time
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from benchmarks.e2e_eval import Tracker, exact_match, read_val


class TimeToAccuracy(Callback):
    """Evaluate every ``every_n_steps`` optimizer steps; stop at ``target``; write the log to ``out`` at the end.

    Args:
        out: JSON file for the record.
        val_file: Held-out ``{"prompt", "response"}`` JSONL.
        every_n_steps: Steps between evaluations. Default: 10.
        target: Exact-match rate that ends the race. Default: 0.9.
        max_eval_samples: Evaluate on the first this many records. Default: None (all).
        max_new_tokens: Greedy tokens per answer. Default: 12.
    """

    def __init__(self, out: str, val_file: str, every_n_steps: int = 10, target: float = 0.9,
                 max_eval_samples: int | None = None, max_new_tokens: int = 12) -> None:
        self.tracker = Tracker(target, out)
        self.val = read_val(val_file, max_eval_samples)
        self.every_n_steps, self.max_new_tokens = every_n_steps, max_new_tokens

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.tracker.train_started = time.time()

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:  # fmt: skip
        step = trainer.global_step
        if step % self.every_n_steps and step < trainer.max_steps:
            return
        autocast = getattr(pl_module, "frozen_dtype", None)  # evaluate as the module runs: bf16 autocast if auto chose it
        self.tracker.evaluate(step, lambda: exact_match(pl_module.model, pl_module.tokenizer, self.val,
                                                        self.max_new_tokens, autocast=autocast))  # fmt: skip
        if self.tracker.reached():
            trainer.should_stop = True

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        dtype = getattr(pl_module, "frozen_dtype", None)
        precision = "fp32" if dtype is None else f"frozen base {str(dtype).removeprefix('torch.')} + autocast, adapters fp32"
        packing = bool(getattr(trainer.datamodule, "packing", False))
        self.tracker.write(side="lightning_lora", precision=precision, packing=packing,
                           trainable=sum(p.numel() for p in pl_module.parameters() if p.requires_grad))
