"""How each implementation builds a configuration (runs inside a worker process only).

Both implementations start from the same saved base model and get the same LoRA hyper-parameters; the only
difference is the library call. PEFT is imported only in PEFT workers, so "ours" workers never pay for it.
"""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmarks.settings import LORA

QUANT_MODULE = "lightning_lora.surgery.quant.quantize"


def load_base(model_dir: str) -> nn.Module:
    """The fp32 base model from ``model_dir`` (saved once per run by the parent, or SmolLM2's cached directory)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)


def load_base_4bit(model_dir: str, impl: str) -> nn.Module:
    """The base with every Linear except ``lm_head`` in NF4 + double quantization, fp32 compute.

    PEFT's users load through transformers' ``BitsAndBytesConfig`` and call ``prepare_model_for_kbit_training``
    (without its default gradient checkpointing, so that the row compares LoRA, not checkpointing); ours load the
    dense model and call :func:`lightning_lora.surgery.quant.quantize.quantize_model`.
    """
    if impl == "peft":
        from peft import prepare_model_for_kbit_training
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                 bnb_4bit_compute_dtype=torch.float32)
        model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=bnb, device_map="cpu",
                                                     dtype=torch.float32)
        return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if importlib.util.find_spec(QUANT_MODULE) is None:
        raise RuntimeError(f"{QUANT_MODULE} does not exist yet: no QLoRA row for lightning-lora.")
    from lightning_lora.surgery.quant.config import QuantConfig
    from lightning_lora.surgery.quant.quantize import quantize_model

    model = load_base(model_dir)
    quantize_model(model, QuantConfig(quant_type="nf4", double_quant=True, compute_dtype="float32"))
    return model


def add_lora(model: nn.Module, impl: str, targets: list[str] | str) -> nn.Module:
    """Wrap ``targets`` with a fresh r=16 adapter; returns the model to train (PEFT wraps it in a PeftModel)."""
    if impl == "peft":
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                            target_modules=targets, task_type="CAUSAL_LM")
        return get_peft_model(model, config)
    from lightning_lora import LoRAConfig, apply_lora

    apply_lora(model, LoRAConfig(r=LORA["r"], alpha=LORA["alpha"], dropout=LORA["dropout"], targets=targets))
    return model


def merge(model: nn.Module, impl: str, checked: bool | None = None) -> nn.Module:
    """Merge the adapter into the base weights and drop the wrappers.

    ``checked=None`` uses each library's default: ours checks that the merged weights are finite before changing
    anything (``safe=True``), PEFT does not (``safe_merge=False``). True / False force the check on / off in both.
    """
    if impl == "peft":
        return model.merge_and_unload(safe_merge=bool(checked))
    from lightning_lora import merge_lora

    return merge_lora(model, safe=True if checked is None else checked)


def save(model: nn.Module, impl: str, path: Path) -> None:
    """Write the adapter in PEFT's format."""
    if impl == "peft":
        model.save_pretrained(path)
    else:
        from lightning_lora import save_adapter

        save_adapter(model, path)


def perturb_b(model: nn.Module, seed: int = 0) -> None:
    """Give every B a small random value (B starts at zero, so a merge would otherwise change nothing)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:  # benchmark-only shortcut; the library finds adapters structurally
                param.copy_(torch.randn(param.shape, generator=gen) * 0.01)


def enable_checkpointing(model: nn.Module) -> None:
    """Non-reentrant activation checkpointing through transformers (``gradient_checkpointing_enable``)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x; the old name warns
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def make_floor(model: nn.Module) -> nn.Module:
    """Freeze every weight but keep the gradient flowing back through every block to the embeddings' output."""
    for param in model.parameters():
        param.requires_grad_(False)
    model.enable_input_require_grads()
    return model


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def quantized_weight_bytes(model: nn.Module) -> dict[str, Any]:
    """Storage of the 4-bit linear weights (packed data + quantization state) vs the same weights in bf16/fp32."""
    import bitsandbytes as bnb

    packed = numel = layers = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            weight = module.weight
            packed += weight.numel() * weight.element_size()
            state = getattr(weight, "quant_state", None)
            if state is not None:
                packed += sum(t.numel() * t.element_size() for t in state.as_dict(packed=True).values()
                              if isinstance(t, torch.Tensor))
            numel += module.in_features * module.out_features
            layers += 1
    return {"layers": layers, "weights": numel, "bytes_4bit": packed, "bytes_bf16": 2 * numel,
            "bytes_fp32": 4 * numel}


def deepcopy(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)
