"""What a surgery would do (a plan) and what it did (a report): plain values that tests and users can read."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class PlannedLayer:
    """One layer that would get an adapter."""

    name: str
    kind: str
    in_features: int
    out_features: int
    block: int | None
    r: int
    alpha: float
    scale: float
    tied_with: tuple[str, ...] = ()
    """Parameters of other modules that share this layer's weight (a tied ``lm_head``: the input embedding)."""

    @property
    def params(self) -> int:
        """Adapter parameters this layer adds: ``r * (in + out)``."""
        return self.r * (self.in_features + self.out_features)


@dataclass
class LoRAPlan:
    """The dry run of :func:`~lightning_lora.plan_lora`: the layers that would be wrapped and what was skipped."""

    adapter: str
    layers: list[PlannedLayer]
    skipped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def names(self) -> list[str]:
        """Paths of the layers that would be wrapped, in model order."""
        return [layer.name for layer in self.layers]

    @property
    def adapter_params(self) -> int:
        """Parameters the adapter would add."""
        return sum(layer.params for layer in self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def table(self) -> str:
        """A plain-text table, one row a layer, with a total line."""
        rows = [("module", "kind", "block", "in", "out", "r", "alpha", "params")]
        for layer in self.layers:
            block = "-" if layer.block is None else str(layer.block)
            rows.append((layer.name, layer.kind, block, str(layer.in_features), str(layer.out_features),
                          str(layer.r), f"{layer.alpha:g}", f"{layer.params:,}"))
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        lines.append(f"{len(self.layers)} layers, {self.adapter_params:,} adapter parameters (adapter {self.adapter!r})")
        if self.skipped:
            reasons = Counter(reason for _, reason in self.skipped)
            summary = "; ".join(f"{count} {reason}" for reason, count in reasons.most_common())
            lines.append(f"{len(self.skipped)} matched modules skipped: {summary}")
        for layer in self.layers:
            if layer.tied_with:
                lines.append(f"{layer.name}: weight tied with {', '.join(layer.tied_with)}; merging unties it (the merged "
                             f"model keeps both, tie_word_embeddings=false)")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


@dataclass
class SurgeryReport:
    """What :func:`~lightning_lora.apply_lora` did."""

    adapter: str
    replaced: list[str]
    extended: list[str]
    skipped: list[tuple[str, str]]
    trainable_params: int
    total_params: int
    adapter_params: int

    @property
    def trainable_percent(self) -> float:
        """Trainable parameters as a percentage of all parameters."""
        return 100.0 * self.trainable_params / max(self.total_params, 1)

    def __str__(self) -> str:
        wrapped = len(self.replaced) + len(self.extended)
        return (
            f"LoRA adapter {self.adapter!r}: {wrapped} layers adapted ({len(self.replaced)} newly wrapped), "
            f"{len(self.skipped)} matches skipped; trainable params {self.trainable_params:,} of "
            f"{self.total_params:,} ({self.trainable_percent:.4f}%)"
        )


def logical_numel(param: Tensor) -> int:
    """How many weights a (possibly packed 4-bit) parameter stands for: the dense shape's size when known.

    Duck-typed on what quantized tensors carry (bitsandbytes' ``quant_state``), so the core needs no backend import.
    """
    state = getattr(param, "quant_state", None)
    if state is not None and getattr(state, "shape", None) is not None:
        return int(torch.Size(state.shape).numel())
    if type(param).__name__ == "Params4bit" and not param.dtype.is_floating_point:
        return param.numel() * param.element_size() * 2  # two 4-bit values a byte
    return param.numel()


def parameter_count(param: nn.Parameter) -> int:
    """Logical parameter count of a tensor: a packed 4-bit weight counts as its dense shape (two per uint8 byte;
    four per element with ``quant_storage=bfloat16``); a 4-bit layer not quantized yet counts its elements."""
    return logical_numel(param)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` logical parameter counts, shared parameters counted once."""
    seen: set[int] = set()
    trainable = total = 0
    for param in model.parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        n = parameter_count(param)
        total += n
        trainable += n if param.requires_grad else 0
    return trainable, total
