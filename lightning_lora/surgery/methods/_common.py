"""Helpers shared by the method files: validation of config fields and the model facts virtual tokens need."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from lightning_lora.surgery.errors import SurgeryError


def positive_int(name: str, value: Any, example: str) -> list[str]:
    """``[problem]`` when ``value`` is not a positive int (bools refused), else ``[]``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        return [f"{name}={value!r}: must be a positive integer, e.g. {example}."]
    return []


def one_of(name: str, value: Any, valid: tuple[str, ...]) -> list[str]:
    """``[problem]`` when ``value`` is not one of ``valid``, else ``[]``."""
    if value not in valid:
        return [f"{name}={value!r}: must be one of {', '.join(map(repr, valid))}."]
    return []


def raise_problems(error: type[Exception], cls_name: str, problems: list[str]) -> None:
    """Raise ``error`` listing every problem of one config at once (nothing when there are none)."""
    if problems:
        raise error(f"Invalid {cls_name}:\n  - " + "\n  - ".join(problems))


@dataclass(frozen=True)
class ModelDims:
    """What virtual tokens need to know about a transformers causal LM.

    Attributes:
        hidden: Width of the input embeddings.
        num_layers: Decoder blocks (each gets a key / value prefix in prefix tuning).
        kv_heads: Key / value heads per block (fewer than query heads with grouped-query attention).
        head_dim: Width of one head.
    """

    hidden: int
    num_layers: int
    kv_heads: int
    head_dim: int

    @property
    def kv_dim(self) -> int:
        """Width of one block's key (or value) prefix per token: ``kv_heads * head_dim`` (PEFT's ``token_dim``)."""
        return self.kv_heads * self.head_dim


def model_dims(model: nn.Module, what: str) -> ModelDims:
    """Read :class:`ModelDims` off a transformers model's config and input embeddings.

    Raises:
        SurgeryError: If ``model`` is not a transformers causal LM (no ``config`` / ``get_input_embeddings``).
    """
    config = getattr(model, "config", None)
    get_embeddings = getattr(model, "get_input_embeddings", None)
    if config is None or not callable(get_embeddings) or get_embeddings() is None:
        raise SurgeryError(
            f"{what} needs a transformers model with `config` and `get_input_embeddings()` (e.g. LlamaForCausalLM); "
            f"got {type(model).__name__}. HINT: call it on the Hugging Face model itself (with PEFTFinetuning: "
            "module=\"model\")."
        )
    if not type(model).__name__.endswith(("ForCausalLM", "LMHeadModel")):
        raise SurgeryError(
            f"{what} is built for causal language models (transformers ...ForCausalLM / GPT2LMHeadModel: virtual "
            f"tokens in front, the KV cache, generate); got {type(model).__name__}. HINT: use LoRA or bottleneck "
            "adapters for this model."
        )
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    hidden = int(get_embeddings().embedding_dim)
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    return ModelDims(hidden, int(config.num_hidden_layers), kv_heads, head_dim)
