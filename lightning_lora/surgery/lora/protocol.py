"""What every adapter-holding module offers, whatever its method: the one structural test for "this holds adapters".

A :class:`~lightning_lora.surgery.lora.layer.LoRALayer`, a bottleneck host on a block's output projection and the
virtual-token host of prompt / prefix tuning all satisfy :class:`AdapterModule`; inventory, activation and
checkpoint code walk the model for it (torchtune's ``AdapterModule.adapter_params()``), never for name substrings.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from torch import nn


@runtime_checkable
class AdapterModule(Protocol):
    """A module holding named adapters.

    Attributes:
        specs: Adapter name -> its per-module settings, in the order they were added.
        active_adapters: The adapters a forward applies.
        merged_adapters: The adapters folded into base weights (always empty where merging is impossible).
        disabled: When True a forward applies no adapter (``disable_adapters``).
    """

    specs: dict[str, Any]
    active_adapters: list[str]
    merged_adapters: list[str]
    disabled: bool

    def adapter_params(self) -> dict[str, dict[str, nn.Parameter]]:
        """Adapter name -> {parameter path relative to this module: parameter}."""
        ...

    def delete_adapter(self, name: str) -> None:
        """Remove adapter ``name`` from this module."""
        ...
