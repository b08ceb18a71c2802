"""Parse and validate OpenAI / vLLM request bodies, in the HTTP process, before anything is queued.

Every check runs here, where the tokenizer is at hand, so that a bad request gets a real HTTP status and OpenAI's
error body naming the field, and never reaches (or fails) the batch the model is running. Fields this server does
not implement (``n`` > 1, ``logprobs``, penalties, tools, ...) are refused with a 400 naming them rather than
silently ignored.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from lightning_lora.serve.errors import ServeError

Kind = Literal["completion", "chat"]
_RESERVED_NAMES = ("base", "__base__")


@dataclass(frozen=True)
class SamplingParams:
    """How one row chooses its tokens and when it stops.

    Args:
        max_tokens: Most new tokens.
        temperature: 0 is greedy (argmax); otherwise logits are divided by it before sampling. Default: 1.0 (as OpenAI).
        top_p: Nucleus sampling: sample among the most likely tokens whose probabilities sum to ``top_p``. Default: 1.0.
        seed: Seed of the row's own random generator (same seed, same request: same answer). Default: None (random).
        stop: Strings that end the answer; the answer excludes them. Default: none.
        ignore_eos: Keep generating after the end-of-sequence token (vLLM's extension). Default: False.
    """

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False


@dataclass(frozen=True)
class GenerationRequest:
    """A validated request, as the engine runs it.

    Args:
        prompt_ids: The prompt's token ids (chat template applied for chat requests).
        adapter: The adapter name, or None for the bare base model.
        params: Sampling and stopping settings.
    """

    prompt_ids: tuple[int, ...]
    adapter: str | None
    params: SamplingParams


@dataclass(frozen=True)
class ParsedRequest:
    """A request body after validation: what the engine needs plus how to answer (model name, streaming)."""

    kind: Kind
    model: str
    generation: GenerationRequest
    stream: bool = False
    include_usage: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


# Fields each endpoint accepts, with the value(s) that mean "not used" for the ones we only accept when unused.
_COMMON = {"model", "max_tokens", "temperature", "top_p", "stop", "seed", "stream", "stream_options", "user",
           "ignore_eos"}
_UNUSED_OK: dict[str, tuple[Any, ...]] = {
    "n": (None, 1), "logprobs": (None, False), "top_logprobs": (None, 0), "echo": (None, False), "best_of": (None, 1),
    "presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0), "logit_bias": (None, {}),
    "suffix": (None, ""), "tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []),
    "parallel_tool_calls": (None,), "response_format": (None, {"type": "text"}),
}
_FIELDS: dict[Kind, set[str]] = {
    "completion": _COMMON | {"prompt"} | set(_UNUSED_OK),
    "chat": _COMMON | {"messages", "max_completion_tokens"} | set(_UNUSED_OK),
}


class RequestValidator:
    """Validates request bodies against the served model: its adapters, tokenizer and context length.

    Args:
        tokenizer: The model's tokenizer (``apply_chat_template`` is used for chat requests).
        served_model_name: The name that selects the bare base model.
        adapters: Name -> path of the adapters currently loaded (kept up to date by the server).
        max_context: The model's context length in tokens (prompt + new tokens).
    """

    def __init__(self, tokenizer: Any, served_model_name: str, adapters: Mapping[str, str], max_context: int) -> None:
        self.tokenizer = tokenizer
        self.served_model_name = served_model_name
        self.adapters = adapters
        self.max_context = max_context

    def parse(self, body: Any, kind: Kind) -> ParsedRequest:
        """Validate a ``/v1/completions`` (``kind="completion"``) or ``/v1/chat/completions`` body.

        Raises:
            ServeError: 400 for a bad field (named in ``param``), 404 for an unknown model / adapter.
        """
        if not isinstance(body, dict):
            raise ServeError(f"the request body must be a JSON object, got {type(body).__name__}", 400)
        self._check_fields(body, kind)
        model = _get(body, "model", str, required=True)
        adapter = self.adapter_of(model)
        prompt_ids = self._prompt(body) if kind == "completion" else self._chat_prompt(body)
        max_tokens = self._max_tokens(body, kind, len(prompt_ids))
        params = SamplingParams(
            max_tokens=max_tokens,
            temperature=_number(body, "temperature", 1.0, low=0.0, high=2.0),
            top_p=_number(body, "top_p", 1.0, low=0.0, high=1.0, low_open=True),
            seed=_get(body, "seed", int),
            stop=_stop(body),
            ignore_eos=bool(_get(body, "ignore_eos", bool) or False),
        )
        stream = bool(_get(body, "stream", bool) or False)
        options = _get(body, "stream_options", dict) or {}
        if options and not stream:
            raise ServeError("stream_options is only allowed when stream is true", 400, "stream_options")
        include_usage = bool(options.get("include_usage", False))
        generation = GenerationRequest(tuple(prompt_ids), adapter, params)
        return ParsedRequest(kind, model, generation, stream=stream, include_usage=include_usage)

    def adapter_of(self, model: str) -> str | None:
        """The adapter a ``model`` field selects (None: the base), or a 404 naming what exists."""
        if model == self.served_model_name:
            return None
        if model in self.adapters:
            return model
        known = [self.served_model_name, *sorted(self.adapters)]
        raise ServeError(f"The model {model!r} does not exist. Served models: {', '.join(map(repr, known))} (the "
                         f"first is the base model without adapter; load another adapter with POST "
                         f"/v1/load_lora_adapter).", 404, "model", "model_not_found")

    # ------------------------------------------------------------------------------------------------ fields
    def _check_fields(self, body: dict, kind: Kind) -> None:
        unknown = sorted(set(body) - _FIELDS[kind])
        if unknown:
            raise ServeError(f"unsupported field(s) {', '.join(map(repr, unknown))}; this server accepts "
                             f"{', '.join(sorted(_FIELDS[kind] - set(_UNUSED_OK)))}", 400, unknown[0])
        used = [k for k, ok in _UNUSED_OK.items() if k in body and body[k] not in ok]
        if used:
            name = used[0]
            raise ServeError(f"{name}={body[name]!r} is not supported by this server (only {_UNUSED_OK[name][-1]!r} or "
                             f"leaving it out); remove the field{' and send one request per answer' if name == 'n' else ''}.",
                             400, name)

    def _prompt(self, body: dict) -> list[int]:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # a batch of one prompt
        if isinstance(prompt, str):
            if not prompt:
                raise ServeError("prompt is empty; give at least one character", 400, "prompt")
            return list(self.tokenizer(prompt)["input_ids"])
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            vocab = len(self.tokenizer)
            bad = [t for t in prompt if not 0 <= t < vocab]
            if bad:
                raise ServeError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {vocab})", 400, "prompt")
            return list(prompt)
        if isinstance(prompt, list) and len(prompt) > 1:
            raise ServeError(f"prompt holds {len(prompt)} prompts; this server takes one prompt per request", 400, "prompt")
        raise ServeError(f"prompt must be a non-empty string or a list of token ids, got {_type(prompt)}", 400, "prompt")

    def _chat_prompt(self, body: dict) -> list[int]:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ServeError(f"messages must be a non-empty list of {{'role', 'content'}} objects, got {_type(messages)}",
                             400, "messages")
        plain = [_message(m, i) for i, m in enumerate(messages)]
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise ServeError("this model's tokenizer has no chat template; use /v1/completions with a prompt", 400,
                             "messages")
        text = self.tokenizer.apply_chat_template(plain, tokenize=False, add_generation_prompt=True)
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _max_tokens(self, body: dict, kind: Kind, prompt_tokens: int) -> int:
        name = "max_completion_tokens" if kind == "chat" and body.get("max_completion_tokens") is not None else "max_tokens"
        value = _get(body, name, int)
        room = self.max_context - prompt_tokens
        if value is None:
            value = 16 if kind == "completion" else room  # OpenAI's completions default; chat: up to the context
        if value < 1:
            raise ServeError(f"{name}={value} must be at least 1", 400, name)
        if prompt_tokens + value > self.max_context:
            raise ServeError(f"This model's maximum context length is {self.max_context} tokens. However, you requested "
                             f"{prompt_tokens + value} tokens ({prompt_tokens} in the prompt, {value} in the completion). "
                             f"Please reduce the length of the prompt or {name}.", 400, name, "context_length_exceeded")
        return value


def check_adapter_name(name: Any, served_model_name: str, loaded: Mapping[str, str]) -> str:
    """Validate a ``lora_name`` for loading: a new, non-empty name that is not the base model's.

    Raises:
        ServeError: 400 naming the problem.
    """
    if not isinstance(name, str) or not name.strip():
        raise ServeError(f"lora_name must be a non-empty string, got {_type(name)}", 400, "lora_name")
    if name == served_model_name or name in _RESERVED_NAMES:
        raise ServeError(f"lora_name {name!r} is reserved for the base model; choose another name", 400, "lora_name")
    if name in loaded:
        raise ServeError(f"The lora adapter {name!r} has already been loaded (from {loaded[name]!r}); unload it first "
                         f"or choose another name.", 400, "lora_name")
    return name


# ---------------------------------------------------------------------------------------------------- helpers
def _type(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"[:120]


def _get(body: dict, name: str, kind: type, required: bool = False) -> Any:
    value = body.get(name)
    if value is None:
        if required:
            raise ServeError(f"{name} is required", 400, name)
        return None
    ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    if not ok:
        raise ServeError(f"{name} must be {'an' if kind is int else 'a'} {kind.__name__}, got {_type(value)}", 400, name)
    return value


def _number(body: dict, name: str, default: float, *, low: float, high: float, low_open: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ServeError(f"{name} must be a number, got {_type(value)}", 400, name)
    if value < low or value > high or (low_open and value == low):
        bound = f"({low}, {high}]" if low_open else f"[{low}, {high}]"
        raise ServeError(f"{name}={value} is out of range; valid: {bound}", 400, name)
    return float(value)


def _stop(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise ServeError(f"stop must be a non-empty string or a list of them, got {_type(stop)}", 400, "stop")
    return tuple(stop)


def _message(message: Any, index: int) -> dict[str, str]:
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
        raise ServeError(f"messages[{index}] must be an object with a string 'role', got {_type(message)}", 400,
                         "messages")
    content = message.get("content")
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
        parts = [p.get("text") if isinstance(p, dict) and p.get("type") == "text" else None for p in content]
        if any(not isinstance(p, str) for p in parts):
            raise ServeError(f"messages[{index}].content: only text parts ({{'type': 'text', 'text': ...}}) are "
                             f"supported", 400, "messages")
        content = "".join(parts)
    if not isinstance(content, str):
        raise ServeError(f"messages[{index}].content must be a string, got {_type(content)}", 400, "messages")
    return {"role": message["role"], "content": content}


def is_reserved(names: Sequence[str]) -> list[str]:
    """The names among ``names`` that :func:`~lightning_lora.mixed_batch` reserves for the base model."""
    return [n for n in names if n in _RESERVED_NAMES]
