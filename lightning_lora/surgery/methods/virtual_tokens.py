"""Attach prompt tuning, P-tuning and prefix tuning to a transformers model: one host module and two forward hooks.

The host (:class:`VirtualTokens`, at ``<model>.peft_virtual_tokens``) holds each adapter's encoder. A forward
pre-hook on the model rewrites the call, a forward hook undoes what the caller must not see:

* prompt / P-tuning, first step (empty or no cache): ``inputs_embeds = [virtual tokens; embed(input_ids)]``,
  labels get ``-100`` in front; the output's logits lose the virtual positions again, so they line up with
  ``input_ids`` exactly as the base model's do (PEFT returns them with the virtual positions).
* prefix tuning, first step: the cache is filled with each block's key / value prefix (PEFT's way).
* every step, generation included: the attention mask gets ``n`` ones in front, and the position ids are
  counted over that mask, so with left padding every row's real tokens sit at positions ``n, n+1, ...`` as they do
  for the row alone, unpadded (PEFT's forward on one row). Later generation steps find the virtual tokens in the
  cache and only need the mask and positions.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from lightning_lora.surgery.errors import SurgeryError
from lightning_lora.surgery.methods.prefix_tuning import PrefixEncoder

HOST = "peft_virtual_tokens"
_HOOKED = "_peft_virtual_token_hooks"


class VirtualTokens(nn.Module):
    """The virtual-token adapters of one model (an :class:`~lightning_lora.surgery.lora.protocol.AdapterModule`).

    At most one of them is applied per forward (two sets of virtual tokens have no agreed order).
    """

    def __init__(self) -> None:
        super().__init__()
        self.encoders = nn.ModuleDict()
        self.specs: dict[str, Any] = {}
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False
        self._strip = 0  # virtual positions to cut from the current call's logits

    def adapter_params(self) -> dict[str, dict[str, nn.Parameter]]:
        """Adapter name -> its encoder's parameters, keyed ``encoders.<name>.<param>``."""
        return {n: {f"encoders.{n}.{k}": p for k, p in self.encoders[n].named_parameters()} for n in self.specs}

    def delete_adapter(self, name: str) -> None:
        """Forget adapter ``name`` (the host stays, empty: a no-op)."""
        del self.encoders[name]
        self.specs.pop(name)
        if name in self.active_adapters:
            self.active_adapters.remove(name)

    def current(self) -> tuple[str, nn.Module] | None:
        """The adapter this forward applies, or None (disabled / none active)."""
        if self.disabled or not self.active_adapters:
            return None
        if len(self.active_adapters) > 1:
            raise SurgeryError(f"Virtual-token adapters {self.active_adapters} are active together; prompt, P- and "
                               "prefix tuning apply one at a time. HINT: set_active_adapters(model, [one of them, plus "
                               "any LoRA / bottleneck adapters]).")
        name = self.active_adapters[0]
        return name, self.encoders[name]

    def forward(self, *args: Any, **kwargs: Any) -> None:  # pragma: no cover - a container, never called
        raise RuntimeError("VirtualTokens holds adapters; the model's forward hooks apply them.")


def host_of(model: nn.Module, create: bool = False) -> VirtualTokens | None:
    """The model's :class:`VirtualTokens` host (created and hooked when ``create``)."""
    host = model._modules.get(HOST)
    if host is None and create:
        host = VirtualTokens()
        model.add_module(HOST, host)
    if create and not model.__dict__.get(_HOOKED):
        model.register_forward_pre_hook(_before_forward, with_kwargs=True)
        model.register_forward_hook(_after_forward, with_kwargs=True)
        model.__dict__[_HOOKED] = True
    return host


# ------------------------------------------------------------------------------------------------ hooks
def _before_forward(model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]] | None:
    host = model._modules.get(HOST)
    chosen = host.current() if host is not None else None
    if chosen is None:
        return None
    _, encoder = chosen
    kwargs = dict(kwargs)
    if args:  # model(input_ids, ...) -> keyword form
        kwargs.setdefault("input_ids", args[0])
        args = args[1:]
    n = encoder.embedding.num_embeddings
    tokens = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs.get("inputs_embeds")
    batch, length = tokens.shape[0], tokens.shape[1]
    cache = kwargs.pop("past_key_values", None) if kwargs.get("cache") is None else kwargs.get("cache")
    past = cache.get_seq_length() if cache is not None else 0
    first = past == 0
    mask = kwargs.get("attention_mask")
    extended = _extended_mask(mask, batch, n, past, length, first, tokens.device)
    kwargs["attention_mask"] = extended
    host._strip = 0
    if isinstance(encoder, PrefixEncoder):
        _refuse_checkpointing(model)
        if first:
            kwargs["cache"] = _filled_cache(model, encoder, batch, cache)
        kwargs["position_ids"] = _positions(kwargs.get("position_ids"), extended, n, length)
    elif first:
        _prepend_prompts(model, encoder, kwargs, batch, n)
        kwargs["position_ids"] = _positions(None, extended, n, n + length)
        host._strip = n
    else:
        kwargs["position_ids"] = _positions(kwargs.get("position_ids"), extended, n, length)
    return args, kwargs


def _after_forward(model: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> Any:
    host = model._modules.get(HOST)
    if host is None or not host._strip:
        return None
    n, host._strip = host._strip, 0
    logits = getattr(output, "logits", None)
    if isinstance(logits, Tensor) and logits.dim() == 3 and logits.shape[1] > n:
        output.logits = logits[:, n:]  # (B, n + T, V) -> (B, T, V): aligned with input_ids again
    return output


def _extended_mask(mask: Tensor | None, batch: int, n: int, past: int, length: int, first: bool,
                   device: torch.device) -> Tensor:
    if mask is None:  # every position attends: n virtual + earlier real tokens + this call's
        total = (n if first else past) + length
        return torch.ones(batch, total, dtype=torch.long, device=device)
    if mask.dim() != 2:
        raise SurgeryError(f"Virtual-token adapters need a 2-D attention mask (batch, length); got shape "
                           f"{tuple(mask.shape)}. HINT: pass the tokenizer's attention_mask.")
    return torch.cat([torch.ones(batch, n, dtype=mask.dtype, device=mask.device), mask], dim=1)  # (B, n + S)


def _positions(given: Tensor | None, extended: Tensor, n: int, length: int) -> Tensor:
    if given is not None:
        return given + n  # positions counted without the virtual tokens (e.g. by generate) move up by n
    positions = extended.long().cumsum(-1) - 1  # real tokens of every row at n, n+1, ... whatever the padding
    positions = positions.masked_fill(extended == 0, 1)
    return positions[:, -length:]


def _prepend_prompts(model: nn.Module, encoder: nn.Module, kwargs: dict[str, Any], batch: int, n: int) -> None:
    embeds = kwargs.pop("inputs_embeds", None)
    ids = kwargs.pop("input_ids", None)
    if embeds is None:
        embeds = model.get_input_embeddings()(ids)  # (B, T) -> (B, T, hidden)
    prompts = encoder.prompts().to(embeds.dtype).unsqueeze(0).expand(batch, -1, -1)  # (n, hidden) -> (B, n, hidden)
    kwargs["inputs_embeds"] = torch.cat([prompts, embeds], dim=1)  # (B, n + T, hidden)
    labels = kwargs.get("labels")
    if labels is not None:
        ignore = torch.full((batch, n), -100, dtype=labels.dtype, device=labels.device)
        kwargs["labels"] = torch.cat([ignore, labels], dim=1)


def _filled_cache(model: nn.Module, encoder: PrefixEncoder, batch: int, cache: Any) -> Any:
    from transformers import DynamicCache

    if cache is None:
        cache = DynamicCache()
    dtype = model.get_input_embeddings().weight.dtype
    for layer, (key, value) in enumerate(encoder.key_values(batch)):
        cache.update(key.to(dtype), value.to(dtype), layer)
    return cache


def _refuse_checkpointing(model: nn.Module) -> None:
    if model.training and torch.is_grad_enabled():
        refuse_checkpointing(model)


def refuse_checkpointing(model: nn.Module) -> None:
    """Raise :class:`SurgeryError` when activation checkpointing is on anywhere in ``model`` (prefix tuning's cache
    does not survive it); called at fit start by the callback and before every training forward."""
    for module in model.modules():
        wrapped = type(module.__dict__.get("forward")).__name__ == "CheckpointedForward"
        if getattr(module, "gradient_checkpointing", False) is True or wrapped:
            raise SurgeryError(
                "Prefix tuning cannot train under gradient checkpointing: transformers drops the cache (where the "
                "prefixes live) inside checkpointed blocks. HINT: remove GradientCheckpointing / "
                "gradient_checkpointing_enable(), or use prompt tuning, P-tuning or LoRA, which work with it."
            )
