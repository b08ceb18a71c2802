"""Merging LoRA into a quantized (4-bit) base: which weights the adapter's update is added to.

A QLoRA adapter was trained against ``dequant(W4)``, the 4-bit base as the forward pass saw it. Merging therefore
has to choose a base, and each choice costs something different:

- ``"dequantized"`` (default): ``W = dequant(W4) + s B A`` in a dense 16/32-bit layer. Reproduces the trained
  QLoRA model (up to float rounding), at 16/32-bit size.
- ``"original"``: ``W = W_orig + s B A`` with the high-precision weights the model was quantized from. Sharper base,
  but the adapter never saw it, so outputs drift from the trained model by the quantization error.
- ``"requantize"``: ``W4' = quant(dequant(W4) + s B A)``: stays 4-bit and small, but the update is quantized too and
  is mostly rounded away when it is smaller than the quantization step.

:func:`compare_merge_bases` measures each choice against the unmerged model on a probe batch.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_lora.surgery.errors import MergeError
from lightning_lora.surgery.lora.layer import LoRALayer
from lightning_lora.surgery.lora.merge import merge_lora, untie_shared_
from lightning_lora.surgery.lora.targets import candidate_modules
from lightning_lora.surgery.quant import bnb4bit

log = logging.getLogger(__name__)

MERGE_BASES: tuple[str, ...] = ("dequantized", "original", "requantize")

Original = nn.Module | Mapping[str, Tensor]


def needs_merge_base(model: nn.Module, merge_base: str, original: Original | None) -> bool:
    """Whether :func:`merge_lora` must take the quantized-base path (a 4-bit layer, or a non-default choice)."""
    return merge_base != "dequantized" or original is not None or any(bnb4bit.is_linear4bit(m) for m in model.modules())


def merge_onto_base_(model: nn.Module, todo: list[tuple[str, LoRALayer, list[str]]], *, merge_base: str,
                     original: Original | None, unload: bool, safe: bool) -> None:
    """Merge ``todo`` (path, layer, adapter names) onto the chosen base, in place; validates everything first.

    With ``"dequantized"`` / ``"original"`` every 4-bit layer of ``model`` becomes a dense ``nn.Linear`` (adapted or
    not), so the result is a plain 16/32-bit model; with ``"requantize"`` they stay 4-bit. Dense layers merge as usual.
    The wrappers are left in place; the caller unloads them.
    """
    _check_arguments(todo, merge_base, original, unload)
    dense_base = merge_base in ("dequantized", "original")
    quantized = _quantized_paths(model) if dense_base else {}
    originals = _original_weights(quantized, original) if merge_base == "original" else {}
    adapted = {path: (layer, names) for path, layer, names in todo}
    merged: dict[str, Tensor] = {}
    for path, module in quantized.items():
        base = originals[path] if merge_base == "original" else bnb4bit.dequantize(module)  # (out, in)
        layer, names = adapted.get(path, (None, []))
        weight = base.float()
        for name in names:
            weight = weight + layer.delta_weight(name).to(weight.device)  # fp32, cast once below
        merged[path] = weight.to(base.dtype)
        if safe and not torch.isfinite(merged[path]).all():  # in the dtype written: fp16 overflows where fp32 does not
            raise MergeError(f"{path}: merging adapters {names} gives non-finite weights (inf or NaN) in {base.dtype}; "
                             f"nothing was merged. Check the adapter for inf/NaN, or merge onto a wider dtype.")
    if safe:
        for path, layer, names in todo:
            if path not in merged:
                layer.check_merge(names, path)
    untie_shared_(model, [t for t in todo if t[0] not in merged], unload=unload)  # a tied dense lm_head
    _apply(model, todo, quantized, merged, keep_original=not unload)


def _check_arguments(todo: list[tuple[str, LoRALayer, list[str]]], merge_base: str, original: Original | None,
                     unload: bool) -> None:
    if merge_base not in MERGE_BASES:
        raise MergeError(f"merge_base={merge_base!r}: must be one of {list(MERGE_BASES)} ('dequantized' reproduces the "
                         "trained QLoRA model; see compare_merge_bases to measure each).")
    if original is not None and merge_base != "original":
        raise MergeError(f"`original` was given with merge_base={merge_base!r}; it is only used by merge_base='original'. "
                         "Pass merge_base='original', or drop `original`.")
    if merge_base == "original" and original is None:
        raise MergeError("merge_base='original' needs the high-precision weights: pass original=<the unquantized model "
                         "or its state dict>.")
    if original is not None and not isinstance(original, (nn.Module, Mapping)):
        raise MergeError(f"original={type(original).__name__}: pass an nn.Module or a state dict (name -> tensor).")
    if not unload and merge_base != "requantize" and any(layer.codec.quantized for _, layer, _ in todo):
        raise MergeError(
            f"merge_base={merge_base!r} replaces the 4-bit layers by dense ones, which unmerge_lora cannot undo; "
            "pass unload=True (the default), or merge_base='requantize' to merge into the 4-bit weights in place."
        )


def _quantized_paths(model: nn.Module) -> dict[str, nn.Module]:
    """Every 4-bit layer by path: the base layers of wrappers (under the wrapper's path) and unwrapped ones."""
    found = {}
    for path, module in candidate_modules(model).items():
        if isinstance(module, LoRALayer) and bnb4bit.is_linear4bit(module.base_layer):
            found[path] = module.base_layer
        elif bnb4bit.is_linear4bit(module):
            found[path] = module
    return found


def _original_weights(quantized: dict[str, nn.Module], original: Original) -> dict[str, Tensor]:
    """The high-precision weight of every 4-bit layer, found by path in ``original``; all problems in one error."""
    state = original.state_dict() if isinstance(original, nn.Module) else original
    found, problems = {}, []
    for path, module in quantized.items():
        key = _find_key(path, state)
        if key is None:
            problems.append(f"{path}: no '{path}.weight' (or a key ending with it) in `original`")
            continue
        tensor = state[key]
        expected = (module.out_features, module.in_features)
        if tuple(tensor.shape) != expected or not tensor.is_floating_point():
            problems.append(f"{path}: original[{key!r}] is {tuple(tensor.shape)} {tensor.dtype}, expected a float {expected}")
            continue
        found[path] = tensor.detach().to(module.weight.device)
    if problems:
        raise MergeError("merge_base='original': `original` does not fit the model; nothing was merged:\n  - "
                         + "\n  - ".join(problems[:10])
                         + (f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""))
    return found


def _find_key(path: str, state: Mapping[str, Any]) -> str | None:
    """``path.weight``, or the one key that ends with / is a suffix of it (models saved with or without a wrapper)."""
    wanted = [f"{path}.weight", f"{path}.base_layer.weight"]
    for key in wanted:
        if key in state:
            return key
    hits = [k for k in state if any(w.endswith(f".{k}") or k.endswith(f".{w}") for w in wanted)]
    return hits[0] if len(hits) == 1 else None


def _apply(model: nn.Module, todo: list[tuple[str, LoRALayer, list[str]]], quantized: dict[str, nn.Module],
           merged: dict[str, Tensor], *, keep_original: bool) -> None:
    wrapped = {path for path, _, _ in todo}
    for path, layer, names in todo:
        if path in merged:
            layer.base_layer = bnb4bit.to_dense_linear(quantized[path], merged[path])
            layer.merged_adapters.extend(names)
        else:
            layer.merge(names, keep_original=keep_original)  # dense layer, or re-quantized in place (codec)
            if not keep_original:
                bnb4bit.forget_previous_(layer.base_layer)  # no unmerge will come: keep no second packed copy
    for path in set(merged) - wrapped:
        parent_path, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        setattr(parent, child, bnb4bit.to_dense_linear(quantized[path], merged[path]))
    if merged:
        _forget_hf_quantization(model)


def _forget_hf_quantization(model: nn.Module) -> None:
    """A 4-bit transformers model declares it (``config.quantization_config``, and when loaded 4-bit a quantizer);
    once every layer is dense, ``save_pretrained`` would still write that config and ``from_pretrained`` re-create
    4-bit layers around dense weights. Drop those markers so the merged model saves and loads as a plain model."""
    for module in model.modules():
        config = getattr(module, "config", None)
        quant = getattr(config, "quantization_config", None)
        method = _get(quant, "quant_method") if quant is not None else None
        if getattr(method, "value", method) != "bitsandbytes":  # an enum in transformers' configs, a str in dicts
            continue
        delattr(config, "quantization_config")
        if getattr(module, "hf_quantizer", None) is not None:
            module.hf_quantizer = None
        if getattr(module, "is_quantized", False):
            module.is_quantized = False
        if getattr(module, "quantization_method", None) is not None:
            module.quantization_method = None


def _get(obj: Any, key: str) -> Any:
    return obj.get(key) if isinstance(obj, Mapping) else getattr(obj, key, None)


# --------------------------------------------------------------------------------------------- comparing bases
@dataclass
class MergeBaseResult:
    """How one merge base compares with the unmerged model on the probe batch.

    Attributes:
        merge_base: ``"dequantized"``, ``"original"`` or ``"requantize"``.
        max_abs_diff: Largest absolute logit difference (None when not measured).
        kl: Mean over positions of ``KL(p_unmerged || p_merged)`` in nats (None when not measured).
        weight_bytes: Bytes of the merged model's weights (None when not measured).
        note: Why a base was not measured, if it was not.
    """

    merge_base: str
    max_abs_diff: float | None = None
    kl: float | None = None
    weight_bytes: int | None = None
    note: str = ""


@dataclass
class MergeComparison:
    """The result of :func:`compare_merge_bases`: one row per merge base."""

    rows: list[MergeBaseResult]
    unmerged_bytes: int = 0

    def row(self, merge_base: str) -> MergeBaseResult:
        """The row of ``merge_base``."""
        return next(r for r in self.rows if r.merge_base == merge_base)

    def table(self) -> str:
        """A plain-text table (markdown-compatible)."""
        lines = ["| merge_base | max abs logit diff | KL (nats/token) | weight MiB |", "|---|---|---|---|"]
        for r in self.rows:
            if r.max_abs_diff is None:
                lines.append(f"| {r.merge_base} | - | - | - ({r.note}) |")
            else:
                lines.append(f"| {r.merge_base} | {r.max_abs_diff:.3g} | {r.kl:.3g} | {r.weight_bytes / 2**20:.3f} |")
        lines.append(f"unmerged QLoRA model: {self.unmerged_bytes / 2**20:.3f} MiB")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def compare_merge_bases(model: nn.Module, probe: Tensor | Mapping[str, Any], *, original: Original | None = None,
                        adapters: list[str] | None = None,
                        bases: tuple[str, ...] = MERGE_BASES) -> MergeComparison:
    """Merge copies of ``model`` onto each base and compare their logits with the unmerged model's on ``probe``.

    ``model`` is not changed (each base is merged on a deep copy, one copy at a time: this needs memory for one
    extra copy of the model). Run it on the adapted model itself, not on a LightningModule that holds a Trainer.

    Args:
        model: A model with LoRA layers (typically on a 4-bit base).
        probe: The model's input: a tensor (``model(probe)``) or a mapping of keyword arguments
            (``model(**probe)``), e.g. ``{"input_ids": ids, "attention_mask": mask}``.
        original: The high-precision weights for ``"original"`` (a model or a state dict). Without it that row is
            left unmeasured.
        adapters: Which adapters to merge. Default: the active ones.
        bases: Which merge bases to try. Default: all three.

    Returns:
        A :class:`MergeComparison`; ``print()`` it for a table of max abs logit difference, KL and weight size.
    """
    was_training = model.training
    model.eval()
    try:
        reference = _logits(model, probe)
        rows = []
        for base in bases:
            if base == "original" and original is None:
                rows.append(MergeBaseResult(base, note="pass original= to measure"))
                continue
            merged = merge_lora(copy.deepcopy(model), adapters=adapters, merge_base=base,
                                original=original if base == "original" else None)
            logits = _logits(merged, probe)
            rows.append(MergeBaseResult(base, _max_abs(reference, logits), _kl(reference, logits),
                                        bnb4bit.weight_bytes(merged)))
            del merged
    finally:
        model.train(was_training)
    comparison = MergeComparison(rows, bnb4bit.weight_bytes(model))
    log.info("Merge bases compared:\n%s", comparison)
    return comparison


def _logits(model: nn.Module, probe: Tensor | Mapping[str, Any]) -> Tensor:
    with torch.no_grad():
        out = model(**probe) if isinstance(probe, Mapping) else model(probe)
    if hasattr(out, "logits"):
        out = out.logits
    elif isinstance(out, (tuple, list)):
        out = out[0]
    return out.detach().double()


def _max_abs(reference: Tensor, logits: Tensor) -> float:
    return (reference - logits.to(reference.device)).abs().max().item()


def _kl(reference: Tensor, logits: Tensor) -> float:
    log_p = F.log_softmax(reference, dim=-1)  # (..., vocab)
    log_q = F.log_softmax(logits.to(reference.device), dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)  # (...,)
    value = kl.mean().item()
    return max(value, 0.0) if math.isfinite(value) else value
