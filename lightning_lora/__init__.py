"""lightning-lora: LoRA and QLoRA fine-tuning for PyTorch Lightning.

The surgery API (plain PyTorch) is importable from here, the same names as :mod:`lightning_lora.surgery`; callbacks
live in :mod:`lightning_lora.callbacks` and the command line in :mod:`lightning_lora.cli`. Importing this package does
not import Lightning, PEFT or bitsandbytes.
"""

from lightning_lora.surgery import *  # noqa: F403  (the public API is surgery's, one set)
from lightning_lora.surgery import __all__ as _surgery_all

__version__ = "0.1.0"

__all__ = [*_surgery_all, "__version__"]
