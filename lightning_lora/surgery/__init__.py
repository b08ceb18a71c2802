"""Model surgery for LoRA in plain PyTorch: select, wrap, merge, unmerge, unload, save and load adapters.

This package never imports Lightning.
"""

from lightning_lora.surgery.adapters import adapter_state_dict, load_adapter, read_adapter, save_adapter
from lightning_lora.surgery.apply import DEFAULT_ADAPTER, apply_lora, merge_lora, plan_lora, set_trainable, unload_lora, unmerge_lora
from lightning_lora.surgery.codecs import Codec, codec_for, register_codec
from lightning_lora.surgery.config import LoRAConfig
from lightning_lora.surgery.errors import (
    AdapterLoadError,
    LoRAConfigError,
    MergeError,
    QuantizationError,
    SurgeryError,
    TargetMatchError,
)
from lightning_lora.surgery.kbit import KbitReport, prepare_for_kbit_training
from lightning_lora.surgery.layers import AdapterSpec, LoRALayer
from lightning_lora.surgery.merge_bases import MergeBase, MergeComparison, compare_merge_bases
from lightning_lora.surgery.quant_config import QuantConfig
from lightning_lora.surgery.quantize import QuantReport, plan_quantization, quantize_model
from lightning_lora.surgery.registry import adapter_configs, lora_layers
from lightning_lora.surgery.report import LoRAPlan, PlannedLayer, SurgeryReport, count_parameters

__all__ = [
    "DEFAULT_ADAPTER", "AdapterLoadError", "AdapterSpec", "Codec", "LoRAConfig", "LoRAConfigError", "LoRALayer",
    "LoRAPlan", "MergeError", "PlannedLayer", "SurgeryError", "SurgeryReport", "TargetMatchError", "adapter_configs",
    "adapter_state_dict", "apply_lora", "codec_for", "count_parameters", "load_adapter", "lora_layers", "merge_lora",
    "plan_lora", "read_adapter", "register_codec", "save_adapter", "set_trainable", "unload_lora", "unmerge_lora",
    # QLoRA
    "KbitReport", "MergeBase", "MergeComparison", "QuantConfig", "QuantReport", "QuantizationError",
    "compare_merge_bases", "plan_quantization", "prepare_for_kbit_training", "quantize_model",
]
