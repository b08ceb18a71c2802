"""How to read and write the dense weight of a base layer, one small entry per layer type.

LoRA needs three things from the layer it wraps: its (in, out) features, its weight as a dense ``(out, in)``
matrix, and a way to write a dense matrix back (for merging). Each supported layer type is one :class:`Codec` in an
ordered registry; the first whose ``matches`` accepts a module wins. Adding a backend is adding one entry, never a
LoRA subclass.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class Codec:
    """Access to one layer type's dense weight.

    Attributes:
        name: Short name shown in plans and reports (``"Linear"``, ``"Conv1D"``, ``"Linear4bit"``).
        matches: Whether a module is of this type.
        features: ``(in_features, out_features)`` of a module.
        get_weight: The dense weight as ``(out, in)``; for quantized layers, dequantized.
        set_weight: Writes a dense ``(out, in)`` weight back, in place (re-quantizing where the layer is quantized).
        mergeable: Whether merging into this layer type is supported at all.
        quantized: Whether the stored weight is quantized (adapters then train in fp32, and merges choose a base:
            see :func:`~lightning_lora.merge_lora`'s ``merge_base``).
        in_place: Whether ``get_weight`` returns a writable view of the stored weight, so a merge can add into it
            without building a new tensor.
        snapshot: What the layer stores for its weight, kept by ``merge(keep_original=True)`` for an exact undo.
            Default (None): a copy of the dense weight. A quantized backend keeps its packed tensors instead, so a
            layer merged into in place stays small.
        restore: Puts a ``snapshot`` back, in place. Default (None): ``set_weight``.
    """

    name: str
    matches: Callable[[nn.Module], bool]
    features: Callable[[nn.Module], tuple[int, int]]
    get_weight: Callable[[nn.Module], Tensor]
    set_weight: Callable[[nn.Module, Tensor], None]
    mergeable: bool = True
    quantized: bool = False
    in_place: bool = False
    snapshot: Callable[[nn.Module], object] | None = None
    restore: Callable[[nn.Module, object], None] | None = None

    def take_snapshot(self, module: nn.Module) -> object:
        """What :attr:`restore` needs to put ``module``'s weight back exactly."""
        return self.snapshot(module) if self.snapshot is not None else self.get_weight(module).clone()

    def put_back(self, module: nn.Module, snapshot: object) -> None:
        """Restore a :meth:`take_snapshot`, in place."""
        if self.restore is not None:
            self.restore(module, snapshot)
        else:
            self.set_weight(module, snapshot)  # type: ignore[arg-type]  (a dense weight by default)


def _copy_into(param: Tensor, value: Tensor) -> None:
    with torch.no_grad():
        param.copy_(value.to(dtype=param.dtype, device=param.device))


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear)


def _is_conv1d(module: nn.Module) -> bool:
    # transformers' GPT-2 style Conv1D: weight stored as (in, out), y = x @ W + b. Only checked when transformers is
    # already imported, so that this module never imports it.
    pytorch_utils = sys.modules.get("transformers.pytorch_utils")
    return pytorch_utils is not None and isinstance(module, pytorch_utils.Conv1D)


LINEAR = Codec(
    name="Linear",
    matches=_is_linear,
    features=lambda m: (m.in_features, m.out_features),
    get_weight=lambda m: m.weight.detach(),
    set_weight=lambda m, w: _copy_into(m.weight, w),
    in_place=True,
)

CONV1D = Codec(
    name="Conv1D",
    matches=_is_conv1d,
    features=lambda m: (m.weight.shape[0], m.weight.shape[1]),
    get_weight=lambda m: m.weight.detach().T,
    set_weight=lambda m, w: _copy_into(m.weight, w.T),
    in_place=True,
)

# Ordered: more specific types first. Quantized backends register themselves in front (surgery/quant/ adds
# bitsandbytes' Linear4bit, a subclass of nn.Linear), so this core never imports them.
_REGISTRY: list[Codec] = [CONV1D, LINEAR]


def register_codec(codec: Codec, *, first: bool = True) -> None:
    """Add a layer type to the registry (replacing an entry of the same name).

    Args:
        codec: The new entry.
        first: Put it in front of the existing entries, so it wins over more general types. Default: True.
    """
    _REGISTRY[:] = [c for c in _REGISTRY if c.name != codec.name]
    if first:
        _REGISTRY.insert(0, codec)
    else:
        _REGISTRY.append(codec)


def codec_for(module: nn.Module) -> Codec | None:
    """The registry entry for a module, or None when LoRA cannot wrap it."""
    for codec in _REGISTRY:
        if codec.matches(module):
            return codec
    return None


def supported_names() -> list[str]:
    """Names of the layer types that can be adapted, for error messages."""
    return [c.name for c in _REGISTRY]
