"""Replay mixing: reference examples mixed into each training epoch at a fixed ratio, against forgetting.

A :class:`ReplaySampler` draws, per epoch, ``n_replay`` examples from the replay pool (seeded by ``seed`` and the
epoch) and shuffles them with every task example; ``n_replay = round(n_task * ratio / (1 - ratio))``, so replay
examples make up ``ratio`` of each epoch (:attr:`ReplaySampler.realised_ratio` says exactly how much after
rounding). The pool is a JSONL instruction file, or ``"self"``: the base model's own greedy answers to the shipped
general prompts (:func:`self_replay_records`), generated once and cached on disk.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections.abc import Iterator
from pathlib import Path

from torch.utils.data import Sampler

from lightning_lora.data.jsonl import Conversation
from lightning_lora.data.reference import GENERAL_REFERENCE

log = logging.getLogger(__name__)


def replay_count(n_task: int, ratio: float) -> int:
    """Replay examples per epoch so that they are ``ratio`` of it: ``round(n_task * ratio / (1 - ratio))``."""
    return round(n_task * ratio / (1 - ratio)) if ratio > 0 else 0


class ReplaySampler(Sampler[int]):
    """Indices into ``ConcatDataset([task, pool])``: every task example plus ``n_replay`` pool examples, shuffled.

    A different seeded draw each epoch (``set_epoch``, which Lightning calls, or one more per iteration).

    Args:
        n_task: Task examples (indices ``0 .. n_task-1``).
        n_pool: Replay pool examples (indices ``n_task ..``).
        ratio: Share of replay examples in each epoch, in [0, 1).
        seed: Seed of the draws and the shuffle.
    """

    def __init__(self, n_task: int, n_pool: int, ratio: float, seed: int = 0) -> None:
        self.n_task, self.n_pool, self.seed = n_task, n_pool, seed
        self.n_replay = replay_count(n_task, ratio) if n_pool else 0
        self.epoch = 0

    @property
    def realised_ratio(self) -> float:
        """The replay share of each epoch after rounding."""
        return self.n_replay / (self.n_task + self.n_replay) if self.n_task + self.n_replay else 0.0

    def set_epoch(self, epoch: int) -> None:
        """Draw the mix of ``epoch`` on the next iteration."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n_task + self.n_replay

    def __iter__(self) -> Iterator[int]:
        rng = random.Random(f"{self.seed}-{self.epoch}")
        if self.n_replay <= self.n_pool:
            drawn = rng.sample(range(self.n_pool), self.n_replay)  # without replacement when the pool suffices
        else:
            drawn = [rng.randrange(self.n_pool) for _ in range(self.n_replay)]
        order = list(range(self.n_task)) + [self.n_task + i for i in drawn]
        rng.shuffle(order)
        self.epoch += 1
        return iter(order)


def self_replay_records(model_name: str, use_chat_template: bool, max_new_tokens: int = 48,
                        cache_dir: str | Path | None = None) -> list[Conversation]:
    """The base model's own greedy answers to the shipped general prompts, generated once and cached.

    Args:
        model_name: Model alias or directory (the base the adapter is trained on).
        use_chat_template: Render prompts with the tokenizer's chat template.
        max_new_tokens: Tokens generated per answer. Default: 48.
        cache_dir: Where the generated records are kept. Default: lightning-lora's cache directory.

    Returns:
        ``[{"role": "user", ...}, {"role": "assistant", ...}]`` conversations.
    """
    from lightning_lora.modules.smollm2 import default_cache_dir

    key = hashlib.sha256(json.dumps([model_name, use_chat_template, max_new_tokens, GENERAL_REFERENCE]).encode())
    cache = Path(cache_dir or default_cache_dir()) / f"replay-self-{key.hexdigest()[:16]}.jsonl"
    if cache.is_file():
        return [json.loads(line) for line in cache.read_text(encoding="utf-8").splitlines() if line.strip()]
    records = _generate(model_name, use_chat_template, max_new_tokens)
    from lightning_lora.surgery.io.atomic import atomic_file

    with atomic_file(cache) as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    log.info("replay='self': %d base-model answers cached in %s", len(records), cache)
    return records


def _generate(model_name: str, use_chat_template: bool, max_new_tokens: int) -> list[Conversation]:
    import torch

    from lightning_lora.data.rendering import render_prompt
    from lightning_lora.modules.loading import load_causal_lm

    model, tokenizer = load_causal_lm(model_name, "float32")
    records = []
    for text in GENERAL_REFERENCE:
        messages = [{"role": "user", "content": text}, {"role": "assistant", "content": ""}]
        prompt = render_prompt(messages, tokenizer, use_chat_template)
        ids = tokenizer(prompt, add_special_tokens=not use_chat_template, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
        answer = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        records.append([{"role": "user", "content": text}, {"role": "assistant", "content": answer or "."}])
    return records
