"""Activation (gradient) checkpointing on transformer blocks: recompute a block's activations in the backward pass.

Transformers models use their own API (``activation_checkpointing_enable`` / ``gradient_checkpointing_enable``).
Any other model gets its blocks' ``forward`` wrapped in :func:`torch.utils.checkpoint.checkpoint`, per instance: the
module tree and state-dict keys do not change, so LoRA surgery composes with it in either order.

Non-reentrant checkpointing is the default (PyTorch's recommendation). With reentrant checkpointing a block whose
inputs do not require grad gets no parameter gradients at all -- with a frozen embedding that is every adapter --
so input gradients are switched on (transformers' ``enable_input_require_grads``, or on the block inputs here).

Example:
    >>> from torch import nn
    >>> model = nn.Module()
    >>> model.layers = nn.ModuleList([nn.Linear(4, 4) for _ in range(2)])
    >>> enable_activation_checkpointing(model, blocks="layers")
    ['layers.0', 'layers.1']
"""

from __future__ import annotations

import functools
import re
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from lightning_lora.surgery.lora.targets import candidate_modules, matches_name, unmatched_error

_NUMBERED_BLOCK = re.compile(r"(?:^|.*\.)(?:layers|h|layer|blocks|block)\.\d+$")


class CheckpointedForward:
    """A block's ``forward`` run under :func:`torch.utils.checkpoint.checkpoint` in training (with grad enabled)."""

    def __init__(self, forward: Any, use_reentrant: bool) -> None:
        self.forward = forward
        self.use_reentrant = use_reentrant

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        module = getattr(self.forward, "__self__", None)
        if not torch.is_grad_enabled() or (module is not None and not module.training):
            return self.forward(*args, **kwargs)
        if self.use_reentrant:
            # Reentrant checkpointing only back-propagates into blocks whose tensor inputs require grad.
            for arg in args:
                if isinstance(arg, torch.Tensor) and arg.is_floating_point() and not arg.requires_grad:
                    arg.requires_grad_(True)
            return checkpoint(functools.partial(self.forward, **kwargs), *args, use_reentrant=True)
        return checkpoint(self.forward, *args, use_reentrant=False, **kwargs)


def transformers_model(model: nn.Module) -> nn.Module | None:
    """The outermost transformers model inside ``model`` that supports gradient checkpointing, if any."""
    for _, module in model.named_modules():
        if getattr(module, "supports_gradient_checkpointing", False) and hasattr(module, "gradient_checkpointing_enable"):
            return module
    return None


def find_blocks(model: nn.Module, blocks: str | None = None) -> list[str]:
    """Paths of the blocks to checkpoint (outermost matches only).

    Args:
        model: The model.
        blocks: ``None`` for numbered blocks (``layers.N``, ``h.N``, ``layer.N``, ``blocks.N``); a container name
            (``"layers"``: every child of a module whose path is or ends with ``layers``); or ``"re:<regex>"``
            full-matched against block paths.

    Raises:
        TargetMatchError: If nothing matches (the message lists the closest module names).
    """
    modules = candidate_modules(model)
    if blocks is None:
        found = [n for n in modules if _NUMBERED_BLOCK.match(n)]
    elif blocks.startswith("re:"):
        found = [n for n in modules if n and matches_name(blocks, n)]
    else:
        containers = [n for n in modules if n and matches_name(blocks, n)]
        found = [f"{c}.{child}" for c in containers for child, _ in modules[c].named_children()]
    outermost: list[str] = []
    for name in found:
        if not any(name.startswith(f"{kept}.") for kept in outermost):
            outermost.append(name)
    if not outermost:
        raise unmatched_error("blocks", [blocks or "<numbered blocks: layers.N, h.N, layer.N, blocks.N>"], modules)
    return outermost


def enable_activation_checkpointing(model: nn.Module, *, blocks: str | None = None, use_reentrant: bool = False) -> list[str]:
    """Turn on activation checkpointing for ``model``'s blocks, in place; idempotent.

    Args:
        model: Any module. When ``blocks`` is None and it holds a transformers model, that model's API is used.
        blocks: Which blocks to wrap (see :func:`find_blocks`). Default: the transformers API, else numbered blocks.
        use_reentrant: Use reentrant checkpointing (input gradients are then switched on). Default: False.

    Returns:
        Paths of the checkpointed blocks, relative to ``model``.

    Raises:
        TargetMatchError: If ``blocks`` matches nothing.
    """
    hf = transformers_model(model) if blocks is None else None
    if hf is not None:
        return _enable_transformers(model, hf, use_reentrant)
    paths = find_blocks(model, blocks)  # validate before changing anything
    for path in paths:
        block = model.get_submodule(path)
        if not isinstance(block.__dict__.get("forward"), CheckpointedForward):
            block.forward = CheckpointedForward(block.forward, use_reentrant)
    return paths


def _enable_transformers(model: nn.Module, hf: nn.Module, use_reentrant: bool) -> list[str]:
    kwargs = {"use_reentrant": use_reentrant}
    if hasattr(hf, "activation_checkpointing_enable"):  # transformers >= 5 (gradient_checkpointing_enable deprecated)
        hf.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if use_reentrant and not getattr(hf, "_require_grads_hooks", None) and getattr(hf, "_require_grads_hook", None) is None:
        hf.enable_input_require_grads()
    # The layers that checkpoint (transformers' GradientCheckpointingLayer), not the models that carry the flag too.
    return [n for n, m in model.named_modules()
            if getattr(m, "gradient_checkpointing", False) is True and not hasattr(m, "supports_gradient_checkpointing")]


def disable_activation_checkpointing(model: nn.Module) -> None:
    """Undo :func:`enable_activation_checkpointing`, in place."""
    hf = transformers_model(model)
    if hf is not None:
        disable = getattr(hf, "activation_checkpointing_disable", None) or hf.gradient_checkpointing_disable
        disable()
    for _, module in model.named_modules():
        if isinstance(module.__dict__.get("forward"), CheckpointedForward):
            del module.forward
