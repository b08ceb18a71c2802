"""``AdapterModelParallelStrategy``: Lightning's FSDP2 strategy with adapter-only, world-size-independent checkpoints.

Lightning's ``ModelParallelStrategy`` (2.6) writes a distributed-checkpoint directory whose loading requires every
base key, or (``save_distributed_checkpoint=False``) gathers the whole model before any callback runs; loading
bypasses ``LightningModule.load_state_dict``, and the optimizer state is keyed by position over all parameters. None
of that suits a LoRA run, whose checkpoint should hold the adapters only. This subclass takes over the checkpoint
I/O: it gathers the trainable tensors (``full_tensor``) and their optimizer states, and global rank zero writes one
ordinary Lightning checkpoint file, the same as a one-process LoRA run writes. So a checkpoint resumes on any number
of processes (2 -> 2 bit for bit, 2 -> 1, 1 -> 2).

``LoRAFinetuning`` switches a plain ``ModelParallelStrategy`` to this class by itself (adapter-only checkpoints
are its default); naming it in the Trainer is only needed to pass it to a Trainer without that callback.
"""

from __future__ import annotations

import logging
import os
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal, Union

import torch
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.strategies import ModelParallelStrategy
from typing_extensions import override

from lightning_lora.surgery.training.adapter_checkpoint import trainable_state_keys
from lightning_lora.surgery.training.sharded_checkpoint import (
    adapter_only_full_state_dict,
    load_full_state_dict_,
    load_optimizer_full_state_,
    optimizer_full_state,
)

_PATH = Union[str, "os.PathLike[str]"]  # what Lightning accepts as a checkpoint path
log = logging.getLogger(__name__)


class AdapterModelParallelStrategy(ModelParallelStrategy):
    """``ModelParallelStrategy`` whose checkpoints hold only the trainable tensors, in one file from global rank zero.

    Takes the arguments of ``lightning.pytorch.strategies.ModelParallelStrategy`` with defaults for FSDP2 alone:
    ``data_parallel_size="auto"`` here means every process (devices x nodes) and ``tensor_parallel_size=1`` (no
    tensor parallelism is applied), so one config runs unchanged on any number of devices and nodes. Checkpoints
    are always one file (there is no ``save_distributed_checkpoint``).

    Args:
        data_parallel_size: Processes the model is sharded over. Default: ``"auto"`` (all of them).
        tensor_parallel_size: Must stay 1 with lightning-lora's callbacks (they refuse more). Default: 1.
        process_group_backend: ``"nccl"``, ``"gloo"``... Default: None (Lightning's choice for the device).
        timeout: Timeout of collective operations. Default: Lightning's default.

    Example:
        >>> import lightning as L
        >>> strategy = AdapterModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
        >>> trainer = L.Trainer(accelerator="cpu", devices=2, strategy=strategy)  # doctest: +SKIP
    """

    def __init__(self, data_parallel_size: Literal["auto"] | int = "auto", tensor_parallel_size: Literal["auto"] | int = 1,
                 process_group_backend: str | None = None, timeout: timedelta | None = default_pg_timeout) -> None:
        super().__init__(data_parallel_size=data_parallel_size, tensor_parallel_size=tensor_parallel_size,
                         save_distributed_checkpoint=False, process_group_backend=process_group_backend,
                         timeout=timeout)

    @override
    def setup_environment(self) -> None:
        if self._data_parallel_size == "auto" and self._tensor_parallel_size == 1:
            self._data_parallel_size = self.num_nodes * self.num_processes  # Lightning's "auto" would be num_nodes
        super().setup_environment()

    @override
    def lightning_module_state_dict(self) -> dict[str, Any]:
        assert self.model is not None
        return adapter_only_full_state_dict(self.model)  # collective: every rank gathers, all get whole tensors

    @override
    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        assert self.model is not None
        if isinstance(optimizer, LightningOptimizer):
            optimizer = optimizer._optimizer
        return optimizer_full_state(self.model, optimizer)

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: _PATH, storage_options: Any | None = None) -> None:
        path = Path(self.broadcast(filepath))
        if path.is_dir():
            raise IsADirectoryError(f"The checkpoint path {str(path)!r} is a directory (a distributed checkpoint?). "
                                    "HINT: write adapter-only checkpoints to a new file name.")
        if self.is_global_zero:
            self.checkpoint_io.save_checkpoint(checkpoint, path, storage_options=storage_options)
        self.barrier("AdapterModelParallelStrategy.save_checkpoint")

    @override
    def load_checkpoint(self, checkpoint_path: _PATH, weights_only: bool | None = None) -> dict[str, Any]:
        path = Path(self.broadcast(checkpoint_path))
        if path.is_dir():
            raise IsADirectoryError(
                f"{str(path)!r} is a directory (a distributed checkpoint of ModelParallelStrategy), not an adapter-only "
                "checkpoint file.\nHINT: resume it with a plain ModelParallelStrategy and LoRAFinetuning("
                "adapter_only_checkpoints=False).")
        checkpoint = torch.load(path, map_location="cpu", weights_only=True if weights_only is None else weights_only)
        assert self.model is not None
        unexpected = load_full_state_dict_(self.model, checkpoint["state_dict"], trainable_state_keys(self.model))
        if unexpected:
            log.warning("The checkpoint holds %d tensor(s) the model does not have (ignored), e.g. %s",
                        len(unexpected), unexpected[0])
        for optimizer, state in zip(self.optimizers, checkpoint.get("optimizer_states", [])):
            load_optimizer_full_state_(self.model, optimizer, state)
        return checkpoint
