"""bitsandbytes 4-bit layers (``bnb.nn.Linear4bit``): detect, dequantize, re-quantize, build and measure them.

Nothing here imports bitsandbytes at import time. Detection only looks at ``sys.modules``: a model can hold a 4-bit
layer only if bitsandbytes was imported to build it, so an absent module means "no 4-bit layer here". The functions
that need bitsandbytes take it from :func:`~lightning_lora.surgery._deps.require`.

Works the same for layers made by :func:`~lightning_lora.quantize_model`, by transformers
(``BitsAndBytesConfig(load_in_4bit=True)``) and by Lightning's ``BitsandbytesPrecision`` (its ``_Linear4bit``
subclasses ``bnb.nn.Linear4bit``).
"""

from __future__ import annotations

import copy
import sys
from typing import Any

import torch
from torch import Tensor, nn

from lightning_lora.surgery._compat import bnb_unpack_cpu_weight
from lightning_lora.surgery._deps import require
from lightning_lora.surgery.lora.codecs import Codec


def is_linear4bit(module: nn.Module) -> bool:
    """Whether ``module`` is a bitsandbytes ``Linear4bit`` (without importing bitsandbytes)."""
    bnb = sys.modules.get("bitsandbytes")
    cls = getattr(getattr(bnb, "nn", None), "Linear4bit", None)
    return cls is not None and isinstance(module, cls)


def is_quantized(module: nn.Module) -> bool:
    """Whether a ``Linear4bit``'s weight already holds packed 4-bit data (it is quantized on its first ``.to(device)``)."""
    weight = getattr(module, "weight", None)
    return getattr(weight, "quant_state", None) is not None or getattr(module, "quant_state", None) is not None


def _packed(module: nn.Module) -> tuple[Tensor, Any]:
    """The packed data and quant state, in bitsandbytes' portable layout."""
    weight = module.weight
    state = getattr(weight, "quant_state", None) or module.quant_state
    data = weight.data
    if getattr(state, "packing_format_for_cpu", False):
        # On CPUs with AVX512-BF16, bitsandbytes repacks the weight for its inference kernel on the first eval forward
        # (see keep_portable_layout_); dequantize_4bit only reads the portable layout, so undo the repacking. The
        # inverse rewrites the state it is given, hence the copy: the layer itself is left untouched.
        data, state = bnb_unpack_cpu_weight()(data, copy.copy(state))
    return data, state


def keep_portable_layout_(module: nn.Module) -> None:
    """Turn off bitsandbytes' AVX512-BF16 CPU inference path for one ``Linear4bit``, in place.

    On CPUs with AVX512-BF16, bitsandbytes 0.50 repacks a 4-bit weight on its first eval-mode, no-grad forward: it
    rounds the block scales to bf16 (so eval outputs differ from training's), rewrites the layer's weight, and fails
    for layers whose ``in_features`` is not a multiple of the block size or ``out_features`` of 32. Keeping the
    portable layout makes eval compute exactly what training computes.
    """
    if hasattr(module, "support_avx512bf16_for_cpu"):
        module.support_avx512bf16_for_cpu = False


def dequantize(module: nn.Module) -> Tensor:
    """The dense ``(out, in)`` weight of a ``Linear4bit``, in the dtype it had before quantization.

    A layer that is not quantized yet (bitsandbytes quantizes on the first ``.to(device)``) returns its weight as is.
    """
    if not is_quantized(module):
        return module.weight.detach()
    functional = require("bitsandbytes").functional
    data, state = _packed(module)
    return functional.dequantize_4bit(data, state)  # (out, in), state.dtype


def requantize_(module: nn.Module, weight: Tensor) -> None:
    """Quantize a dense ``(out, in)`` weight into ``module`` with its own settings, in place.

    Block size, NF4/FP4, double quantization and storage dtype are kept; the ``Params4bit`` object stays the same
    (its data and quant state are replaced), so references to it stay valid. Writing back exactly the dense weight
    the layer held before its last re-quantization restores that packed state bit for bit (re-quantizing it would
    round the double-quantized scales again): so merge with ``unload=False`` then unmerge is exact.
    """
    params = module.weight
    if not is_quantized(module):
        with torch.no_grad():
            params.data.copy_(weight.to(dtype=params.dtype, device=params.device))
        return
    functional = require("bitsandbytes").functional
    previous = module.__dict__.pop(_PREVIOUS_ATTR, None)
    if previous is not None and _holds(functional, previous, weight):
        _set_packed(module, *previous)
        return
    _, state = _packed(module)
    dense = weight.detach().to(device=params.device, dtype=state.dtype).contiguous()
    data, new_state = functional.quantize_4bit(
        dense, blocksize=state.blocksize, compress_statistics=state.nested, quant_type=state.quant_type,
        quant_storage=params.quant_storage,
    )
    module.__dict__[_PREVIOUS_ATTR] = (params.data, params.quant_state)
    _set_packed(module, data, new_state)


_PREVIOUS_ATTR = "_lora_previous_packed"


def forget_previous_(module: nn.Module) -> None:
    """Drop the packed state :func:`requantize_` keeps for an exact undo (when no undo will come), in place."""
    module.__dict__.pop(_PREVIOUS_ATTR, None)


def _holds(functional: Any, previous: tuple[Tensor, Any], weight: Tensor) -> bool:
    data, state = previous
    if getattr(state, "packing_format_for_cpu", False):
        return False
    dense = functional.dequantize_4bit(data, state)  # (out, in)
    return dense.shape == weight.shape and torch.equal(dense, weight.to(device=dense.device, dtype=dense.dtype))


def _set_packed(module: nn.Module, data: Tensor, state: Any) -> None:
    module.weight.data = data
    module.weight.quant_state = state
    module.quant_state = state


def snapshot(module: nn.Module) -> object:
    """What a ``Linear4bit`` stores for its weight, for an exact undo of a merge: its packed data and quant state (by
    reference: :func:`requantize_` replaces them instead of writing into them), not a dense copy."""
    if not is_quantized(module):
        return module.weight.detach().clone()
    return module.weight.data, module.weight.quant_state


def restore_(module: nn.Module, snapshot: object) -> None:
    """Put a :func:`snapshot` back, in place."""
    if isinstance(snapshot, Tensor):
        with torch.no_grad():
            module.weight.data.copy_(snapshot)
        return
    module.__dict__.pop(_PREVIOUS_ATTR, None)
    _set_packed(module, *snapshot)  # type: ignore[misc]


def state_tensors(module: nn.Module, *, tables: bool = False) -> list[Tensor]:
    """The tensors a 4-bit layer keeps for its weight.

    Args:
        module: A ``Linear4bit``.
        tables: Return the lookup tables (the 16 NF4 / FP4 values and the 256 values of the nested 8-bit code),
            instead of the packed data and per-block statistics (absmax, nested absmax, offset). The tables are the
            same constants for every layer (bitsandbytes keeps a copy per layer); they do not grow with the layer.
    """
    state = getattr(module.weight, "quant_state", None) or getattr(module, "quant_state", None)
    if state is None:
        return [] if tables else [module.weight.data]
    nested = getattr(state, "state2", None)
    if tables:
        found = [state.code, nested.code if nested is not None else None]
    else:
        found = [module.weight.data, state.absmax, state.offset, nested.absmax if nested is not None else None]
    return [t for t in found if isinstance(t, Tensor)]


def tensor_bytes(tensors: list[Tensor], seen: set[tuple[int, int]] | None = None) -> int:
    """Bytes held by ``tensors``, each storage counted once (shared code tables count once across layers)."""
    seen = set() if seen is None else seen
    total = 0
    for tensor in tensors:
        meta = tensor.device.type == "meta"
        key = (id(tensor), -1) if meta else (tensor.untyped_storage().data_ptr(), tensor.device.index or 0)
        if key in seen:
            continue
        seen.add(key)
        total += tensor.numel() * tensor.element_size()
    return total


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every weight in ``model``: dense parameters and buffers, plus 4-bit data and their statistics."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for module in model.modules():
        if is_linear4bit(module):
            total += tensor_bytes(state_tensors(module) + state_tensors(module, tables=True), seen)
    for tensor in [*model.parameters(), *model.buffers()]:
        total += tensor_bytes([tensor], seen)
    return total


def to_dense_linear(module: nn.Module, weight: Tensor) -> nn.Linear:
    """A plain ``nn.Linear`` with ``weight`` (``(out, in)``, kept in its dtype) and the 4-bit layer's bias."""
    dense = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                      device="meta", dtype=weight.dtype)
    dense.weight = nn.Parameter(weight.detach(), requires_grad=False)  # frozen, as the base was
    if module.bias is not None:
        bias = module.bias.detach().to(device=weight.device, dtype=weight.dtype)
        dense.bias = nn.Parameter(bias, requires_grad=module.bias.requires_grad)
    dense.train(module.training)
    return dense


# Dense weight out = dequantize, dense weight in = re-quantize with the layer's own settings. `matches` only looks at
# sys.modules, so registering this never imports bitsandbytes.
LINEAR4BIT = Codec(
    name="Linear4bit",
    matches=is_linear4bit,
    features=lambda m: (m.in_features, m.out_features),
    get_weight=dequantize,
    set_weight=requantize_,
    quantized=True,
    snapshot=snapshot,
    restore=restore_,
)

