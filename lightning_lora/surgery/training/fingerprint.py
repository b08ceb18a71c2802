"""A fingerprint of a base model, so a checkpoint that holds only adapters is never resumed into the wrong base.

The identity is plain data (safe in a ``weights_only`` checkpoint): the model's name, its class, how many tensors
and parameters it has, a hash of every base tensor's name, shape and dtype, and a hash of a fixed sample of each
tensor's values. LoRA factors are left out and ``.base_layer`` is removed from names, so the identity of a model is
the same before and after LoRA surgery.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch import nn

from lightning_lora.surgery.io.peft_format import base_model_name
from lightning_lora.surgery.training.freeze import adapter_parameter_ids
from lightning_lora.surgery.training.sharding import class_name, take_flat

SAMPLE = 16  # values read per tensor: enough to tell two trainings or seeds apart, cheap on a 70B model


def model_identity(model: nn.Module, *, sample: int = SAMPLE) -> dict[str, Any]:
    """The fingerprint of ``model``'s base weights (adapters excluded).

    Args:
        model: The model (a transformers model, a LightningModule's backbone...).
        sample: Values sampled per tensor, evenly spaced over its flattened storage. Default: 16.

    Returns:
        ``{"name", "class", "tensors", "params", "shapes_sha256", "values_sha256"}``, plain types only.
    """
    adapters = adapter_parameter_ids(model)
    shapes, values = hashlib.sha256(), hashlib.sha256()
    tensors = params = 0
    for name, tensor in _base_tensors(model, adapters):
        tensors += 1
        params += tensor.numel()
        shapes.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        values.update(name.encode())
        values.update(_sample(tensor, sample))
    return {
        "name": base_model_name(model),
        "class": class_name(model),  # the same sharded or not
        "tensors": tensors,
        "params": params,
        "shapes_sha256": shapes.hexdigest(),
        "values_sha256": values.hexdigest(),
    }


def _base_tensors(model: nn.Module, adapters: set[int]) -> list[tuple[str, torch.Tensor]]:
    found = [(n, p) for n, p in model.named_parameters() if id(p) not in adapters]
    found += list(model.named_buffers())
    return [(n.replace(".base_layer.", "."), t) for n, t in found]


def _sample(tensor: torch.Tensor, k: int) -> bytes:
    if tensor.device.type == "meta" or tensor.numel() == 0:
        return b"-"
    n = tensor.numel()
    k = min(k, n)
    # Integer spacing: a float32 linspace rounds indices past the end for tensors of ~2^24+ elements.
    index = torch.tensor([i * (n - 1) // max(k - 1, 1) for i in range(k)], dtype=torch.long)
    # A sharded (DTensor) parameter: the same logical values on any number of processes, without gathering it.
    return take_flat(tensor, index).numpy().tobytes()


def identity_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Human-readable differences between two identities (empty when they describe the same base model)."""
    problems = []
    if saved.get("name") != current.get("name"):
        problems.append(f"model name: checkpoint {saved.get('name')!r}, this model {current.get('name')!r}")
    if saved.get("class") != current.get("class"):
        problems.append(f"model class: checkpoint {saved.get('class')!r}, this model {current.get('class')!r}")
    if saved.get("shapes_sha256") != current.get("shapes_sha256"):
        problems.append(
            f"architecture (tensor names, shapes, dtypes): checkpoint {saved.get('tensors')} tensors / "
            f"{saved.get('params', 0):,} values, "
            f"this model {current.get('tensors')} tensors / {current.get('params', 0):,} values"
        )
    elif saved.get("values_sha256") != current.get("values_sha256"):
        problems.append("weights: same architecture, but the base weights differ (another checkpoint, seed or fine-tune)")
    return problems
