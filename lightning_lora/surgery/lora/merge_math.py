"""The arithmetic of a merge, ``W' = cast(W + sum_a s_a B_a A_a)``, computed once and checked in the layer's dtype.

A checked merge must refuse a result that is not finite *in the dtype written* (an fp16 weight overflows at 65504
while the fp32 sum is finite). Computing every merged weight to check it, then again to write it, costs twice PEFT's
unchecked ``merge_and_unload``. Instead, :func:`finite_by_bound` proves finiteness from one read of ``W`` and the
small factors: ``|W + s B A|_max <= |W|_max + |s| max_i sum_k |B_ik| |A|_max``; when the bound is below half the
dtype's largest value the cast result is finite (fp32 rounding adds a relative ``r * 2^-24`` at most). Only a layer
whose bound fails (huge values, or inf / NaN already present) is computed exactly and checked element by element.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

Update = tuple[Tensor, Tensor, float]
"""One adapter's ``(B (out, r), A (r, in), scale)``."""


def finite_by_bound(weight: Tensor, updates: Sequence[Update], dtype: torch.dtype) -> bool:
    """Whether ``weight + sum s B A``, cast to ``dtype``, is finite for certain (False: unknown, check exactly).

    Args:
        weight: The base weight ``(out, in)``, any float dtype.
        updates: ``(B, A, scale)`` per adapter.
        dtype: The dtype the merged weight is written in.
    """
    if not dtype.is_floating_point or weight.numel() == 0:
        return False
    with torch.no_grad():
        low, high = (v.item() for v in torch.aminmax(weight))  # one read of W; inf and NaN propagate
        if not (math.isfinite(low) and math.isfinite(high)):
            return False
        bound = max(abs(low), abs(high))
        for b, a, scale in updates:
            rows = b.detach().abs().float().sum(dim=1).max().item()  # (out, r) -> max_i sum_k |B_ik|
            bound += abs(scale) * rows * a.detach().abs().max().item()  # Python floats: float64, no overflow
    return math.isfinite(bound) and bound <= 0.5 * torch.finfo(dtype).max


def add_updates_(target: Tensor, updates: Sequence[Update]) -> Tensor:
    """``target += s B A`` for each update, in place, one fused ``addmm_`` each (``target`` is fp32 here)."""
    with torch.no_grad():
        for b, a, scale in updates:
            target.addmm_(b.detach().to(target.dtype), a.detach().to(target.dtype), alpha=scale)  # (out, r) @ (r, in)
    return target


def merged_copy(weight: Tensor, updates: Sequence[Update], out: Tensor | None = None) -> Tensor:
    """``cast(fp32(W) + sum s B A)`` as a new tensor in ``weight``'s dtype (``weight`` is not changed).

    Args:
        weight: The base weight ``(out, in)``.
        updates: ``(B, A, scale)`` per adapter.
        out: An fp32 scratch buffer of ``weight``'s shape to compute in (reused across layers). Default: a new one.
    """
    buffer = out if out is not None else torch.empty(weight.shape, dtype=torch.float32, device=weight.device)
    with torch.no_grad():
        buffer.copy_(weight)
        add_updates_(buffer, updates)
        if out is None and weight.dtype == torch.float32:
            return buffer  # already a new tensor in the weight's dtype
        return buffer.to(weight.dtype, copy=True)


def merge_into_(weight: Tensor, updates: Sequence[Update], scratch: dict[object, Tensor] | None = None) -> None:
    """``W <- cast(fp32(W) + sum s B A)``, in place into the writable weight view ``weight``.

    fp32 weights are updated directly (``addmm_``: no temporary); lower precisions go through an fp32 buffer taken
    from ``scratch`` (one per shape and device, reused by every layer of a merge) and are cast once.
    """
    with torch.no_grad():
        if weight.dtype == torch.float32:
            add_updates_(weight, updates)
            return
        key = (tuple(weight.shape), weight.device)
        buffer = None if scratch is None else scratch.get(key)
        if buffer is None:
            buffer = torch.empty(weight.shape, dtype=torch.float32, device=weight.device)
            if scratch is not None:
                scratch[key] = buffer
        buffer.copy_(weight)
        add_updates_(buffer, updates)
        weight.copy_(buffer)
