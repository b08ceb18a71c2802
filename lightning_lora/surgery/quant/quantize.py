"""Quantize a model's linear layers to 4 bits with bitsandbytes (the frozen base of QLoRA).

Example:
    >>> from torch import nn
    >>> from lightning_lora import LoRAConfig, QuantConfig, apply_lora, quantize_model
    >>> model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
    >>> report = quantize_model(model, QuantConfig(targets=["0", "2"]))  # doctest: +SKIP
    >>> report.replaced  # doctest: +SKIP
    ['0', '2']
    >>> apply_lora(model, LoRAConfig(r=4, targets=["0", "2"]))  # QLoRA: fp32 adapters on a 4-bit base  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import math
import sys
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lightning_lora.surgery._deps import require
from lightning_lora.surgery.errors import QuantizationError, SurgeryError
from lightning_lora.surgery.lora.layer import LoRALayer
from lightning_lora.surgery.lora.targets import candidate_modules, union_matches
from lightning_lora.surgery.quant.bnb4bit import is_linear4bit, keep_portable_layout_, state_tensors, tensor_bytes
from lightning_lora.surgery.quant.config import QuantConfig

log = logging.getLogger(__name__)

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass
class QuantReport:
    """What :func:`quantize_model` did.

    Attributes:
        replaced: Paths of the layers now 4-bit, in model order.
        skipped: ``(path, reason)`` for matched modules left as they were.
        params: Weights quantized (logical count, not packed elements).
        bytes_before: Bytes of those layers' dense weights before.
        bytes_after: Bytes of their packed 4-bit weights, per-block statistics and lookup tables after.
        table_bytes: The part of ``bytes_after`` held by lookup tables: 16 + 256 constants per layer that
            bitsandbytes copies into every layer; they do not grow with the layer (1,088 bytes a layer).
        compute_dtype: The matmul dtype the 4-bit layers use, e.g. ``"float32"``.
    """

    replaced: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    params: int = 0
    bytes_before: int = 0
    bytes_after: int = 0
    table_bytes: int = 0
    compute_dtype: str = ""

    @property
    def bf16_bytes(self) -> int:
        """What the quantized weights would take in bfloat16 (2 bytes each), the usual reference."""
        return 2 * self.params

    @property
    def ratio_vs_bf16(self) -> float:
        """``bytes_after / bf16_bytes``, everything included: about 0.26 for NF4 with double quantization on large
        layers (0.28 without); more on tiny layers, where the per-layer lookup tables weigh."""
        return self.bytes_after / max(self.bf16_bytes, 1)

    @property
    def bits_per_param(self) -> float:
        """Average bits per quantized weight, per-block statistics included, lookup tables not (NF4 with double
        quantization and block size 64: about 4.13, as in the QLoRA paper)."""
        return 8 * (self.bytes_after - self.table_bytes) / max(self.params, 1)

    def __str__(self) -> str:
        return (
            f"Quantized {len(self.replaced)} layers to 4 bits ({self.params:,} weights, compute {self.compute_dtype}): "
            f"{self.bytes_before / 2**20:.2f} MiB -> {self.bytes_after / 2**20:.2f} MiB "
            f"({self.bits_per_param:.2f} bits/weight, {self.ratio_vs_bf16:.3f}x bf16); {len(self.skipped)} matches skipped"
        )


def quantize_model(model: nn.Module, config: QuantConfig | None = None) -> QuantReport:
    """Replace the selected ``nn.Linear`` layers by bitsandbytes ``Linear4bit`` layers, in place.

    Each layer is quantized on the device its weight is on (CPU included) and its weight frozen; biases keep their
    dtype and ``requires_grad``. Every selected layer is checked before any is replaced, so a bad input leaves the
    model unchanged. Call it before :func:`~lightning_lora.apply_lora`: the adapters then train in fp32 on the
    frozen 4-bit base (QLoRA).

    Args:
        model: The model to change, in place.
        config: What to quantize and how. Default: ``QuantConfig()`` (NF4, double quantization, all linear layers
            except the output head).

    Returns:
        A :class:`QuantReport`: replaced and skipped layers, bytes before and after.

    Raises:
        ModuleNotFoundError: If bitsandbytes is not installed (the message gives the pip line).
        TargetMatchError: If a ``targets`` / ``exclude`` pattern matches no module.
        QuantizationError: If a selected layer cannot be quantized (each one named, with the reason), or nothing is
            left to quantize.
        SurgeryError: If the model already has LoRA layers (quantize first, then apply LoRA).
    """
    config = config or QuantConfig()
    bnb = require("bitsandbytes")
    selected, skipped = plan_quantization(model, config)
    layers = {path: model.get_submodule(path) for path in selected}
    _check_layers(model, layers, config)
    before = sum(tensor_bytes([m.weight]) for m in layers.values())
    params = sum(m.weight.numel() for m in layers.values())
    seen: set[tuple[int, int]] = set()
    after = tables = 0
    dtypes = set()
    for path, linear in layers.items():
        quantized = _to_4bit(bnb, linear, config)
        _set_module(model, path, quantized)
        table = tensor_bytes(state_tensors(quantized, tables=True), seen)
        after += tensor_bytes(state_tensors(quantized), seen) + table
        tables += table
        dtypes.add(str(quantized.compute_dtype).removeprefix("torch."))
    report = QuantReport(selected, skipped, params, before, after, tables, ",".join(sorted(dtypes)))
    _declare_to_transformers(model, config, report)
    log.info("%s", report)
    return report


def _declare_to_transformers(model: nn.Module, config: QuantConfig, report: QuantReport) -> None:
    """Record a matching ``BitsAndBytesConfig`` on each transformers model inside ``model``.

    Without it ``save_pretrained`` writes packed 4-bit tensors under a config that says nothing of them, and
    ``from_pretrained`` cannot load the directory. With it the directory loads back as the same 4-bit model. The
    linear layers left in full precision are listed in ``llm_int8_skip_modules`` (transformers' name for it).
    """
    transformers = sys.modules.get("transformers")
    if transformers is None:
        return
    for prefix, module in model.named_modules():
        if not isinstance(module, transformers.PreTrainedModel):
            continue
        inside = f"{prefix}." if prefix else ""
        dense = [p for p, m in module.named_modules() if type(m) is nn.Linear]
        compute = report.compute_dtype.split(",")[0] or "float32"
        module.config.quantization_config = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=config.quant_type, bnb_4bit_use_double_quant=config.double_quant,
            bnb_4bit_compute_dtype=getattr(torch, compute), bnb_4bit_quant_storage=config.quant_storage,
            llm_int8_skip_modules=dense or None,
        )
        log.debug("Recorded a BitsAndBytesConfig on %s%s", inside, type(module).__name__)
        return  # the outermost transformers model holds the config that save_pretrained writes


def plan_quantization(model: nn.Module, config: QuantConfig) -> tuple[list[str], list[tuple[str, str]]]:
    """Which modules ``config`` would quantize, without changing the model: (paths, skipped (path, reason)).

    Raises:
        TargetMatchError: If a pattern matches no module.
        QuantizationError: If nothing is left to quantize.
        SurgeryError: If the model already has LoRA layers.
    """
    if any(isinstance(m, LoRALayer) for m in model.modules()):
        raise SurgeryError(
            "quantize_model: the model already has LoRA layers. Quantize the base first, then apply LoRA "
            "(quantize_model(model, qcfg); apply_lora(model, lcfg)), or unload_lora(model) and start again."
        )
    modules = candidate_modules(model)
    matched = union_matches(config.targets, "quantize target", model, modules)  # model order
    excluded = set(union_matches(config.exclude, "quantize exclude", model, modules)) if config.exclude else set()
    selected, skipped = [], []
    for path in matched:
        reason = "excluded" if path in excluded else _skip_reason(path, modules)
        if reason is None:
            selected.append(path)
        else:
            skipped.append((path, reason))
    if not selected:
        shown = "\n".join(f"  - {p}: {r}" for p, r in skipped[:10])
        raise QuantizationError(
            f"targets={config.targets!r} (exclude={config.exclude!r}) left no nn.Linear layer to quantize. "
            f"Matched but skipped:\n{shown}\nWiden `targets` (e.g. 'all-linear') or narrow `exclude`."
        )
    return selected, skipped


def _skip_reason(path: str, modules: dict[str, nn.Module]) -> str | None:
    module = modules[path]
    if is_linear4bit(module):
        return "already 4-bit"
    if isinstance(modules.get(path.rpartition(".")[0]), nn.MultiheadAttention):
        return "inside nn.MultiheadAttention, which reads the weight directly"
    if not isinstance(module, nn.Linear):
        return f"{type(module).__name__} is not nn.Linear (bitsandbytes 4-bit replaces nn.Linear layers only)"
    if type(module) is not nn.Linear:
        return f"{type(module).__name__} subclasses nn.Linear with its own behaviour; only plain nn.Linear is quantized"
    return None


def _check_layers(model: nn.Module, layers: dict[str, nn.Module], config: QuantConfig) -> None:
    """Every reason bitsandbytes would fail (or silently break the model), for every layer, in one error."""
    owners = _parameter_owners(model)
    itemsize = config.storage_dtype.itemsize
    problems = []
    for path, linear in layers.items():
        weight = linear.weight
        if weight.dtype not in _FLOAT_DTYPES:
            problems.append(f"{path!r}: weight dtype {weight.dtype} (bitsandbytes 4-bit takes float32, float16 or "
                            "bfloat16; cast the model first, e.g. model.float()).")
        if weight.device.type == "meta":
            problems.append(f"{path!r}: weight is on the meta device (no values to quantize); load the weights first.")
        if weight.numel() == 0:
            problems.append(f"{path!r}: empty weight {tuple(weight.shape)}; there is nothing to quantize.")
        elif math.ceil(weight.numel() / 2) % itemsize:
            problems.append(f"{path!r}: {weight.numel()} weights pack into {math.ceil(weight.numel() / 2)} bytes, not a "
                            f"multiple of quant_storage={config.quant_storage!r} ({itemsize} bytes); use "
                            "quant_storage='uint8' or exclude this layer.")
        tied = [o for o in owners.get(id(weight), []) if o != f"{path}.weight"]
        if tied:
            problems.append(f"{path!r}: weight is shared with {tied} (tied weights); quantizing would untie them and "
                            "save no memory. Add it to `exclude`.")
    if problems:
        raise QuantizationError("Cannot quantize these layers; nothing was changed:\n  - " + "\n  - ".join(problems))


def _parameter_owners(model: nn.Module) -> dict[int, list[str]]:
    owners: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), []).append(name)
    return owners


def _to_4bit(bnb: Any, linear: nn.Linear, config: QuantConfig) -> nn.Module:
    """A ``Linear4bit`` holding ``linear``'s weight, quantized on the weight's device."""
    device = linear.weight.device
    storage = config.storage_dtype
    layer = bnb.nn.Linear4bit(
        linear.in_features, linear.out_features, bias=linear.bias is not None,
        compute_dtype=config.compute_dtype_for(device), compress_statistics=config.double_quant,
        quant_type=config.quant_type, quant_storage=storage, device="meta",
    )
    layer.weight = bnb.nn.Params4bit(
        linear.weight.data, requires_grad=False, blocksize=config.blocksize,
        compress_statistics=config.double_quant, quant_type=config.quant_type, quant_storage=storage, module=layer,
    )
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.data, requires_grad=linear.bias.requires_grad)
    layer.train(linear.training)
    keep_portable_layout_(layer)  # eval must compute what training computes (see bnb4bit.keep_portable_layout_)
    return layer.to(device)  # bitsandbytes quantizes the weight on this move (CPU included)


def _set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, module)
