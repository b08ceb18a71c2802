"""Tiny offline stand-ins for a real instruction model, shared by the tests.

``build_tiny_tokenizer()`` makes a byte-level tokenizer (one token per UTF-8 byte, no merges) with ChatML-like
special tokens and a chat template, so chat-template code paths run without a download.
``save_tiny_causal_lm(path)`` writes a random-init tiny model plus that tokenizer with ``save_pretrained``,
so that ``CausalLMModule(model=str(path))`` and ``load_causal_lm(str(path))`` can load it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

PAD, BOS, EOS = "<pad>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (PAD, BOS, EOS)
# ChatML, as SmolLM2 uses: the end-of-turn token is the EOS token, followed by a newline.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_tiny_tokenizer(chat_template: bool = True) -> PreTrainedTokenizerFast:
    """Build a byte-level tokenizer in code: 3 special tokens (ids 0-2) then the 256 bytes.

    Args:
        chat_template: Set :data:`CHAT_TEMPLATE` (ChatML). Default: ``True``.

    Returns:
        A ``PreTrainedTokenizerFast`` with pad ``<pad>``, bos ``<|im_start|>`` and eos ``<|im_end|>``.
    """
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, *alphabet])}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=PAD, bos_token=BOS, eos_token=EOS)
    if chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _llama(vocab_size: int, tokenizer: PreTrainedTokenizerFast) -> PreTrainedModel:
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return LlamaForCausalLM(config)


def _gpt2(vocab_size: int, tokenizer: PreTrainedTokenizerFast) -> PreTrainedModel:
    config = GPT2Config(
        vocab_size=vocab_size,
        n_embd=64,
        n_layer=2,
        n_head=4,
        n_positions=512,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return GPT2LMHeadModel(config)


ARCHITECTURES: dict[str, Callable[[int, PreTrainedTokenizerFast], PreTrainedModel]] = {
    "llama": _llama,
    "gpt2": _gpt2,
}


def build_tiny_causal_lm(arch: str = "llama", seed: int = 0, chat_template: bool = True) -> tuple[
    PreTrainedModel, PreTrainedTokenizerFast
]:
    """Build a random-init tiny causal LM (hidden 64, 2 layers, 4 heads) and its tokenizer, in memory.

    Args:
        arch: ``"llama"`` (2 KV heads, ``q/k/v/o_proj`` + ``gate/up/down_proj``) or ``"gpt2"`` (``Conv1D``).
        seed: Seed for the weights. Default: ``0``.
        chat_template: Give the tokenizer a chat template. Default: ``True``.

    Returns:
        ``(model, tokenizer)``; the model is in eval mode.
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown arch {arch!r}; valid: {', '.join(ARCHITECTURES)}")
    tokenizer = build_tiny_tokenizer(chat_template=chat_template)
    torch.manual_seed(seed)
    model = ARCHITECTURES[arch](len(tokenizer), tokenizer)
    return model.eval(), tokenizer


def save_tiny_causal_lm(
    path: str | Path, arch: str = "llama", seed: int = 0, chat_template: bool = True
) -> Path:
    """Save a tiny random-init causal LM and its tokenizer with ``save_pretrained`` into ``path``.

    Args:
        path: Target directory (created).
        arch: See :func:`build_tiny_causal_lm`. Default: ``"llama"``.
        seed: Seed for the weights. Default: ``0``.
        chat_template: Give the tokenizer a chat template. Default: ``True``.

    Returns:
        ``path`` as a ``Path``.
    """
    path = Path(path)
    model, tokenizer = build_tiny_causal_lm(arch, seed=seed, chat_template=chat_template)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
