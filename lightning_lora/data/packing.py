"""Packed training batches: a batch's rows concatenated into one sequence, with no padding at all.

This is transformers' padding-free convention (``DataCollatorWithFlattening``): ``input_ids`` and ``labels`` of shape
``(1, sum of row lengths)``, ``position_ids`` that restart at 0 at each row, and *no* ``attention_mask``. Models that
support it (Llama, Mistral, Qwen2, ... with sdpa / eager / flash attention) detect the row starts from the position
ids and keep attention inside each row. They only do so without a KV cache, so the module must pass
``use_cache=False`` (measured with transformers 5.24: with a cache, rows attend to each other; max logit difference
0.20 on a tiny Llama).

Each batch keeps exactly the rows it would have had unpacked, so the examples per optimizer step and the loss (mean
over the answer tokens of the batch) are those of unpacked training; only the padding is gone. The first label of
each row is set to -100: after the model's one-token shift it would be the target of the previous row's last token
(unpacked it is never a target).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

IGNORE_INDEX = -100


def collate_packed(examples: Sequence[Any]) -> dict[str, torch.Tensor]:
    """Concatenate tokenised examples (``input_ids`` / ``labels`` lists) into one packed row.

    Args:
        examples: The examples of one batch (objects with ``input_ids`` and ``labels`` lists of equal length).

    Returns:
        ``input_ids``, ``labels``, ``position_ids``: ``(1, N)`` long tensors, ``N`` the total number of tokens.
    """
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    for example in examples:
        ids += example.input_ids
        labels += [IGNORE_INDEX, *example.labels[1:]]
        positions += range(len(example.input_ids))
    return {
        "input_ids": torch.tensor([ids], dtype=torch.long),  # (1, N)
        "labels": torch.tensor([labels], dtype=torch.long),  # (1, N)
        "position_ids": torch.tensor([positions], dtype=torch.long),  # (1, N), 0 at each row start
    }


def pad_fraction(lengths: Sequence[int], batches: Sequence[Sequence[int]], packed: bool) -> float:
    """Fraction of the tokens computed on that are padding, over ``batches`` (lists of row indices into ``lengths``).

    Unpacked, each batch is padded to its longest row; packed, there is no padding.
    """
    real = sum(lengths[i] for batch in batches for i in batch)
    computed = real if packed else sum(len(batch) * max(lengths[i] for i in batch) for batch in batches if batch)
    return 1.0 - real / computed if computed else 0.0


def packing_problems(model: torch.nn.Module) -> list[str]:
    """Why ``model`` cannot train on packed rows (empty when it can).

    Methods that prepend virtual tokens to every row (prompt tuning, P-tuning, prefix tuning) cannot: a packed row
    is one row to them, so only its first example would see the virtual tokens, and position ids would be shifted.
    They are found structurally, by their virtual-token module.
    """
    from lightning_lora.surgery.methods.virtual_tokens import VirtualTokens

    hosts = [(path, m) for path, m in model.named_modules() if isinstance(m, VirtualTokens) and m.active_adapters]
    return [f"{path or 'the model'} prepends virtual tokens (adapters {m.active_adapters}: prompt / P- / prefix "
            "tuning) to every row, and a packed row holds several examples" for path, m in hosts]
