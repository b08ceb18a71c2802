"""Bottleneck adapters: small ``Linear -> nonlinearity -> Linear`` modules added, residually, to sublayer outputs.

``h' = h + W_up f(W_down h)`` on the output ``h`` of a block's attention (its output projection) and / or of its
MLP (its down projection), before the block's own residual addition:

* ``"houlsby"`` (Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP", fig. 2): two adapters per
  block, after the attention and after the MLP.
* ``"pfeiffer"`` (Pfeiffer et al. 2020, "AdapterFusion"): one adapter per block, after the MLP.

``W_up`` starts at zero, so a fresh adapter leaves every output exactly unchanged (``h + 0 == h``). Not mergeable:
the nonlinearity cannot be folded into a weight matrix. The adapters live in a host module attached to the
projection (``<proj>.peft_bottleneck``) and run from a forward hook, so the projection itself is not replaced and
LoRA can still wrap it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch.nn.functional as F
from torch import Tensor, nn

from lightning_lora.surgery.errors import BottleneckConfigError, ConfigError
from lightning_lora.surgery.lora.config import ConfigDict, layer_problems
from lightning_lora.surgery.methods._common import one_of, positive_int, raise_problems

Placement = Literal["houlsby", "pfeiffer"]
Nonlinearity = Literal["relu", "gelu", "swish"]
HOST = "peft_bottleneck"
_ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "swish": F.silu}


@dataclass(frozen=True, eq=True)
class BottleneckConfig(ConfigDict):
    """Bottleneck adapters in every selected block (Houlsby or Pfeiffer placement).

    Trains ``2 * d * size + size + d`` parameters per adapter (``d`` = the block's hidden width).

    Args:
        size: Bottleneck width. Give this or ``reduction_factor``. Default: None.
        reduction_factor: Bottleneck width as ``d / reduction_factor`` (rounded, at least 1). Default: None (16
            when ``size`` is not given either).
        placement: ``"houlsby"`` (after attention and after the MLP) or ``"pfeiffer"`` (after the MLP).
            Default: ``"houlsby"``.
        nonlinearity: ``"relu"``, ``"gelu"`` or ``"swish"``. Default: ``"relu"``.
        layers: Which blocks, as ``LoRAConfig.layers`` (indices or a slice string like ``"-8:"``). Default: all.
        init: ``"zero-up"``: the down projection is initialised like ``nn.Linear``, the up projection and its bias
            are zero, so a fresh adapter changes nothing. Default: ``"zero-up"``.
    """

    size: int | None = None
    reduction_factor: float | None = None
    placement: Placement = "houlsby"
    nonlinearity: Nonlinearity = "relu"
    layers: str | list[int] | None = None
    init: Literal["zero-up"] = "zero-up"

    error_type: ClassVar[type[ConfigError]] = BottleneckConfigError
    method: ClassVar[str] = "bottleneck adapters"
    merge_refusal: ClassVar[str] = "the nonlinearity between its two projections cannot be folded into a weight matrix"

    def __post_init__(self) -> None:
        if isinstance(self.layers, tuple):
            object.__setattr__(self, "layers", list(self.layers))
        if isinstance(self.layers, str):
            object.__setattr__(self, "layers", self.layers.strip().strip("'\"").strip())
        problems = []
        if self.size is not None and self.reduction_factor is not None:
            problems.append(f"size={self.size!r} and reduction_factor={self.reduction_factor!r}: give one of them.")
        if self.size is not None:
            problems += positive_int("size", self.size, "64")
        if self.reduction_factor is not None and (isinstance(self.reduction_factor, bool)
                                                  or not isinstance(self.reduction_factor, (int, float))
                                                  or not self.reduction_factor > 0):
            problems.append(f"reduction_factor={self.reduction_factor!r}: must be a positive number, e.g. 16.")
        problems += one_of("placement", self.placement, ("houlsby", "pfeiffer"))
        problems += one_of("nonlinearity", self.nonlinearity, ("relu", "gelu", "swish"))
        problems += one_of("init", self.init, ("zero-up",))
        problems += layer_problems(self.layers)
        raise_problems(BottleneckConfigError, "BottleneckConfig", problems)

    def __hash__(self) -> int:
        return hash(repr(self))

    def width(self, d: int) -> int:
        """The bottleneck width for sublayer width ``d``."""
        if self.size is not None:
            return self.size
        return max(1, round(d / (self.reduction_factor or 16)))


class Bottleneck(nn.Module):
    """``h -> h + up(f(down(h)))``; ``down``: ``(d -> m)``, ``up``: ``(m -> d)``, ``up`` zero at the start."""

    def __init__(self, d: int, m: int, nonlinearity: str) -> None:
        super().__init__()
        self.down = nn.Linear(d, m)
        self.up = nn.Linear(m, d)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.nonlinearity = nonlinearity

    def forward(self, h: Tensor) -> Tensor:
        x = h.to(self.down.weight.dtype)
        delta = self.up(_ACTIVATIONS[self.nonlinearity](self.down(x)))  # (..., d) -> (..., m) -> (..., d)
        return h + delta.to(h.dtype)


class BottleneckHost(nn.Module):
    """The bottleneck adapters on one projection, by name (an ``AdapterModule``); applied by a forward hook."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.features = features
        self.adapters = nn.ModuleDict()
        self.specs: dict[str, Any] = {}
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False

    def adapter_params(self) -> dict[str, dict[str, nn.Parameter]]:
        """Adapter name -> its parameters, keyed ``adapters.<name>.<down|up>.<weight|bias>``."""
        return {n: {f"adapters.{n}.{k}": p for k, p in self.adapters[n].named_parameters()} for n in self.specs}

    def delete_adapter(self, name: str) -> None:
        """Forget adapter ``name`` (the host stays, empty: a no-op)."""
        del self.adapters[name]
        self.specs.pop(name)
        if name in self.active_adapters:
            self.active_adapters.remove(name)

    def forward(self, h: Tensor) -> Tensor:
        if self.disabled:
            return h
        for name in self.active_adapters:  # several active adapters apply in sequence (stacking)
            h = self.adapters[name](h)
        return h


def apply_host_hook(module: nn.Module, args: tuple, output: Any) -> Any:
    """Forward hook on an adapted projection: run its :class:`BottleneckHost` on the output."""
    host = module._modules.get(HOST)
    if host is None or host.disabled or not host.active_adapters:
        return None
    if isinstance(output, tuple):
        return (host(output[0]), *output[1:])
    return host(output)
