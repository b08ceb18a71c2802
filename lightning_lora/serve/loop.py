"""The inference worker's loop: continuous batching on LitServe's request queue.

LitServe 0.2.19's loops do not fit a multi-adapter LLM server: ``BatchedStreamingLoop`` keeps a batch fixed until
every row is done and fails every row when one fails, and ``ContinuousBatchingLoop`` has no way to run control
messages (load / unload an adapter, cancel a row) in the worker, where the model lives. This loop reads LitServe's
queue itself. Between two decode steps it takes everything that arrived: new requests join the batch, adapters
are loaded or unloaded, rows whose client went away are dropped; then :meth:`Engine.step` runs once and each row's
new text goes back on LitServe's transport to the HTTP process that asked.

Queue items are LitServe's ``(response_queue_id, uid, timestamp, payload)``; ``payload`` is a dict with ``op``:
``"generate"`` (``request``: a :class:`~lightning_lora.serve.protocol.GenerationRequest`), ``"cancel"``
(``target``: a uid), ``"load"`` (``name``, ``path``) or ``"unload"`` (``name``). Replies are dicts: generation
chunks ``{"text", "finish_reason", "prompt_tokens", "completion_tokens"}``, control results ``{"ok", "message",
"status"}``.
"""

from __future__ import annotations

import logging
import sys
import time
from queue import Empty, Queue
from typing import Any

from litserve.loops.base import LitLoop
from litserve.utils import LitAPIStatus, LoopResponseType

from lightning_lora.serve.engine import Engine, RowOutput

log = logging.getLogger(__name__)

_SENTINEL = (None, None, None, None)  # what LitServe puts on the queue at shutdown
_MAX_TAKE = 256  # most queue items read between two steps


class ContinuousBatchingLoop(LitLoop):
    """Continuous batching with per-row adapters; adapter loading and cancelling between decode steps."""

    def __init__(self) -> None:
        super().__init__()
        self.routes: dict[str, int] = {}  # uid -> response queue (HTTP process) of a running request
        self.held: dict[str, list[str]] = {}  # uid -> text so far, for rows whose client does not stream

    def run(self, lit_api: Any, device: str, worker_id: int, request_queue: Queue, transport: Any,
            workers_setup_status: dict, callback_runner: Any) -> None:
        """One round: take what arrived (blocking briefly when idle), then one engine step. LitServe calls it forever."""
        engine: Engine = lit_api.engine
        for item in self._take(request_queue, idle=not engine.busy, batch_timeout=lit_api.batch_timeout):
            self._handle(item, lit_api, transport)
        if not engine.busy:
            return
        try:
            outputs = engine.step()
        except Exception as err:  # a failing forward: every row of that batch gets the error, the server goes on
            log.exception("decode step failed")
            for uid in engine.fail_all():
                self.held.pop(uid, None)
                self._reply(transport, uid, {"error": f"internal error in the model: {err}", "status": 500})
            return
        for out in outputs:
            self._send_output(transport, out)

    # ---------------------------------------------------------------------------------------------- queue
    def _take(self, queue: Queue, idle: bool, batch_timeout: float) -> list[tuple]:
        items = []
        if idle:  # wait for work; then let the requests sent together arrive for `batch_timeout`
            try:
                items.append(queue.get(timeout=1.0))
            except Empty:
                return items
            deadline = time.monotonic() + batch_timeout
            while time.monotonic() < deadline:
                try:
                    items.append(queue.get(timeout=max(deadline - time.monotonic(), 1e-4)))
                except Empty:
                    break
        while len(items) < _MAX_TAKE:
            try:
                items.append(queue.get_nowait())
            except Empty:
                break
        if _SENTINEL in items:
            log.info("shutting down the inference worker")
            sys.exit(0)
        return items

    def _handle(self, item: tuple, lit_api: Any, transport: Any) -> None:
        response_queue_id, uid, _, payload = item
        op = payload.get("op")
        if op == "generate":
            self.routes[uid] = response_queue_id
            if not payload.get("stream", True):
                self.held[uid] = []
            lit_api.engine.submit(uid, payload["request"])
        elif op == "cancel":
            target = payload["target"]
            if lit_api.engine.cancel(target) is not None:
                log.info("request %s cancelled (client went away)", target)
            self.routes.pop(target, None)
            self.held.pop(target, None)
        elif op in ("load", "unload"):
            self.routes[uid] = response_queue_id
            self._reply(transport, uid, lit_api.control(op, payload))
        else:
            self.routes[uid] = response_queue_id
            self._reply(transport, uid, {"error": f"unknown operation {op!r}", "status": 500})

    # ---------------------------------------------------------------------------------------------- replies
    def _send_output(self, transport: Any, out: RowOutput) -> None:
        if out.uid not in self.routes:
            return  # cancelled
        held = self.held.get(out.uid)
        if held is not None:  # a non-streaming client: one message with the whole text, at the end
            held.append(out.text)
            if out.finish_reason is None:
                return
            out.text = "".join(self.held.pop(out.uid))
        data = {"text": out.text, "finish_reason": out.finish_reason, "prompt_tokens": out.prompt_tokens,
                "completion_tokens": out.completion_tokens}
        if out.finish_reason is not None:
            self._reply(transport, out.uid, data)
        else:
            self.put_response(transport, self.routes[out.uid], out.uid, data, LitAPIStatus.OK, LoopResponseType.STREAMING)

    def _reply(self, transport: Any, uid: str, data: dict) -> None:
        """Send the last message of request ``uid``."""
        route = self.routes.pop(uid, None)
        if route is not None:
            self.put_response(transport, route, uid, data, LitAPIStatus.OK, LoopResponseType.STREAMING)
