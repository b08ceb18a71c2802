"""The continuous-batching engine: one base model, many adapters, rows that join and leave between decode steps.

Each :meth:`Engine.step` first admits waiting requests (up to ``max_batch_size`` running rows): each is prefilled
alone with its adapter and samples its first token, and its KV cache joins the batch (:class:`~.kv.BatchCache`).
Then one decode step runs every row through the model at once, each row with its own adapter
(:func:`lightning_lora.mixed_batch`) and its own sampling settings. Rows that are done (``max_tokens``, a stop
string, the end-of-sequence token, or cancelled) leave the batch right away and their answer is complete.

Example:
    >>> engine = Engine(model, tokenizer, max_batch_size=16)  # doctest: +SKIP
    >>> engine.submit("a", GenerationRequest((1, 2, 3), "legal", SamplingParams(max_tokens=8, temperature=0)))
    >>> while engine.busy:
    ...     for out in engine.step(): print(out.uid, out.text, out.finish_reason)
"""

from __future__ import annotations

import inspect
import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lightning_lora.serve.kv import BatchCache
from lightning_lora.serve.protocol import GenerationRequest
from lightning_lora.serve.routing import RowRouting
from lightning_lora.serve.sampling import TextTracker, choose_tokens, make_generator

log = logging.getLogger(__name__)


@dataclass
class RowOutput:
    """What one step produced for one request: new text, and at the end the finish reason and token counts."""

    uid: str
    text: str
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | None while running
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class _Row:
    uid: str
    request: GenerationRequest
    tracker: TextTracker
    generator: torch.Generator | None
    tokens: list[int] = field(default_factory=list)
    finish: str | None = None

    @property
    def adapter(self) -> str | None:
        return self.request.adapter


class Engine:
    """Runs many requests at once on one model, each with its own adapter; rows join and leave between steps.

    Args:
        model: A causal LM (transformers), in eval mode, with its adapters loaded (or none).
        tokenizer: Its tokenizer.
        max_batch_size: Most rows decoded together; further requests wait. Default: 16.
        max_context: Context length; a row stops (``"length"``) when it reaches it. Default: the model config's
            ``max_position_embeddings``.
    """

    def __init__(self, model: nn.Module, tokenizer: Any, max_batch_size: int = 16, max_context: int | None = None) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size={max_batch_size!r} must be at least 1")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.max_context = max_context or int(getattr(model.config, "max_position_embeddings", 2048))
        self.eos_ids = _eos_ids(model, tokenizer)
        self.device = next(model.parameters()).device
        self.waiting: deque[_Row] = deque()
        self.running: list[_Row] = []
        self.kv = BatchCache()
        self.doomed: set[str] = set()  # adapters to delete once no row uses them
        self.routing = RowRouting(self.model)
        self._cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    @property
    def busy(self) -> bool:
        """Whether any request is running or waiting."""
        return bool(self.running or self.waiting)

    def submit(self, uid: str, request: GenerationRequest) -> None:
        """Queue a validated request; it joins the batch at the next :meth:`step` with room."""
        row = _Row(uid, request, TextTracker(self.tokenizer, request.params.stop), make_generator(request.params))
        self.waiting.append(row)

    def cancel(self, uid: str) -> RowOutput | None:
        """Drop request ``uid`` (its client went away); its row leaves the batch before the next step."""
        for row in self.waiting:
            if row.uid == uid:
                self.waiting.remove(row)
                return self._output(row, "", "cancelled")
        for row in self.running:
            if row.uid == uid and row.finish is None:
                row.finish = "cancelled"
                return self._output(row, "", "cancelled")
        return None

    @torch.inference_mode()
    def step(self) -> list[RowOutput]:
        """Admit waiting requests, run one decode step for every row, and drop the rows that are done."""
        outputs = []
        self._drop_finished()
        while self.waiting and len(self.running) < self.max_batch_size:
            row = self.waiting.popleft()
            outputs += self._prefill(row)
        self._drop_finished()  # rows whose first token already ended them
        if self.running:
            outputs += self._decode()
        self._drop_finished()
        self._delete_doomed()
        return outputs

    def fail_all(self) -> list[str]:
        """Forget every row (after an error in a forward); returns their ids."""
        uids = [r.uid for r in [*self.running, *self.waiting]]
        self.running, self.waiting, self.kv = [], deque(), BatchCache()
        return uids

    # ------------------------------------------------------------------------------------------------ adapters
    def in_use(self, name: str) -> bool:
        """Whether a running or waiting row uses adapter ``name``."""
        return any(r.request.adapter == name for r in [*self.running, *self.waiting])

    def unload_later(self, name: str) -> None:
        """Delete adapter ``name`` as soon as no row uses it (now, if none does)."""
        self.doomed.add(name)
        self._delete_doomed()

    def _delete_doomed(self) -> None:
        from lightning_lora import delete_adapter

        for name in [n for n in self.doomed if not self.in_use(n)]:
            self.doomed.discard(name)
            if name in self.routing.adapters:
                delete_adapter(self.model, name)
                self.routing.refresh()
                log.info("unloaded adapter %r", name)

    def adapters_changed(self) -> None:
        """Call after loading an adapter into the model (re-reads its LoRA layers)."""
        self.routing.refresh()

    # ------------------------------------------------------------------------------------------------ the model
    def _forward(self, names: list[str], cache: object, **kwargs: Any) -> tuple[torch.Tensor, object]:
        # transformers 5.x renamed `past_key_values` to `cache` (the old name warns); accept both.
        key = self._cache_arg
        with self.routing.rows(names):
            out = self.model(use_cache=True, **{key: cache}, **kwargs)
        cache = getattr(out, key, None)
        return out.logits[:, -1, :], cache if cache is not None else getattr(out, "past_key_values", None)

    def _prefill(self, row: _Row) -> list[RowOutput]:
        from transformers import DynamicCache

        ids = torch.tensor([row.request.prompt_ids], device=self.device)  # (1, T)
        cache = DynamicCache(config=self.model.config)
        logits, cache = self._forward([row.adapter], cache, input_ids=ids, logits_to_keep=1)  # (1, V)
        token = choose_tokens(logits, [row.request.params], [row.generator])[0]
        self.running.append(row)
        self.kv.add(cache, ids.shape[1])
        return self._advance([row], [token])

    def _decode(self) -> list[RowOutput]:
        rows = self.running
        ids = torch.tensor([[r.tokens[-1]] for r in rows], device=self.device)  # (B, 1)
        inputs = self.kv.step_inputs()
        logits, self.kv.cache = self._forward([r.adapter for r in rows], self.kv.cache, input_ids=ids,
                                              **{k: v.to(self.device) for k, v in inputs.items()})  # (B, V)
        tokens = choose_tokens(logits, [r.request.params for r in rows], [r.generator for r in rows])
        return self._advance(rows, tokens)

    def _advance(self, rows: list[_Row], tokens: list[int]) -> list[RowOutput]:
        outputs = []
        for row, token in zip(rows, tokens):
            params = row.request.params
            row.tokens.append(token)
            if token in self.eos_ids and not params.ignore_eos:
                row.finish = "stop"  # the end-of-sequence token counts as generated, but adds no text
                outputs.append(self._output(row, row.tracker.flush(), "stop"))
                continue
            delta, hit_stop = row.tracker.update(row.tokens)
            total = len(row.request.prompt_ids) + len(row.tokens)
            if hit_stop:
                row.finish = "stop"
            elif len(row.tokens) >= params.max_tokens or total >= self.max_context:
                row.finish = "length"
                delta += row.tracker.flush()
            outputs.append(self._output(row, delta, row.finish))
        return outputs

    def _drop_finished(self) -> None:
        keep = [i for i, r in enumerate(self.running) if r.finish is None]
        if len(keep) != len(self.running):
            self.running = [self.running[i] for i in keep]
            self.kv.keep(keep)

    def _output(self, row: _Row, text: str, finish: str | None) -> RowOutput:
        return RowOutput(row.uid, text, finish, len(row.request.prompt_ids), len(row.tokens))


def _eos_ids(model: nn.Module, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    config = getattr(model, "generation_config", None)
    eos = getattr(config, "eos_token_id", None)
    ids.update(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(tokenizer.eos_token_id)
    return ids
