"""Merge adapters into the base weights and take them out again, in place.

``W <- W + scale * B A``, computed in fp32 and cast once. Quantized bases plug in their own merge path through
:func:`register_merge_path` (surgery/quant/ registers the 4-bit one), so this core never imports a backend.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any, Literal

from torch import Tensor, nn

from lightning_lora.surgery.errors import MergeError
from lightning_lora.surgery.lora.active import check_adapter_names
from lightning_lora.surgery.lora.apply import require_lora_layers, unwrap_layers
from lightning_lora.surgery.lora.config import LoRAConfig
from lightning_lora.surgery.lora.inventory import adapter_configs
from lightning_lora.surgery.lora.layer import LoRALayer
from lightning_lora.surgery.lora.tied import mark_untied_, tied_with, weight_sharers

log = logging.getLogger(__name__)

MergeBase = Literal["dequantized", "original", "requantize"]
"""Which weights the update is added to on a quantized base; see :func:`merge_lora`."""

MergeTodo = list[tuple[str, LoRALayer, list[str]]]
MergePath = tuple[Callable[[nn.Module, str, Any], bool], Callable[..., None]]
_MERGE_PATHS: list[MergePath] = []


def register_merge_path(applies: Callable[[nn.Module, str, Any], bool], merge_onto_base: Callable[..., None]) -> None:
    """Add a merge path for quantized bases, tried before the dense merge.

    Args:
        applies: ``applies(model, merge_base, original)``: whether this path handles the merge.
        merge_onto_base: ``merge_onto_base(model, todo, *, merge_base, original, unload, safe)`` with ``todo`` a list
            of ``(path, layer, adapter names)``; merges in place, validating everything first. The wrappers are
            unloaded by :func:`merge_lora` afterwards when asked.
    """
    if (applies, merge_onto_base) not in _MERGE_PATHS:
        _MERGE_PATHS.append((applies, merge_onto_base))


def merge_lora(model: nn.Module, *, adapters: list[str] | None = None, unload: bool = True, safe: bool = True,
               merge_base: MergeBase = "dequantized", original: nn.Module | Mapping[str, Tensor] | None = None) -> nn.Module:
    """Merge adapters into the base weights, in place: ``W <- W + scale * B A`` (computed in fp32, cast once).

    On a 4-bit base (QLoRA) the weights the update is added to are chosen by ``merge_base``; on a dense model it has
    no effect. :func:`~lightning_lora.surgery.quant.merge_bases.compare_merge_bases` measures what each choice costs.

    Args:
        model: A model with LoRA layers.
        adapters: Which adapters to merge. Default: the active ones in each layer.
        unload: Replace every wrapper by its (merged) base layer, giving a plain model, as PEFT's
            ``merge_and_unload``. With False the wrappers stay, keep a copy of the original weight, and
            :func:`unmerge_lora` restores it bit for bit. Default: True.
        safe: Check that every merged weight is finite before changing any layer. Default: True.
        merge_base: For 4-bit layers: ``"dequantized"`` (``dequant(W4) + s B A`` in a dense layer: reproduces the
            trained QLoRA model), ``"original"`` (``W_orig + s B A`` from ``original``), or ``"requantize"``
            (``quant(dequant(W4) + s B A)``: stays 4-bit, the update is rounded). With the first two every 4-bit
            layer becomes a plain ``nn.Linear`` in the dtype it had before quantization. Default: ``"dequantized"``.
        original: The high-precision weights for ``merge_base="original"``: the unquantized model or its state
            dict (keys ``<path>.weight``, matched by path suffix). Default: None.

    Returns:
        The model (the same object, changed in place; a plain model when ``unload``).

    Raises:
        MergeError: If a merge would produce inf or NaN (naming the layer), or ``merge_base`` / ``original`` do not
            fit the model; nothing is changed then.
        SurgeryError: If the model has no LoRA layer, or ``adapters`` names an adapter it does not have.
    """
    refuse_unmergeable(model, adapters, "merge_lora")
    layers = require_lora_layers(model, "merge_lora")
    check_adapter_names(model, adapters or [], "merge_lora")  # a typo would otherwise merge nothing and unload all
    for applies, merge_onto_base in _MERGE_PATHS:
        if applies(model, merge_base, original):
            todo = [(path, layer, _to_merge(layer, adapters)) for path, layer in layers]
            merge_onto_base(model, todo, merge_base=merge_base, original=original, unload=unload, safe=safe)
            if unload:
                unwrap_layers(model, layers)
            return model
    if merge_base != "dequantized" or original is not None:
        raise MergeError(f"merge_base={merge_base!r} / original=... only apply to quantized bases, and no quantization "
                         f"backend is registered (import lightning_lora.surgery.quant).")
    _merge_dense(model, layers, adapters, unload=unload, safe=safe)
    if unload:
        unwrap_layers(model, layers)
    return model


def refuse_unmergeable(model: nn.Module, adapters: list[str] | None, what: str) -> None:
    """Raise :class:`MergeError` when ``adapters`` (default: the model's, if none of them is LoRA) are of a method
    that cannot be folded into the weights (bottleneck, prompt, P- or prefix tuning), saying why and what to do."""
    configs = adapter_configs(model)
    others = {n: c for n, c in configs.items() if not isinstance(c, LoRAConfig)}
    chosen = [n for n in (adapters or []) if n in others]
    if adapters is None and others and len(others) == len(configs):
        chosen = list(others)
    if chosen:
        reasons = "; ".join(f"{n!r} is {getattr(others[n], 'method', type(others[n]).__name__)}: "
                            f"{getattr(others[n], 'merge_refusal', 'it cannot be folded into the weights')}"
                            for n in chosen)
        raise MergeError(f"{what}: cannot merge {reasons}. HINT: serve the model unmerged with the adapter attached "
                         "(save_adapter / load_adapter), or train a LoRA adapter (LoRAConfig) if you need a merged model.")


def _merge_dense(model: nn.Module, layers: list[tuple[str, LoRALayer]], adapters: list[str] | None, *, unload: bool,
                 safe: bool) -> None:
    """Check every layer, then merge each once, in place (issue 15: as fast as PEFT's unchecked merge).

    The check reads each weight once and proves the result finite in the layer's dtype from a bound; only layers where
    the bound fails are computed before any change, and their checked result is what gets written. So every check
    runs before the first write, and nothing changes when one fails. Should a write itself fail, the layers merged
    before it are put back from their kept originals (kept when ``unload`` is False; with ``unload`` nothing is
    copied, as in PEFT, and the check above is what protects the model).

    A layer whose weight is shared with another module (a tied ``lm_head``) is untied first: the merge must not write
    into the input embedding (issue 10). With ``unload`` the model's config then says the head is not tied.
    """
    todo = [(path, layer, _to_merge(layer, adapters)) for path, layer in layers]
    checked = {path: layer.check_merge(names, path) for path, layer, names in todo} if safe else {}
    untie_shared_(model, todo, unload=unload)
    scratch: dict[object, Tensor] = {}  # fp32 buffers shared by the layers of this merge
    done: list[LoRALayer] = []
    try:
        for path, layer, names in todo:
            fresh = not layer.merged_adapters
            layer.merge(names, keep_original=not unload, merged=checked.pop(path, None), scratch=scratch)
            if fresh:
                done.append(layer)
    except BaseException:
        if not unload:
            for layer in done:
                layer.unmerge()
        raise


def untie_shared_(model: nn.Module, todo: MergeTodo, *, unload: bool) -> None:
    """Untie every layer in ``todo`` with adapters to merge whose weight another module shares, in place (see
    :mod:`~lightning_lora.surgery.lora.tied`); with ``unload`` the model's config then says the head is not tied."""
    sharers = weight_sharers(model)
    tied = [(path, layer) for path, layer, names in todo if names and tied_with(layer, path, sharers)]
    for path, layer in tied:
        log.info("%s shares its weight with %s; merging into an untied copy.", path, tied_with(layer, path, sharers))
        layer.untie(keep=not unload)
    if tied and unload:
        mark_untied_(model)


def _to_merge(layer: LoRALayer, adapters: list[str] | None) -> list[str]:
    names = layer.active_adapters if adapters is None else [a for a in adapters if a in layer.specs]
    return [n for n in names if n not in layer.merged_adapters]


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Undo :func:`merge_lora(model, unload=False) <merge_lora>`, in place; unmerged layers are left as they are."""
    for _, layer in require_lora_layers(model, "unmerge_lora"):
        layer.unmerge()
    return model


