"""Lightning callbacks for LoRA fine-tuning, each thin over :mod:`lightning_lora.surgery`.

* :class:`PEFTFinetuning` -- (quantize and) attach an adapter of any method (LoRA, bottleneck, prompt / P- / prefix
  tuning) before the optimizer exists; adapter-only, resumable checkpoints.
* :class:`LoRAFinetuning` -- its LoRA form.
* :class:`TrainableParameters` -- report trainable parameters and a memory estimate at fit start.
* :class:`GradientCheckpointing` -- activation checkpointing on the transformer blocks.
* :class:`LayerFreezing` -- train only some blocks, unfreezing more on a resumable schedule.
* :class:`MergeAndExport` -- write the adapter and a merged model at the end of fit.
* :class:`ForgettingMonitor` -- KL to the base and perplexity on general reference text at each validation.
* :class:`AdapterHealth` -- catch the silent failures of adapter training (no gradient, no update, non-finite values).
* :class:`LineProgressBar` -- plain progress lines (step, loss, it/s, ETA) for logs that are not a terminal.

They compose in any order: work that must precede the optimizer runs right after ``configure_model`` in a fixed
order (LoRA surgery, then freezing, then checkpointing).
"""

from lightning_lora.callbacks.adapter_health import AdapterHealth, AdapterHealthError
from lightning_lora.callbacks.forgetting import ForgettingMonitor
from lightning_lora.callbacks.gradient_checkpointing import GradientCheckpointing
from lightning_lora.callbacks.layer_freezing import LayerFreezing
from lightning_lora.callbacks.lora_finetuning import LoRAFinetuning
from lightning_lora.callbacks.merge_export import MergeAndExport
from lightning_lora.callbacks.multi_adapter import MultiAdapterEvaluation
from lightning_lora.callbacks.peft_finetuning import PEFTFinetuning
from lightning_lora.callbacks.progress import (
    CompactModelSummary,
    LineProgressBar,
    StepRichProgressBar,
)
from lightning_lora.callbacks.trainable_parameters import TrainableParameters
from lightning_lora.surgery.errors import CheckpointMismatchError, OptimizerSetupError

__all__ = [
    "AdapterHealth", "AdapterHealthError", "CheckpointMismatchError", "CompactModelSummary", "ForgettingMonitor",
    "GradientCheckpointing", "LayerFreezing", "LineProgressBar", "LoRAFinetuning", "MergeAndExport",
    "MultiAdapterEvaluation", "OptimizerSetupError", "PEFTFinetuning", "StepRichProgressBar", "TrainableParameters",
]
