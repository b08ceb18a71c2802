"""Where adapters live on a model: the LoRA layers, and the configs recorded by ``apply_lora``."""

from __future__ import annotations

from torch import nn

from lightning_lora.surgery.config import LoRAConfig
from lightning_lora.surgery.layers import LoRALayer

_CONFIGS_ATTR = "_lora_configs"


def lora_layers(model: nn.Module) -> list[tuple[str, LoRALayer]]:
    """Every LoRA wrapper in the model with its path, in model order (found structurally, not by name)."""
    return [(name, module) for name, module in model.named_modules() if isinstance(module, LoRALayer)]


def record_config(model: nn.Module, name: str, config: LoRAConfig) -> None:
    """Remember adapter ``name``'s config on the module that ``apply_lora`` was called on (the surgery root)."""
    configs = model.__dict__.setdefault(_CONFIGS_ATTR, {})
    configs[name] = config


def adapter_configs(model: nn.Module) -> dict[str, LoRAConfig]:
    """The configs recorded on the surgery root at or below ``model``, by adapter name (empty when none)."""
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
