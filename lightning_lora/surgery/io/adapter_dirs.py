"""Several adapters in one directory, in PEFT's multi-adapter layout: save, find and load them together.

As PEFT 0.21's ``save_pretrained``: the adapter called ``"default"`` goes to the directory itself and every other
adapter to ``<dir>/<name>/``, each in PEFT's format (:mod:`lightning_lora.surgery.io.adapter_files`).
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Sequence
from pathlib import Path

from torch import nn

from lightning_lora.surgery.errors import SurgeryError, UnknownAdapterError
from lightning_lora.surgery.io.adapter_files import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    check_adapter_fits,
    load_adapter,
    save_adapter,
)
from lightning_lora.surgery.io.atomic import atomic_dir
from lightning_lora.surgery.lora.active import check_adapter_names, get_active_adapters, list_adapters, set_active_adapters
from lightning_lora.surgery.lora.apply import DEFAULT_ADAPTER
from lightning_lora.surgery.lora.report import SurgeryReport

log = logging.getLogger(__name__)

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
            :func:`~lightning_lora.surgery.io.adapter_files.load_adapter`).
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
        check_adapter_fits(model, found[name])
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
