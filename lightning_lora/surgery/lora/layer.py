"""The LoRA wrapper: a base layer plus named low-rank adapters.

``y = base(x) + sum_a scale_a * B_a A_a dropout_a(x)`` over the active, unmerged adapters ``a``
(Hu et al. 2021, eq. 3). The wrapper composes the base layer instead of subclassing it, and A/B are plain
parameters, so tools that swap every ``nn.Linear`` never touch the adapter factors.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_lora.surgery._compat import global_forward_hooks
from lightning_lora.surgery.errors import MergeError, SurgeryError
from lightning_lora.surgery.lora.codecs import Codec, codec_for
from lightning_lora.surgery.lora.merge_math import Update, finite_by_bound, merge_into_, merged_copy
from lightning_lora.surgery.lora.tied import untie_


@dataclass(frozen=True)
class AdapterSpec:
    """One adapter's hyperparameters inside one layer."""

    r: int
    alpha: float
    dropout: float
    use_rslora: bool = False
    init: str = "kaiming"

    @property
    def scale(self) -> float:
        """``alpha / r`` (or ``alpha / sqrt(r)`` with rsLoRA)."""
        return self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r


class LoRALayer(nn.Module):
    """Wraps a base layer and holds any number of named adapters.

    Args:
        base_layer: The layer to adapt (``nn.Linear``, transformers ``Conv1D``, bitsandbytes ``Linear4bit``...).
        codec: How to read and write the base layer's dense weight.
    """

    def __init__(self, base_layer: nn.Module, codec: Codec) -> None:
        super().__init__()
        self.base_layer = base_layer
        self._codec = codec
        self.in_features, self.out_features = codec.features(base_layer)
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.lora_dropout = nn.ModuleDict()
        self.specs: dict[str, AdapterSpec] = {}
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False
        self._unmerged_weight: object | None = None  # the codec's snapshot of the unmerged weight
        self._tied_weight: nn.Parameter | None = None  # the shared weight a merge untied from (see surgery/lora/tied.py)
        # Values derived from the adapters (e.g. mixed_batch's stacked factors), dropped whenever adapters change.
        self.derived: dict[str, object] = {}

    # A wrapper is a drop-in for the layer it wraps: code outside reads `.weight` / `.bias` of the layer it adapted
    # (T5's feed-forward reads `self.wo.weight.dtype`), as it can with PEFT's wrappers.
    @property
    def weight(self) -> Tensor:
        """The base layer's weight (not including any adapter)."""
        return self.base_layer.weight

    @property
    def unmerged_weight(self) -> Tensor | None:
        """The base weight as it was before adapters were merged (kept by ``merge(keep_original=True)``), or None."""
        return self._unmerged_weight

    @property
    def bias(self) -> Tensor | None:
        """The base layer's bias, or None."""
        return getattr(self.base_layer, "bias", None)

    @property
    def codec(self) -> Codec:
        """How to read / write the base layer's dense weight, looked up again on each use: a precision plugin may swap
        the base layer's class after wrapping (Lightning's ``BitsandbytesPrecision`` turns it into a 4-bit layer)."""
        return codec_for(self.base_layer) or self._codec

    # ----------------------------------------------------------------------------------------------- adapters
    def add_adapter(self, name: str, spec: AdapterSpec, *, active: bool = True) -> None:
        """Create adapter ``name``: A initialised randomly, B at zero, so the layer's output is unchanged.

        Args:
            name: The adapter's name.
            spec: Its rank, alpha, dropout and initialisation.
            active: Add it to the adapters a forward applies. Default: True.
        """
        if name in self.specs:
            raise SurgeryError(f"This layer already has an adapter named {name!r}.")
        if self.merged_adapters:
            raise SurgeryError(f"Cannot add adapter {name!r} while adapters {self.merged_adapters} are merged; unmerge first.")
        dtype, device = self._adapter_dtype_device()
        a = torch.empty(spec.r, self.in_features, dtype=dtype, device=device)  # (r, in)
        if spec.init == "gaussian":
            nn.init.normal_(a, std=1 / spec.r)
        else:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # PEFT's default, as nn.Linear initialises its weight
        self.lora_A[name] = nn.Parameter(a)
        self.lora_B[name] = nn.Parameter(torch.zeros(self.out_features, spec.r, dtype=dtype, device=device))  # (out, r)
        self.lora_dropout[name] = nn.Dropout(spec.dropout) if spec.dropout > 0 else nn.Identity()
        self.specs[name] = spec
        if active:
            self.active_adapters.append(name)
        self.derived.clear()

    def adapter_params(self) -> dict[str, dict[str, nn.Parameter]]:
        """Adapter name -> its factors, keyed by their path in this layer (``lora_A.<name>``, ``lora_B.<name>``)."""
        return {n: {f"lora_A.{n}": self.lora_A[n], f"lora_B.{n}": self.lora_B[n]} for n in self.specs}

    def delete_adapter(self, name: str) -> None:
        """Remove adapter ``name`` (it must not be merged)."""
        if name in self.merged_adapters:
            raise SurgeryError(f"Adapter {name!r} is merged; unmerge it before deleting it.")
        for container in (self.lora_A, self.lora_B, self.lora_dropout):
            del container[name]
        del self.specs[name]
        if name in self.active_adapters:
            self.active_adapters.remove(name)
        self.derived.clear()

    def _adapter_dtype_device(self) -> tuple[torch.dtype, torch.device]:
        weight = getattr(self.base_layer, "weight", None)
        if weight is None:
            return torch.float32, torch.device("cpu")
        # Quantized storage (uint8, or a float dtype holding packed 4-bit values): adapters train in fp32, as in
        # QLoRA (Dettmers et al. 2023, sec. 3).
        quantized = self.codec.quantized or not weight.dtype.is_floating_point
        dtype = torch.float32 if quantized else weight.dtype
        return dtype, weight.device

    # ----------------------------------------------------------------------------------------------- forward
    # Set (per instance) only inside `mixed_batch(...)`: ``row_update(layer, result, x)`` adds each row's own adapter.
    row_update: Callable[[LoRALayer, Tensor, Tensor], Tensor] | None = None

    def forward(self, x: Tensor, *args: object, **kwargs: object) -> Tensor:
        """``base(x)`` plus each active, unmerged adapter's scaled low-rank update."""
        result = self.base_layer(x, *args, **kwargs)
        if self.disabled:
            return result
        if self.row_update is not None:  # a mixed batch, each row with its own adapter: see surgery/mixed.py
            return self.row_update(self, result, x)
        for name in self.active_adapters:
            if name not in self.merged_adapters:
                result = self.add_update(result, x, name)
        return result

    def add_update(self, result: Tensor, x: Tensor, name: str) -> Tensor:
        """``result + scale * B A dropout(x)`` for adapter ``name`` (in place into ``result`` when no graph is kept)."""
        a, b = self.lora_A[name], self.lora_B[name]  # (r, in), (out, r)
        x = self.lora_dropout[name](x.to(a.dtype))  # Identity when dropout is 0: no copy
        xa = F.linear(x, a)  # (..., in) @ (in, r) -> (..., r)
        scale = self.specs[name].scale
        if result.dtype != b.dtype or not result.is_contiguous():
            return result + (F.linear(xa, b) * scale).to(result.dtype)  # (..., r) @ (r, out) -> (..., out)
        flat, xa2 = result.view(-1, self.out_features), xa.reshape(-1, xa.shape[-1])  # (N, out), (N, r)
        # One fused kernel for `result + scale * xa @ B^T`, no separate scaled or summed temporaries; when no graph
        # is recorded it writes into the base layer's fresh output instead of allocating another (N, out) tensor.
        graph = torch.is_grad_enabled() and (result.requires_grad or xa.requires_grad or b.requires_grad)
        if not graph and self.may_write_base_output():
            return flat.addmm_(xa2, b.t(), alpha=scale).view(result.shape)  # (..., out)
        return torch.addmm(flat, xa2, b.t(), alpha=scale).view(result.shape)  # (..., out)

    def may_write_base_output(self) -> bool:
        """Whether the base layer's output may be changed in place (no forward hook can have kept it)."""
        # Adding in place into the base layer's output saves an (N, out) allocation per layer at inference, but a
        # forward hook on the base layer may have kept that tensor: then it must stay as the base layer returned it.
        return not self.base_layer._forward_hooks and not global_forward_hooks()

    # ----------------------------------------------------------------------------------------------- merging
    def delta_weight(self, name: str) -> Tensor:
        """``scale * B @ A`` in fp32: (out, r) @ (r, in) -> (out, in)."""
        return (self.lora_B[name].detach().float() @ self.lora_A[name].detach().float()) * self.specs[name].scale

    def merged_weight(self, names: list[str]) -> Tensor:
        """The base weight with ``names`` added, computed in fp32 (not written anywhere)."""
        weight = self.codec.get_weight(self.base_layer).float()
        for name in names:
            weight = weight + self.delta_weight(name)
        return weight

    def _updates(self, names: list[str]) -> list[Update]:
        return [(self.lora_B[n], self.lora_A[n], self.specs[n].scale) for n in names]  # (out, r), (r, in), s

    def check_merge(self, names: list[str], where: str) -> Tensor | None:
        """Raise :class:`MergeError` if merging ``names`` would give non-finite weights in the layer's dtype.

        Finiteness is proved from a bound where it can be (one read of the weight, see
        :mod:`~lightning_lora.surgery.lora.merge_math`); otherwise the merged weight is computed, cast to the
        layer's dtype and checked element by element (an fp16 weight that overflows is refused).

        Returns:
            The merged weight when it had to be computed for a dense layer (pass it to :meth:`merge` so that it is
            not computed twice), else None.
        """
        if not self.codec.mergeable:
            raise MergeError(f"{where}: cannot merge into a {self.codec.name} layer.")
        if not names:
            return None
        weight = self.codec.get_weight(self.base_layer)
        updates = self._updates(names)
        if finite_by_bound(weight, updates, weight.dtype):
            return None
        merged = merged_copy(weight, updates)
        if not bool(torch.isfinite(merged).all()):
            raise MergeError(f"{where}: merging adapters {names} gives non-finite weights (inf or NaN) in {weight.dtype}"
                             f" (largest finite value {torch.finfo(weight.dtype).max:g}); nothing was merged. Check the "
                             f"adapter for inf/NaN, or merge into a wider dtype (e.g. model.float()).")
        return None if self.codec.quantized else merged

    def merge(self, names: list[str] | None = None, *, keep_original: bool = True, merged: Tensor | None = None,
              scratch: dict[object, Tensor] | None = None) -> None:
        """Add the adapters' updates into the base weight, in place. Merging a merged adapter does nothing.

        Args:
            names: Adapters to merge. Default: the active ones.
            keep_original: Keep what the layer stores for its weight (a dense copy, or a quantized backend's packed
                tensors) so that :meth:`unmerge` restores it bit for bit.
            merged: The merged weight, already computed by :meth:`check_merge`; written as is.
            scratch: fp32 buffers reused across layers by one merge (see ``merge_math.merge_into_``).
        """
        todo = [n for n in (names if names is not None else self.active_adapters) if n not in self.merged_adapters]
        if not todo:
            return
        codec = self.codec
        if keep_original and self._unmerged_weight is None:
            self._unmerged_weight = codec.take_snapshot(self.base_layer)
        if merged is not None:
            codec.set_weight(self.base_layer, merged)
        elif codec.in_place:
            merge_into_(codec.get_weight(self.base_layer), self._updates(todo), scratch)
        else:
            codec.set_weight(self.base_layer, merged_copy(codec.get_weight(self.base_layer), self._updates(todo)))
        self.merged_adapters.extend(todo)

    def untie(self, *, keep: bool) -> None:
        """Give the base layer its own copy of a weight it shares with another module (a tied ``lm_head``), in place,
        so that a merge does not write into the other module. With ``keep``, :meth:`unmerge` re-ties it."""
        shared = untie_(self.base_layer)
        if keep:
            self._tied_weight = shared

    def unmerge(self) -> None:
        """Take every merged adapter's update out of the base weight again (exactly, when the original was kept)."""
        if not self.merged_adapters:
            return
        if self._tied_weight is not None:  # merged into an untied copy: share the original weight again
            self.base_layer.weight = self._tied_weight
            self._tied_weight = None
        elif self._unmerged_weight is not None:
            self.codec.put_back(self.base_layer, self._unmerged_weight)
        else:
            weight = self.codec.get_weight(self.base_layer).float()
            for name in self.merged_adapters:
                weight = weight - self.delta_weight(name)
            self.codec.set_weight(self.base_layer, weight)
        self._unmerged_weight = None
        self.merged_adapters.clear()

    def extra_repr(self) -> str:
        adapters = ", ".join(f"{n}(r={s.r}, scale={s.scale:g})" for n, s in self.specs.items())
        return (f"{self.codec.name} in={self.in_features} out={self.out_features} adapters=[{adapters}] "
                f"merged={self.merged_adapters}")
