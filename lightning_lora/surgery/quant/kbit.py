"""Preparing a k-bit (4-bit) base for training, one explicit option at a time, each with its cost reported.

PEFT's ``prepare_model_for_kbit_training`` upcasts every non-quantized parameter to fp32, turns on input gradients
and gradient checkpointing, all at once. Here each of those is a separate option and the report says what each one
changed and costs, so that nothing is upcast silently:

- ``norms_fp32``: normalization weights in fp32 (numerically safer; QLoRA keeps them in high precision). Costs
  ``2 bytes x norm params`` for a bf16 model, and norms that multiply by their fp32 weight (Llama's RMSNorm) then
  output fp32 activations.
- ``input_grads``: make the input embeddings' output require grad. Needed by *reentrant* checkpointing, which
  otherwise sees no input needing grad and drops the adapters' gradients. Costs one ``(batch, seq, hidden)``
  gradient per step.
- ``gradient_checkpointing``: recompute each block's activations in the backward pass (transformers models).
  Saves most activation memory, costs about one extra forward per step.

Example:
    >>> report = prepare_for_kbit_training(model, norms_fp32=True, gradient_checkpointing=True)  # doctest: +SKIP
    >>> print(report)  # doctest: +SKIP
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from lightning_lora.surgery.errors import KbitConfigError, SurgeryError

log = logging.getLogger(__name__)

_NORM_TYPES: tuple[type[nn.Module], ...] = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.modules.batchnorm._NormBase)
_HOOK_ATTR = "_lora_input_grads_hook"


@dataclass
class KbitStep:
    """One preparation option and what it did.

    Attributes:
        name: ``"norms_fp32"``, ``"input_grads"`` or ``"gradient_checkpointing"``.
        enabled: Whether the option was asked for.
        changed: Module paths that were changed (empty when the option was off or had nothing to do).
        param_bytes: Parameter memory added (bytes; 0 for options that only change activations).
        cost: The memory / time cost in words.
    """

    name: str
    enabled: bool
    changed: list[str] = field(default_factory=list)
    param_bytes: int = 0
    cost: str = ""


@dataclass
class KbitReport:
    """What :func:`prepare_for_kbit_training` did, one :class:`KbitStep` per option."""

    steps: list[KbitStep]

    def step(self, name: str) -> KbitStep:
        """The step called ``name``."""
        return next(s for s in self.steps if s.name == name)

    @property
    def param_bytes(self) -> int:
        """Parameter memory added by all options together."""
        return sum(s.param_bytes for s in self.steps)

    def __str__(self) -> str:
        lines = ["k-bit training preparation:"]
        for s in self.steps:
            state = "on " if s.enabled else "off"
            what = f"{len(s.changed)} modules" if s.changed else "no change"
            lines.append(f"  {s.name:<23} {state} {what:<12} +{s.param_bytes:,} B params; {s.cost}")
        return "\n".join(lines)


def prepare_for_kbit_training(model: nn.Module, *, norms_fp32: bool = True, input_grads: bool = False,
                              gradient_checkpointing: bool = False, reentrant: bool = False) -> KbitReport:
    """Prepare a (4-bit) model for adapter training, in place, doing only what is asked.

    Args:
        model: The model, before or after :func:`~lightning_lora.apply_lora`.
        norms_fp32: Cast the weights of normalization layers (LayerNorm, RMSNorm, GroupNorm, BatchNorm and classes
            named ``*Norm``) to fp32. Default: True.
        input_grads: Register a forward hook on the input embeddings so their output requires grad (needed for
            reentrant checkpointing). Default: False.
        gradient_checkpointing: Turn on transformers' gradient checkpointing on the transformers model inside
            ``model``. Default: False.
        reentrant: Use reentrant checkpointing (``torch.utils.checkpoint(use_reentrant=True)``); requires
            ``input_grads=True``. Non-reentrant (the default) needs no input gradients. Default: False.

    Returns:
        A :class:`KbitReport` with each option's changes and memory cost.

    Raises:
        KbitConfigError: If ``reentrant`` checkpointing is asked for without ``input_grads``.
        SurgeryError: If ``input_grads`` finds no input embedding, or ``gradient_checkpointing`` no transformers
            model that supports it. Nothing is changed then.
    """
    if gradient_checkpointing and reentrant and not input_grads:
        raise KbitConfigError(
            "reentrant=True gradient checkpointing needs input_grads=True: with frozen embeddings no checkpointed "
            "input requires grad and the adapters would get no gradient. Pass input_grads=True, or reentrant=False."
        )
    embedding = _input_embeddings(model) if input_grads else None
    hf_model = _checkpointable(model) if gradient_checkpointing else None
    steps = [
        _norms_to_fp32(model) if norms_fp32 else KbitStep("norms_fp32", False, cost="norms keep their dtype"),
        _enable_input_grads(model, embedding) if embedding is not None else
        KbitStep("input_grads", False, cost="none"),
        _enable_checkpointing(hf_model, reentrant, keep_input_grads=input_grads) if hf_model is not None else
        KbitStep("gradient_checkpointing", False, cost="none"),
    ]
    report = KbitReport(steps)
    log.info("%s", report)
    return report


def is_norm(module: nn.Module) -> bool:
    """Whether a module is a normalization layer (by type, or a class named ``*Norm`` such as ``LlamaRMSNorm``)."""
    return isinstance(module, _NORM_TYPES) or type(module).__name__.endswith("Norm")


def _norms_to_fp32(model: nn.Module) -> KbitStep:
    changed, added = [], 0
    for path, module in model.named_modules():
        if not is_norm(module):
            continue
        params = [p for p in module.parameters(recurse=False) if p.is_floating_point() and p.dtype != torch.float32]
        for param in params:
            added += param.numel() * (4 - param.element_size())
            param.data = param.data.float()
        if params:
            changed.append(path)
    cost = (f"+{added:,} B; norm outputs may become fp32 activations" if changed else "norms were already fp32")
    return KbitStep("norms_fp32", True, changed, added, cost)


def _input_embeddings(model: nn.Module) -> nn.Module:
    for module in model.modules():
        getter = getattr(module, "get_input_embeddings", None)
        if callable(getter):
            try:
                embedding = getter()
            except NotImplementedError:
                continue
            if isinstance(embedding, nn.Module):
                return embedding
    embeddings = [m for m in model.modules() if isinstance(m, nn.Embedding)]
    if not embeddings:
        raise SurgeryError(
            "input_grads=True: the model has no input embedding (no get_input_embeddings() and no nn.Embedding). "
            "Make the first layer's input require grad yourself, or use non-reentrant checkpointing (reentrant=False), "
            "which does not need it."
        )
    return embeddings[0]


def _make_output_require_grad(module: nn.Module, args: tuple, output: Tensor) -> None:
    if isinstance(output, Tensor) and output.is_floating_point():
        output.requires_grad_(True)


def _enable_input_grads(model: nn.Module, embedding: nn.Module) -> KbitStep:
    path = next(p for p, m in model.named_modules() if m is embedding)
    if getattr(embedding, _HOOK_ATTR, None) is None:  # idempotent: one hook however often this runs
        setattr(embedding, _HOOK_ATTR, embedding.register_forward_hook(_make_output_require_grad))
    dim = getattr(embedding, "embedding_dim", None)
    cost = f"one {dim}-wide gradient per token per step" if dim else "one (batch, seq, hidden) gradient per step"
    return KbitStep("input_grads", True, [path], 0, cost + "; the embedding weight stays frozen")


def _checkpointable(model: nn.Module) -> nn.Module:
    for module in model.modules():
        if getattr(module, "supports_gradient_checkpointing", False) and callable(
            getattr(module, "gradient_checkpointing_enable", None)
        ):
            return module
    raise SurgeryError(
        f"gradient_checkpointing=True: no module inside {type(model).__name__} supports it (transformers models with "
        "supports_gradient_checkpointing do). Wrap your blocks with torch.utils.checkpoint yourself, or turn it off."
    )


def _enable_checkpointing(hf_model: nn.Module, reentrant: bool, *, keep_input_grads: bool) -> KbitStep:
    had_hooks = bool(getattr(hf_model, "_require_grads_hooks", None))
    enable = getattr(hf_model, "activation_checkpointing_enable", None) or hf_model.gradient_checkpointing_enable
    kwargs = {"use_reentrant": reentrant}
    if enable.__name__ == "activation_checkpointing_enable":
        enable(activation_checkpointing_kwargs=kwargs)
    else:
        enable(gradient_checkpointing_kwargs=kwargs)
    if not keep_input_grads and not had_hooks and callable(getattr(hf_model, "disable_input_require_grads", None)):
        # transformers turns input gradients on by itself; they were not asked for (non-reentrant needs none).
        hf_model.disable_input_require_grads()
    path = type(hf_model).__name__
    kind = "reentrant" if reentrant else "non-reentrant"
    return KbitStep("gradient_checkpointing", True, [path], 0,
                    f"{kind}; keeps block inputs only, about one extra forward per step (training mode only)")
