"""``TrainableParameters``: a report of what trains and what it costs, printed (rank zero) and logged at fit start."""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from lightning_lora.callbacks._model_ready import target_module
from lightning_lora.surgery.training.sharding import is_sharded, local_bytes
from lightning_lora.surgery.training.summary import ParameterSummary, summarize_parameters


class TrainableParameters(Callback):
    """At fit start, print and log trainable / total parameters, per layer kind and block, and a memory estimate.

    Runs at ``on_fit_start``, after any LoRA surgery and after the optimizer exists (its type sizes the optimizer
    states). 4-bit packed weights count two parameters per stored byte. The numbers go to every logger as
    ``params/trainable``, ``params/total``, ``params/trainable_percent``, ``params/adapter_bytes``,
    ``params/weight_bytes``, ``params/gradient_bytes`` and ``params/optimizer_bytes``.

    Args:
        module: Attribute path of the network to report on inside the LightningModule. Default: None (all of it).
        log: Send the numbers to the Trainer's loggers. Default: True.

    Example:
        >>> import lightning as L
        >>> trainer = L.Trainer(callbacks=[TrainableParameters()])
    """

    def __init__(self, module: str | None = None, log: bool = True) -> None:
        self.module = module
        self.log = log
        self.summary: ParameterSummary | None = None
        self.rank_bytes: int | None = None  # weights held by this rank, when the model is sharded

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        target = target_module(pl_module, self.module)
        self.summary = summarize_parameters(target, optimizer)
        metrics = self.summary.metrics()
        table = self.summary.table()
        if is_sharded(target):  # DTensors: the summary counts logical sizes; each rank holds its shards
            self.rank_bytes = local_bytes(target)
            metrics["params/weight_bytes_per_rank"] = float(self.rank_bytes)
            table += (f"\n  sharded (FSDP2) over {trainer.world_size} processes: logical sizes above; weights held by "
                      f"rank {trainer.global_rank}: {self.rank_bytes:,} bytes")
        rank_zero_info(table)
        if self.log:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)
