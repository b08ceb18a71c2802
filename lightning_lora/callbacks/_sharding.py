"""FSDP2 under Lightning's ``ModelParallelStrategy``: shard after the surgery, refuse what cannot work.

``LoRAFinetuning`` calls :func:`prepare_sharding` from ``setup``. Under a ``ModelParallelStrategy`` it

* refuses a device mesh with ``tensor_parallel_size > 1`` (we apply no tensor parallelism), before any surgery;
* switches a plain ``ModelParallelStrategy`` to :class:`~lightning_lora.strategies.AdapterModelParallelStrategy` for
  adapter-only checkpoints (same arguments, only the checkpoint I/O differs);
* registers the sharding as the last action after ``configure_model`` (after quantization, LoRA, freezing and
  activation checkpointing), so the optimizer is built from the sharded parameters.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_info

from lightning_lora.callbacks._model_ready import (
    SHARDING,
    target_module,
    when_model_ready,
)
from lightning_lora.surgery.training.sharding import (
    ShardConfig,
    check_can_shard,
    shard_model,
)

SHARD_KEY = "lightning_lora/fsdp2"


def shard_config(shard: ShardConfig | str | Callable[[str, Any], bool] | dict | None) -> ShardConfig:
    """``ShardConfig`` from the callback argument: a config, its fields as a dict, a block class name, a policy
    ``(path, module) -> bool``, or None."""
    if isinstance(shard, ShardConfig):
        return shard
    if isinstance(shard, dict):
        return ShardConfig(**shard)
    if shard is None or isinstance(shard, str) or callable(shard):
        return ShardConfig(blocks=shard or None)
    raise TypeError(f"shard={shard!r}: give a ShardConfig, a block class name (e.g. 'LlamaDecoderLayer'), a policy "
                    "(path, module) -> bool, or None.")


def uses_model_parallel(trainer: pl.Trainer) -> bool:
    """Whether the Trainer runs Lightning's ``ModelParallelStrategy`` (or a subclass)."""
    return isinstance(trainer.strategy, ModelParallelStrategy)


def prepare_sharding(trainer: pl.Trainer, pl_module: pl.LightningModule, module: str | None, config: ShardConfig,
                     adapter_only: bool) -> None:
    """Check the mesh, take over checkpoint I/O (``adapter_only``) and register the sharding of ``module``."""
    strategy = trainer.strategy
    mesh = strategy.device_mesh
    tensor_parallel = mesh["tensor_parallel"].size() if "tensor_parallel" in (mesh.mesh_dim_names or ()) else 1
    check_can_shard(target_module(pl_module, module) if _built(pl_module, module) else pl_module, tensor_parallel)
    if adapter_only and type(strategy) is ModelParallelStrategy:
        from lightning_lora.strategies import AdapterModelParallelStrategy

        strategy.__class__ = AdapterModelParallelStrategy  # a subclass adding no state: only checkpoint I/O differs
        rank_zero_info("LoRAFinetuning: adapter-only checkpoints under FSDP2 (AdapterModelParallelStrategy): one file "
                       "from rank 0 with the trainable tensors, loadable on any number of processes.")

    def shard(pl_module: Any) -> None:
        paths = shard_model(target_module(pl_module, module), mesh["data_parallel"], config)
        rank_zero_info(f"FSDP2: {len(paths)} blocks ({paths[0]} ... {paths[-1]}) and the root sharded over "
                       f"{mesh['data_parallel'].size()} processes")

    when_model_ready(pl_module, SHARD_KEY, SHARDING, shard)  # one key: several adapters' callbacks shard once


def _built(pl_module: pl.LightningModule, module: str | None) -> bool:
    try:
        target_module(pl_module, module)
    except ValueError:
        return False  # built later, in configure_model: checked again when sharding
    return True
