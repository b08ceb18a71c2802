"""Mixed-batch inference: one forward (or ``generate``) where each batch row uses its own adapter, or none.

Multi-LoRA servers (Punica, S-LoRA, vLLM, LoRAX) keep one base model and pick the adapter per request. Here, inside
``with mixed_batch(model, ["legal", "base", "medical", ...]):``, every LoRA layer computes the base output once
for the whole batch and adds to row ``i`` the update of adapter ``names[i]``, without merging and without a loop
over requests or adapters:

* each layer keeps its adapters in one stacked buffer per factor, ``A (N+1, r_max, in)`` and ``B (N+1, out, r_max)``,
  smaller ranks zero-padded and a zero slot for the bare base (padding and the zero slot add exact zeros), and the
  adapters' parameters *are views into it*: every write to an adapter, through autograd, an optimizer, ``.data`` or
  ``load_state_dict``, lands in the stack, so it is never stale and never re-stacked per call. It is rebuilt only
  when an adapter is added or deleted, a parameter gets new storage (``.data = ...``, ``.to(...)``) or a scale
  changes;
* per call, the rows' slots are gathered once and reused by every forward of the block (``generate``'s decoding
  steps);
* the update is two batched matmuls, ``baddbmm(result, bmm(A[rows], x^T)^T, B[rows]^T)``: the same FLOPs as a single
  adapter, whatever the number of adapters, where a per-adapter loop (PEFT's ``adapter_names``) pays a gather,
  two small matmuls and a scatter per adapter and layer;
* a layer where every row uses the same adapter takes the ordinary single-adapter path, and one where no row's
  adapter is present returns the base output untouched.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from lightning_lora import LoRAConfig, apply_lora, mixed_batch
    >>> model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    >>> _ = apply_lora(model, LoRAConfig(r=2, targets=["0"]), name="legal")
    >>> _ = apply_lora(model, LoRAConfig(r=4, targets=["0", "2"]), name="medical")
    >>> with torch.no_grad(), mixed_batch(model, ["legal", "base", "medical"]):
    ...     out = model(torch.randn(3, 8))  # row 0: legal, row 1: the bare base, row 2: medical
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn

from lightning_lora.surgery.errors import MixedBatchError, SurgeryError, UnknownAdapterError
from lightning_lora.surgery.lora.active import require_lora_adapters
from lightning_lora.surgery.lora.inventory import lora_layers
from lightning_lora.surgery.lora.layer import LoRALayer

BASE = "base"
"""The row name meaning "the bare base model, no adapter" (PEFT's ``"__base__"`` is accepted too)."""

_BASE_NAMES = (BASE, "__base__")
_STACK_ATTR = "_mixed_batch_stack"




@contextlib.contextmanager
def mixed_batch(model: nn.Module, adapter_names: Sequence[str], *, num_beams: int = 1) -> Iterator[nn.Module]:
    """Inside the block, row ``i`` of every forward uses adapter ``adapter_names[i]`` (``"base"``: no adapter).

    Covers ``model(...)`` and ``model.generate(...)`` (whose forwards all see the same rows). Outputs match running
    each row alone with its adapter active, up to fp32 rounding. Adapters only: ``modules_to_save`` and trained
    biases are shared by every row.

    Args:
        model: A model with LoRA layers, in eval mode, no adapter merged.
        adapter_names: One adapter name per batch row; ``"base"`` (or ``"__base__"``) for the bare base model.
        num_beams: Rows are also accepted ``num_beams`` times each, in order (``generate(num_beams=k)`` repeats
            every input row ``k`` times). Default: 1.

    Yields:
        The model.

    Raises:
        UnknownAdapterError: If a name is not an adapter of the model (the message lists the known ones).
        MixedBatchError: If ``adapter_names`` is not a list of names, or (during a forward) a layer gets a batch
            whose size is neither ``len(adapter_names)`` nor ``len(adapter_names) * num_beams``.
        SurgeryError: If the model is in training mode, has merged or disabled adapters, no LoRA layers, or is
            already inside ``mixed_batch``.
    """
    layers = lora_layers(model)  # one walk of the model per block: a server enters a block per decoding step
    if not isinstance(adapter_names, str):
        require_lora_adapters(model, adapter_names, "mixed_batch", MixedBatchError)
    names = _check_names(layers, adapter_names, num_beams)
    _check_state(layers)
    router = RowRouter(names, num_beams, {id(layer): path for path, layer in layers})
    try:
        for _, layer in layers:
            layer.row_update = router
        yield model
    finally:
        for _, layer in layers:
            layer.__dict__.pop("row_update", None)


def clear_mixed_batch_cache(model: nn.Module) -> int:
    """Free the stacked adapter buffers that :func:`mixed_batch` keeps on each layer between calls (the adapters
    live in them while they are kept; this gives each adapter its own storage again).

    Returns:
        How many layers held one.
    """
    return sum(_release(layer) for _, layer in lora_layers(model))


# --------------------------------------------------------------------------------------------------- validation
def _check_names(layers: list[tuple[str, LoRALayer]], adapter_names: Sequence[str], num_beams: int) -> list[str]:
    if isinstance(adapter_names, str) or not all(isinstance(n, str) for n in adapter_names) or not adapter_names:
        raise MixedBatchError(f"mixed_batch: adapter_names={adapter_names!r}; give a non-empty list with one adapter "
                              f"name per batch row, e.g. ['legal', 'base', 'medical'].")
    if isinstance(num_beams, bool) or not isinstance(num_beams, int) or num_beams < 1:
        raise MixedBatchError(f"mixed_batch: num_beams={num_beams!r}; must be a positive integer (generate's num_beams).")
    known = list(dict.fromkeys(n for _, layer in layers for n in layer.specs))
    clash = [n for n in _BASE_NAMES if n in known]
    if clash:
        raise MixedBatchError(f"mixed_batch: the model has an adapter named {clash[0]!r}, which mixed_batch reserves for "
                              f"the bare base model; load or combine it under another name.")
    unknown = [n for n in dict.fromkeys(adapter_names) if n not in known and n not in _BASE_NAMES]
    if unknown:
        raise UnknownAdapterError(f"mixed_batch: no adapter named {', '.join(map(repr, unknown))} on this model; its "
                                  f"adapters are {known or 'none'}, and {BASE!r} means the bare base model.")
    return [BASE if n in _BASE_NAMES else n for n in adapter_names]


def _check_state(layers: list[tuple[str, LoRALayer]]) -> list[tuple[str, LoRALayer]]:
    if not layers:
        raise SurgeryError("mixed_batch: the model has no LoRA layers; apply_lora(model, config) or load_adapter(...) "
                           "first.")
    training = [p for p, layer in layers if layer.training]
    if training:
        raise SurgeryError(f"mixed_batch is for inference, but {len(training)} LoRA layers (e.g. {training[0]!r}) are in "
                           f"training mode; call model.eval() first.")
    merged = sorted({n for _, layer in layers for n in layer.merged_adapters})
    if merged:
        raise SurgeryError(f"mixed_batch: adapters {merged} are merged into the base weights, so rows cannot choose "
                           f"them; call unmerge_lora(model) first.")
    if any(layer.disabled for _, layer in layers):
        raise SurgeryError("mixed_batch: adapters are disabled (inside disable_adapters?); leave that block first, "
                           "or use 'base' as the row's adapter name.")
    if any(layer.row_update is not None for _, layer in layers):
        raise SurgeryError("mixed_batch: the model is already inside a mixed_batch block; blocks cannot be nested.")
    return layers


# --------------------------------------------------------------------------------------------------- the forward
class RowRouter:
    """The ``row_update`` hook of every LoRA layer inside one :func:`mixed_batch` block: row ``i`` gets adapter
    ``names[i]``. Public so that a server can keep one installed across decoding steps while its rows do not change
    (the per-block gather is then reused), as :mod:`lightning_lora.serve.routing` does."""

    def __init__(self, names: list[str], num_beams: int, paths: dict[int, str]) -> None:
        self.names = names
        self.num_beams = num_beams
        self.paths = paths
        # (layer, rows) -> gathered (At, Bt) rows | the one adapter of every row | None (nothing to add), for this block
        self._plans: dict[tuple[int, int], object] = {}

    def __call__(self, layer: LoRALayer, result: Tensor, x: Tensor) -> Tensor:
        if layer.training or layer.merged_adapters:  # switched after entering the block
            _check_state([(self.paths.get(id(layer), "?"), layer)])
        rows = x.shape[0] if x.dim() > 1 else -1
        key = (id(layer), rows)
        plan = self._plans.get(key, _MISSING)
        if plan is _MISSING:
            plan = self._plans[key] = self._plan(layer, rows)
        if plan is None:
            return result
        if isinstance(plan, str):
            return layer.add_update(result, x, plan)
        at, bt, scale = plan  # (n, r, in), (n, out, r), (n, 1, 1)
        x3 = x.reshape(rows, -1, layer.in_features).to(at.dtype)  # (n, T, in)
        # A x^T rather than x A^T: the batched matmul's output is wider (T columns, not r), which it runs faster.
        ax = torch.bmm(at, x3.transpose(1, 2))  # (n, r, in) @ (n, in, T) -> (n, r, T)
        ax = ax * scale if ax.requires_grad else ax.mul_(scale)  # each row's alpha / r
        xa, bt = ax.transpose(1, 2), bt.transpose(1, 2)  # (n, T, r), (n, r, out): views
        out_shape = result.shape
        result3 = result.reshape(rows, -1, layer.out_features)  # (n, T, out)
        if result3.dtype != bt.dtype:
            return (result3 + torch.bmm(xa, bt).to(result3.dtype)).view(out_shape)
        graph = result.requires_grad and torch.is_grad_enabled()
        if graph or not result.is_contiguous() or not layer.may_write_base_output():
            return torch.baddbmm(result3, xa, bt).view(out_shape)  # (n, T, out) + (n, T, r) @ (n, r, out)
        # No graph and no hook that kept the base output: add into it, saving an (n, T, out) copy (as _add_update).
        return result3.baddbmm_(xa, bt).view(out_shape)

    def _plan(self, layer: LoRALayer, rows: int) -> object:
        names = self._row_names(layer, rows)
        present = [n for n in names if n in layer.specs]
        if not present:
            return None
        if len(present) == len(names) and len(set(present)) == 1:
            return present[0]  # every row the same adapter: the ordinary single-adapter path
        slots, at, bt, scales = _stack(layer)
        index = [slots.get(n, len(slots)) for n in names]
        # One gather per layer and block, of the slots as stored (contiguous blocks): a transposing copy (the earlier
        # torch.stack of `.t()` views) cost 4-5x more, more than the batched matmuls themselves, and a Python loop of
        # views adds ~1800 tensor ops a block on a 56-layer model (profiled 2026-12-06 on 1-2 threads: index_select
        # 0.03-0.05 ms per layer, stack of views 0.08 ms, transposing stack 0.23-0.50 ms). The matmuls read the
        # gathered blocks transposed for free; the scale goes on A x^T (n, r, T), the smallest term.
        rows_index = torch.tensor(index, device=at.device)
        at_rows = at.index_select(0, rows_index)  # (n, r, in)
        bt_rows = bt.index_select(0, rows_index)  # (n, out, r)
        scale = scales.index_select(0, rows_index).view(-1, 1, 1)  # (n, 1, 1)
        return at_rows, bt_rows, scale

    def _row_names(self, layer: LoRALayer, rows: int) -> list[str]:
        batch = len(self.names)
        if rows == batch:
            return self.names
        if self.num_beams > 1 and rows == batch * self.num_beams:
            return [n for n in self.names for _ in range(self.num_beams)]
        beams = f" (or {batch * self.num_beams} with num_beams={self.num_beams})" if self.num_beams > 1 else ""
        got = f"{rows} rows" if rows >= 0 else "an input without a batch dimension"
        raise MixedBatchError(
            f"mixed_batch: layer {self.paths.get(id(layer), '?')!r} got {got}, but {batch} adapter names were given"
            f"{beams}. Give one adapter name per batch row; for generate(num_beams=k) pass mixed_batch(..., num_beams=k)."
        )


_MISSING = object()


def _stack(layer: LoRALayer) -> tuple[dict[str, int], Tensor, Tensor, Tensor]:
    """The layer's adapters stacked for batched matmuls, the adapters' parameters made views into the stack.

    Cached on the layer (``layer.derived``) until an adapter is added or deleted (which clears it), a parameter's
    storage is replaced, or a scale changes. In-place writes need no check: they write into the stack.

    Returns:
        Slot of each adapter name; ``A (N+1, r_max, in)``; ``B (N+1, out, r_max)``; the scale of each slot.
        Slot ``N`` is all zeros, scale 0 (rows of the bare base, or of adapters this layer does not have).
    """
    names = list(layer.specs)
    cached = layer.derived.get(_STACK_ATTR)
    if cached is not None and _still_valid(layer, cached[0]):
        return cached[1], cached[2], cached[3], cached[4]
    first = layer.lora_A[names[0]]
    r_max = max(layer.specs[n].r for n in names)
    # Built outside inference mode, so that a later call with autograd on can still use it.
    with torch.inference_mode(False), torch.no_grad():
        at = torch.zeros(len(names) + 1, r_max, layer.in_features, dtype=first.dtype, device=first.device)
        bt = torch.zeros(len(names) + 1, layer.out_features, r_max, dtype=first.dtype, device=first.device)
        for slot, name in enumerate(names):
            r = layer.specs[name].r
            _adopt(layer.lora_A[name], at[slot, :r, :])  # (r, in)
            _adopt(layer.lora_B[name], bt[slot, :, :r])  # (out, r)
        scales = torch.tensor([layer.specs[n].scale for n in names] + [0.0], dtype=at.dtype, device=at.device)  # (N+1,)
    slots = {n: i for i, n in enumerate(names)}
    layer.derived[_STACK_ATTR] = (_stack_key(layer), slots, at, bt, scales)
    return slots, at, bt, scales


def _adopt(param: Tensor, view: Tensor) -> None:
    """Copy ``param`` into ``view`` (a slot of the stack) and make the view its storage, when dtype and device match."""
    view.copy_(param.detach())
    if param.dtype == view.dtype and param.device == view.device:
        param.data = view


def _stack_key(layer: LoRALayer) -> tuple[object, ...]:
    """What the stack was built from: the adapters' spec and parameter objects, and where each parameter's data
    lives (as ids and pointers, so that :func:`_still_valid` compares plain tuples)."""
    params = [*layer.lora_A._parameters.values(), *layer.lora_B._parameters.values()]
    # The specs are compared as objects (identity first, then fields); the parameters by id, the key keeping them
    # alive (key[3]) so that an id cannot be reused by a new parameter.
    return (tuple(layer.specs.values()), tuple(map(id, params)), _data_state(params), tuple(params))


def _data_state(params: list[Tensor]) -> tuple[object, ...]:
    # A parameter that is a view into the stack keeps its data_ptr until its storage is replaced. One that could not be
    # adopted (another dtype or device than the first adapter) is a copy: its version counter is the best signal
    # available there (it misses writes through `.data`).
    adopted = params[0].dtype
    return tuple((p.data_ptr(), 0 if p.dtype == adopted else p._version) for p in params)


def _still_valid(layer: LoRALayer, key: tuple[object, ...]) -> bool:
    """Whether the stack still holds the layer's adapters; run for every layer of every block, so it compares tuples
    of ids and pointers only. Adding or deleting an adapter clears the stack anyway (``layer.derived``)."""
    params = [*layer.lora_A._parameters.values(), *layer.lora_B._parameters.values()]
    return (key[0] == tuple(layer.specs.values()) and key[1] == tuple(map(id, params))
            and key[2] == _data_state(params))


def _release(layer: LoRALayer) -> bool:
    """Drop the layer's stack and give every adapter parameter its own storage again (the stack is freed)."""
    cached = layer.derived.pop(_STACK_ATTR, None)
    if cached is None:
        return False
    with torch.no_grad():
        for factors in (layer.lora_A, layer.lora_B):
            for param in factors.values():
                if param.untyped_storage().data_ptr() in (cached[2].untyped_storage().data_ptr(),
                                                         cached[3].untyped_storage().data_ptr()):
                    param.data = param.data.clone()
    return True
