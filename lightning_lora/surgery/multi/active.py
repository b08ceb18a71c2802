"""Several named adapters on one base model: list, activate, switch off, delete, save and load them together.

The base weights are held once; each adapter is a pair of small factors per wrapped layer, keyed by its name
(``apply_lora(model, cfg, name="legal")``). Choosing one per batch *row* is :func:`~lightning_lora.surgery.mixed.
mixed_batch`; building a new adapter out of others is :func:`~lightning_lora.surgery.combine.combine_adapters`.

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

On disk, :func:`save_adapters` follows PEFT 0.21's ``save_pretrained``: the adapter called ``"default"`` goes to the
directory itself and every other adapter to ``<dir>/<name>/``, each in PEFT's format.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

from torch import nn

from lightning_lora.surgery._io import atomic_dir
from lightning_lora.surgery.adapters import CONFIG_NAME, WEIGHTS_NAME, load_adapter, read_adapter, save_adapter
from lightning_lora.surgery.apply import DEFAULT_ADAPTER
from lightning_lora.surgery.errors import SurgeryError
from lightning_lora.surgery.layers import LoRALayer
from lightning_lora.surgery.registry import adapter_configs, find_lora_root, lora_layers
from lightning_lora.surgery.report import SurgeryReport

log = logging.getLogger(__name__)

_LayerState = tuple[list[str], bool]


class UnknownAdapterError(ValueError):
    """An adapter name that the model does not have (the message lists the ones it has)."""


# --------------------------------------------------------------------------------------------------- inspecting
def list_adapters(model: nn.Module) -> list[str]:
    """Names of the adapters on ``model``, in the order they were added.

    Args:
        model: A model with LoRA layers (or any module holding one, e.g. a LightningModule).

    Returns:
        The adapter names (empty when the model has no LoRA layers).
    """
    names = dict.fromkeys(adapter_configs(model))
    for _, layer in lora_layers(model):
        names.update(dict.fromkeys(layer.specs))
    return list(names)


def get_active_adapters(model: nn.Module) -> list[str]:
    """Names of the adapters that are active in at least one layer (what a plain forward adds)."""
    names: dict[str, None] = {}
    for _, layer in lora_layers(model):
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


def _require_lora(model: nn.Module, what: str) -> list[tuple[str, LoRALayer]]:
    layers = lora_layers(model)
    if not layers:
        raise SurgeryError(f"{what}: the model has no LoRA layers; apply_lora(model, config) or load_adapter(...) first.")
    return layers


def _refuse_merged(layers: list[tuple[str, LoRALayer]], what: str) -> None:
    merged = sorted({n for _, layer in layers for n in layer.merged_adapters})
    if merged:
        raise SurgeryError(f"{what}: adapters {merged} are merged into the base weights, so they cannot be switched "
                           f"per call; call unmerge_lora(model) first.")


# --------------------------------------------------------------------------------------------------- activating
def set_active_adapters(model: nn.Module, names: str | Sequence[str]) -> None:
    """Make ``names`` the adapters a forward adds (their updates are summed), in place.

    Trainability is not changed: :func:`~lightning_lora.surgery.apply.set_trainable` chooses the adapter that trains.

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


def _snapshot(layers: list[tuple[str, LoRALayer]]) -> list[_LayerState]:
    return [(list(layer.active_adapters), layer.disabled) for _, layer in layers]


def _restore(layers: list[tuple[str, LoRALayer]], states: list[_LayerState]) -> None:
    for (_, layer), (active, disabled) in zip(layers, states):
        layer.active_adapters[:] = active
        layer.disabled = disabled


@contextlib.contextmanager
def _restored_after(layers: list[tuple[str, LoRALayer]], *, disabled: bool) -> Iterator[None]:
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
    shared = sorted(n for n, cfg in adapter_configs(model).items() if cfg.modules_to_save or cfg.bias != "none")
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
    layers = lora_layers(model)
    if any(name in layer.merged_adapters for _, layer in layers):
        raise SurgeryError(f"delete_adapter: adapter {name!r} is merged into the base weights; call unmerge_lora(model) "
                           f"first.")
    from lightning_lora.surgery.mixed import clear_mixed_batch_cache  # mixed imports this module

    clear_mixed_batch_cache(model)  # drop the stacked copies mixed_batch kept of this adapter
    for path, layer in layers:
        if name in layer.specs:
            layer.delete_adapter(name)
        if not layer.specs:
            parent_path, _, child = path.rpartition(".")
            setattr(model.get_submodule(parent_path) if parent_path else model, child, layer.base_layer)
    adapter_configs(model).pop(name, None)
    log.info("Deleted adapter %r", name)


# --------------------------------------------------------------------------------------------------- saving
_RESERVED = {CONFIG_NAME, WEIGHTS_NAME, "adapter_model.bin", "README.md"}


def adapter_subdir(name: str) -> str:
    """Where adapter ``name`` lives inside a multi-adapter directory: ``""`` for ``"default"``, else ``name``."""
    return "" if name == DEFAULT_ADAPTER else name


def _check_dir_names(names: Sequence[str]) -> None:
    bad = [n for n in names if n in {".", ".."} or n in _RESERVED or not n or n.startswith(".") or "/" in n or "\\" in n]
    if bad:
        raise SurgeryError(f"save_adapters: adapter names {bad} cannot be directory names (each adapter other than "
                           f"'default' is saved to <dir>/<name>); rename them with combine_adapters or load them under "
                           f"other names.")


def save_adapters(model: nn.Module, path: str | Path, *, names: Sequence[str] | None = None,
                  base_model_name_or_path: str | None = None) -> dict[str, Path]:
    """Write several adapters at once in PEFT's multi-adapter layout, atomically (the whole directory or nothing).

    As PEFT 0.21's ``save_pretrained``: ``"default"`` goes to ``path`` itself, every other adapter to
    ``path/<name>/``; each directory holds ``adapter_config.json`` and ``adapter_model.safetensors``. PEFT then
    loads them with ``PeftModel.from_pretrained(base, path)`` and ``.load_adapter(f"{path}/{name}", adapter_name=name)``.

    Args:
        model: The adapted model (or a module holding it).
        path: Output directory; replaced whole if it exists.
        names: Which adapters. Default: all of them.
        base_model_name_or_path: Recorded in each config. Default: the model's ``config.name_or_path``.

    Returns:
        Adapter name -> the directory it was written to.

    Raises:
        UnknownAdapterError: If ``names`` holds an adapter the model does not have.
        SurgeryError: If there is nothing to save, or a name cannot be a directory name.
    """
    chosen = list(dict.fromkeys(names)) if names is not None else list_adapters(model)
    check_adapter_names(model, chosen, "save_adapters")
    if not chosen:
        raise SurgeryError("save_adapters: the model has no adapters to save.")
    _check_dir_names([n for n in chosen if n != DEFAULT_ADAPTER])
    target = Path(path)
    with atomic_dir(target) as tmp:
        for name in chosen:
            if name == DEFAULT_ADAPTER:  # save_adapter replaces its directory whole: stage, then move the files up
                staged = save_adapter(model, tmp / ".default", name=name, base_model_name_or_path=base_model_name_or_path)
                for file in staged.iterdir():
                    file.rename(tmp / file.name)
                shutil.rmtree(staged)
            else:
                save_adapter(model, tmp / name, name=name, base_model_name_or_path=base_model_name_or_path)
    log.info("Saved adapters %s to %s", chosen, target)
    return {name: target / adapter_subdir(name) for name in chosen}


# --------------------------------------------------------------------------------------------------- loading
def find_adapters(path: str | Path) -> dict[str, Path]:
    """The adapters stored in a multi-adapter directory (PEFT's layout), by name, without reading their weights.

    ``path/adapter_config.json`` is adapter ``"default"``; each ``path/<name>/adapter_config.json`` is adapter
    ``name``.

    Raises:
        FileNotFoundError: If ``path`` is not a directory or holds no adapter.
    """
    directory = Path(path)
    if not directory.is_dir():
        raise FileNotFoundError(f"{str(directory)!r} is not a directory; save_adapters(model, dir) writes one.")
    found = {DEFAULT_ADAPTER: directory} if (directory / CONFIG_NAME).is_file() else {}
    for sub in sorted(directory.iterdir()):
        if sub.is_dir() and not sub.name.startswith(".") and (sub / CONFIG_NAME).is_file():
            found[sub.name] = sub
    if not found:
        raise FileNotFoundError(f"No adapter in {str(directory)!r}: expected {CONFIG_NAME} in it (adapter 'default') "
                                f"or in its subdirectories (one per adapter name).")
    return found


def load_adapters(model: nn.Module, path: str | Path, *, names: Sequence[str] | None = None, replace: bool = False,
                  trainable: bool = False, active: str | Sequence[str] | None = None) -> dict[str, SurgeryReport]:
    """Load every adapter of a multi-adapter directory (written by :func:`save_adapters` or PEFT), in place.

    Every adapter is read and checked against the model (names, keys, shapes) before the first one is loaded.

    Args:
        model: The base model, possibly with other adapters already.
        path: A directory in PEFT's multi-adapter layout (see :func:`find_adapters`).
        names: Load only these adapters. Default: all found.
        replace: Replace adapters that already exist under the same names instead of refusing.
        trainable: Leave the loaded adapters trainable; otherwise every parameter is frozen (as
            :func:`~lightning_lora.surgery.adapters.load_adapter`).
        active: The adapter(s) active afterwards. Default: the adapters active before the call, or, if none
            were, the first loaded one (``"default"`` when present, as PEFT does).

    Returns:
        Adapter name -> the :class:`SurgeryReport` of its surgery.

    Raises:
        FileNotFoundError: If ``path`` holds no adapter.
        UnknownAdapterError: If ``names`` or ``active`` name an adapter that is neither found nor loaded.
        SurgeryError: If an adapter of the same name exists and ``replace`` is False (all clashes listed).
        AdapterLoadError: If an adapter's keys or shapes do not fit the model.
    """
    found = find_adapters(path)
    chosen = list(dict.fromkeys(names)) if names is not None else list(found)
    missing = [n for n in chosen if n not in found]
    if missing:
        raise UnknownAdapterError(f"load_adapters: {missing} not found in {str(path)!r}; it holds {list(found)}.")
    clashes = [n for n in chosen if n in list_adapters(model)]
    if clashes and not replace:
        raise SurgeryError(f"load_adapters: adapters {clashes} are already on the model; pass replace=True to "
                           f"replace them, or names= to load only the others.")
    wanted_active = _active_after(model, chosen, active)
    for name in chosen:
        _check_fits(model, found[name])
    before = get_active_adapters(model)
    reports = {name: load_adapter(model, found[name], name=name, trainable=trainable, replace=replace) for name in chosen}
    set_active_adapters(model, wanted_active if wanted_active is not None else before)
    log.info("Loaded adapters %s from %s", chosen, path)
    return reports


def _active_after(model: nn.Module, chosen: list[str], active: str | Sequence[str] | None) -> list[str] | None:
    if active is not None:
        wanted = [active] if isinstance(active, str) else list(active)
        unknown = [n for n in wanted if n not in chosen and n not in list_adapters(model)]
        if unknown:
            raise UnknownAdapterError(f"load_adapters: active={unknown} is neither loaded now nor on the model "
                                      f"(loading {chosen}; on the model: {list_adapters(model)}).")
        return wanted
    if get_active_adapters(model):
        return None  # keep what was active
    return chosen[:1]


def _check_fits(model: nn.Module, directory: Path) -> None:
    # The same checks load_adapter runs before it changes anything, done here for every adapter first, so that a
    # bad third adapter does not leave the first two loaded.
    from lightning_lora.surgery import adapters as _adapters

    config, tensors = read_adapter(directory)
    _, root = find_lora_root(model)
    config = _adapters._matching_config(root, config, tensors, directory)
    _adapters._check_tensors(_adapters._expected_shapes(root, config, "\0probe"), tensors, directory)
    _adapters._check_other_tensors(root, tensors, directory)
