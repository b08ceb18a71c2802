"""``dtype="auto"`` for the built-in module: the frozen base in bf16 where this machine runs bf16 matmuls faster.

The model is loaded in float32. Right after ``configure_model`` and the callbacks' surgery (LoRA, layer freezing,
checkpointing), *frozen* float32 parameters are cast to the dtype :func:`~lightning_lora.surgery.quant.cpu_precision.auto_dtype`
picks for the device, and the forward runs under ``torch.autocast`` in that dtype. Trainable parameters (adapters,
blocks trained by ``LayerFreezing``, every weight in full fine-tuning) stay float32, so their gradients and the
optimizer state are float32 too (mixed precision with fp32 master weights; Micikevicius et al. 2018). Casting after
the trainable set is known keeps trainable weights bit-exact (a bf16 load would round them first).

When training ends the frozen weights go back to float32 (holding their bf16-rounded values), before ``on_fit_end``
callbacks such as ``MergeAndExport`` run: a merge then adds the fp32 adapter update to exactly the base the model
trained with, without rounding the update to bf16, and the merged model has one dtype throughout (a dequantized
4-bit base is float32, which would not mix with bf16 embeddings outside autocast).

Autocast (rather than bf16 weights alone) is what lets an fp32 trainable layer sit between bf16 frozen ones; it was
also the faster variant for LoRA on an AMD EPYC with AVX512-BF16 (``python -m benchmarks.precision``: bf16 weights
without autocast were about as slow as fp32; see ``benchmarks/results/precision.md``).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator

import torch
from torch import nn

from lightning_lora.surgery.quant.cpu_precision import auto_dtype

log = logging.getLogger(__name__)


def frozen_dtype_for_auto(model: nn.Module) -> torch.dtype:
    """The dtype ``"auto"`` gives ``model``'s frozen weights: float32 unless bf16 is faster on the model's device."""
    first = next(model.parameters(), None)
    return auto_dtype(first.device if first is not None else "cpu")


_LOW = (torch.bfloat16, torch.float16)


def _cast_(model: nn.Module, dtype: torch.dtype, chosen: Callable[[nn.Parameter], bool]) -> int:
    # Plain parameters only: quantized weights are parameter subclasses (bitsandbytes' Params4bit) and stay as they
    # are. Assigning `.data` keeps the Parameter object, so tied parameters stay tied.
    n = 0
    for param in model.parameters():
        if type(param) is nn.Parameter and chosen(param):
            param.data = param.data.to(dtype)
            n += param.numel()
    return n


def cast_frozen_(model: nn.Module, dtype: torch.dtype) -> int:
    """Cast, in place, every plain float32 parameter that does not require grad to ``dtype``.

    Quantized weights (parameter subclasses such as bitsandbytes' ``Params4bit``) and trainable parameters are left
    alone. Tied parameters stay tied (the same ``Parameter`` object gets the new data).

    Returns:
        How many elements were cast.
    """
    return _cast_(model, dtype, lambda p: not p.requires_grad and p.dtype == torch.float32)


def to_float32_(model: nn.Module) -> int:
    """Cast, in place, every plain bf16 / fp16 parameter (frozen or not) back to float32 (their rounded values).

    Returns:
        How many elements were cast.
    """
    return _cast_(model, torch.float32, lambda p: p.dtype in _LOW)


def upcast_trainable_(model: nn.Module) -> int:
    """Cast, in place, every trainable low-precision float parameter to float32 (e.g. a block unfrozen mid-run).

    Returns:
        How many elements were cast.
    """
    return _cast_(model, torch.float32, lambda p: p.requires_grad and p.dtype in _LOW)


@contextlib.contextmanager
def autocast_to(dtype: torch.dtype | None, device: torch.device) -> Iterator[None]:
    """``torch.autocast(device.type, dtype)``, or nothing when ``dtype`` is None or float32."""
    if dtype is None or dtype == torch.float32:
        yield
        return
    with torch.autocast(device.type, dtype=dtype):
        yield
