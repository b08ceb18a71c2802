"""What both sides of ``benchmarks/e2e.py`` share: the held-out exact-match evaluation and the time-to-accuracy log.

Imports only torch and the standard library, so that neither side's memory or start-up includes the other's stack.
Each side gets the same prompts (rendered with the tokenizer's chat template) and answers, generates greedily with
the same settings, and compares stripped strings.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import time
from pathlib import Path
from typing import Any

import torch

T0_ENV = "E2E_T0"  # the parent's time.time() just before it started this process


def read_val(path: str, limit: int | None = None) -> list[tuple[list[dict[str, str]], str]]:
    """``(messages without the answer, answer)`` pairs from a ``{"prompt", "response"}`` JSONL file."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return [([{"role": "user", "content": r["prompt"]}], r["response"]) for r in rows[:limit]]


@torch.no_grad()
def exact_match(model: Any, tokenizer: Any, val: list[tuple[list[dict[str, str]], str]], max_new_tokens: int,
                batch_size: int = 20, autocast: torch.dtype | None = None) -> float:
    """Greedy answers to the held-out prompts (left-padded, chat template) scored by stripped exact match."""
    was_training = model.training
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    correct = 0
    try:
        for i in range(0, len(val), batch_size):
            chunk = val[i : i + batch_size]
            prompts = [tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m, _ in chunk]
            enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
            ctx = torch.autocast("cpu", dtype=autocast) if autocast not in (None, torch.float32) else contextlib.nullcontext()
            with ctx:
                out = model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens,
                                     pad_token_id=tokenizer.pad_token_id)  # (B, T + new)
            texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
            correct += sum(t.strip() == a.strip() for t, (_, a) in zip(texts, chunk))
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return correct / max(len(val), 1)


def peak_rss_mib() -> float:
    """Peak resident memory of this process, MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Tracker:
    """Evaluation log: step, seconds since process start, seconds spent evaluating so far, accuracy.

    ``to_target_s`` is the time from the process's start (set by the parent, so imports and model loading count) to
    the first evaluation at or above ``target``, minus the time spent in evaluations: the same evaluations run on
    both sides, so they are taken out of the race.
    """

    def __init__(self, target: float, out: str) -> None:
        self.t0 = float(os.environ.get(T0_ENV, time.time()))
        self.target, self.out = target, out
        self.evals: list[dict[str, float]] = []
        self.eval_s = 0.0
        self.train_started: float | None = None

    def evaluate(self, step: int, score: Any) -> float:
        """Run ``score()`` (returns the accuracy), time it, log it; returns the accuracy."""
        start = time.time()
        accuracy = float(score())
        self.eval_s += time.time() - start
        self.evals.append({"step": step, "elapsed_s": start - self.t0, "eval_s_so_far": self.eval_s,
                           "accuracy": accuracy})  # fmt: skip
        return accuracy

    def reached(self) -> bool:
        """Whether the last evaluation met the target."""
        return bool(self.evals) and self.evals[-1]["accuracy"] >= self.target

    def write(self, **extra: Any) -> dict[str, Any]:
        """Write the record (JSON) to ``out`` and return it."""
        hit = next((e for e in self.evals if e["accuracy"] >= self.target), None)
        record = {
            "evals": self.evals, "target": self.target, "peak_rss_mib": peak_rss_mib(),
            "to_target_s": None if hit is None else hit["elapsed_s"] - (hit["eval_s_so_far"] - self._last_eval_s(hit)),
            "steps_to_target": None if hit is None else hit["step"],
            "final_accuracy": self.evals[-1]["accuracy"] if self.evals else None,
            "train_start_s": None if self.train_started is None else self.train_started - self.t0, **extra,
        }  # fmt: skip
        Path(self.out).write_text(json.dumps(record, indent=1) + "\n")
        return record

    def _last_eval_s(self, hit: dict[str, float]) -> float:
        i = self.evals.index(hit)
        return hit["eval_s_so_far"] - (self.evals[i - 1]["eval_s_so_far"] if i else 0.0)
