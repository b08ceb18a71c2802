"""Materialize a model built on the meta device and sharded with FSDP2, reading only this rank's rows of each weight.

The large-model path: build the model on the meta device (no memory), apply the surgery there, shard it, then
allocate each rank's shards (``to_empty``) and fill them from the ``save_pretrained`` safetensors files. FSDP2
shards every parameter on dim 0 in ``ceil(rows / ranks)`` chunks, and safetensors reads a row range without
reading the rest of the tensor, so no rank ever holds a whole weight of the base. Adapters (``lora_A`` / ``lora_B``)
are initialised as ``LoRALayer.add_adapter`` does, on the whole (small) tensor from a fixed seed on every rank, and
each rank keeps its rows. Buffers are kept as built when they are real (build with ``include_buffers=False``).

Plain PyTorch; the safetensors files are read with seek + read of this rank's bytes (no memory map); no
communication.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightning_lora.surgery.errors import CheckpointMismatchError
from lightning_lora.surgery.lora.inventory import lora_layers
from lightning_lora.surgery.training.sharding import dim0_range, is_dtensor, like

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Build modules with their parameters on the meta device and their buffers real (e.g. rotary frequencies).

    Each parameter is moved to meta as it is registered, so at most one freshly created tensor exists at a time and
    no initialisation runs on real memory (the same trick as ``accelerate.init_empty_weights(include_buffers=False)``).
    """
    original = nn.Module.register_parameter

    def register_parameter(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    nn.Module.register_parameter = register_parameter  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def has_meta_parameters(model: nn.Module) -> bool:
    """Whether any parameter of ``model`` is on the meta device (allocated nowhere yet)."""
    return any(p.device.type == "meta" for p in model.parameters())


def weight_files(directory: str | Path) -> dict[str, Path]:
    """``{tensor name: safetensors file}`` of a ``save_pretrained`` directory (single file or sharded with an index).

    Raises:
        FileNotFoundError: If the directory has neither ``model.safetensors`` nor ``model.safetensors.index.json``.
    """
    directory = Path(directory)
    if (directory / INDEX).is_file():
        weight_map = json.loads((directory / INDEX).read_text())["weight_map"]
        return {name: directory / file for name, file in weight_map.items()}
    if (directory / WEIGHTS).is_file():
        return {name: directory / WEIGHTS for name in _header(directory / WEIGHTS)[1] if name != "__metadata__"}
    raise FileNotFoundError(f"{str(directory)!r} has no {WEIGHTS} or {INDEX}: loading shards needs the safetensors "
                            "files of save_pretrained.\nHINT: save the model with save_pretrained(..., "
                            "safe_serialization=True), or load it without meta-device initialisation.")


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


def _header(path: Path) -> tuple[int, dict[str, Any]]:
    """(offset of the data section, the JSON header) of a safetensors file (cached while the file is unchanged)."""
    stat = path.stat()
    return _read_header(path, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=64)
def _read_header(path: Path, mtime_ns: int, size: int) -> tuple[int, dict[str, Any]]:
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        return 8 + size, json.loads(f.read(size))


def _read_into_(path: Path, key: str, rows: tuple[int, int] | None, target: Tensor) -> int:
    """Read rows ``[start, stop)`` of tensor ``key`` (all of it for None) into ``target``, in place; bytes read.

    Plain seek + read of just those bytes (a row range of a row-major tensor is contiguous in the file): unlike a
    memory map, no other page of the file becomes part of this process's memory.
    """
    data, header = _header(path)
    info = header[key]
    dtype, shape = _DTYPES[info["dtype"]], list(info["shape"])
    start, stop = rows if rows is not None else (0, shape[0] if shape else 1)
    expected = (stop - start, *shape[1:]) if shape else ()
    if tuple(target.shape) != tuple(expected):
        raise CheckpointMismatchError(f"{key}: the file's rows {start}:{stop} have shape {expected}, this rank's shard "
                                      f"{tuple(target.shape)}.\nHINT: load the directory this model's config came from.")
    row_bytes = math.prod(shape[1:]) * dtype.itemsize if shape else dtype.itemsize
    nbytes = (stop - start) * row_bytes
    with open(path, "rb") as f:
        f.seek(data + info["data_offsets"][0] + start * row_bytes)
        if target.dtype == dtype and target.device.type == "cpu" and target.is_contiguous():
            f.readinto(target.reshape(-1).view(torch.uint8).numpy())  # straight into the shard, no copy
        else:
            buffer = bytearray(nbytes)
            f.readinto(buffer)
            with torch.no_grad():
                target.copy_(torch.frombuffer(buffer, dtype=dtype).reshape(expected))
    return nbytes


def _init_adapters(model: nn.Module, seed: int) -> set[int]:
    """Initialise every adapter's whole A (as ``add_adapter``) and B (zeros), keep each rank's rows; their ids."""
    done: set[int] = set()
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        for _, layer in lora_layers(model):
            for name, spec in layer.specs.items():
                a, b = layer.lora_A[name], layer.lora_B[name]
                full_a = torch.empty(tuple(a.shape), dtype=a.dtype)  # (r, in)
                if spec.init == "gaussian":
                    nn.init.normal_(full_a, std=1 / spec.r)
                else:
                    nn.init.kaiming_uniform_(full_a, a=math.sqrt(5))
                _copy_(a, full_a)
                _copy_(b, torch.zeros(tuple(b.shape), dtype=b.dtype))  # (out, r)
                done |= {id(a), id(b)}
    finally:
        torch.random.set_rng_state(generator_state)
    return done


def _copy_(param: Tensor, full: Tensor) -> None:
    local = like(param, full)
    with torch.no_grad():
        (param.to_local() if is_dtensor(param) else param).copy_(local.to_local() if is_dtensor(local) else local)


def materialize_and_load_(model: nn.Module, directory: str | Path, *, device: torch.device | str = "cpu",
                          seed: int = 0) -> int:
    """Allocate ``model``'s meta parameters on ``device`` and fill them from ``directory``, in place.

    Args:
        model: The model as built from its config on the meta device (buffers real), possibly with LoRA applied
            and sharded with ``fully_shard``. State-dict names must match the files (``.base_layer.`` is ignored).
        directory: A ``save_pretrained`` directory with safetensors files.
        device: Where the parameters go. Default: CPU.
        seed: Seed of the adapters' initialisation (the same on every rank). Default: 0.

    Returns:
        The number of bytes read from the files by this rank.

    Raises:
        CheckpointMismatchError: If a base parameter is missing from the files or has another shape (before anything
            is read).
    """
    files = weight_files(directory)
    buffers = {name: b.detach().clone() for name, b in model.named_buffers() if b.device.type != "meta"}
    adapter_names = set(_adapter_names(model))
    _check([n for n, _ in model.named_parameters() if n not in adapter_names], files, directory)
    tied = _tied_groups(model)
    model.to_empty(device=device)  # may replace Parameter objects (meta -> real): everything below goes by name
    _retie(model, tied)
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name in buffers:
                buffer.copy_(buffers[name])
    _init_adapters(model, seed)
    read = 0
    for name, param in model.named_parameters():
        if name not in adapter_names:
            key = name.replace(".base_layer.", ".")
            read += _read_into_(files[key], key, dim0_range(param), param.to_local() if is_dtensor(param) else param.data)
    return read


def _adapter_names(model: nn.Module) -> list[str]:
    ids = {id(p) for _, layer in lora_layers(model) for d in (layer.lora_A, layer.lora_B) for p in d.values()}
    return [n for n, p in model.named_parameters() if id(p) in ids]


def _tied_groups(model: nn.Module) -> list[list[str]]:
    groups: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    return [names for names in groups.values() if len(names) > 1]


def _retie(model: nn.Module, tied: list[list[str]]) -> None:
    """Share tied parameters again (``to_empty`` gives each module its own new Parameter for meta tensors)."""
    for first, *others in tied:
        shared = model.get_parameter(first)
        for name in others:
            path, _, attr = name.rpartition(".")
            owner = model.get_submodule(path)
            if getattr(owner, attr) is not shared:
                setattr(owner, attr, shared)


def _check(base: list[str], files: dict[str, Path], directory: str | Path) -> None:
    missing = [n for n in base if n.replace(".base_layer.", ".") not in files]
    if missing:
        raise CheckpointMismatchError(
            f"{str(directory)!r} lacks {len(missing)} weight(s) of this model, e.g. {missing[:5]}.\nHINT: load the "
            "directory the model's config came from (save_pretrained output), or load without meta initialisation.")
