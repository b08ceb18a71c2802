"""Save and load adapters in the Hugging Face PEFT file format (``adapter_config.json`` + safetensors).

Files written here load with ``peft.PeftModel.from_pretrained`` and vLLM; adapters saved by PEFT load here.
Only safetensors (or ``weights_only`` pickles from old PEFT versions) are read: an adapter file cannot run code.
"""

from __future__ import annotations

import json
import logging
import pickle
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from lightning_lora.surgery.errors import AdapterLoadError, SurgeryError, UnknownAdapterError
from lightning_lora.surgery.io import method_files
from lightning_lora.surgery.io.atomic import atomic_dir
from lightning_lora.surgery.io.peft_format import (
    PEFT_PREFIX,
    base_model_name,
    config_from_peft,
    peft_config_dict,
    target_modules_for,
    task_type_of,
)
from lightning_lora.surgery.lora.apply import DEFAULT_ADAPTER, add_adapter, planned_layers, set_trainable
from lightning_lora.surgery.lora.config import LoRAConfig
from lightning_lora.surgery.lora.inventory import (
    adapter_configs,
    adapter_modules,
    adapter_parameters,
    find_lora_root,
    lora_layers,
)
from lightning_lora.surgery.lora.layer import LoRALayer
from lightning_lora.surgery.lora.report import SurgeryReport, count_parameters
from lightning_lora.surgery.lora.targets import candidate_modules, match_pattern, matches_name

log = logging.getLogger(__name__)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_LEGACY_WEIGHTS_NAME = "adapter_model.bin"


def adapter_state_dict(model: nn.Module, name: str = DEFAULT_ADAPTER) -> dict[str, Tensor]:
    """The tensors of adapter ``name`` under PEFT's keys (``base_model.model.<path>.lora_A.weight`` ...).

    Includes ``modules_to_save`` weights and the biases chosen by the config's ``bias``.
    """
    _, root = find_lora_root(model)
    config = _config_of(root, name)
    if not isinstance(config, LoRAConfig):
        return method_files.method_state_dict(root, name, config)
    tensors = {_peft_key(path, name): param for path, param in adapter_parameters(root, name).items()}
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}


def _peft_key(path: str, name: str) -> str:
    # Our factor paths end in `.lora_A.<adapter>`; PEFT's files drop the adapter name: `.lora_A.weight`.
    for factor in ("lora_A", "lora_B"):
        suffix = f".{factor}.{name}"
        if path.endswith(suffix):
            return f"{PEFT_PREFIX}{path[: -len(suffix)]}.{factor}.weight"
    return f"{PEFT_PREFIX}{path}"


def save_adapter(model: nn.Module, path: str | Path, *, name: str = DEFAULT_ADAPTER,
                 base_model_name_or_path: str | None = None, tensors: dict[str, Tensor] | None = None) -> Path:
    """Write adapter ``name`` to directory ``path`` in PEFT's format, atomically.

    Args:
        model: The adapted model (or any module holding it, e.g. a LightningModule).
        path: Output directory; replaced whole if it exists.
        name: Which adapter. Default: ``"default"``.
        base_model_name_or_path: Recorded in the config for PEFT / vLLM. Default: the model's own
            ``config.name_or_path`` when it is a transformers model.
        tensors: The adapter's tensors under PEFT keys, already gathered (a sharded model: see
            ``surgery/training/sharded_export.py``). Default: None (``adapter_state_dict(model, name)``).

    Returns:
        The directory written.
    """
    _, root = find_lora_root(model)
    config = _config_of(root, name)
    if not isinstance(config, LoRAConfig):  # prompt / P- / prefix tuning (PEFT's format), bottleneck (ours)
        return method_files.save_method_adapter(root, path, name, config, task_type=task_type_of(root),
                                                base_model=base_model_name_or_path or base_model_name(root))
    tensors = adapter_state_dict(root, name) if tensors is None else tensors
    wrapped = [p for p, layer in lora_layers(root) if name in layer.specs]
    targets, layers = target_modules_for(root, wrapped, config.modules_to_save)
    conv1d = any(layer.codec.name == "Conv1D" for _, layer in lora_layers(root))
    body = peft_config_dict(config, targets, layers, task_type=task_type_of(root),
                            base_model=base_model_name_or_path or base_model_name(root), fan_in_fan_out=conv1d)
    with atomic_dir(path) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(body, indent=2, sort_keys=True) + "\n")
    log.info("Saved adapter %r (%d tensors) to %s", name, len(tensors), path)
    return Path(path)


def _config_of(root: nn.Module, name: str) -> LoRAConfig:
    configs = adapter_configs(root)
    if name not in configs:
        known = sorted(configs) or "none"
        raise UnknownAdapterError(f"No adapter named {name!r} on this model (adapters: {known}).")
    return configs[name]


def read_adapter(path: str | Path) -> tuple[LoRAConfig, dict[str, Tensor]]:
    """Read a PEFT-format adapter directory without touching any model: its config and its tensors.

    Raises:
        FileNotFoundError: If the directory or its config / weights file is missing.
        AdapterLoadError: If the config is not valid JSON, not an object, has a field of the wrong type or value, or
            is not a LoRA adapter this project can load; if the weights file is not a readable safetensors file; or
            if a tensor holds inf or NaN (each message names the file, field or tensor).
    """
    directory = Path(path)
    config_file = directory / CONFIG_NAME
    if not config_file.is_file():
        raise FileNotFoundError(f"No {CONFIG_NAME} in {str(directory)!r}; an adapter directory holds {CONFIG_NAME} "
                                f"and {WEIGHTS_NAME}.")
    config = config_from_peft(_read_json_object(config_file), str(config_file))
    if (directory / WEIGHTS_NAME).is_file():
        tensors = _read_safetensors(directory / WEIGHTS_NAME)
    elif (directory / _LEGACY_WEIGHTS_NAME).is_file():
        tensors = _read_legacy(directory / _LEGACY_WEIGHTS_NAME)
    else:
        raise FileNotFoundError(f"No {WEIGHTS_NAME} in {str(directory)!r}.")
    _check_finite(tensors, directory)
    return config, tensors


def _read_json_object(config_file: Path) -> dict[str, Any]:
    try:
        data = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AdapterLoadError(f"{str(config_file)!r} is not valid JSON ({err}); it should hold PEFT's adapter config "
                               f"object, e.g. {{\"peft_type\": \"LORA\", \"r\": 8, ...}}. Re-save the adapter.") from err
    if not isinstance(data, dict):
        raise AdapterLoadError(f"{str(config_file)!r} holds a JSON {type(data).__name__}, not an object; it should hold "
                               f"PEFT's adapter config object, e.g. {{\"peft_type\": \"LORA\", \"r\": 8, ...}}.")
    return data


def _read_safetensors(file: Path) -> dict[str, Tensor]:
    try:
        return load_file(str(file), device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        size = file.stat().st_size
        raise AdapterLoadError(f"{str(file)!r} ({size} bytes) is not a readable safetensors file ({err}); it is empty, "
                               f"truncated or another format. Save the adapter again (save_adapter or PEFT's "
                               f"save_pretrained).") from err


def _read_legacy(file: Path) -> dict[str, Tensor]:
    try:
        tensors = torch.load(file, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, OSError, ValueError, EOFError) as err:  # bad / truncated / unsafe
        raise AdapterLoadError(f"{str(file)!r} cannot be read as a weights-only PyTorch file ({err}); save the adapter "
                               f"again as {WEIGHTS_NAME}.") from err
    if not isinstance(tensors, dict) or not all(isinstance(v, Tensor) for v in tensors.values()):
        raise AdapterLoadError(f"{str(file)!r} does not hold a dict of tensors; save the adapter again as {WEIGHTS_NAME}.")
    return tensors


def _check_finite(tensors: dict[str, Tensor], directory: Path) -> None:
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise AdapterLoadError(f"The adapter in {str(directory)!r} has tensors holding inf or NaN: {shown}. Loading it "
                               f"would make every output NaN; use a checkpoint from before training diverged.")


def load_adapter(model: nn.Module, path: str | Path, *, name: str = DEFAULT_ADAPTER, trainable: bool = False,
                 replace: bool = False) -> SurgeryReport:
    """Apply the adapter saved in ``path`` (by PEFT or by :func:`save_adapter`) to a plain base model, in place.

    Every key and shape is checked against the model before anything changes.

    Args:
        model: The base model (without this adapter).
        path: An adapter directory in PEFT's format.
        name: Name to load it under. Default: ``"default"``.
        trainable: Leave the adapter trainable (to continue training); otherwise every parameter is frozen.
        replace: Replace an existing adapter of the same name instead of refusing.

    Returns:
        The :class:`SurgeryReport` of the surgery.

    Raises:
        AdapterLoadError: If the file's keys or shapes do not fit the model (the message lists them).
        SurgeryError: If an adapter called ``name`` exists and ``replace`` is False.
    """
    _, root = find_lora_root(model)
    if name in adapter_configs(root) and not replace:
        raise SurgeryError(f"An adapter named {name!r} is already loaded; pass replace=True or another name=.")
    if method_files.is_method_dir(path):
        return _load_method(root, path, name, trainable)
    config, tensors = check_adapter_fits(root, path)
    if name in adapter_configs(root):
        _delete_adapter(root, name)
    report = add_adapter(root, config, name)
    _copy_tensors(root, tensors, name)
    for _, layer in lora_layers(root):
        if name in layer.specs:
            layer.active_adapters.append(name)
    if trainable:
        set_trainable(root, name)
    else:
        for param in root.parameters():
            param.requires_grad_(False)
    report.trainable_params, report.total_params = count_parameters(root)
    return report


def check_adapter_fits(model: nn.Module, path: str | Path) -> tuple[LoRAConfig, dict[str, Tensor]]:
    """Read the adapter in ``path`` and check that it fits ``model`` (keys, shapes), without changing anything.

    The one check that :func:`load_adapter` and :func:`~lightning_lora.load_adapters` run before any change.

    Args:
        model: The base model (or a module holding it).
        path: An adapter directory in PEFT's format.

    Returns:
        The config (targets narrowed to the ones this model has) and the tensors, ready to load.

    Raises:
        FileNotFoundError: If files are missing.
        AdapterLoadError: If the files cannot be read or do not fit the model (every problem is listed).
    """
    if method_files.is_method_dir(path):
        config, tensors, _ = method_files.check_method_fits(find_lora_root(model)[1], path)
        return config, tensors
    config, tensors = read_adapter(path)
    tensors = _without_peft_wrapper_keys(tensors)
    _, root = find_lora_root(model)
    config = _matching_config(root, config, tensors, path)
    _check_tensors(_expected_shapes(root, config), tensors, path)
    _check_other_tensors(root, tensors, path)
    return config, tensors


def _matching_config(root: nn.Module, config: LoRAConfig, tensors: dict[str, Tensor], path: str | Path) -> LoRAConfig:
    # PEFT accepts target lists where only some names exist in the model; keep the patterns that match here so
    # that a config written for a family of models loads, then let the key check below decide.
    modules = candidate_modules(root)
    kept = [t for t in config.targets if match_pattern(t, root, modules)]
    if not kept:
        raise AdapterLoadError(f"{path}: none of target_modules={config.targets!r} exists in this model; is it the right "
                               "base model?")
    data = config.to_dict()
    data["targets"] = kept
    # PEFT's sequence-classification models add both "classifier" and "score" to `modules_to_save` (duplicates
    # included) whichever exists; keep the ones this model has.
    names = [n for n in modules if n]
    saved = dict.fromkeys(p for p in config.modules_to_save if any(matches_name(p, n) for n in names))
    data["modules_to_save"] = list(saved)
    return LoRAConfig.from_dict(data)


def _without_peft_wrapper_keys(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    # PEFT with bias="all" and modules_to_save also saves `<m>.original_module.bias` (the frozen original) and
    # `<m>.modules_to_save.bias` (the trained copy, also saved as `<m>.bias`). Keep the trained values under the
    # plain module path, which is where they live in our (unwrapped) modules_to_save.
    plain = {k: v for k, v in tensors.items() if ".original_module." not in k and ".modules_to_save." not in k}
    for key, value in tensors.items():
        if ".modules_to_save." in key:
            plain.setdefault(key.replace(".modules_to_save.", "."), value)
    return plain


def _expected_shapes(root: nn.Module, config: LoRAConfig) -> dict[str, tuple[int, ...]]:
    layers, _ = planned_layers(root, config)
    expected: dict[str, tuple[int, ...]] = {}
    for layer in layers:
        expected[f"{PEFT_PREFIX}{layer.name}.lora_A.weight"] = (layer.r, layer.in_features)
        expected[f"{PEFT_PREFIX}{layer.name}.lora_B.weight"] = (layer.out_features, layer.r)
    return expected


def _check_tensors(expected: dict[str, tuple[int, ...]], tensors: dict[str, Tensor], path: str | Path) -> None:
    lora_keys = {k for k in tensors if ".lora_" in k}
    missing = sorted(set(expected) - lora_keys)
    unexpected = sorted(lora_keys - set(expected))
    shapes = [f"{k}: file {tuple(tensors[k].shape)} vs model {expected[k]}" for k in sorted(lora_keys & set(expected))
              if tuple(tensors[k].shape) != expected[k]]
    problems = []
    for label, items in (("missing from the file", missing), ("not in the model", unexpected), ("shape mismatch", shapes)):
        if items:
            shown = "\n    ".join(items[:10]) + (f"\n    ... and {len(items) - 10} more" if len(items) > 10 else "")
            problems.append(f"  {len(items)} key(s) {label}:\n    {shown}")
    if problems:
        raise AdapterLoadError(f"The adapter in {str(path)!r} does not fit this model; nothing was changed.\n"
                               + "\n".join(problems))


def _check_other_tensors(root: nn.Module, tensors: dict[str, Tensor], path: str | Path) -> None:
    params = dict(root.named_parameters())
    problems = []
    for key in sorted(k for k in tensors if ".lora_" not in k):
        target = _lookup(params, key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key)
        if target is None:
            problems.append(f"{key}: no such parameter in the model")
        elif tuple(target.shape) != tuple(tensors[key].shape):
            problems.append(f"{key}: file {tuple(tensors[key].shape)} vs model {tuple(target.shape)}")
    if problems:
        raise AdapterLoadError(f"The adapter in {str(path)!r} does not fit this model; nothing was changed.\n  "
                               + "\n  ".join(problems[:10]))


def _copy_tensors(root: nn.Module, tensors: dict[str, Tensor], name: str) -> None:
    params = dict(root.named_parameters())
    layers = dict(lora_layers(root))
    with torch.no_grad():
        for key, value in tensors.items():
            path = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
            target = _lora_param(layers, path, name)
            if target is None:
                target = _lookup(params, path)
            target.copy_(value.to(dtype=target.dtype, device=target.device))


def _lookup(params: dict[str, nn.Parameter], path: str) -> nn.Parameter | None:
    # Biases of wrapped layers are `<layer>.base_layer.bias` after wrapping and `<layer>.bias` before.
    for candidate in (path, path.replace(".base_layer.", "."), _with_base_layer(path)):
        if candidate in params:
            return params[candidate]
    return None


def _with_base_layer(path: str) -> str:
    head, _, leaf = path.rpartition(".")
    return f"{head}.base_layer.{leaf}" if head else path


def _lora_param(layers: dict[str, LoRALayer], path: str, name: str) -> nn.Parameter | None:
    for factor in ("lora_A", "lora_B"):
        layer_path, marker, _ = path.partition(f".{factor}.")
        if marker and layer_path in layers:
            return getattr(layers[layer_path], factor)[name]
    return None


def _delete_adapter(root: nn.Module, name: str) -> None:
    for _, layer in adapter_modules(root):
        if name in layer.specs:
            layer.delete_adapter(name)
    adapter_configs(root).pop(name, None)


def _load_method(root: nn.Module, path: str | Path, name: str, trainable: bool) -> SurgeryReport:
    method_files.check_method_fits(root, path)  # before any change, also before a replaced adapter goes
    if name in adapter_configs(root):
        _delete_adapter(root, name)
    method_files.load_method_adapter(root, path, name)
    hosts = [m for _, m in adapter_modules(root) if name in m.specs]
    for host in hosts:
        if type(host).__name__ == "VirtualTokens":  # one virtual-token adapter applies at a time
            host.active_adapters.clear()
        host.active_adapters.append(name)
    if trainable:
        set_trainable(root, name)
    else:
        for param in root.parameters():
            param.requires_grad_(False)
    trainable_params, total = count_parameters(root)
    params = sum(p.numel() for p in adapter_parameters(root, name).values())
    return SurgeryReport(name, [], [], [], trainable_params, total, params)
