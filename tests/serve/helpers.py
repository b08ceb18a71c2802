"""Shared by the serve tests: a tiny Llama with adapters that differ, and the offline reference answers."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lightning_lora import (
    LoRAConfig,
    apply_lora,
    disable_adapters,
    save_adapter,
    use_adapters,
)
from tests.tiny_lm import build_tiny_causal_lm

ADAPTERS = ("a", "b", "c")
TARGETS = ["q_proj", "v_proj", "down_proj"]


def add_adapters(model: nn.Module, names: tuple[str, ...] = ADAPTERS, seed: int = 0) -> nn.Module:
    """Add LoRA adapters with B perturbed (B starts at zero: unperturbed adapters would all equal the base)."""
    for i, name in enumerate(names):
        apply_lora(model, LoRAConfig(r=4, alpha=8, targets=TARGETS), name=name)
        generator = torch.Generator().manual_seed(seed + i)
        with torch.no_grad():
            for pname, param in model.named_parameters():
                if f"lora_B.{name}" in pname:
                    param.normal_(0.0, 0.5, generator=generator)
    return model.eval()


def tiny_model_with_adapters(names: tuple[str, ...] = ADAPTERS) -> tuple[nn.Module, object]:
    model, tokenizer = build_tiny_causal_lm("llama", seed=0)
    return add_adapters(model, names), tokenizer


def save_all(model: nn.Module, root: Path, names: tuple[str, ...] = ADAPTERS) -> dict[str, Path]:
    return {name: save_adapter(model, root / name, name=name) for name in names}


@torch.no_grad()
def offline(model: nn.Module, tokenizer: object, adapter: str | None, prompt_ids: list[int], max_tokens: int) -> dict:
    """Greedy ``generate`` for one request alone with its adapter: the answer the server must give."""
    ids = torch.tensor([prompt_ids])
    context = disable_adapters(model) if adapter is None else use_adapters(model, adapter)
    with context:
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, do_sample=False)
    tokens = out[0, ids.shape[1]:].tolist()
    eos = tokenizer.eos_token_id
    return {"text": tokenizer.decode(tokens, skip_special_tokens=True), "tokens": len(tokens),
            "finish_reason": "stop" if eos in tokens else "length"}


def chat_ids(tokenizer: object, messages: list[dict]) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]
