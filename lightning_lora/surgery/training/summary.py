"""How many parameters train, where they sit, and what training them costs in memory (plain values).

Counts are logical parameter counts: a 4-bit packed ``uint8`` element holds two parameters
(:func:`~lightning_lora.surgery.lora.report.parameter_count`). Byte figures are the real storage: the packed weight is
counted at its packed size.

Example:
    >>> from torch import nn
    >>> from lightning_lora import LoRAConfig, apply_lora
    >>> model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2))
    >>> _ = apply_lora(model, LoRAConfig(r=2, targets=["0"]))
    >>> summarize_parameters(model).trainable  # 2 * (8 + 8)
    32
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch import nn

from lightning_lora.surgery.lora.inventory import adapter_configs, adapter_parameters, lora_layers
from lightning_lora.surgery.lora.report import parameter_count
from lightning_lora.surgery.lora.targets import block_index

# Optimizer states kept per trainable parameter, by optimizer class name (Adam-like: exp_avg and exp_avg_sq).
_STATES_PER_PARAM = {"Adam": 2, "AdamW": 2, "Adamax": 2, "NAdam": 2, "RAdam": 2, "Adagrad": 1, "Adadelta": 2,
                     "Rprop": 2, "LBFGS": 2, "Lion": 1, "Adafactor": 1}


@dataclass
class ParameterSummary:
    """Parameter counts and a memory estimate for weights, gradients and optimizer states.

    Attributes:
        trainable: Trainable parameters. total: All parameters (shared ones once).
        by_kind: Trainable parameters per layer kind: the last name of the adapted layer for LoRA factors
            (``q_proj``), of the owning module otherwise (``lm_head``).
        by_block: Trainable parameters per transformer block (``"block 3"``) and outside any block (``"other"``).
        by_method: Trainable adapter parameters per method (``"LoRA"``, ``"prefix tuning"``...).
        adapter_params / adapter_bytes: The adapters' own tensors (LoRA factors, bottleneck and virtual-token
            weights), without ``modules_to_save``.
        weight_bytes: Storage of every parameter and buffer. gradient_bytes: One gradient per trainable parameter.
        optimizer_bytes: Optimizer states for the trainable parameters; ``optimizer`` names the optimizer and
            ``optimizer_states`` how many states per parameter were assumed.
    """

    trainable: int
    total: int
    by_kind: dict[str, int] = field(default_factory=dict)
    by_block: dict[str, int] = field(default_factory=dict)
    by_method: dict[str, int] = field(default_factory=dict)
    adapter_params: int = 0
    adapter_bytes: int = 0
    weight_bytes: int = 0
    gradient_bytes: int = 0
    optimizer_bytes: int = 0
    optimizer: str = "AdamW (assumed)"
    optimizer_states: int = 2

    @property
    def percent(self) -> float:
        """Trainable parameters as a percentage of all parameters."""
        return 100.0 * self.trainable / max(self.total, 1)

    @property
    def training_bytes(self) -> int:
        """Weights + gradients + optimizer states (activations are not included)."""
        return self.weight_bytes + self.gradient_bytes + self.optimizer_bytes

    def metrics(self, prefix: str = "params/") -> dict[str, float]:
        """Flat numbers for a logger."""
        values = {"trainable": self.trainable, "total": self.total, "trainable_percent": self.percent,
                  "adapter_bytes": self.adapter_bytes, "weight_bytes": self.weight_bytes,
                  "gradient_bytes": self.gradient_bytes, "optimizer_bytes": self.optimizer_bytes}
        return {f"{prefix}{k}": float(v) for k, v in values.items()}

    def table(self) -> str:
        """A plain-text report."""
        lines = [f"Trainable parameters: {self.trainable:,} of {self.total:,} ({self.percent:.4f}%)"]
        if self.by_kind:
            lines.append("  by kind:  " + ", ".join(f"{k} {v:,}" for k, v in self.by_kind.items()))
        if self.by_block:
            lines.append("  by block: " + _block_runs(self.by_block))
        if self.by_method:
            lines.append("  by method: " + ", ".join(f"{k} {v:,}" for k, v in self.by_method.items()))
        lines.append(f"  adapters: {self.adapter_params:,} parameters, {_human(self.adapter_bytes)}")
        lines.append(f"  memory estimate: weights {_human(self.weight_bytes)} + gradients {_human(self.gradient_bytes)} "
                     f"+ optimizer states {_human(self.optimizer_bytes)} ({self.optimizer}, {self.optimizer_states} per "
                     f"trainable parameter) = {_human(self.training_bytes)}, activations not included")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _block_runs(by_block: dict[str, int]) -> str:
    """``blocks 0-29 162,816 each, other 0``: consecutive blocks with equal counts in one entry."""
    runs: list[list[int]] = []  # [first, last, count]
    parts = []
    for key, count in by_block.items():
        if key == "other":
            parts.append(f"other {count:,}")
            continue
        index = int(key.split()[1])
        if runs and runs[-1][1] == index - 1 and runs[-1][2] == count:
            runs[-1][1] = index
        else:
            runs.append([index, index, count])
    blocks = [f"block {a} {n:,}" if a == b else f"blocks {a}-{b} {n:,} each" for a, b, n in runs]
    return ", ".join([*blocks, *parts])


def _human(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:,.2f} {unit}"
    return f"{n} B"


def summarize_parameters(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> ParameterSummary:
    """Count ``model``'s parameters by kind and block and estimate training memory.

    Args:
        model: Any module (a LightningModule, a transformers model...).
        optimizer: The optimizer used, to size its states. Default: AdamW (two states per trainable parameter).

    Returns:
        A :class:`ParameterSummary`; ``print(summary)`` shows a report.
    """
    kinds = _kind_of_parameters(model)
    methods = _method_of_parameters(model)
    kinds.update({path: method for path, method in methods.items() if method != "LoRA"})
    adapters = {id(p) for p in adapter_parameters(model, factors_only=True).values()}
    by_method: dict[str, int] = defaultdict(int)
    summary = ParameterSummary(trainable=0, total=0)
    by_kind: dict[str, int] = defaultdict(int)
    by_block: dict[str, int] = defaultdict(int)
    seen: set[int] = set()
    for name, param in model.named_parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        n, nbytes = parameter_count(param), param.numel() * param.element_size()
        summary.total += n
        summary.weight_bytes += nbytes
        if id(param) in adapters:
            summary.adapter_params += n
            summary.adapter_bytes += nbytes
        if param.requires_grad:
            summary.trainable += n
            summary.gradient_bytes += nbytes
            by_kind[kinds.get(name, name.rsplit(".", 1)[0].rsplit(".", 1)[-1])] += n
            block = block_index(name)
            by_block["other" if block is None else f"block {block}"] += n
            if name in methods:
                by_method[methods[name]] += n
    summary.weight_bytes += sum(b.numel() * b.element_size() for b in model.buffers())
    summary.by_kind, summary.by_block, summary.by_method = dict(by_kind), _sorted_blocks(by_block), dict(by_method)
    summary.optimizer, summary.optimizer_states, state_bytes = _optimizer_states(optimizer)
    summary.optimizer_bytes = _optimizer_bytes(model, summary.optimizer_states, state_bytes)
    return summary


def _kind_of_parameters(model: nn.Module) -> dict[str, str]:
    """LoRA factors and base parameters of an adapted layer count under the adapted layer's last name."""
    kinds = {}
    for path, layer in lora_layers(model):
        leaf = path.rsplit(".", 1)[-1]
        for pname, _ in layer.named_parameters():
            kinds[f"{path}.{pname}"] = leaf
    return kinds


def _method_of_parameters(model: nn.Module) -> dict[str, str]:
    """Adapter tensors by path -> their method in words (``"LoRA"``, ``"bottleneck adapters"``...)."""
    methods = {}
    for name, config in adapter_configs(model).items():
        label = getattr(config, "method", "LoRA")
        methods.update({path: label for path in adapter_parameters(model, name, factors_only=True)})
    return methods


def _sorted_blocks(by_block: dict[str, int]) -> dict[str, int]:
    def key(item: tuple[str, int]) -> tuple[int, int]:
        return (1, 0) if item[0] == "other" else (0, int(item[0].split()[1]))

    return dict(sorted(by_block.items(), key=key))


def _optimizer_states(optimizer: torch.optim.Optimizer | None) -> tuple[str, int, int | None]:
    """(name, states per parameter, bytes per state or None for "the parameter's own dtype")."""
    if optimizer is None:
        return "AdamW (assumed)", 2, None
    name = type(optimizer).__name__
    if "8bit" in name:  # bitsandbytes' 8-bit optimizers keep their states in uint8 (plus small block scales)
        return name, 1 if "SGD" in name or "Lion" in name else 2, 1
    if name == "SGD" or name == "RMSprop":
        momentum = any(group.get("momentum", 0) for group in optimizer.param_groups)
        return name, int(momentum) + (1 if name == "RMSprop" else 0), None
    return name, _STATES_PER_PARAM.get(name, 2), None


def _optimizer_bytes(model: nn.Module, states: int, state_bytes: int | None) -> int:
    seen: set[int] = set()
    total = 0
    for param in model.parameters():
        if param.requires_grad and id(param) not in seen:
            seen.add(id(param))
            total += states * param.numel() * (param.element_size() if state_bytes is None else state_bytes)
    return total
