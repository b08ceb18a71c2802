"""lightning-lora: LoRA and QLoRA fine-tuning for PyTorch Lightning.

The surgery API (plain PyTorch) is importable from here; callbacks live in :mod:`lightning_lora.callbacks` and the
command line in :mod:`lightning_lora.cli`. Importing this package does not import Lightning, PEFT or bitsandbytes.
"""

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
