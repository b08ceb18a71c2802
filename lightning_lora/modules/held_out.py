"""A callback that scores held-out answers before and after training, and records the run for comparisons."""

from __future__ import annotations

import json
import resource
import sys
import time
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from lightning_lora.surgery.io.atomic import atomic_file
from lightning_lora.surgery.lora.report import count_parameters
from lightning_lora.surgery.training.sharding import is_sharded


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far, in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


class HeldOutAccuracy(Callback):
    """Print the held-out exact match of the model before and after ``fit``, and write both to a JSON file.

    Needs a LightningModule with ``evaluate_exact_match(dataloader)`` (the built-in
    :class:`~lightning_lora.modules.CausalLMModule`) and a datamodule with a validation set. The score before
    training is taken at fit start, after the LoRA surgery: a fresh adapter changes nothing, so it is the base
    model's score. Runs on global rank zero.

    Args:
        before: Score the model before training too. Default: True.
        results_file: Where to write a JSON record of the run (accuracy before/after, trainable and total
            parameters, training time, peak memory). Default: None (nothing written).
        name: A label for the run in that record. Default: None.
    """

    def __init__(self, before: bool = True, results_file: str | None = None, name: str | None = None) -> None:
        self.before = before
        self.results_file = results_file
        self.name = name
        self.record: dict[str, Any] = {}
        self._train_start: float | None = None

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if is_sharded(pl_module):
            raise RuntimeError(
                "HeldOutAccuracy generates on global rank zero only, and a model sharded with FSDP2 cannot run a forward "
                "on one rank (every forward gathers weights from all ranks).\nHINT: drop HeldOutAccuracy from sharded "
                "runs and score the exported model afterwards (MergeAndExport writes a from_pretrained directory), or "
                "use the module's validation (val_exact_match), which runs on every rank.")
        trainable, total = count_parameters(pl_module)
        self.record = {"name": self.name, "trainable_params": trainable, "total_params": total}
        if self.before and trainer.is_global_zero:
            self.record["accuracy_before"] = self._score(trainer, pl_module, "before training (base model)")
        trainer.strategy.barrier()

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._train_start = time.perf_counter()

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._train_start is not None:
            self.record["train_seconds"] = round(time.perf_counter() - self._train_start, 1)
        self.record["steps"] = trainer.global_step
        self.record["peak_rss_mib"] = round(peak_rss_mib(), 1)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            self.record["accuracy_after"] = self._score(trainer, pl_module, "after training")
            before = self.record.get("accuracy_before")
            if before is not None:
                rank_zero_info(f"Held-out exact match: {before:.1%} before -> {self.record['accuracy_after']:.1%} after "
                               f"{self.record.get('steps', '?')} steps")
            if self.results_file:
                with atomic_file(self.results_file) as tmp:
                    tmp.write_text(json.dumps(self.record, indent=2) + "\n")
        trainer.strategy.barrier()

    def _score(self, trainer: pl.Trainer, pl_module: pl.LightningModule, when: str) -> float:
        evaluate = getattr(pl_module, "evaluate_exact_match", None)
        datamodule = trainer.datamodule
        if evaluate is None or datamodule is None:
            raise TypeError("HeldOutAccuracy needs a LightningModule with evaluate_exact_match() (e.g. CausalLMModule) "
                            "and a datamodule with a validation set.\nHINT: remove the callback for other modules.")
        loader = datamodule.val_dataloader()
        n = len(loader.dataset) if hasattr(loader, "dataset") else None
        rank_zero_info(f"Scoring {n if n is not None else 'the'} held-out examples {when}...")
        start = time.perf_counter()
        accuracy = evaluate(loader)
        correct = f" ({round(accuracy * n)}/{n})" if n else ""
        rank_zero_info(f"Held-out exact match {when}: {accuracy:.1%}{correct} [{time.perf_counter() - start:.0f} s]")
        return accuracy
