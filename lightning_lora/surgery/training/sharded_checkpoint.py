"""Adapter-only checkpoints of a sharded (FSDP2) model, in the same world-size-independent format as unsharded ones.

Saving gathers only the trainable tensors (and ``modules_to_save`` buffers) to whole tensors, and the optimizer state
of those parameters, keyed like ``torch.optim.Optimizer.state_dict()`` (index order over the param groups) with the
parameter names added to each group (``param_names``). The result is exactly what a one-process run writes, so a
checkpoint moves freely between 1 and N processes. Loading cuts each rank's shard from the whole tensors; no base
weight is read or written.

Every function that gathers is a collective: call it on all ranks, in the same order.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from lightning_lora.surgery.errors import CheckpointMismatchError
from lightning_lora.surgery.training.adapter_checkpoint import adapter_only_state_dict
from lightning_lora.surgery.training.sharding import full_tensor, is_dtensor, like


def adapter_only_full_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Whole (gathered) CPU copies of ``model``'s trainable tensors and ``modules_to_save`` buffers (collective)."""
    selected = adapter_only_state_dict(model, model.state_dict(keep_vars=True))  # DTensors: no gather yet
    return {name: full_tensor(t.detach()).to("cpu").clone() for name, t in selected.items()}


def _param_names(model: nn.Module) -> dict[int, str]:
    names: dict[int, str] = {}
    for name, param in model.named_parameters():
        names.setdefault(id(param), name)
    return names


def optimizer_full_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """``optimizer.state_dict()`` with every state tensor gathered whole, plus ``param_names`` per group (collective).

    Raises:
        CheckpointMismatchError: If the optimizer holds a parameter that is not ``model``'s.
    """
    names = _param_names(model)
    state = optimizer.state_dict()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    unknown = [i for i, p in enumerate(params) if id(p) not in names]
    if unknown:
        raise CheckpointMismatchError(f"The optimizer holds {len(unknown)} parameter(s) that are not the model's "
                                      f"(e.g. index {unknown[0]}); the checkpoint could not be keyed by name.")
    for group, saved in zip(optimizer.param_groups, state["param_groups"]):
        saved["param_names"] = [names[id(p)] for p in group["params"]]
    state["state"] = {index: {k: full_tensor(v).to("cpu").clone() if isinstance(v, Tensor) else v
                              for k, v in values.items()}
                      for index, values in sorted(state["state"].items())}
    return state


def load_full_state_dict_(model: nn.Module, state_dict: dict[str, Tensor], required: set[str]) -> list[str]:
    """Copy whole tensors into ``model``'s (possibly sharded) parameters and buffers, in place; no communication.

    Args:
        model: The model, sharded or not.
        state_dict: Whole tensors by name (relative to ``model``); names the model lacks are returned, not loaded.
        required: Names that must be present (the adapters and every trainable parameter).

    Returns:
        The names in ``state_dict`` that the model does not have.

    Raises:
        CheckpointMismatchError: If a required name is missing or a shape differs (nothing is copied then).
    """
    targets = dict(model.state_dict(keep_vars=True))
    missing = sorted(required - set(state_dict))
    shapes = [f"{k}: checkpoint {tuple(v.shape)}, model {tuple(targets[k].shape)}" for k, v in state_dict.items()
              if k in targets and tuple(v.shape) != tuple(targets[k].shape)]
    if missing or shapes:
        raise CheckpointMismatchError(
            "The checkpoint does not fit this sharded model's adapters; loading it would leave adapter weights at their "
            f"initial values, so it is refused.\n  missing: {missing[:10]}\n  other shapes: {shapes[:10]}\nHINT: resume "
            "with the base model and LoRA settings of the run that wrote it.")
    with torch.no_grad():
        for name, value in state_dict.items():
            if name in targets:
                target = targets[name]
                local = like(target, value.to(target.dtype))
                (target.to_local() if is_dtensor(target) else target).copy_(
                    local.to_local() if is_dtensor(local) else local)
    return [k for k in state_dict if k not in targets]


def load_optimizer_full_state_(model: nn.Module, optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> None:
    """Load a state written by :func:`optimizer_full_state` (or by an unsharded run) into ``optimizer``, in place.

    Parameters are matched by ``param_names`` when the checkpoint has them, else by position (what an unsharded
    PyTorch optimizer writes). State tensors shaped like their parameter are sharded like it.

    Raises:
        CheckpointMismatchError: If the groups or names do not match the optimizer's parameters.
    """
    names = _param_names(model)
    current = [p for group in optimizer.param_groups for p in group["params"]]
    current_names = [names.get(id(p)) for p in current]
    saved_names = [n for group in saved["param_groups"] for n in group.get("param_names", [])]
    order = list(range(len(current)))
    if saved_names:
        position = {n: i for i, n in enumerate(saved_names)}
        missing = [n for n in current_names if n not in position]
        if missing or len(saved_names) != len(current):
            raise CheckpointMismatchError(
                f"The checkpoint's optimizer state is for other parameters: {len(saved_names)} saved, {len(current)} "
                f"in this optimizer; not in the checkpoint: {missing[:5]}.\nHINT: build the optimizer from the same "
                "trainable parameters as the run that wrote the checkpoint.")
        order = [position[n] for n in current_names]  # current index -> saved index
    elif sum(len(g["params"]) for g in saved["param_groups"]) != len(current):
        raise CheckpointMismatchError(
            f"The checkpoint's optimizer has {sum(len(g['params']) for g in saved['param_groups'])} parameters, this one "
            f"{len(current)}.\nHINT: build the optimizer from the same trainable parameters as the run that wrote it.")
    state = {}
    for index, param in enumerate(current):
        values = saved["state"].get(order[index], saved["state"].get(str(order[index])))
        if values is not None:
            state[index] = {k: like(param, v.to(param.dtype)) if isinstance(v, Tensor) and v.shape == param.shape
                            else v for k, v in values.items()}
    groups, start = [], 0
    for group, saved_group in zip(optimizer.param_groups, saved["param_groups"]):
        groups.append({**{k: v for k, v in saved_group.items() if k not in ("params", "param_names")},
                       "params": list(range(start, start + len(group["params"])))})
        start += len(group["params"])
    optimizer.load_state_dict({"state": state, "param_groups": groups})
