"""lightning-lora: LoRA and QLoRA fine-tuning for PyTorch Lightning.

The surgery API (plain PyTorch) is importable from here; callbacks live in :mod:`lightning_lora.callbacks` and the
command line in :mod:`lightning_lora.cli`. Importing this package imports nothing heavy (not even torch) until a name is used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the real imports, for type checkers and IDEs
    from lightning_lora.surgery import (
        AdapterLoadError,
        LoRAConfig,
        LoRAConfigError,
        LoRALayer,
        LoRAPlan,
        MergeError,
        QuantConfig,
        QuantizationError,
        QuantReport,
        SurgeryError,
        SurgeryReport,
        TargetMatchError,
        apply_lora,
        compare_merge_bases,
        load_adapter,
        merge_lora,
        plan_lora,
        prepare_for_kbit_training,
        quantize_model,
        save_adapter,
        unload_lora,
        unmerge_lora,
    )
    from lightning_lora.surgery.combine import CombineError, combine_adapters
    from lightning_lora.surgery.mixed import MixedBatchError, mixed_batch
    from lightning_lora.surgery.multi import (
        UnknownAdapterError,
        delete_adapter,
        disable_adapters,
        get_active_adapters,
        list_adapters,
        load_adapters,
        save_adapters,
        set_active_adapters,
        use_adapters,
    )

# Public names, imported on first use (PEP 562) so that `lightning-lora --help` does not wait for torch.
_SUBPACKAGES = ("callbacks", "cli", "data", "modules", "surgery")
_LAZY: dict[str, str] = {
    "AdapterLoadError": "lightning_lora.surgery",
    "LoRAConfig": "lightning_lora.surgery",
    "LoRAConfigError": "lightning_lora.surgery",
    "LoRALayer": "lightning_lora.surgery",
    "LoRAPlan": "lightning_lora.surgery",
    "MergeError": "lightning_lora.surgery",
    "QuantConfig": "lightning_lora.surgery",
    "QuantizationError": "lightning_lora.surgery",
    "QuantReport": "lightning_lora.surgery",
    "SurgeryError": "lightning_lora.surgery",
    "SurgeryReport": "lightning_lora.surgery",
    "TargetMatchError": "lightning_lora.surgery",
    "apply_lora": "lightning_lora.surgery",
    "compare_merge_bases": "lightning_lora.surgery",
    "load_adapter": "lightning_lora.surgery",
    "merge_lora": "lightning_lora.surgery",
    "plan_lora": "lightning_lora.surgery",
    "prepare_for_kbit_training": "lightning_lora.surgery",
    "quantize_model": "lightning_lora.surgery",
    "save_adapter": "lightning_lora.surgery",
    "unload_lora": "lightning_lora.surgery",
    "unmerge_lora": "lightning_lora.surgery",
    "CombineError": "lightning_lora.surgery.combine",
    "combine_adapters": "lightning_lora.surgery.combine",
    "MixedBatchError": "lightning_lora.surgery.mixed",
    "mixed_batch": "lightning_lora.surgery.mixed",
    "UnknownAdapterError": "lightning_lora.surgery.multi",
    "delete_adapter": "lightning_lora.surgery.multi",
    "disable_adapters": "lightning_lora.surgery.multi",
    "get_active_adapters": "lightning_lora.surgery.multi",
    "list_adapters": "lightning_lora.surgery.multi",
    "load_adapters": "lightning_lora.surgery.multi",
    "save_adapters": "lightning_lora.surgery.multi",
    "set_active_adapters": "lightning_lora.surgery.multi",
    "use_adapters": "lightning_lora.surgery.multi",
}

__version__ = "0.1.0"

__all__ = [
    "AdapterLoadError", "LoRAConfig", "LoRAConfigError", "LoRALayer", "LoRAPlan", "MergeError", "SurgeryError",
    "SurgeryReport", "TargetMatchError", "apply_lora", "load_adapter", "merge_lora", "plan_lora", "save_adapter",
    "unload_lora", "unmerge_lora", "__version__",
    # QLoRA
    "QuantConfig", "QuantReport", "QuantizationError", "compare_merge_bases", "prepare_for_kbit_training", "quantize_model",
    # several adapters on one base
    "CombineError", "MixedBatchError", "UnknownAdapterError", "combine_adapters", "delete_adapter", "disable_adapters", "get_active_adapters",
    "list_adapters", "load_adapters", "mixed_batch", "save_adapters", "set_active_adapters", "use_adapters",
]


def __getattr__(name: str) -> Any:
    if name in _SUBPACKAGES:  # `import lightning_lora; lightning_lora.surgery.x` keeps working
        return importlib.import_module(f"{__name__}.{name}")
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'lightning_lora' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
