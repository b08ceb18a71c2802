"""Every exception of lightning-lora, in one hierarchy.

Each type subclasses the built-in exception a caller would naturally catch, so ``except ValueError`` keeps working,
and :class:`LightningLoRAError` catches them all. One failure has one type wherever it is raised: an unknown adapter
name is always :class:`UnknownAdapterError`, a bad config field always a :class:`ConfigError` subclass named after
its config class.

::

    LightningLoRAError
    ├── ConfigError (ValueError)
    │   ├── LoRAConfigError            LoRAConfig and block selections (``layers=``)
    │   ├── QuantConfigError           QuantConfig
    │   ├── FreezingConfigError        LayerFreezing
    │   ├── ShardConfigError           ShardConfig (FSDP2 sharding) and block selection
    │   ├── KbitConfigError            prepare_for_kbit_training options
    │   ├── PromptTuningConfigError    PromptTuningConfig
    │   ├── PTuningConfigError         PTuningConfig
    │   ├── PrefixTuningConfigError    PrefixTuningConfig
    │   └── BottleneckConfigError      BottleneckConfig
    ├── TargetMatchError (ValueError)  a pattern that matches nothing adaptable
    ├── SurgeryError (RuntimeError)    the model is in a state the surgery cannot start from
    │   └── UnknownAdapterError (also ValueError)
    ├── MergeError (RuntimeError)      merging would corrupt weights or cannot be done
    ├── AdapterLoadError (ValueError)  an adapter file or directory that does not fit or cannot be read
    ├── CheckpointMismatchError (ValueError)
    ├── CheckpointFileError (ValueError)   a truncated or corrupt checkpoint file
    ├── NonFiniteError (FloatingPointError) a non-finite loss, adapter weight or gradient
    ├── QuantizationError (ValueError)
    ├── MixedBatchError (ValueError)
    ├── CombineError (ValueError)
    └── OptimizerSetupError (RuntimeError)
"""

from __future__ import annotations


class LightningLoRAError(Exception):
    """Base class of every exception raised by lightning-lora."""


class ConfigError(LightningLoRAError, ValueError):
    """A config field holds a value outside its valid range (the message names the field, the value and the fix)."""


class LoRAConfigError(ConfigError):
    """A :class:`~lightning_lora.LoRAConfig` field, or a block selection (``layers=``), is invalid."""


class QuantConfigError(ConfigError):
    """A :class:`~lightning_lora.QuantConfig` field is invalid."""


class FreezingConfigError(ConfigError):
    """A :class:`~lightning_lora.callbacks.LayerFreezing` option is invalid."""


class ShardConfigError(ConfigError):
    """A :class:`~lightning_lora.surgery.training.sharding.ShardConfig` field is invalid, or names absent blocks."""


class KbitConfigError(ConfigError):
    """An option of :func:`~lightning_lora.prepare_for_kbit_training` is invalid."""


class PromptTuningConfigError(ConfigError):
    """A :class:`~lightning_lora.PromptTuningConfig` field is invalid."""


class PTuningConfigError(ConfigError):
    """A :class:`~lightning_lora.PTuningConfig` field is invalid."""


class PrefixTuningConfigError(ConfigError):
    """A :class:`~lightning_lora.PrefixTuningConfig` field is invalid."""


class BottleneckConfigError(ConfigError):
    """A :class:`~lightning_lora.BottleneckConfig` field is invalid."""


class TargetMatchError(LightningLoRAError, ValueError):
    """A target pattern matched no module, or matched modules that cannot be adapted."""


class SurgeryError(LightningLoRAError, RuntimeError):
    """The model is in a state the requested surgery cannot start from (e.g. LoRA already applied)."""


class UnknownAdapterError(SurgeryError, ValueError):
    """An adapter name the model does not have (the message lists the ones it has)."""


class MergeError(LightningLoRAError, RuntimeError):
    """Merging would corrupt the weights (non-finite values) or the base layer cannot be merged into."""


class AdapterLoadError(LightningLoRAError, ValueError):
    """An adapter on disk cannot be used: unreadable or invalid files, missing or unexpected keys, other shapes."""


class CheckpointMismatchError(LightningLoRAError, ValueError):
    """A checkpoint does not fit the model it is loaded into: other base model, LoRA settings or adapter tensors."""


class QuantizationError(LightningLoRAError, ValueError):
    """A selected layer cannot be quantized (dtype, shape, device, tied weight) or the model is in the wrong state."""


class MixedBatchError(LightningLoRAError, ValueError):
    """The row names of a mixed batch do not fit the model or the batch (unknown adapter, wrong row count)."""


class CombineError(LightningLoRAError, ValueError):
    """Adapters cannot be combined as asked (method, weights, ranks or layers that do not fit)."""


class OptimizerSetupError(LightningLoRAError, RuntimeError):
    """The optimizer does not hold the trainable (adapter) parameters, or holds frozen ones."""


class CheckpointFileError(LightningLoRAError, ValueError):
    """A checkpoint file cannot be read: truncated (e.g. a write killed half way), corrupt, or not a checkpoint."""


class NonFiniteError(LightningLoRAError, FloatingPointError):
    """A loss, adapter weight or adapter gradient holds inf or NaN."""


__all__ = [
    "AdapterLoadError", "BottleneckConfigError", "CheckpointFileError", "CheckpointMismatchError", "CombineError",
    "ConfigError", "FreezingConfigError", "KbitConfigError", "LightningLoRAError", "LoRAConfigError", "MergeError",
    "MixedBatchError", "NonFiniteError", "OptimizerSetupError", "PTuningConfigError", "PrefixTuningConfigError",
    "PromptTuningConfigError", "QuantConfigError", "QuantizationError", "ShardConfigError", "SurgeryError", "TargetMatchError",
    "UnknownAdapterError",
]
