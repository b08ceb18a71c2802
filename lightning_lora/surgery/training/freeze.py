"""Block-wise freezing for partial fine-tuning, and the bookkeeping that keeps trainable parameters in the optimizer.

Plain PyTorch. Blocks are found from module paths (``layers.N``, ``h.N``, ``layer.N``, ``blocks.N``), exactly as
``LoRAConfig.layers`` finds them, so ``"-2:"`` means the same blocks here and there. LoRA adapter factors are found
structurally (the ``lora_A`` / ``lora_B`` of every :class:`LoRALayer`) and are never frozen or unfrozen here: they
belong to the LoRA surgery.

Example:
    >>> from torch import nn
    >>> model = nn.Module()
    >>> model.layers = nn.ModuleList([nn.Linear(4, 4) for _ in range(3)])
    >>> model.head = nn.Linear(4, 2)
    >>> sorted(train_only(model, blocks="-1:", modules=["head"]))
    ['head.bias', 'head.weight', 'layers.2.bias', 'layers.2.weight']
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from lightning_lora.surgery.errors import LoRAConfigError
from lightning_lora.surgery.lora.config import parse_layer_slice
from lightning_lora.surgery.lora.inventory import adapter_modules, adapter_parameters
from lightning_lora.surgery.lora.targets import (
    block_index,
    candidate_modules,
    matches_name,
    num_blocks,
    resolve_layers,
    unmatched_error,
)

BlockSpec = list[int] | str | None


def adapter_parameter_ids(model: nn.Module) -> set[int]:
    """``id()`` of every adapter tensor (LoRA factors and the other methods' weights) in the model."""
    return {id(p) for p in adapter_parameters(model, factors_only=True).values()}


def has_lora(model: nn.Module) -> bool:
    """Whether the model holds at least one adapter (a LoRA layer or another method's: their surgery chose what
    trains, so layer freezing adds to it instead of freezing it)."""
    return bool(adapter_modules(model))


def block_spec_problems(blocks: BlockSpec, what: str = "blocks") -> list[str]:
    """Problems with a block selection's syntax (``LoRAConfig.layers``: a list of ints or a slice string), if any."""
    if blocks is None:
        return []
    if isinstance(blocks, str):
        try:
            step = parse_layer_slice(blocks).step
        except LoRAConfigError:
            step = 0
        if step == 0:
            return [f"{what}={blocks!r}: use a slice string like '-2:' (the last two blocks) or '0:4', or a list of ints."]
        return []
    int_list = isinstance(blocks, (list, tuple)) and all(isinstance(i, int) and not isinstance(i, bool) for i in blocks)
    if not int_list or not blocks:
        return [f"{what}={blocks!r}: give a non-empty list of block indices like [10, 11] or a slice string like '-2:'."]
    return []


def select_blocks(model: nn.Module, blocks: BlockSpec) -> set[int]:
    """Block indices chosen by ``blocks`` (a list of indices or a slice string like ``"-2:"``); empty for None.

    Raises:
        LoRAConfigError: If the model has no numbered blocks or an index / slice does not fit them.
    """
    if blocks is None:
        return set()
    problems = block_spec_problems(blocks)
    if problems:
        raise LoRAConfigError(problems[0])
    return resolve_layers(list(blocks) if isinstance(blocks, tuple) else blocks, num_blocks(model)) or set()


def selected_parameters(model: nn.Module, blocks: BlockSpec = None, modules: Iterable[str] = ()) -> dict[str, nn.Parameter]:
    """Non-adapter parameters inside the chosen blocks or under modules matching ``modules`` (pure).

    Args:
        model: The model to read.
        blocks: Block indices or a slice string (``LoRAConfig.layers`` syntax). Default: none.
        modules: Module name patterns (``LoRAConfig.targets`` syntax, e.g. ``"lm_head"``, ``"re:.*norm"``).

    Returns:
        ``{parameter name: parameter}`` in model order.

    Raises:
        TargetMatchError: If a module pattern matches nothing (the message lists the closest names).
        LoRAConfigError: If ``blocks`` does not fit the model.
    """
    chosen = select_blocks(model, blocks)
    prefixes = _module_prefixes(model, list(modules))
    adapters = adapter_parameter_ids(model)
    selected: dict[str, nn.Parameter] = {}
    for name, param in model.named_parameters():
        if id(param) in adapters:
            continue
        if block_index(name) in chosen or any(name.startswith(p) for p in prefixes):
            selected[name] = param
    return selected


def _module_prefixes(model: nn.Module, patterns: list[str]) -> list[str]:
    modules = candidate_modules(model)
    missing = [p for p in patterns if not any(n and matches_name(p, n) for n in modules)]
    if missing:
        raise unmatched_error("modules", missing, modules)
    return [f"{n}." for n in modules if n and any(matches_name(p, n) for p in patterns)]


def train_only(model: nn.Module, blocks: BlockSpec = None, modules: Iterable[str] = ()) -> list[str]:
    """Make the chosen blocks and modules trainable, in place; returns the names of the parameters now trainable.

    Without LoRA every other parameter is frozen (partial fine-tuning). With LoRA layers present the LoRA surgery
    has already frozen the base and chosen what trains (adapters, ``modules_to_save``, biases): the chosen blocks
    are then trained fully *in addition*, and nothing else changes. Adapter factors are never touched.

    Raises:
        TargetMatchError, LoRAConfigError: On a pattern or block selection that does not fit; nothing is changed.
    """
    selected = selected_parameters(model, blocks, modules)  # validates before any change
    if not has_lora(model):
        chosen = {id(p) for p in selected.values()}
        for param in model.parameters():
            if id(param) not in chosen:
                param.requires_grad_(False)
    for param in selected.values():
        param.requires_grad_(True)
    return list(selected)


def unfreeze(params: Iterable[nn.Parameter]) -> list[nn.Parameter]:
    """Set ``requires_grad`` on the given parameters, in place; returns those that were frozen before."""
    changed = []
    for param in params:
        if not param.requires_grad and (param.is_floating_point() or param.is_complex()):
            param.requires_grad_(True)
            changed.append(param)
    return changed


# ----------------------------------------------------------------------------------------------------- optimizers
def optimizer_parameter_ids(optimizers: Iterable[torch.optim.Optimizer]) -> set[int]:
    """``id()`` of every parameter in any param group of any of the optimizers."""
    return {id(p) for opt in optimizers for group in opt.param_groups for p in group["params"]}


def trainable_not_in_optimizers(model: nn.Module, optimizers: Iterable[torch.optim.Optimizer]) -> list[str]:
    """Names of parameters that require grad but are in no optimizer (they would silently never train)."""
    held = optimizer_parameter_ids(optimizers)
    return [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in held]


def frozen_in_optimizers(model: nn.Module, optimizers: Iterable[torch.optim.Optimizer]) -> list[str]:
    """Names of frozen parameters that an optimizer holds anyway (harmless, but they cost memory and time)."""
    held = optimizer_parameter_ids(optimizers)
    return [n for n, p in model.named_parameters() if not p.requires_grad and id(p) in held]


def add_param_group(optimizer: torch.optim.Optimizer, params: Iterable[nn.Parameter], lr: float | None = None,
                    schedulers: Iterable[Any] = ()) -> int:
    """Add the parameters the optimizer does not hold yet as one new param group, in place.

    The new group follows the first group's learning rate, scaled by ``lr / first group's current lr``: it joins
    the learning-rate schedulers of this optimizer (recent PyTorch schedulers refuse an optimizer whose group count
    changed) with the first group's schedule and a proportional base learning rate.

    Args:
        optimizer: The optimizer to extend.
        params: Candidate parameters, in a fixed order (resuming re-adds the same group in the same order).
        lr: Learning rate of the new group now. Default: the first group's current learning rate.
        schedulers: The learning-rate schedulers built on ``optimizer`` (others are ignored).

    Returns:
        How many parameters were added (0 adds no group).

    Raises:
        NotImplementedError: For a scheduler with per-group settings we cannot extend (CyclicLR, OneCycleLR).
    """
    held = optimizer_parameter_ids([optimizer])
    new = [p for p in params if id(p) not in held]
    if not new:
        return 0
    owned = [s for s in _flatten_schedulers(schedulers) if getattr(s, "optimizer", None) is optimizer]
    unsupported = [type(s).__name__ for s in owned if type(s).__name__ in ("CyclicLR", "OneCycleLR")]
    if unsupported:
        raise NotImplementedError(
            f"Cannot add a param group to an optimizer driven by {unsupported[0]}, which keeps per-group cycle "
            "settings. HINT: train those blocks from the start instead of unfreezing them later, or use another "
            "scheduler (e.g. LambdaLR, CosineAnnealingLR)."
        )
    first = optimizer.param_groups[0]
    current, initial = float(first["lr"]), float(first.get("initial_lr", first["lr"]))
    ratio = 1.0 if lr is None or lr == current else (float(lr) / current if current else 0.0)
    group_lr, base_lr = (float(lr), float(lr)) if ratio == 0.0 else (current * ratio, initial * ratio)
    optimizer.add_param_group({"params": new, "lr": group_lr, "initial_lr": base_lr})
    for scheduler in owned:
        _join_scheduler(scheduler, base_lr, group_lr)
    return len(new)


def _flatten_schedulers(schedulers: Iterable[Any]) -> list[Any]:
    flat = []
    for scheduler in schedulers:
        flat.append(scheduler)
        flat += _flatten_schedulers(getattr(scheduler, "_schedulers", []))  # SequentialLR, ChainedScheduler
    return flat


def _join_scheduler(scheduler: Any, base_lr: float, lr: float) -> None:
    """Extend a scheduler's per-group lists by one entry, copying the first group's schedule."""
    for name, value in (("base_lrs", base_lr), ("_last_lr", lr)):
        values = getattr(scheduler, name, None)
        if isinstance(values, list):
            values.append(value)
    for name in ("lr_lambdas", "min_lrs"):  # LambdaLR / MultiplicativeLR, ReduceLROnPlateau
        values = getattr(scheduler, name, None)
        if isinstance(values, list) and values:
            values.append(values[0])
