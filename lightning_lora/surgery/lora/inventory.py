"""Where adapters live on a model: the LoRA layers, the configs recorded for them, and the tensors of each adapter.

Everything here only reads the model (except :func:`record_config`). "Which tensors belong to adapter X" is
answered in one place, :func:`adapter_parameters`, found structurally (the tensors of every
:class:`~lightning_lora.surgery.lora.protocol.AdapterModule` -- LoRA layers and the hosts of the other methods --,
the modules a LoRA config saves, the biases it trains), never by name substrings.
"""

from __future__ import annotations

import copy
from typing import Any

from torch import nn

from lightning_lora.surgery.lora.config import LoRAConfig
from lightning_lora.surgery.lora.layer import LoRALayer
from lightning_lora.surgery.lora.protocol import AdapterModule
from lightning_lora.surgery.lora.targets import candidate_modules, matches_name

_CONFIGS_ATTR = "_lora_configs"


def lora_layers(model: nn.Module) -> list[tuple[str, LoRALayer]]:
    """Every LoRA wrapper in the model with its path, in model order (found structurally, not by name)."""
    return [(name, module) for name, module in model.named_modules() if isinstance(module, LoRALayer)]


def adapter_modules(model: nn.Module) -> list[tuple[str, AdapterModule]]:
    """Every module holding adapters (LoRA layers and the other methods' hosts) with its path, in model order."""
    return [(name, module) for name, module in model.named_modules() if isinstance(module, AdapterModule)]


def record_config(model: nn.Module, name: str, config: Any) -> None:
    """Remember adapter ``name``'s config on the module that the surgery was called on (the surgery root).

    A copy is kept: configs are frozen, and the copy also protects the lists inside from a later change.
    """
    configs = model.__dict__.setdefault(_CONFIGS_ATTR, {})
    configs[name] = copy.deepcopy(config)


def adapter_configs(model: nn.Module) -> dict[str, Any]:
    """The configs recorded on the surgery root at or below ``model``, by adapter name (empty when none).

    Values are :class:`LoRAConfig` for LoRA adapters and the other methods' configs (``PromptTuningConfig``...).
    """
    return find_lora_root(model)[1].__dict__.get(_CONFIGS_ATTR, {})


def find_lora_root(model: nn.Module) -> tuple[str, nn.Module]:
    """The module ``apply_lora`` was called on and its path below ``model`` (``("", model)`` when none is found).

    Adapter files use paths relative to this root, so saving from a LightningModule that holds the adapted model
    as ``self.model`` writes the same keys as saving from the adapted model itself.
    """
    for path, module in model.named_modules():
        if module.__dict__.get(_CONFIGS_ATTR):
            return path, module
    return "", model


def modules_to_save_paths(model: nn.Module, config: LoRAConfig) -> list[str]:
    """Paths of the modules that ``config.modules_to_save`` selects (outermost matches only)."""
    paths: list[str] = []
    if not isinstance(config, LoRAConfig):
        return paths
    for path in candidate_modules(model):
        if path and any(matches_name(p, path) for p in config.modules_to_save):
            if not any(path.startswith(f"{kept}.") for kept in paths):
                paths.append(path)
    return paths


def adapter_parameters(model: nn.Module, name: str | None = None, *, factors_only: bool = False) -> dict[str, nn.Parameter]:
    """The parameters of adapter ``name`` (of every adapter when None), keyed by their path in ``model``.

    Args:
        model: The adapted model, or any module holding it (keys are then relative to this module).
        name: The adapter. Default: every adapter.
        factors_only: Only the tensors held by adapter modules (LoRA factors, bottleneck and virtual-token
            weights); otherwise also the ``modules_to_save`` and the biases a LoRA config trains. Default: False.

    Returns:
        Path -> parameter, in model order (keys as ``model.named_parameters()`` writes them).
    """
    found: dict[str, nn.Parameter] = {}
    for path, module in adapter_modules(model):
        head = f"{path}." if path else ""
        for adapter, params in module.adapter_params().items():
            if name is None or adapter == name:
                found.update({f"{head}{key}": param for key, param in params.items()})
    if not factors_only:
        found.update(_saved_and_bias_parameters(model, name))
    return found


def _saved_and_bias_parameters(model: nn.Module, name: str | None) -> dict[str, nn.Parameter]:
    root_path, root = find_lora_root(model)
    head = f"{root_path}." if root_path else ""
    configs = adapter_configs(root)
    found: dict[str, nn.Parameter] = {}
    for adapter, config in configs.items():
        if (name is not None and adapter != name) or not isinstance(config, LoRAConfig):
            continue
        if config.bias == "all":
            found.update({f"{head}{p}": param for p, param in _biases(root)})
        elif config.bias == "lora_only":
            found.update({f"{head}{path}.base_layer.bias": layer.bias for path, layer in lora_layers(root)
                          if adapter in layer.specs and layer.bias is not None})
        for path in modules_to_save_paths(root, config):
            found.update({f"{head}{path}.{p}": param for p, param in root.get_submodule(path).named_parameters()})
    return found


def _biases(root: nn.Module) -> list[tuple[str, nn.Parameter]]:
    factors = {id(p) for p in adapter_parameters(root, factors_only=True).values()}
    return [(p, param) for p, param in root.named_parameters() if p.endswith("bias") and id(param) not in factors]
