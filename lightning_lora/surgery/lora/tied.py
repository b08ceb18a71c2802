"""Weights shared between modules (a language model's ``lm_head`` tied to its input embedding).

Merging LoRA into a tied ``lm_head`` writes into the embedding too (GPT-2, SmolLM2 and Llama models with
``tie_word_embeddings``): the merged model's logits then move far from the trained model's. So a merge unties such a
layer first (it gets its own copy of the weight; the embedding keeps the original), and with ``unload`` records in the
model's config that the head is no longer tied, so that ``save_pretrained`` / ``from_pretrained`` keep both.
:func:`~lightning_lora.merge_lora` with ``unload=False`` re-ties on :func:`~lightning_lora.unmerge_lora`.
"""

from __future__ import annotations

from torch import Tensor, nn


def _storage_key(tensor: Tensor) -> tuple[object, ...]:
    if tensor.device.type == "meta":
        return ("id", id(tensor))
    return (tensor.untyped_storage().data_ptr(), tensor.device.type, tensor.device.index)


def weight_sharers(model: nn.Module) -> dict[tuple[object, ...], list[str]]:
    """Every parameter name of ``model`` (duplicates included) grouped by the storage it lives in."""
    groups: dict[tuple[object, ...], list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(_storage_key(param), []).append(name)
    return groups


def tied_with(module: nn.Module, path: str, sharers: dict[tuple[object, ...], list[str]]) -> list[str]:
    """Names of parameters outside ``path`` that share the storage of ``module``'s weight (empty: not tied).

    Args:
        module: A layer (or a LoRA wrapper: its base layer's weight is looked at).
        path: The layer's path in the model whose ``sharers`` were computed.
        sharers: :func:`weight_sharers` of that model.
    """
    base = getattr(module, "base_layer", module)
    weight = getattr(base, "weight", None)
    if not isinstance(weight, Tensor):
        return []
    prefix = f"{path}." if path else ""
    return [n for n in sharers.get(_storage_key(weight), []) if not n.startswith(prefix)]


def untie_(base_layer: nn.Module) -> nn.Parameter:
    """Give ``base_layer`` its own copy of its weight, in place; returns the shared parameter it held."""
    shared = base_layer.weight
    base_layer.weight = nn.Parameter(shared.detach().clone(), requires_grad=shared.requires_grad)
    return shared


def mark_untied_(model: nn.Module) -> None:
    """Record in a transformers model's config that its output embedding is not tied any more, in place (duck-typed:
    any module with a ``config`` holding ``tie_word_embeddings``)."""
    for module in model.modules():
        config = getattr(module, "config", None)
        for cfg in (config, _text_config(config)):
            if cfg is not None and getattr(cfg, "tie_word_embeddings", False):
                cfg.tie_word_embeddings = False


def _text_config(config: object) -> object | None:
    get = getattr(config, "get_text_config", None)
    try:
        return get() if callable(get) else None
    # Configs with several sub-configs may refuse; the top-level flag is set anyway.
    except (ValueError, TypeError, AttributeError):
        return None
