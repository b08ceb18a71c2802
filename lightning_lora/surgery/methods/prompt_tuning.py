"""Prompt tuning (Lester et al. 2021): trainable virtual-token embeddings prepended to the input, nothing else.

The module holds one ``nn.Embedding`` of ``num_virtual_tokens`` rows (PEFT's ``PromptEmbedding`` layout, so a
PEFT file's ``prompt_embeddings`` tensor is this weight). Attaching it to a model is
:mod:`lightning_lora.surgery.methods.virtual_tokens`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from lightning_lora.surgery.errors import ConfigError, PromptTuningConfigError, SurgeryError
from lightning_lora.surgery.lora.config import ConfigDict
from lightning_lora.surgery.methods._common import ModelDims, one_of, positive_int, raise_problems

PromptInit = Literal["random", "text", "vocab"]


@dataclass(frozen=True, eq=True)
class PromptTuningConfig(ConfigDict):
    """Prompt tuning: ``num_virtual_tokens`` trainable embeddings prepended to every input.

    Trains ``num_virtual_tokens * hidden`` parameters; the base model is untouched. Not mergeable: the extra tokens
    cannot be folded into the weights (serve the adapter unmerged).

    Args:
        num_virtual_tokens: How many virtual tokens. Default: 20.
        init: Their initial values: ``"random"`` (N(0, 1), PEFT's default), ``"vocab"`` (rows of the model's own
            embedding matrix, sampled at random) or ``"text"`` (the embeddings of ``init_text``'s tokens, repeated
            or cut to length). Default: ``"random"``.
        init_text: The text for ``init="text"``, e.g. ``"Normalise this date to ISO 8601:"``. Default: None.
        tokenizer: Name or path of the tokenizer that turns ``init_text`` into tokens (``init="text"`` only).
            Default: None.
    """

    num_virtual_tokens: int = 20
    init: PromptInit = "random"
    init_text: str | None = None
    tokenizer: str | None = None

    error_type: ClassVar[type[ConfigError]] = PromptTuningConfigError
    method: ClassVar[str] = "prompt tuning"
    merge_refusal: ClassVar[str] = "its virtual tokens are extra input positions, not a change of any weight"

    def __post_init__(self) -> None:
        problems = positive_int("num_virtual_tokens", self.num_virtual_tokens, "20")
        problems += one_of("init", self.init, ("random", "text", "vocab"))
        if self.init == "text" and not (isinstance(self.init_text, str) and self.init_text and self.tokenizer):
            problems.append(f"init='text' needs init_text (got {self.init_text!r}) and tokenizer "
                            f"(got {self.tokenizer!r}): e.g. init_text='Normalise the date:', "
                            "tokenizer='HuggingFaceTB/SmolLM2-135M-Instruct'.")
        if self.init != "text" and self.init_text is not None:
            problems.append(f"init_text={self.init_text!r} is only used with init='text' (init={self.init!r}); "
                            "set init='text' or drop init_text.")
        raise_problems(PromptTuningConfigError, "PromptTuningConfig", problems)

    def __hash__(self) -> int:
        return hash(repr(self))

    def num_parameters(self, dims: ModelDims) -> int:
        """Trainable parameters on a model with these dimensions."""
        return self.num_virtual_tokens * dims.hidden


class PromptEmbedding(nn.Module):
    """The virtual tokens of one prompt-tuning adapter: ``embedding.weight`` of shape ``(n, hidden)``."""

    def __init__(self, config: PromptTuningConfig, dims: ModelDims) -> None:
        super().__init__()
        self.embedding = nn.Embedding(config.num_virtual_tokens, dims.hidden)

    def prompts(self) -> Tensor:
        """The virtual-token embeddings, ``(n, hidden)``."""
        return self.embedding.weight

    def peft_embeddings(self) -> Tensor:
        """What PEFT's file stores as ``prompt_embeddings``: the embeddings themselves."""
        return self.embedding.weight


def init_prompt_embedding(module: PromptEmbedding, config: PromptTuningConfig, word_embeddings: nn.Embedding) -> None:
    """Set the initial virtual tokens as ``config.init`` says (in place; ``"random"`` keeps the N(0, 1) init)."""
    n = config.num_virtual_tokens
    if config.init == "random":
        return
    if config.init == "vocab":
        ids = torch.randint(0, word_embeddings.num_embeddings, (n,), device=word_embeddings.weight.device)
    else:
        ids = torch.tensor(_text_token_ids(config), device=word_embeddings.weight.device)
    with torch.no_grad():  # (n,) -> (n, hidden)
        module.embedding.weight.copy_(word_embeddings(ids).float())


def _text_token_ids(config: PromptTuningConfig) -> list[int]:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(config.tokenizer)
    except (OSError, ValueError) as err:
        raise SurgeryError(f"PromptTuningConfig(tokenizer={config.tokenizer!r}) could not be loaded ({err}); give "
                           "a local tokenizer directory or a Hub name that is available offline.") from err
    ids: list[Any] = tokenizer(config.init_text)["input_ids"]
    if not ids:
        raise SurgeryError(f"init_text={config.init_text!r} gives no tokens; give a non-empty text.")
    # PEFT's rule: repeat the text's tokens, then cut to the number of virtual tokens.
    return (ids * math.ceil(config.num_virtual_tokens / len(ids)))[: config.num_virtual_tokens]
