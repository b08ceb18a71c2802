"""Per-row adapters for the engine's decode steps, kept between steps while the batch's rows stay the same.

:func:`lightning_lora.mixed_batch` validates the model (three walks over its modules) and gathers every layer's
row adapters afresh on each entry: right for one call, but a server enters it once per decode step, where that
came to about a third of a SmolLM2-135M step with 8 rows (cProfile, 1 thread). The rows of a running batch only
change when one joins or leaves, so this keeps mixed_batch's per-layer update (``RowRouter``: two batched matmuls
over the rows' stacked adapters, the plain single-adapter path when every row has the same one) installed for
the duration of a step and reuses its gathered adapters until the rows change. The checks mixed_batch makes on
each entry are made once per adapter change (:meth:`RowRouting.refresh`); row names are checked each step
against the loaded adapters.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

from lightning_lora import SurgeryError, list_adapters
from lightning_lora.surgery import lora_layers
from lightning_lora.surgery.multi.mixed import (  # the per-layer update mixed_batch installs
    BASE,
    RowRouter,
)


class RowRouting:
    """Route each batch row through its own adapter during a step; ``None`` / ``"base"`` rows use the bare base.

    Args:
        model: The served model (eval mode, nothing merged). Call :meth:`refresh` after adding or deleting an adapter.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.refresh()

    def refresh(self) -> None:
        """Re-read the model's LoRA layers and adapters (after a load or unload); forget the gathered adapters."""
        self.layers = lora_layers(self.model)
        self.adapters = set(list_adapters(self.model))
        self._paths = {id(layer): path for path, layer in self.layers}
        self._names: list[str] | None = None
        self._router: RowRouter | None = None
        merged = sorted({n for _, layer in self.layers for n in layer.merged_adapters})
        if merged or any(layer.disabled or layer.training for _, layer in self.layers):
            raise SurgeryError(f"serving needs every adapter unmerged, enabled and in eval mode (merged: {merged}); "
                               f"call unmerge_lora(model) and model.eval()")

    @contextlib.contextmanager
    def rows(self, names: list[str | None]) -> Iterator[None]:
        """Inside the block, row ``i`` of every forward uses adapter ``names[i]``."""
        if not self.layers:
            yield
            return
        rows = [n or BASE for n in names]
        unknown = sorted({n for n in rows if n != BASE and n not in self.adapters})
        if unknown:
            raise SurgeryError(f"rows use adapters {unknown} that the model does not have (it has "
                               f"{sorted(self.adapters)}); refresh() after loading")
        if rows != self._names:
            self._names, self._router = rows, RowRouter(rows, 1, self._paths)
        for _, layer in self.layers:
            layer.row_update = self._router
        try:
            yield
        finally:
            for _, layer in self.layers:
                layer.__dict__.pop("row_update", None)
