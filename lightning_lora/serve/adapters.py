"""Checks on an adapter directory before the server loads it: confinement, file format, LoRA type, finite tensors.

These run without the model (in the HTTP process for ``/v1/load_lora_adapter``, and at start-up); whether the
adapter fits the base model (its keys and shapes) is checked by :func:`lightning_lora.load_adapter` in the worker,
before the model changes.
"""

from __future__ import annotations

import json
from pathlib import Path

from lightning_lora.serve.errors import ServeError

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


def check_adapter_dir(path: object, adapter_root: str | None = None) -> Path:
    """Validate an adapter directory for serving; returns its resolved path.

    Args:
        path: The directory (PEFT format: ``adapter_config.json`` + ``adapter_model.safetensors``).
        adapter_root: If set, ``path`` must resolve (symlinks followed) to a directory inside it.

    Raises:
        ServeError: 400 naming the problem: outside ``adapter_root``, missing files, only a pickle
            (``adapter_model.bin``, never read), not a LoRA adapter, unreadable or non-finite tensors.
    """
    if not isinstance(path, str) or not path:
        raise ServeError(f"lora_path must be a non-empty string, got {type(path).__name__} {path!r}", 400, "lora_path")
    resolved = Path(path).expanduser().resolve()
    if adapter_root is not None:
        root = Path(adapter_root).expanduser().resolve()
        if not resolved.is_relative_to(root):
            raise ServeError(f"lora_path {path!r} is outside the adapter root {str(root)!r} (--adapter_root); put the "
                             f"adapter under it", 400, "lora_path")
    if not resolved.is_dir():
        raise ServeError(f"lora_path {path!r} is not a directory; give an adapter directory with {CONFIG_NAME} and "
                         f"{WEIGHTS_NAME}", 400, "lora_path")
    _check_config(resolved, path)
    _check_weights(resolved, path)
    return resolved


def _check_config(directory: Path, shown: str) -> None:
    from lightning_lora.surgery.errors import AdapterLoadError
    from lightning_lora.surgery.io.peft_format import config_from_peft

    config_file = directory / CONFIG_NAME
    if not config_file.is_file():
        raise ServeError(f"no {CONFIG_NAME} in {shown!r}; an adapter directory holds {CONFIG_NAME} and {WEIGHTS_NAME}",
                         400, "lora_path")
    try:
        config_from_peft(json.loads(config_file.read_text()), str(config_file))
    except json.JSONDecodeError as err:
        raise ServeError(f"{config_file} is not valid JSON: {err}", 400, "lora_path") from err
    except (AdapterLoadError, ValueError, TypeError) as err:
        raise ServeError(f"{shown!r} is not a LoRA adapter this server can load: {err}", 400, "lora_path") from err


def _check_weights(directory: Path, shown: str) -> None:
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        legacy = " (it has adapter_model.bin: pickles are never read; convert it with PEFT's save_pretrained)" if (
            directory / "adapter_model.bin").exists() else ""
        raise ServeError(f"no {WEIGHTS_NAME} in {shown!r}{legacy}; only safetensors adapter files are read", 400,
                         "lora_path")
    try:
        tensors = load_file(str(weights), device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise ServeError(f"{weights} is not a readable safetensors file: {err}", 400, "lora_path") from err
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise ServeError(f"the adapter in {shown!r} has NaN or infinite values in {len(bad)} tensor(s), e.g. "
                         f"{bad[0]!r}; it would produce garbage, so it is refused", 400, "lora_path")
