"""The built-in LightningModule for causal LMs, model loading, and the bundled SmolLM2 model."""

from lightning_lora.modules.causal_lm import CausalLMModule, ExactMatch, default_optimizer
from lightning_lora.modules.loading import (
    MODEL_ALIASES,
    load_causal_lm,
    load_tokenizer,
    resolve_dtype,
    resolve_model_path,
)
from lightning_lora.modules.smollm2 import smollm2_dir, smollm2_gguf_path

__all__ = [
    "MODEL_ALIASES",
    "CausalLMModule",
    "ExactMatch",
    "default_optimizer",
    "load_causal_lm",
    "load_tokenizer",
    "resolve_dtype",
    "resolve_model_path",
    "smollm2_dir",
    "smollm2_gguf_path",
]
