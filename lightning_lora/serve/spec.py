"""The HTTP side: vLLM's OpenAI-compatible endpoints, as a LitServe spec.

LitServe's ``OpenAISpec`` serves ``/v1/chat/completions`` only and answers errors as ``{"detail": ...}``. This spec
registers vLLM's endpoint names and JSON (``/v1/models``, ``/v1/completions``, ``/v1/chat/completions``,
``/v1/load_lora_adapter``, ``/v1/unload_lora_adapter``), validates every request here in the HTTP process (see
:mod:`~lightning_lora.serve.protocol`) and answers errors with OpenAI's ``{"error": {...}}`` body. Work for the
model (generation, adapter loading, cancelling) goes to the inference worker on LitServe's request queue and is
handled there between decode steps (:mod:`~lightning_lora.serve.loop`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from litserve.specs.base import LitSpec
from litserve.utils import ResponseBufferItem

from lightning_lora.serve.adapters import check_adapter_dir
from lightning_lora.serve.errors import ServeError
from lightning_lora.serve.protocol import (
    Kind,
    ParsedRequest,
    RequestValidator,
    check_adapter_name,
)
from lightning_lora.serve.responses import (
    chunk,
    full_response,
    model_card,
    new_id,
    usage_chunk,
)

log = logging.getLogger(__name__)

_DISCONNECT_POLL_S = 0.5


class ServeSpec(LitSpec):
    """vLLM's OpenAI-compatible API for one base model and its LoRA adapters.

    Args:
        tokenizer: The base model's tokenizer (requests are tokenized and checked here).
        served_model_name: The ``model`` value that selects the bare base model.
        model_path: Where the base model came from (``root`` of its model card).
        max_context: The model's context length.
        adapters: Name -> directory of the adapters loaded at start-up.
        adapter_root: If set, ``/v1/load_lora_adapter`` only reads directories inside it.
    """

    def __init__(self, tokenizer: Any, served_model_name: str, model_path: str, max_context: int,
                 adapters: dict[str, str], adapter_root: str | None = None) -> None:
        super().__init__()
        self.api_path = "/v1/completions"
        self.served_model_name = served_model_name
        self.model_path = model_path
        self.adapter_root = adapter_root
        self.adapters = dict(adapters)
        self.validator = RequestValidator(tokenizer, served_model_name, self.adapters, max_context)
        self.created = int(time.time())

    @property
    def stream(self) -> bool:
        return True  # rows stream their tokens back from the worker, whether the client streams or not

    def pre_setup(self, lit_api: Any) -> None:
        """Register the endpoints."""
        self.add_endpoint("/v1/models", self.models, ["GET"])
        self.add_endpoint("/v1/completions", self.completions, ["POST"])
        self.add_endpoint("/v1/chat/completions", self.chat_completions, ["POST"])
        self.add_endpoint("/v1/load_lora_adapter", self.load_lora_adapter, ["POST"])
        self.add_endpoint("/v1/unload_lora_adapter", self.unload_lora_adapter, ["POST"])

    def decode_request(self, request: Any, context_kwargs: Any = None) -> Any:
        return request

    def encode_response(self, output: Any, context_kwargs: Any = None) -> Any:
        return output

    # ------------------------------------------------------------------------------------------------ endpoints
    async def models(self, request: Request) -> JSONResponse:
        """``GET /v1/models``: the base model, then every loaded adapter."""
        limit = self.validator.max_context
        cards = [model_card(self.served_model_name, self.model_path, None, limit, self.created)]
        cards += [model_card(n, p, self.served_model_name, limit, self.created) for n, p in sorted(self.adapters.items())]
        return JSONResponse({"object": "list", "data": cards})

    async def completions(self, request: Request) -> Response:
        """``POST /v1/completions``."""
        return await self._generate(request, "completion")

    async def chat_completions(self, request: Request) -> Response:
        """``POST /v1/chat/completions`` (the tokenizer's chat template builds the prompt)."""
        return await self._generate(request, "chat")

    async def load_lora_adapter(self, request: Request) -> Response:
        """``POST /v1/load_lora_adapter`` with ``{"lora_name", "lora_path"}``: load an adapter while serving."""
        try:
            body = await _json(request, {"lora_name", "lora_path"})
            name = check_adapter_name(body.get("lora_name"), self.served_model_name, self.adapters)
            path = await asyncio.to_thread(check_adapter_dir, body.get("lora_path"), self.adapter_root)
            await self._control({"op": "load", "name": name, "path": str(path)})
        except ServeError as err:
            return JSONResponse(err.body(), err.status)
        self.adapters[name] = str(path)
        log.info("loaded adapter %r from %s", name, path)
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

    async def unload_lora_adapter(self, request: Request) -> Response:
        """``POST /v1/unload_lora_adapter`` with ``{"lora_name"}``; requests already running on it finish first."""
        try:
            body = await _json(request, {"lora_name", "lora_int_id"})
            name = body.get("lora_name")
            if not isinstance(name, str) or name not in self.adapters:
                known = ", ".join(map(repr, sorted(self.adapters))) or "none"
                raise ServeError(f"The lora adapter {name!r} cannot be found; loaded adapters: {known}", 404,
                                 "lora_name", "model_not_found")
            path = self.adapters.pop(name)  # new requests for it get a 404 from now on
            try:
                await self._control({"op": "unload", "name": name})
            except ServeError:
                self.adapters[name] = path
                raise
        except ServeError as err:
            return JSONResponse(err.body(), err.status)
        return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")

    # ------------------------------------------------------------------------------------------------ generation
    async def _generate(self, request: Request, kind: Kind) -> Response:
        try:
            body = await _json(request)
            parsed = self.validator.parse(body, kind)
        except ServeError as err:
            return JSONResponse(err.body(), err.status)
        # A non-streaming row gets one message, at its end; the HTTP process polls for a client that went away.
        payload = {"op": "generate", "request": parsed.generation, "stream": parsed.stream}
        _, messages = self._submit(payload, None if parsed.stream else request)
        if parsed.stream:
            return StreamingResponse(self._stream(parsed, messages), media_type="text/event-stream")
        return await self._collect(parsed, messages)

    async def _stream(self, parsed: ParsedRequest, messages: AsyncIterator[dict]) -> AsyncIterator[str]:
        rid, model, kind = new_id(parsed.kind), parsed.model, parsed.kind
        if kind == "chat":
            yield chunk(kind, rid, model, None, None, role=True, with_usage=parsed.include_usage)
        last: dict = {}
        try:
            async for last in messages:
                if "error" in last:
                    yield f"data: {json.dumps(ServeError(last['error'], last.get('status', 500)).body())}\n\n"
                    return
                if last["text"] or last["finish_reason"]:
                    yield chunk(kind, rid, model, last["text"], last["finish_reason"], with_usage=parsed.include_usage)
        finally:
            await messages.aclose()  # a client that went away: cancels its row
        if parsed.include_usage and last:
            yield usage_chunk(kind, rid, model, (last["prompt_tokens"], last["completion_tokens"]))
        yield "data: [DONE]\n\n"

    async def _collect(self, parsed: ParsedRequest, messages: AsyncIterator[dict]) -> Response:
        parts, last = [], {}
        try:
            async for last in messages:
                if "error" in last:
                    err = ServeError(last["error"], last.get("status", 500))
                    return JSONResponse(err.body(), err.status)
                parts.append(last["text"])
        except ClientGone:
            return Response(status_code=499)  # nobody reads it; the row was cancelled
        if not last:
            return Response(status_code=499)
        body = full_response(parsed.kind, new_id(parsed.kind), parsed.model, "".join(parts), last["finish_reason"],
                             (last["prompt_tokens"], last["completion_tokens"]))
        return JSONResponse(body)

    # ------------------------------------------------------------------------------------------------ the queue
    def _submit(self, payload: dict, request: Request | None = None) -> tuple[str, AsyncIterator[dict]]:
        """Put ``payload`` on the worker's queue; return its id and the iterator over its replies.

        With ``request``, the iterator also checks every half second whether that client is still connected, and
        raises :class:`ClientGone` (after cancelling the row) when it is not.
        """
        uid = uuid.uuid4().hex
        queue: deque = deque()
        event = asyncio.Event()
        self.response_buffer[uid] = ResponseBufferItem(event=event, response_queue=queue)
        self.request_queue.put((self.response_queue_id, uid, time.monotonic(), payload))
        return uid, self._replies(uid, queue, event, request)

    async def _replies(self, uid: str, queue: deque, event: asyncio.Event,
                       request: Request | None) -> AsyncIterator[dict]:
        """The worker's messages for ``uid`` until its last one; if the consumer stops early, cancel the row."""
        done = False
        try:
            while not done:
                await _wait(event, request)
                event.clear()
                while queue and not done:
                    data, _status = queue.popleft()
                    done = "error" in data or "ok" in data or data.get("finish_reason") is not None
                    yield data
        finally:
            self.response_buffer.pop(uid, None)
            if not done:  # the client went away: free the row
                self.request_queue.put((self.response_queue_id, uuid.uuid4().hex, time.monotonic(),
                                        {"op": "cancel", "target": uid}))

    async def _control(self, payload: dict) -> dict:
        """Run a load / unload in the worker and wait for its result; a failure becomes a :class:`ServeError`."""
        _, replies = self._submit(payload)
        param = "lora_path" if payload["op"] == "load" else "lora_name"
        async for reply in replies:
            if not reply.get("ok"):
                raise ServeError(reply.get("error", "failed"), reply.get("status", 400), param)
            return reply
        raise ServeError("the inference worker did not answer", 500)


class ClientGone(Exception):
    """The client of a non-streaming request disconnected before its answer was ready."""


async def _wait(event: asyncio.Event, request: Request | None) -> None:
    if request is None:
        await event.wait()
        return
    while True:
        try:
            await asyncio.wait_for(event.wait(), _DISCONNECT_POLL_S)
            return
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                raise ClientGone from None


async def _json(request: Request, allowed: set[str] | None = None) -> dict:
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ServeError(f"the request body is not valid JSON: {err}", 400) from err
    if not isinstance(body, dict):
        raise ServeError(f"the request body must be a JSON object, got {type(body).__name__}", 400)
    if allowed is not None:
        unknown = sorted(set(body) - allowed)
        if unknown:
            raise ServeError(f"unsupported field(s) {unknown}; accepted: {sorted(allowed)}", 400, unknown[0])
    return body
