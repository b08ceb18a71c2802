"""Per-row token choice (greedy, temperature, top-p, seeded) and incremental detokenization with stop strings."""

from __future__ import annotations

import random
from typing import Any

import torch
from torch import Tensor

from lightning_lora.serve.protocol import SamplingParams


def make_generator(params: SamplingParams) -> torch.Generator | None:
    """A CPU generator seeded with the request's ``seed`` (a random seed if none); None for greedy rows."""
    if params.temperature == 0.0:
        return None
    generator = torch.Generator()
    generator.manual_seed(params.seed if params.seed is not None else random.getrandbits(63))
    return generator


def choose_tokens(logits: Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]) -> list[int]:
    """One next token per row.

    Greedy rows take the argmax (the same op ``generate`` uses); sampling rows divide by their temperature, keep the
    smallest set of tokens whose probability reaches ``top_p`` and draw from their own generator.

    Args:
        logits: ``(B, V)`` next-token logits.
        params: One :class:`SamplingParams` per row.
        generators: One generator per row (None for greedy rows).
    """
    greedy = torch.argmax(logits, dim=-1).tolist()  # (B, V) -> (B,)
    tokens = []
    for row, (p, generator) in enumerate(zip(params, generators)):
        if p.temperature == 0.0 or generator is None:
            tokens.append(greedy[row])
            continue
        # On the CPU: each row's generator is a CPU generator (seeded per request), whatever the model's device.
        probs = torch.softmax(logits[row].float().cpu() / p.temperature, dim=-1)  # (V,)
        if p.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            outside = torch.cumsum(sorted_probs, dim=-1) - sorted_probs >= p.top_p  # tokens after the nucleus
            sorted_probs[outside] = 0.0
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        tokens.append(int(torch.multinomial(probs, 1, generator=generator)))
    return tokens


class TextTracker:
    """Turns a row's token ids into text deltas, holding back what might still become a stop string.

    The full text is re-decoded each step (so multi-token characters come out right), and a delta is released only
    up to the point where no stop string could start and no character is incomplete.

    Args:
        tokenizer: The model's tokenizer.
        stop: The row's stop strings.
    """

    def __init__(self, tokenizer: Any, stop: tuple[str, ...]) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.sent = 0  # characters already released
        self.text = ""

    def update(self, token_ids: list[int]) -> tuple[str, bool]:
        """Decode ``token_ids`` (all generated so far); return ``(delta, hit_stop)``.

        When a stop string appears, the text is cut before it and everything up to there is released.
        """
        self.text = self.tokenizer.decode(token_ids, skip_special_tokens=True)
        for stop in self.stop:
            at = self.text.find(stop)
            if at != -1:
                self.text = self.text[:at]
                return self._release(len(self.text)), True
        end = len(self.text)
        while end > self.sent and self.text[end - 1] == "\ufffd":  # an incomplete UTF-8 character so far
            end -= 1
        hold = max((_overlap(self.text[:end], s) for s in self.stop), default=0)
        return self._release(end - hold), False

    def flush(self) -> str:
        """Release the rest (the row is done)."""
        return self._release(len(self.text))

    def _release(self, end: int) -> str:
        if end <= self.sent:
            return ""
        delta = self.text[self.sent:end]
        self.sent = end
        return delta


def _overlap(text: str, stop: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``stop``."""
    for size in range(min(len(stop) - 1, len(text)), 0, -1):
        if text.endswith(stop[:size]):
            return size
    return 0
