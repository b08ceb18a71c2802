"""A ``CheckpointIO`` that reports a truncated or corrupt checkpoint by name before ``torch.load`` fails cryptically.

Lightning reads ``trainer.fit(ckpt_path=...)`` after every ``setup`` hook, through ``trainer.strategy.checkpoint_io``;
no callback hook runs between reading the file and failing on it. :func:`install_checked_io` wraps that object
once (from a callback's ``setup``) so the file is checked first; saving and everything else is delegated.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.fabric.plugins import CheckpointIO
from typing_extensions import override

from lightning_lora.surgery.training.checkpoint_file import check_checkpoint_file


class CheckedCheckpointIO(CheckpointIO):
    """Delegates to ``inner``; :meth:`load_checkpoint` first checks that the file is a whole checkpoint."""

    def __init__(self, inner: CheckpointIO) -> None:
        self.inner = inner

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        self.inner.save_checkpoint(checkpoint, path, storage_options=storage_options)

    @override
    def load_checkpoint(self, path: Any, map_location: Any | None = None,
                        weights_only: bool | None = None) -> dict[str, Any]:
        check_checkpoint_file(path)
        kwargs: dict[str, Any] = {"weights_only": weights_only}
        if map_location is not None:
            kwargs["map_location"] = map_location
        return self.inner.load_checkpoint(path, **kwargs)

    @override
    def remove_checkpoint(self, path: Any) -> None:
        self.inner.remove_checkpoint(path)

    @override
    def teardown(self) -> None:
        self.inner.teardown()


def install_checked_io(trainer: pl.Trainer) -> None:
    """Wrap ``trainer.strategy.checkpoint_io`` in a :class:`CheckedCheckpointIO`, once."""
    strategy = trainer.strategy
    if not isinstance(strategy.checkpoint_io, CheckedCheckpointIO):
        strategy.checkpoint_io = CheckedCheckpointIO(strategy.checkpoint_io)
