"""Exception types of the surgery API.

Each subclasses the built-in exception a caller would naturally catch, so ``except ValueError`` keeps working.
"""

from __future__ import annotations


class LoRAConfigError(ValueError):
    """A :class:`LoRAConfig` or :class:`QuantConfig` field holds a value outside its valid range."""


class TargetMatchError(ValueError):
    """A target pattern matched no module, or matched modules that cannot be adapted."""


class SurgeryError(RuntimeError):
    """The model is in a state the requested surgery cannot start from (e.g. LoRA already applied)."""


class MergeError(RuntimeError):
    """Merging would corrupt the weights (non-finite values) or the base layer cannot be merged into."""


class AdapterLoadError(ValueError):
    """An adapter on disk does not fit the model: missing or unexpected keys, or shapes that differ."""


class QuantizationError(ValueError):
    """A selected layer cannot be quantized (dtype, shape, device, tied weight) or the model is in the wrong state."""


class CheckpointFileError(ValueError):
    """A checkpoint file cannot be read: truncated (e.g. a write killed half way), corrupt, or not a checkpoint."""


class NonFiniteError(FloatingPointError):
    """A loss, adapter weight or adapter gradient holds inf or NaN."""
