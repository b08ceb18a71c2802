"""lightning-lora: LoRA, QLoRA and the other PEFT methods for PyTorch Lightning.

The surgery API (plain PyTorch) is importable from here: the same names as :mod:`lightning_lora.surgery` (a test
checks). Callbacks live in :mod:`lightning_lora.callbacks`, the command line in :mod:`lightning_lora.cli`, the server in
:mod:`lightning_lora.serve`. Importing this package imports nothing heavy (not even torch) until a name is used, so
``lightning-lora --help`` answers at once.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the real imports, for type checkers and IDEs
    from lightning_lora.surgery import *  # noqa: F403

__version__ = "0.1.0"

_SUBPACKAGES = ("callbacks", "cli", "data", "modules", "serve", "surgery")

# Public names, imported from lightning_lora.surgery on first use (PEP 562).
__all__ = [
    "AdapterLoadError",
    "AdapterSpec",
    "BottleneckConfig",
    "BottleneckConfigError",
    "CheckpointFileError",
    "CheckpointMismatchError",
    "Codec",
    "CombineError",
    "ConfigError",
    "DEFAULT_ADAPTER",
    "DoctorReport",
    "ExportReport",
    "FreezingConfigError",
    "KbitConfigError",
    "KbitReport",
    "LightningLoRAError",
    "LoRAConfig",
    "LoRAConfigError",
    "LoRALayer",
    "LoRAPlan",
    "MergeBase",
    "MergeComparison",
    "MergeError",
    "MixedBatchError",
    "NonFiniteError",
    "OptimizerSetupError",
    "PEFTPlan",
    "PTuningConfig",
    "PTuningConfigError",
    "PlannedLayer",
    "PrefixTuningConfig",
    "PrefixTuningConfigError",
    "PromptTuningConfig",
    "PromptTuningConfigError",
    "QuantConfig",
    "QuantConfigError",
    "QuantReport",
    "QuantizationError",
    "ShardConfigError",
    "SurgeryError",
    "SurgeryReport",
    "TargetMatchError",
    "UnknownAdapterError",
    "adapter_configs",
    "adapter_parameters",
    "adapter_state_dict",
    "add_adapter",
    "add_peft_adapter",
    "apply_lora",
    "apply_peft",
    "check_adapter_fits",
    "clear_mixed_batch_cache",
    "codec_for",
    "combine_adapters",
    "compare_merge_bases",
    "count_parameters",
    "delete_adapter",
    "diagnose_adapter",
    "disable_adapters",
    "export_merged",
    "find_adapters",
    "get_active_adapters",
    "list_adapters",
    "load_adapter",
    "load_adapters",
    "lora_layers",
    "merge_lora",
    "mixed_batch",
    "plan_lora",
    "plan_peft",
    "plan_quantization",
    "prepare_for_kbit_training",
    "quantize_model",
    "read_adapter",
    "register_codec",
    "save_adapter",
    "save_adapters",
    "set_active_adapters",
    "set_trainable",
    "unload_lora",
    "unmerge_lora",
    "use_adapters",
    "__version__",
]


def __getattr__(name: str) -> Any:
    if name in _SUBPACKAGES:  # `import lightning_lora; lightning_lora.surgery.x` keeps working
        return importlib.import_module(f"{__name__}.{name}")
    if name not in __all__:
        raise AttributeError(f"module 'lightning_lora' has no attribute {name!r}")
    value = getattr(importlib.import_module("lightning_lora.surgery"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
