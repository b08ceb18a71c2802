"""Serve one base model with many LoRA adapters behind vLLM's OpenAI-compatible API (LitServe).

:class:`~lightning_lora.serve.engine.Engine` is the continuous-batching engine (plain PyTorch, usable in-process);
:func:`~lightning_lora.serve.server.run_server` puts it behind HTTP (needs ``pip install lightning-lora[serve]``).
"""

from lightning_lora.serve.engine import Engine, RowOutput
from lightning_lora.serve.errors import ServeError
from lightning_lora.serve.protocol import (
    GenerationRequest,
    RequestValidator,
    SamplingParams,
)

__all__ = ["Engine", "GenerationRequest", "RequestValidator", "RowOutput", "SamplingParams", "ServeError"]
