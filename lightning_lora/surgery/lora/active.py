"""Which adapters a forward adds: list, activate, switch off and delete named adapters, in place.

The base weights are held once; each adapter is a pair of small factors per wrapped layer, keyed by its name
(``apply_lora(model, cfg, name="legal")``). Choosing one per batch *row* is :func:`~lightning_lora.mixed_batch`;
saving and loading several at once is :mod:`lightning_lora.surgery.io.adapter_dirs`.

Example:
    >>> from torch import nn
    >>> from lightning_lora import LoRAConfig, apply_lora, disable_adapters, list_adapters, set_active_adapters
    >>> model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> _ = apply_lora(model, LoRAConfig(r=2, targets=["0"]), name="legal")
    >>> _ = apply_lora(model, LoRAConfig(r=2, targets=["0", "2"]), name="medical")
    >>> list_adapters(model)
    ['legal', 'medical']
    >>> set_active_adapters(model, "medical")
    >>> with disable_adapters(model):  # the bare base model, e.g. a frozen reference for DPO
    ...     pass
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence

from torch import nn

from lightning_lora.surgery.errors import SurgeryError, UnknownAdapterError
from lightning_lora.surgery.lora.inventory import adapter_configs, adapter_modules
from lightning_lora.surgery.lora.layer import LoRALayer
from lightning_lora.surgery.lora.protocol import AdapterModule

log = logging.getLogger(__name__)

_LayerState = tuple[list[str], bool]


# --------------------------------------------------------------------------------------------------- inspecting
def list_adapters(model: nn.Module) -> list[str]:
    """Names of the adapters on ``model``, in the order they were added.

    Args:
        model: A model with LoRA layers (or any module holding one, e.g. a LightningModule).

    Returns:
        The adapter names (empty when the model has no LoRA layers).
    """
    names = dict.fromkeys(adapter_configs(model))
    for _, layer in adapter_modules(model):
        names.update(dict.fromkeys(layer.specs))
    return list(names)


def get_active_adapters(model: nn.Module) -> list[str]:
    """Names of the adapters that are active in at least one layer (what a plain forward adds)."""
    names: dict[str, None] = {}
    for _, layer in adapter_modules(model):
        names.update(dict.fromkeys(layer.active_adapters))
    return list(names)


def check_adapter_names(model: nn.Module, names: Sequence[str], what: str) -> None:
    """Raise :class:`UnknownAdapterError` naming every entry of ``names`` the model does not have.

    Args:
        model: A model with LoRA layers.
        names: Adapter names to check.
        what: The calling function's name, for the message.
    """
    known = list_adapters(model)
    unknown = [n for n in dict.fromkeys(names) if n not in known]
    if unknown:
        raise UnknownAdapterError(f"{what}: no adapter named {', '.join(map(repr, unknown))} on this model; its adapters "
                                  f"are {known or 'none (apply_lora or load_adapter first)'}.")


def require_lora_adapters(model: nn.Module, names: Sequence[str], what: str, error: type[Exception] = SurgeryError) -> None:
    """Raise ``error`` naming every adapter in ``names`` that is not LoRA (``what`` is a LoRA-only feature)."""
    from lightning_lora.surgery.lora.config import LoRAConfig

    configs = adapter_configs(model)
    others = [f"{n!r} ({getattr(configs[n], 'method', type(configs[n]).__name__)})" for n in dict.fromkeys(names)
              if n in configs and not isinstance(configs[n], LoRAConfig)]
    if others:
        raise error(f"{what} works with LoRA adapters only; {', '.join(others)} {'is' if len(others) == 1 else 'are'} "
                    "not. HINT: use set_active_adapters / use_adapters to switch to such an adapter for a whole batch.")


def _require_lora(model: nn.Module, what: str) -> list[tuple[str, AdapterModule]]:
    # Every adapter-holding module (LoRA layers and the other methods' hosts) switches the same way.
    layers = adapter_modules(model)
    if not layers:
        raise SurgeryError(f"{what}: the model has no LoRA layers or other adapters; apply_lora / apply_peft(model, config) or "
                           "load_adapter(...) first.")
    return layers


def _refuse_merged(layers: list[tuple[str, AdapterModule]], what: str) -> None:
    merged = sorted({n for _, layer in layers for n in layer.merged_adapters})
    if merged:
        raise SurgeryError(f"{what}: adapters {merged} are merged into the base weights, so they cannot be switched "
                           f"per call; call unmerge_lora(model) first.")


# --------------------------------------------------------------------------------------------------- activating
def set_active_adapters(model: nn.Module, names: str | Sequence[str]) -> None:
    """Make ``names`` the adapters a forward adds (their updates are summed), in place.

    Trainability is not changed: :func:`~lightning_lora.surgery.lora.apply.set_trainable` chooses the adapter that trains.

    Args:
        model: A model with LoRA layers.
        names: One adapter name or several; an empty list switches every adapter off.

    Raises:
        UnknownAdapterError: If a name is not an adapter of the model (the message lists the known ones).
        SurgeryError: If the model has no LoRA layers, or some adapters are merged (unmerge first).
    """
    wanted = [names] if isinstance(names, str) else list(names)
    layers = _require_lora(model, "set_active_adapters")
    check_adapter_names(model, wanted, "set_active_adapters")
    _refuse_merged(layers, "set_active_adapters")
    for _, layer in layers:
        layer.active_adapters[:] = [n for n in dict.fromkeys(wanted) if n in layer.specs]


def _snapshot(layers: list[tuple[str, AdapterModule]]) -> list[_LayerState]:
    return [(list(layer.active_adapters), layer.disabled) for _, layer in layers]


def _restore(layers: list[tuple[str, AdapterModule]], states: list[_LayerState]) -> None:
    for (_, layer), (active, disabled) in zip(layers, states):
        layer.active_adapters[:] = active
        layer.disabled = disabled


@contextlib.contextmanager
def _restored_after(layers: list[tuple[str, AdapterModule]], *, disabled: bool) -> Iterator[None]:
    # Shared by use_adapters / disable_adapters: set every layer's `disabled` flag, restore the exact state on exit.
    states = _snapshot(layers)
    try:
        for _, layer in layers:
            layer.disabled = disabled
        yield
    finally:
        _restore(layers, states)


@contextlib.contextmanager
def use_adapters(model: nn.Module, names: str | Sequence[str]) -> Iterator[nn.Module]:
    """Run with ``names`` active (and adapters enabled) inside the block; the previous state comes back on exit.

    Args:
        model: A model with LoRA layers.
        names: The adapter(s) to activate inside the block.

    Yields:
        The model.

    Raises:
        UnknownAdapterError, SurgeryError: As :func:`set_active_adapters`.
    """
    layers = _require_lora(model, "use_adapters")
    with _restored_after(layers, disabled=False):
        set_active_adapters(model, names)
        yield model


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Run the bare base model inside the block: every adapter off; the previous state is restored exactly on exit.

    Usable as the frozen reference model of DPO-style losses without a second copy of the weights::

        with torch.no_grad(), disable_adapters(policy):
            reference_logits = policy(input_ids).logits

    ``modules_to_save`` and biases that an adapter trains are changed in place, so they stay in effect here.

    Args:
        model: A model with LoRA layers.

    Yields:
        The model.

    Raises:
        SurgeryError: If the model has no LoRA layers, or adapters are merged (the base weights are then not the
            base any more; call ``unmerge_lora(model)`` first).
    """
    layers = _require_lora(model, "disable_adapters")
    _refuse_merged(layers, "disable_adapters")
    shared = sorted(n for n, cfg in adapter_configs(model).items()
                    if getattr(cfg, "modules_to_save", None) or getattr(cfg, "bias", "none") != "none")
    if shared:
        log.warning("disable_adapters: adapters %s train modules_to_save or biases in place; those stay in effect.", shared)
    with _restored_after(layers, disabled=True):
        yield model


# --------------------------------------------------------------------------------------------------- deleting
def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter ``name`` from every layer and forget its config, in place.

    A layer left without any adapter is unwrapped (its base layer put back), so deleting the last adapter gives the
    plain base model.

    Raises:
        UnknownAdapterError: If the model has no adapter ``name`` (the message lists the known ones).
        SurgeryError: If that adapter is merged (unmerge first).
    """
    check_adapter_names(model, [name], "delete_adapter")
    layers = adapter_modules(model)
    if any(name in layer.merged_adapters for _, layer in layers):
        raise SurgeryError(f"delete_adapter: adapter {name!r} is merged into the base weights; call unmerge_lora(model) "
                           f"first.")
    for path, layer in layers:
        if name in layer.specs:
            layer.delete_adapter(name)
        if not layer.specs and isinstance(layer, LoRALayer):  # other hosts stay, empty: a no-op
            parent_path, _, child = path.rpartition(".")
            setattr(model.get_submodule(parent_path) if parent_path else model, child, layer.base_layer)
    adapter_configs(model).pop(name, None)
    log.info("Deleted adapter %r", name)
