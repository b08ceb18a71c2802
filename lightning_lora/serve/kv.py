"""The key/value cache of the running batch: rows of different lengths, left-padded to one length.

Continuous batching needs rows to join and leave between decode steps. Each row is prefilled alone (so its prompt
is computed exactly as ``generate`` would for it alone), then its cache is padded on the left and stacked onto the
batch; a finished row's slice is dropped, and columns that only padding uses any more are cut off. A decode step
feeds one token per row with an attention mask that hides the padding and per-row position ids, as ``generate``
does for a left-padded batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


class BatchCache:
    """The running rows' KV cache (a transformers ``DynamicCache``), its attention mask and each row's length."""

    def __init__(self) -> None:
        self.cache = None  # DynamicCache | None
        self.mask: Tensor | None = None  # (B, L) 1 = real token, 0 = left padding
        self.lengths: Tensor | None = None  # (B,) real tokens per row (its next position id)

    @property
    def rows(self) -> int:
        return 0 if self.mask is None else self.mask.shape[0]

    def add(self, cache: object, length: int) -> None:
        """Stack a prefilled single-row cache (``(1, H, length, D)`` per layer) under the running rows."""
        new_mask = torch.ones(1, length, dtype=torch.long)
        if self.cache is None:
            self.cache, self.mask, self.lengths = cache, new_mask, torch.tensor([length])
            return
        width = max(self.mask.shape[1], length)
        for layer, extra in zip(_layers(self.cache), _layers(cache)):
            layer.keys = torch.cat([_left_pad(layer.keys, width), _left_pad(extra.keys, width)])  # (B+1, H, W, D)
            layer.values = torch.cat([_left_pad(layer.values, width), _left_pad(extra.values, width)])
        self.mask = torch.cat([F.pad(self.mask, (width - self.mask.shape[1], 0)), F.pad(new_mask, (width - length, 0))])
        self.lengths = torch.cat([self.lengths, torch.tensor([length])])

    def keep(self, rows: list[int]) -> None:
        """Keep only ``rows`` (in that order); cut the leading columns no remaining row uses."""
        if not rows:
            self.cache = self.mask = self.lengths = None
            return
        index = torch.tensor(rows)
        self.mask, self.lengths = self.mask[index], self.lengths[index]
        start = int(self.mask.shape[1] - self.lengths.max())  # columns before this are padding in every row
        self.mask = self.mask[:, start:]
        for layer in _layers(self.cache):
            layer.keys = layer.keys[index, :, start:]  # (B', H, L', D)
            layer.values = layer.values[index, :, start:]

    def step_inputs(self) -> dict[str, Tensor]:
        """Mask, position ids and cache position for feeding one more token to every row."""
        width = self.mask.shape[1]
        self.mask = torch.cat([self.mask, torch.ones(self.rows, 1, dtype=torch.long)], dim=1)  # (B, L+1)
        positions = self.lengths.unsqueeze(1).clone()  # (B, 1)
        self.lengths = self.lengths + 1
        return {"attention_mask": self.mask, "position_ids": positions, "cache_position": torch.tensor([width])}


def _layers(cache: object) -> list:
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise TypeError(f"expected a transformers DynamicCache with .layers, got {type(cache).__name__}; this needs "
                        f"transformers >= 4.56")
    # Sliding-window and other layer kinds keep more state than keys and values (e.g. how many tokens they saw),
    # which padding and slicing rows here would not keep right.
    odd = sorted({type(layer).__name__ for layer in layers if type(layer).__name__ != "DynamicLayer"})
    if odd:
        raise NotImplementedError(f"the served model's KV cache has {odd} layers (sliding-window attention?); "
                                  f"continuous batching here supports full-attention models (Llama, GPT-2, ...)")
    return layers


def _left_pad(x: Tensor, width: int) -> Tensor:
    return F.pad(x, (0, 0, width - x.shape[2], 0))  # (B, H, L, D) -> (B, H, width, D)
