"""Response bodies in OpenAI's (and vLLM's) JSON: completions, chat completions, their stream chunks, model cards."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from lightning_lora.serve.protocol import Kind


def new_id(kind: Kind) -> str:
    """``cmpl-<hex>`` or ``chatcmpl-<hex>``, as OpenAI names them."""
    return f"{'cmpl' if kind == 'completion' else 'chatcmpl'}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    """OpenAI's ``usage`` object."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def full_response(kind: Kind, rid: str, model: str, text: str, finish: str, tokens: tuple[int, int]) -> dict[str, Any]:
    """The whole answer of a non-streaming request."""
    if kind == "completion":
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish, "stop_reason": None}
        obj = "text_completion"
    else:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                  "finish_reason": finish, "stop_reason": None}
        obj = "chat.completion"
    return {"id": rid, "object": obj, "created": int(time.time()), "model": model, "choices": [choice],
            "usage": usage(*tokens)}


def chunk(kind: Kind, rid: str, model: str, text: str | None, finish: str | None, *, role: bool = False,
          with_usage: bool = False) -> str:
    """One server-sent event of a streaming answer (``data: {...}`` and a blank line)."""
    if kind == "completion":
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish, "stop_reason": None}
        obj = "text_completion"
    else:
        delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
        if text:
            delta["content"] = text
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        obj = "chat.completion.chunk"
    body: dict[str, Any] = {"id": rid, "object": obj, "created": int(time.time()), "model": model, "choices": [choice]}
    if with_usage:
        body["usage"] = None  # OpenAI sends usage: null on every chunk but the last when include_usage is on
    return sse(body)


def usage_chunk(kind: Kind, rid: str, model: str, tokens: tuple[int, int]) -> str:
    """The last chunk when ``stream_options.include_usage`` is on: no choices, the usage."""
    obj = "text_completion" if kind == "completion" else "chat.completion.chunk"
    return sse({"id": rid, "object": obj, "created": int(time.time()), "model": model, "choices": [],
                "usage": usage(*tokens)})


def sse(body: Any) -> str:
    """A server-sent event carrying ``body`` as JSON."""
    return f"data: {json.dumps(body)}\n\n"


def model_card(name: str, root: str, parent: str | None, max_model_len: int, created: int) -> dict[str, Any]:
    """An entry of ``GET /v1/models`` (vLLM's fields: ``root`` is the path, ``parent`` the base for an adapter)."""
    return {"id": name, "object": "model", "created": created, "owned_by": "lightning-lora", "root": root,
            "parent": parent, "max_model_len": max_model_len, "permission": []}
