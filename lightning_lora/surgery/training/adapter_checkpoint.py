"""Adapter-only checkpoints: which state-dict entries to keep, and a guard that refuses a load leaving adapters unset.

Plain PyTorch; the Lightning callback (:class:`~lightning_lora.callbacks.LoRAFinetuning`) wires these into hooks.

An adapter-only state dict keeps every trainable tensor (LoRA factors, ``modules_to_save``, trained biases, blocks
unfrozen by layer freezing) and the buffers of ``modules_to_save``; the frozen base is rebuilt from its own source
on resume. Loading one into a model needs two things that ``strict=True`` loading alone gets wrong:

* missing *frozen* keys are expected and must be forgiven;
* missing or mis-shaped *adapter* keys must fail loudly, even under ``strict=False``, because the adapters would
  silently stay at their initial value (B = 0: the model would behave as the untrained base).

:func:`install_load_guard` registers both rules as ``load_state_dict`` hooks on the module.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from lightning_lora.surgery.errors import CheckpointMismatchError
from lightning_lora.surgery.lora.inventory import adapter_configs, adapter_parameters, find_lora_root, modules_to_save_paths

_GUARDS_ATTR = "_lora_load_guards"
_HINT = (
    "HINT: resume with the same base model and the same adapter settings (config, adapter_name, module) that wrote the "
    "checkpoint. To start a new run from trained adapters instead, export them with save_adapter(...) and apply them "
    "with load_adapter(model, path, trainable=True)."
)




def adapter_state_keys(model: nn.Module, adapter_name: str) -> set[str]:
    """State-dict keys of adapter ``adapter_name``'s factors, relative to ``model`` (found structurally)."""
    return set(adapter_parameters(model, adapter_name, factors_only=True))


def trainable_state_keys(model: nn.Module) -> set[str]:
    """State-dict keys of every parameter that requires grad, under all of its names (tied weights included)."""
    return {n for n, p in model.named_parameters(remove_duplicate=False) if p.requires_grad}


def required_state_keys(model: nn.Module, adapter_name: str) -> set[str]:
    """Keys a checkpoint must provide for ``model``: the adapter's factors and every trainable parameter."""
    return adapter_state_keys(model, adapter_name) | trainable_state_keys(model)


def _modules_to_save_prefixes(model: nn.Module) -> list[str]:
    root_path, root = find_lora_root(model)
    head = f"{root_path}." if root_path else ""
    return [f"{head}{path}." for config in adapter_configs(root).values() for path in modules_to_save_paths(root, config)]


def adapter_only_state_dict(model: nn.Module, state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """The entries of ``state_dict`` (of ``model``) worth saving: trainable tensors and ``modules_to_save`` buffers.

    Args:
        model: The module the state dict was taken from.
        state_dict: Its full state dict.

    Returns:
        A new dict, same order, without the frozen base tensors.
    """
    keep = trainable_state_keys(model)
    prefixes = tuple(_modules_to_save_prefixes(model))
    return {k: v for k, v in state_dict.items() if k in keep or (prefixes and k.startswith(prefixes))}


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``field: checkpoint X, this run Y`` for every field whose value differs between two plain config dicts."""
    fields = list(dict.fromkeys([*saved, *current]))
    return [f"{f}: checkpoint {saved.get(f)!r}, this run {current.get(f)!r}" for f in fields if saved.get(f) != current.get(f)]


def check_state_dict(model: nn.Module, state_dict: dict[str, Tensor], adapter_name: str, *, prefix: str = "",
                     strict: bool = True) -> None:
    """Raise if ``state_dict`` lacks a required key (see :func:`required_state_keys`) or a required key's shape differs.

    Args:
        model: The module that will load ``state_dict``.
        state_dict: The entries to load (keys relative to ``model``, after ``prefix``).
        adapter_name: The adapter whose factors must be present.
        prefix: Prefix of ``model``'s keys inside ``state_dict`` (non-empty when a parent module is being loaded).
        strict: Also list keys the model does not have (only reported alongside another problem).

    Raises:
        CheckpointMismatchError: Listing every missing key, shape mismatch and (with ``strict``) unexpected key;
            or, when all fit, every required tensor that holds inf or NaN.
    """
    tensors = dict(model.named_parameters(remove_duplicate=False))
    required = sorted(required_state_keys(model, adapter_name))
    missing = [k for k in required if prefix + k not in state_dict]
    shapes = [f"{k}: checkpoint {tuple(state_dict[prefix + k].shape)}, model {tuple(tensors[k].shape)}"
              for k in required if prefix + k in state_dict and k in tensors
              and tuple(state_dict[prefix + k].shape) != tuple(tensors[k].shape)]
    if not missing and not shapes:
        _refuse_nonfinite([k for k in required if _nonfinite(state_dict[prefix + k])])
        return
    known = set(model.state_dict().keys())
    unexpected = [k for k in state_dict if k.startswith(prefix) and k[len(prefix):] not in known] if strict else []
    raise CheckpointMismatchError(_mismatch_message(adapter_name, missing, shapes, unexpected))


def _nonfinite(tensor: Tensor) -> bool:
    return tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())


def _refuse_nonfinite(keys: list[str]) -> None:
    if keys:
        shown = "\n    ".join(keys[:10]) + (f"\n    ... and {len(keys) - 10} more" if len(keys) > 10 else "")
        raise CheckpointMismatchError(
            f"The checkpoint's adapter tensors hold inf or NaN, so training from it cannot recover; it is refused "
            f"and nothing was loaded. {len(keys)} tensor(s):\n    {shown}\nHINT: resume from an earlier checkpoint, "
            "written before the loss became non-finite (AdapterHealth stops training at the first non-finite step).")


def _mismatch_message(adapter_name: str, missing: list[str], shapes: list[str], unexpected: list[str]) -> str:
    parts = [f"The checkpoint does not fit this model's adapter {adapter_name!r}; loading it would leave "
             "adapter weights at their initial values, so it is refused."]
    for label, items in (("missing from the checkpoint (adapter or trainable tensors)", missing),
                         ("with another shape", shapes), ("in the checkpoint but not in the model", unexpected)):
        if items:
            shown = "\n    ".join(items[:10]) + (f"\n    ... and {len(items) - 10} more" if len(items) > 10 else "")
            parts.append(f"  {len(items)} key(s) {label}:\n    {shown}")
    parts.append(_HINT)
    return "\n".join(parts)


class LoadGuard:
    """``load_state_dict`` hooks for a module with LoRA adapter ``adapter_name`` (picklable; see module docstring)."""

    def __init__(self, adapter_name: str) -> None:
        self.adapter_name = adapter_name
        self._prefix = ""

    def pre_hook(self, module: nn.Module, state_dict: dict[str, Tensor], prefix: str, local_metadata: dict,
                 strict: bool, missing_keys: list[str], unexpected_keys: list[str], error_msgs: list[str]) -> None:
        """Check the adapter's keys and shapes before anything is copied."""
        self._prefix = prefix
        check_state_dict(module, state_dict, self.adapter_name, prefix=prefix, strict=strict)

    def post_hook(self, module: nn.Module, incompatible_keys: Any) -> None:
        """Forgive missing frozen keys: an adapter-only checkpoint leaves the base as the module was built."""
        required = {self._prefix + k for k in required_state_keys(module, self.adapter_name)}
        incompatible_keys.missing_keys[:] = [k for k in incompatible_keys.missing_keys
                                             if k in required or not k.startswith(self._prefix)]


def install_load_guard(model: nn.Module, adapter_name: str) -> LoadGuard:
    """Register a :class:`LoadGuard` for ``adapter_name`` on ``model``, once (later calls return the same guard)."""
    guards: dict[str, LoadGuard] = model.__dict__.setdefault(_GUARDS_ATTR, {})
    if adapter_name not in guards:
        guard = LoadGuard(adapter_name)
        model.register_load_state_dict_pre_hook(guard.pre_hook)
        model.register_load_state_dict_post_hook(guard.post_hook)
        guards[adapter_name] = guard
    return guards[adapter_name]
