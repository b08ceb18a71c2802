"""The built-in LightningModule for causal LMs, model loading, and the bundled SmolLM2 model.

Names are imported on first use (PEP 562), so that ``lightning_lora.modules.loading`` (used by ``serve``) does not
pull in Lightning (~6 s of imports) through :mod:`~lightning_lora.modules.causal_lm`.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "CausalLMModule": "causal_lm",
    "ExactMatch": "causal_lm",
    "default_optimizer": "causal_lm",
    "MODEL_ALIASES": "loading",
    "load_causal_lm": "loading",
    "load_tokenizer": "loading",
    "resolve_dtype": "loading",
    "resolve_model_path": "loading",
    "smollm2_dir": "smollm2",
    "smollm2_gguf_path": "smollm2",
}

__all__ = ["MODEL_ALIASES", "CausalLMModule", "ExactMatch", "default_optimizer", "load_causal_lm", "load_tokenizer",
           "resolve_dtype", "resolve_model_path", "smollm2_dir", "smollm2_gguf_path"]


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_WHERE])
