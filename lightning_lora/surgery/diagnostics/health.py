"""Health statistics of adapters: which tensors are adapter tensors, and the checks that catch silent failures.

Plain PyTorch, no Lightning: :class:`~lightning_lora.callbacks.AdapterHealth` wires these into training hooks and
:func:`~lightning_lora.surgery.doctor.diagnose_adapter` uses them on a loaded adapter.

:func:`adapter_units` turns every adapter module of every method (found structurally by
:func:`~lightning_lora.surgery.lora.inventory.adapter_modules`, never by a name substring) into
:class:`AdapterUnit` s; LoRA units also know their dense update ``scale * B A``. Every check below covers every
method.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from lightning_lora.surgery.lora.inventory import adapter_configs, adapter_modules
from lightning_lora.surgery.lora.layer import LoRALayer
from lightning_lora.surgery.lora.protocol import AdapterModule


@dataclass(frozen=True)
class AdapterUnit:
    """One adapter in one layer: the tensors that together make its update, and how to measure that update.

    Attributes:
        path: Module path of the layer inside the model given to :func:`adapter_units`.
        method: The PEFT method, e.g. ``"lora"``.
        adapter: The adapter's name.
        tensors: Its trainable tensors by local name (LoRA: ``{"lora_A": (r, in), "lora_B": (out, r)}``).
        active: Whether the adapter takes part in the forward pass (enabled, active, not merged).
        scale: The factor its update is multiplied by (LoRA: ``alpha / r``); ``None`` where a method has none.
        update: ``() -> (out, in)`` dense update it adds to the base weight, or ``None`` if the method has none.
        base_weight: ``() -> (out, in)`` the weight it adapts (dense), or ``None``.
    """

    path: str
    method: str
    adapter: str
    tensors: dict[str, nn.Parameter]
    active: bool
    scale: float | None = None
    update: Callable[[], Tensor] | None = field(default=None, repr=False)
    base_weight: Callable[[], Tensor] | None = field(default=None, repr=False)

    @property
    def label(self) -> str:
        """``path`` (and ``[adapter]`` when it is not the default adapter)."""
        return self.path if self.adapter == "default" else f"{self.path}[{self.adapter}]"


def _lora_units(path: str, layer: LoRALayer) -> list[AdapterUnit]:
    units = []
    for name, spec in layer.specs.items():
        active = not layer.disabled and name in layer.active_adapters and name not in layer.merged_adapters
        units.append(AdapterUnit(
            path=path, method="lora", adapter=name,
            tensors={"lora_A": layer.lora_A[name], "lora_B": layer.lora_B[name]},
            active=active, scale=spec.scale,
            update=lambda layer=layer, name=name: layer.delta_weight(name),  # (out, in), fp32
            base_weight=lambda layer=layer: _base_weight(layer),
        ))
    return units


def _base_weight(layer: LoRALayer) -> Tensor:
    # The unmerged base, when adapters are merged into it, so the ratio is against the weight they adapt.
    weight = layer.unmerged_weight if layer.unmerged_weight is not None else layer.codec.get_weight(layer.base_layer)
    return weight.detach().float()


def _other_units(path: str, module: AdapterModule, configs: dict[str, object]) -> list[AdapterUnit]:
    # Virtual tokens, prefixes and bottleneck adapters add no dense weight update: no scale, no update size.
    return [AdapterUnit(path=path, method=getattr(configs.get(name), "method", type(module).__name__), adapter=name,
                        tensors=dict(params),
                        active=not module.disabled and name in module.active_adapters)
            for name, params in module.adapter_params().items()]


def adapter_units(model: nn.Module, adapter: str | None = None) -> list[AdapterUnit]:
    """Every adapter unit of every method in ``model``, in model order.

    Args:
        model: Any module.
        adapter: Only this adapter's units. Default: all adapters.
    """
    configs = adapter_configs(model)
    units = []
    for path, module in adapter_modules(model):
        found = _lora_units(path, module) if isinstance(module, LoRALayer) else _other_units(path, module, configs)
        units += [u for u in found if adapter is None or u.adapter == adapter]
    return units


def adapter_parameter_ids(units: Iterable[AdapterUnit]) -> set[int]:
    """``id`` of every tensor of ``units`` (to test membership in optimizer param groups)."""
    return {id(t) for unit in units for t in unit.tensors.values()}


# ------------------------------------------------------------------------------------------------ before training
def pre_training_problems(units: list[AdapterUnit], optimizer_params: Iterable[Tensor]) -> list[str]:
    """Why the trainable adapters would not learn, one line per problem (empty when all is well).

    Checked for each unit with a tensor that requires grad: every trainable tensor is in an optimizer, the adapter is
    active, its scale is finite and > 0, and not all of its tensors are zero (LoRA with A = B = 0 gets
    no gradient at all: dL/dA = B^T (...) = 0 and dL/dB = (...) A^T = 0).

    Args:
        units: From :func:`adapter_units`.
        optimizer_params: Every tensor in every optimizer param group.
    """
    in_optimizer = {id(p) for p in optimizer_params}
    trained = [u for u in units if any(t.requires_grad for t in u.tensors.values())]
    problems = []
    for unit in trained:
        missing = [n for n, t in unit.tensors.items() if t.requires_grad and id(t) not in in_optimizer]
        if missing:
            problems.append(f"{unit.label}: {', '.join(missing)} in no optimizer param group (never updated)")
        if not unit.active:
            problems.append(f"{unit.label}: adapter {unit.adapter!r} is not active (disabled, inactive or merged): "
                            "it takes no part in the forward pass, so it gets no gradient")
        if unit.scale is not None and not (unit.scale > 0 and unit.scale != float("inf")):
            problems.append(f"{unit.label}: scale {unit.scale!r} (alpha / r) must be finite and > 0; alpha = 0 "
                            "multiplies every update by zero")
        if all(not _local(t).any() for t in unit.tensors.values()):
            problems.append(f"{unit.label}: all of {', '.join(unit.tensors)} are zero, so no tensor ever gets a "
                            "gradient (initialise A randomly, B at zero)")
    return problems


def partly_frozen(units: list[AdapterUnit]) -> list[str]:
    """``"<layer>: lora_A"`` for units that train some tensors and freeze others (LoRA-FA does this on purpose)."""
    found = []
    for unit in units:
        frozen = [n for n, t in unit.tensors.items() if not t.requires_grad]
        if frozen and len(frozen) < len(unit.tensors):
            found.append(f"{unit.label}: {', '.join(frozen)}")
    return found


# ------------------------------------------------------------------------------------------------ during training
def units_without_grad(units: list[AdapterUnit]) -> list[AdapterUnit]:
    """The trainable units none of whose tensors holds a non-zero gradient (call after a backward pass).

    Per unit, not per tensor: with B initialised to zero, A's gradient is zero at the first step by design.
    """
    trained = [u for u in units if any(t.requires_grad for t in u.tensors.values())]
    return [u for u in trained if all(t.grad is None or not _local(t.grad).any() for t in u.tensors.values())]


def nonfinite_tensors(units: list[AdapterUnit], *, grads: bool = False) -> list[str]:
    """``"<layer>.<tensor>"`` for each adapter tensor (or its gradient) holding inf or NaN.

    One device synchronisation when everything is finite (the common case), a scan only when something is not.
    """
    pairs = [(f"{u.label}.{n}", t.grad if grads else t) for u in units for n, t in u.tensors.items()]
    pairs = [(label, t) for label, t in pairs if t is not None]
    if not pairs:
        return []
    flags = torch.stack([torch.isfinite(_local(t)).all() for _, t in pairs])  # (n,) on the tensors' device
    if bool(flags.all()):
        return []
    return [label for (label, _), ok in zip(pairs, flags.tolist()) if not ok]


def relative_update_sizes(units: list[AdapterUnit]) -> dict[str, float]:
    """``||scale * B A||_F / ||W||_F`` per unit (``label -> ratio``), for the methods with a dense update.

    A ratio of exactly 0 means the adapter has not changed the layer at all (e.g. B still zero).
    """
    sizes = {}
    with torch.no_grad():
        for unit in units:
            if unit.update is None or unit.base_weight is None:
                continue
            base_norm = torch.linalg.matrix_norm(unit.base_weight()).item()
            update_norm = torch.linalg.matrix_norm(unit.update()).item()
            sizes[unit.label] = update_norm / base_norm if base_norm > 0 else update_norm
    return sizes


def _local(tensor: Tensor) -> Tensor:
    # A sharded (FSDP2 DTensor) parameter is checked on this rank's shard; callers reduce the verdict across ranks.
    return (tensor.to_local() if hasattr(tensor, "to_local") else tensor).detach()


def describe(labels: list[str], limit: int = 8) -> str:
    """``a, b, c ... and N more``."""
    return ", ".join(labels[:limit]) + (f" ... and {len(labels) - limit} more" if len(labels) > limit else "")
