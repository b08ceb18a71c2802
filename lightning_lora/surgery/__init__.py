"""Model surgery for parameter-efficient fine-tuning in plain PyTorch (never imports Lightning).

Sub-packages, in dependency order (each imports only those above it, plus :mod:`.errors`):

* ``lora/`` -- the LoRA core: config, target selection, the wrapper layer, codecs, add / apply / merge / unload,
  active adapters. Imports none of its siblings.
* ``quant/`` -- 4-bit bases (bitsandbytes): config, quantization, k-bit preparation, merge bases. Registers its
  codec and merge path with the core.
* ``methods/`` -- the other methods (prompt, P-, prefix tuning, bottleneck adapters) and ``apply_peft``; imports
  only ``lora/``.
* ``io/`` -- files: PEFT format, adapter files and multi-adapter directories, merged export, atomic writes.
* ``multi/`` -- several adapters at once: mixed batches, combining.
* ``training/`` -- helpers the Lightning callbacks call: adapter-only checkpoints, activation checkpointing,
  freezing and optimizer surgery, fingerprints, parameter summaries.

This package and :mod:`lightning_lora` export the same public names.
"""

import lightning_lora.surgery.quant  # noqa: F401  (registers the 4-bit codec and merge path with the core)
from lightning_lora.surgery.diagnostics.doctor import DoctorReport, diagnose_adapter
from lightning_lora.surgery.errors import (
    AdapterLoadError,
    BottleneckConfigError,
    CheckpointFileError,
    CheckpointMismatchError,
    CombineError,
    ConfigError,
    FreezingConfigError,
    KbitConfigError,
    LightningLoRAError,
    LoRAConfigError,
    MergeError,
    MixedBatchError,
    NonFiniteError,
    OptimizerSetupError,
    PrefixTuningConfigError,
    PromptTuningConfigError,
    PTuningConfigError,
    QuantConfigError,
    QuantizationError,
    ShardConfigError,
    SurgeryError,
    TargetMatchError,
    UnknownAdapterError,
)
from lightning_lora.surgery.io.adapter_dirs import find_adapters, load_adapters, save_adapters
from lightning_lora.surgery.io.adapter_files import (
    adapter_state_dict,
    check_adapter_fits,
    load_adapter,
    read_adapter,
    save_adapter,
)
from lightning_lora.surgery.io.export import ExportReport, export_merged
from lightning_lora.surgery.lora.active import (
    delete_adapter,
    disable_adapters,
    get_active_adapters,
    list_adapters,
    set_active_adapters,
    use_adapters,
)
from lightning_lora.surgery.lora.apply import (
    DEFAULT_ADAPTER,
    add_adapter,
    apply_lora,
    plan_lora,
    set_trainable,
    unload_lora,
)
from lightning_lora.surgery.lora.codecs import Codec, codec_for, register_codec
from lightning_lora.surgery.lora.config import LoRAConfig
from lightning_lora.surgery.lora.inventory import adapter_configs, adapter_parameters, lora_layers
from lightning_lora.surgery.lora.layer import AdapterSpec, LoRALayer
from lightning_lora.surgery.lora.merge import MergeBase, merge_lora, unmerge_lora
from lightning_lora.surgery.lora.report import LoRAPlan, PlannedLayer, SurgeryReport, count_parameters
from lightning_lora.surgery.methods.apply import PEFTPlan, add_peft_adapter, apply_peft, plan_peft
from lightning_lora.surgery.methods.bottleneck import BottleneckConfig
from lightning_lora.surgery.methods.p_tuning import PTuningConfig
from lightning_lora.surgery.methods.prefix_tuning import PrefixTuningConfig
from lightning_lora.surgery.methods.prompt_tuning import PromptTuningConfig
from lightning_lora.surgery.multi.combine import combine_adapters
from lightning_lora.surgery.multi.mixed import clear_mixed_batch_cache, mixed_batch
from lightning_lora.surgery.quant.config import QuantConfig
from lightning_lora.surgery.quant.kbit import KbitReport, prepare_for_kbit_training
from lightning_lora.surgery.quant.merge_bases import MergeComparison, compare_merge_bases
from lightning_lora.surgery.quant.quantize import QuantReport, plan_quantization, quantize_model

__all__ = [
    # errors
    "AdapterLoadError", "CheckpointFileError", "CheckpointMismatchError", "CombineError", "ConfigError", "FreezingConfigError",
    "KbitConfigError", "LightningLoRAError", "LoRAConfigError", "MergeError", "MixedBatchError", "NonFiniteError",
    "OptimizerSetupError",
    "QuantConfigError", "QuantizationError", "ShardConfigError", "SurgeryError", "TargetMatchError", "UnknownAdapterError",
    "BottleneckConfigError", "PTuningConfigError", "PrefixTuningConfigError", "PromptTuningConfigError",
    # the other methods
    "BottleneckConfig", "PEFTPlan", "PTuningConfig", "PrefixTuningConfig", "PromptTuningConfig", "add_peft_adapter",
    "apply_peft", "plan_peft",
    # LoRA core
    "DEFAULT_ADAPTER", "AdapterSpec", "Codec", "LoRAConfig", "LoRALayer", "LoRAPlan", "MergeBase", "PlannedLayer",
    "SurgeryReport", "adapter_configs", "adapter_parameters", "add_adapter", "apply_lora", "codec_for",
    "count_parameters", "lora_layers", "merge_lora", "plan_lora", "register_codec", "set_trainable", "unload_lora",
    "unmerge_lora",
    # active adapters
    "delete_adapter", "disable_adapters", "get_active_adapters", "list_adapters", "set_active_adapters", "use_adapters",
    # QLoRA
    "KbitReport", "MergeComparison", "QuantConfig", "QuantReport", "compare_merge_bases", "plan_quantization",
    "prepare_for_kbit_training", "quantize_model",
    # files
    "ExportReport", "adapter_state_dict", "check_adapter_fits", "export_merged", "find_adapters", "load_adapter",
    "load_adapters", "read_adapter", "save_adapter", "save_adapters",
    # diagnostics
    "DoctorReport", "diagnose_adapter",
    # several adapters at once
    "clear_mixed_batch_cache", "combine_adapters", "mixed_batch",
]
