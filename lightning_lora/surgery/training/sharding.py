"""FSDP2 sharding of an adapted model, and the few DTensor helpers the rest of the package needs (plain PyTorch).

After the LoRA surgery (and quantization, freezing, activation checkpointing) the model is sharded with
``torch.distributed.fsdp.fully_shard``: one unit per transformer block, then one for the root (which keeps the
embeddings, the final norm and the head). A unit may hold frozen base weights and trainable adapters together:
FSDP2 shards each parameter on its own (dim 0) and only trainable ones get gradients.

Every gather here (``full_tensor``) is a collective: all ranks must call the same functions in the same order.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lightning_lora.surgery.errors import ShardConfigError, SurgeryError

log = logging.getLogger(__name__)

DtypeName = Literal["float32", "bfloat16", "float16"]
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ShardConfig:
    """How to shard a model with FSDP2 (``fully_shard``) after the surgery.

    Args:
        blocks: The blocks that become one FSDP unit each: a class name (e.g. ``"LlamaDecoderLayer"``) or, in
            Python, a policy ``(path, module) -> bool``. Default: None (a transformers model's
            ``_no_split_modules``, else the class repeated in the model's ``nn.ModuleList``).
        reshard_after_forward: Free each block's gathered weights after its forward and gather them again for the
            backward (ZeRO-3; less memory). False keeps them until the backward (ZeRO-2-like; one all-gather less per
            block, the whole model's weights live during the backward). Default: True.
        cpu_offload: Keep the sharded parameters, gradients and optimizer states in CPU memory
            (``CPUOffloadPolicy``); the accelerator then holds about one gathered block. GPU only. Default: False.
        param_dtype: Gather parameters in this dtype for compute (``MixedPrecisionPolicy``), e.g. ``"bfloat16"``;
            the sharded parameters keep their own dtype. Default: None (no cast).
        reduce_dtype: Reduce gradients in this dtype, e.g. ``"float32"`` with ``param_dtype="bfloat16"``.
            Default: None (the ``param_dtype``).
    """

    blocks: str | Callable[[str, nn.Module], bool] | None = None
    reshard_after_forward: bool = True
    cpu_offload: bool = False
    param_dtype: DtypeName | None = None
    reduce_dtype: DtypeName | None = None

    def __post_init__(self) -> None:
        problems = [f"{field}={value!r}: use one of {sorted(_DTYPES)} or None"
                    for field, value in (("param_dtype", self.param_dtype), ("reduce_dtype", self.reduce_dtype))
                    if value is not None and value not in _DTYPES]
        if self.blocks is not None and not callable(self.blocks) and (not isinstance(self.blocks, str) or not self.blocks):
            problems.append(f"blocks={self.blocks!r}: give a module class name, e.g. 'LlamaDecoderLayer', a policy "
                            "(path, module) -> bool, or None")
        if problems:
            raise ShardConfigError("ShardConfig: " + "; ".join(problems) + ".")

    def fsdp_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``fully_shard`` (besides ``mesh``)."""
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy

        kwargs: dict[str, Any] = {"reshard_after_forward": self.reshard_after_forward}
        if self.cpu_offload:
            kwargs["offload_policy"] = CPUOffloadPolicy()
        if self.param_dtype or self.reduce_dtype:
            kwargs["mp_policy"] = MixedPrecisionPolicy(
                param_dtype=_DTYPES.get(self.param_dtype or ""), reduce_dtype=_DTYPES.get(self.reduce_dtype or ""))
        return kwargs


def is_dtensor(tensor: Any) -> bool:
    """Whether ``tensor`` is a ``torch.distributed.tensor.DTensor`` (a sharded parameter)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch built without distributed
        return False
    return isinstance(tensor, DTensor)


def is_sharded(model: nn.Module) -> bool:
    """Whether any parameter of ``model`` is a DTensor (FSDP2 or tensor parallelism applied)."""
    return any(is_dtensor(p) for p in model.parameters())


def full_tensor(tensor: Tensor) -> Tensor:
    """The whole logical tensor: gathered from every rank for a DTensor (collective), ``tensor`` itself otherwise."""
    return tensor.full_tensor() if is_dtensor(tensor) else tensor


def local_tensor(tensor: Tensor) -> Tensor:
    """This rank's shard of a DTensor, or ``tensor`` itself."""
    return tensor.to_local() if is_dtensor(tensor) else tensor


def dim0_range(tensor: Tensor) -> tuple[int, int] | None:
    """This rank's rows ``[start, stop)`` of a DTensor sharded on dim 0 over a 1-D mesh (FSDP2's layout: chunks of
    ``ceil(rows / ranks)``), or None for a plain tensor.

    Raises:
        ValueError: For any other DTensor layout.
    """
    if not is_dtensor(tensor):
        return None
    from torch.distributed.tensor import Shard

    if len(tensor.placements) != 1 or tensor.placements[0] != Shard(0):
        raise ValueError(f"Only FSDP2's dim-0 sharding on a 1-D mesh is supported, got {tensor.placements}.")
    rows, ranks = tensor.shape[0], tensor.device_mesh.size()
    chunk = math.ceil(rows / ranks)
    start = min(tensor.device_mesh.get_local_rank() * chunk, rows)
    return start, min(start + chunk, rows)


def take_flat(tensor: Tensor, index: Tensor) -> Tensor:
    """``tensor.reshape(-1)[index]`` in float64 on CPU; for a dim-0 sharded DTensor without gathering the tensor.

    Each rank reads the sampled values it holds and one ``all_reduce`` of ``len(index)`` numbers combines them
    (collective: call on every rank).
    """
    if not is_dtensor(tensor):
        return tensor.detach().reshape(-1)[index.to(tensor.device)].to("cpu", torch.float64)
    import torch.distributed as dist

    try:
        rows = dim0_range(tensor)
    except ValueError:  # another layout: gather it whole
        return full_tensor(tensor.detach()).reshape(-1)[index].to("cpu", torch.float64)
    assert rows is not None
    local = tensor.to_local().detach()
    start = rows[0] * (math.prod(tensor.shape[1:]) if tensor.dim() > 1 else 1)  # flat offset of this rank's rows
    mine = (index >= start) & (index < start + local.numel())
    values = torch.zeros(len(index), dtype=torch.float64)
    values[mine] = local.reshape(-1)[(index[mine] - start).to(local.device)].to("cpu", torch.float64)
    values = values.to(local.device)
    dist.all_reduce(values, group=tensor.device_mesh.get_group())  # exactly one rank holds each value: a sum
    return values.to("cpu")


def class_name(module: nn.Module) -> str:
    """The module's class name as built: FSDP2 swaps in a subclass named ``FSDP<Class>``, which is skipped."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch built without distributed
        return type(module).__name__
    return next(c for c in type(module).__mro__ if not issubclass(c, FSDPModule)).__name__


def local_bytes(model: nn.Module) -> int:
    """Bytes of parameters and buffers held by this rank (its shards of DTensors)."""
    seen: set[int] = set()
    total = 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if id(tensor) not in seen:
            seen.add(id(tensor))
            local = local_tensor(tensor)
            total += local.numel() * local.element_size()
    return total


def like(param: Tensor, full: Tensor) -> Tensor:
    """``full`` (a whole logical tensor present on every rank) laid out as ``param``: sharded the same way for a DTensor.

    No communication: each rank cuts its own shard from its copy of ``full``.
    """
    if not is_dtensor(param):
        return full
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full.to(param.to_local().device), param.device_mesh, param.placements, src_data_rank=None)


def find_blocks(model: nn.Module, blocks: str | Callable[[str, nn.Module], bool] | None = None
                ) -> list[tuple[str, nn.Module]]:
    """The modules that become one FSDP unit each, as ``(path, module)`` in model order (outermost only).

    Args:
        model: The (adapted) model.
        blocks: A module class name, or a policy ``(path, module) -> bool``. Default: None (``_no_split_modules``
            of a transformers model, else the class repeated within the model's ``nn.ModuleList`` containers).

    Raises:
        ShardConfigError: If nothing matches (the message lists the model's module classes).
    """
    if callable(blocks):
        chosen: Callable[[str, nn.Module], bool] = blocks
        wanted = f"chosen by {getattr(blocks, '__name__', blocks)!r}"
    else:
        names = {blocks} if blocks else _default_block_classes(model)
        chosen = lambda _, module: type(module).__name__ in names
        wanted = f"of class {sorted(names) or 'any repeated block'}"
    found: list[tuple[str, nn.Module]] = []
    for path, module in model.named_modules():
        if path and chosen(path, module) and not any(path.startswith(f"{p}.") for p, _ in found):
            found.append((path, module))
    if not found:
        classes = sorted(Counter(type(m).__name__ for m in model.modules()))
        raise ShardConfigError(
            f"ShardConfig(blocks={blocks!r}): no module {wanted} in {type(model).__name__} (its classes: "
            f"{classes[:20]}).\nHINT: name the transformer block class, e.g. ShardConfig(blocks='LlamaDecoderLayer') "
            "(shard='LlamaDecoderLayer' on LoRAFinetuning).")
    return found


def _default_block_classes(model: nn.Module) -> set[str]:
    for module in model.modules():
        no_split = getattr(module, "_no_split_modules", None)
        if no_split:
            return set(no_split)
    counts = Counter(type(child).__name__ for m in model.modules() if isinstance(m, nn.ModuleList) for child in m)
    return {name for name, n in counts.items() if n >= 2}


def check_can_shard(model: nn.Module, tensor_parallel_size: int = 1) -> None:
    """Refuse what FSDP2 sharding after the surgery cannot handle (raises before anything changes).

    Raises:
        SurgeryError: If ``tensor_parallel_size > 1`` or the model is sharded already.
    """
    if tensor_parallel_size > 1:
        raise SurgeryError(
            f"The device mesh has tensor_parallel_size={tensor_parallel_size}, but lightning-lora shards with FSDP2 "
            "only (data parallel) and applies no tensor parallelism: the model would run replicated over that "
            "dimension. Note that a bare ModelParallelStrategy() means tensor parallel over all devices.\n"
            "HINT: ModelParallelStrategy(data_parallel_size=<number of devices>, tensor_parallel_size=1).")
    if is_sharded(model):
        raise SurgeryError(
            "The model is sharded already (its parameters are DTensors) before the LoRA surgery: adapters added now "
            "would not be managed by FSDP2 and would neither shard nor get reduced gradients.\n"
            "HINT: do not call fully_shard (or parallelize_module) in configure_model; LoRAFinetuning shards the model "
            "itself after the surgery (options: LoRAFinetuning(shard=ShardConfig(...))).")


def shard_model(model: nn.Module, mesh: Any, config: ShardConfig | None = None) -> list[str]:
    """Apply FSDP2 to ``model`` in place: ``fully_shard`` on each block, then on ``model`` itself.

    Args:
        model: The adapted model, not sharded yet.
        mesh: A 1-D ``DeviceMesh`` (the data-parallel dimension).
        config: Sharding options. Default: ``ShardConfig()``.

    Returns:
        The paths of the blocks sharded as their own units.

    Raises:
        SurgeryError: If the model is sharded already. ShardConfigError: If no blocks are found.
    """
    from torch.distributed.fsdp import fully_shard

    config = config or ShardConfig()
    check_can_shard(model)
    blocks = find_blocks(model, config.blocks)  # validate before changing anything
    kwargs = config.fsdp_kwargs()
    broadcast_trainable_(model, mesh)
    for _, block in blocks:
        fully_shard(block, mesh=mesh, **kwargs)
    fully_shard(model, mesh=mesh, **kwargs)
    log.info("FSDP2: sharded %d blocks (%s ... %s) and the root over %d ranks", len(blocks), blocks[0][0],
             blocks[-1][0], mesh.size())
    return [path for path, _ in blocks]


def broadcast_trainable_(model: nn.Module, mesh: Any) -> None:
    """Copy the trainable parameters (fresh adapters) from the mesh's first rank to the others, in place.

    DDP does this when it wraps a model; FSDP2 does not: each rank keeps its own slice of its own copy, so adapters
    initialised from unseeded random numbers would otherwise differ from what any single rank built.
    """
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized() or mesh.size() == 1:
        return
    group = mesh.get_group()
    src = dist.get_global_rank(group, 0)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad and param.device.type != "meta":  # meta: initialised when materialized
                dist.broadcast(param.data, src=src, group=group)
