"""Export the adapter and the merged model from a sharded (FSDP2) model, one tensor gathered at a time.

``export_merged`` deep-copies the model and merges the copy; FSDP2 refuses to deep-copy a sharded model, and a copy
would need the whole model on one rank anyway. Here every rank walks the model in the same order and gathers one
tensor at a time (``full_tensor``, a collective); a LoRA layer's base weight is merged with its factors right after
they are gathered (``W + scale * B @ A`` in fp32, cast once). Global rank zero writes each block's tensors to its own
safetensors file as soon as the block is done, so beyond its shard it holds about one block (plus the embeddings
and head until the end). The result is an ordinary sharded ``save_pretrained`` directory
(``model.safetensors.index.json``) that ``from_pretrained`` loads, and the adapter in PEFT format.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from lightning_lora.surgery.errors import SurgeryError
from lightning_lora.surgery.io.adapter_files import adapter_state_dict, save_adapter
from lightning_lora.surgery.io.atomic import atomic_dir
from lightning_lora.surgery.io.export import REPORT_NAME, ExportReport
from lightning_lora.surgery.lora.inventory import (
    adapter_configs,
    find_lora_root,
    lora_layers,
)
from lightning_lora.surgery.lora.layer import LoRALayer
from lightning_lora.surgery.training.sharding import full_tensor

INDEX_NAME = "model.safetensors.index.json"


def export_merged_sharded(model: nn.Module, dirpath: str | Path, *, adapter_name: str, write: bool,
                          tokenizer: Any = None) -> ExportReport:
    """Write ``<dirpath>/adapter`` (PEFT) and ``<dirpath>/merged`` (``save_pretrained`` layout) from a sharded model.

    Collective: call it on every rank with the same arguments; only the rank with ``write=True`` writes (atomically).
    The model is not changed.

    Args:
        model: The adapted transformers model (sharded with FSDP2), or a module holding it.
        dirpath: Output directory; replaced whole if it exists.
        adapter_name: The adapter to merge and save.
        write: Whether this rank writes the files (global rank zero).
        tokenizer: Saved beside the merged model when given.

    Returns:
        An :class:`ExportReport` (``max_abs_diff`` is None: no probe forward on a sharded model).

    Raises:
        SurgeryError: If the model is not a transformers model, lacks the adapter, or has non-Linear LoRA layers.
    """
    _, root = find_lora_root(model)
    check_sharded_export(root, adapter_name)
    target = Path(dirpath)
    report = ExportReport(str(target), str(target / "adapter"), str(target / "merged"), "transformers", adapter_name,
                          None)
    adapter = {k: full_tensor(v) for k, v in adapter_state_dict(root, adapter_name).items()}  # collective
    with (atomic_dir(target) if write else contextlib.nullcontext()) as tmp:
        if write:
            save_adapter(root, tmp / "adapter", name=adapter_name, tensors=adapter)
        _write_merged(root, adapter_name, tmp / "merged" if write else None, tokenizer)
        if write:
            (tmp / REPORT_NAME).write_text(json.dumps(asdict(report), indent=2) + "\n")
    return report


def check_sharded_export(root: nn.Module, adapter_name: str) -> None:
    """Raise :class:`SurgeryError` if :func:`export_merged_sharded` cannot export ``root`` (call before training)."""
    if adapter_name not in adapter_configs(root):
        known = sorted(adapter_configs(root)) or "none"
        raise SurgeryError(f"export: no LoRA adapter named {adapter_name!r} on this model (adapters: {known}).")
    if not (hasattr(root, "save_pretrained") and hasattr(root, "config")):
        raise SurgeryError(f"Merged export of a sharded model needs a transformers model; got {type(root).__name__}.\n"
                           "HINT: export the adapter only (save_adapter after gathering), or train unsharded.")
    other = sorted({layer.codec.name for _, layer in lora_layers(root)} - {"Linear"})
    if other:
        raise SurgeryError(f"Merged export of a sharded model supports LoRA on Linear layers only; found {other}.\n"
                           "HINT: export the adapter (PEFT format) and merge it after loading the base unsharded.")


def _write_merged(root: nn.Module, adapter_name: str, out: Path | None, tokenizer: Any) -> None:
    from torch.distributed.fsdp import FSDPModule

    blocks = [path for path, m in root.named_modules() if path and isinstance(m, FSDPModule)]  # the sharded units
    files = [f"model-{i + 1:05d}-of-{len(blocks) + 1:05d}.safetensors" for i in range(len(blocks) + 1)]
    weight_map: dict[str, str] = {}
    rest: dict[str, Tensor] = {}
    current, pending = -1, {}
    total = 0
    for key, tensor in _merged_tensors(root, adapter_name):  # gathers: every rank runs the whole loop
        if out is None:
            continue
        block = next((i for i, p in enumerate(blocks) if key.startswith(f"{p}.")), None)
        if block is None:
            rest[key] = tensor
            continue
        if block != current and pending:
            _flush(out, files[current], pending, weight_map)
        current = block
        pending[key] = tensor
        total += tensor.numel() * tensor.element_size()
    if out is None:
        return
    if pending:
        _flush(out, files[current], pending, weight_map)
    total += sum(t.numel() * t.element_size() for t in rest.values())
    _flush(out, files[-1], rest, weight_map)
    (out / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    root.config.save_pretrained(str(out))
    if getattr(root, "generation_config", None) is not None:
        root.generation_config.save_pretrained(str(out))
    if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(str(out))


def _flush(out: Path, filename: str, tensors: dict[str, Tensor], weight_map: dict[str, str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / filename), metadata={"format": "pt"})
    weight_map.update({k: filename for k in tensors})
    tensors.clear()


@torch.no_grad()
def _merged_tensors(root: nn.Module, adapter_name: str) -> Iterator[tuple[str, Tensor]]:
    """``(state-dict key of the merged model, whole CPU tensor)`` in model order, gathered one tensor at a time."""
    seen: set[int] = set()
    inside: str | None = None
    for path, module in root.named_modules():
        if inside is not None and path.startswith(inside):
            continue
        head = f"{path}." if path else ""
        if isinstance(module, LoRALayer):
            inside = head
            yield f"{head}weight", _merged_weight(module, adapter_name)
            if module.base_layer.bias is not None:
                yield f"{head}bias", full_tensor(module.base_layer.bias.detach()).to("cpu")
            continue
        for name, param in module.named_parameters(recurse=False):
            if id(param) not in seen:  # tied weights are saved once, as save_pretrained does
                seen.add(id(param))
                yield f"{head}{name}", full_tensor(param.detach()).to("cpu")
        for name, buffer in module.named_buffers(recurse=False):
            if name not in module._non_persistent_buffers_set:
                yield f"{head}{name}", full_tensor(buffer).to("cpu")


def _merged_weight(layer: LoRALayer, adapter_name: str) -> Tensor:
    weight = full_tensor(layer.base_layer.weight.detach()).to("cpu")  # (out, in)
    if adapter_name not in layer.specs:
        return weight
    a = full_tensor(layer.lora_A[adapter_name].detach()).to("cpu").float()  # (r, in)
    b = full_tensor(layer.lora_B[adapter_name].detach()).to("cpu").float()  # (out, r)
    return (weight.float() + (b @ a) * layer.specs[adapter_name].scale).to(weight.dtype)  # (out, in)
