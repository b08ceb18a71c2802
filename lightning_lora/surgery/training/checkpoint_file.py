"""Read Lightning / ``torch.save`` checkpoint files, turning a truncated or corrupt file into a clear error.

``torch.load`` on a checkpoint cut short by a killed write fails with ``OSError: [Errno 22] Invalid argument`` or
``PytorchStreamReader failed reading zip archive``, naming neither the file nor the cause. ``torch.save`` writes a
zip archive whose directory sits at the very end, so any truncation is caught by opening it as a zip, before
``torch.load`` reads a byte of tensor data.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from lightning_lora.surgery.errors import CheckpointFileError

_HINT = ("HINT: the file was probably cut short by a write that was killed (disk full, job time limit); resume from "
         "an earlier checkpoint (e.g. the one before `last.ckpt`), or start without ckpt_path.")


def check_checkpoint_file(path: str | os.PathLike) -> None:
    """Raise :class:`CheckpointFileError` if ``path`` is a local file that is not a complete ``torch.save`` archive.

    Cheap: reads the zip directory at the end of the file, not the tensors. Remote (``fsspec``) paths and missing
    files are left to the loader, which reports them itself.
    """
    file = Path(path)
    if "://" in str(path) or not file.is_file():
        return
    size = file.stat().st_size
    if size == 0:
        raise CheckpointFileError(f"{str(file)!r}: the checkpoint is empty (0 bytes).\n{_HINT}")
    with open(file, "rb") as handle:
        head = handle.read(4)
    if head[:2] != b"PK":  # not a zip: the legacy (pre-1.6) torch.save format, which only torch.load can judge
        return
    try:
        with zipfile.ZipFile(file) as archive:
            archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as err:
        raise CheckpointFileError(f"{str(file)!r}: the checkpoint is truncated or corrupt ({size:,} bytes; its zip "
                                  f"directory cannot be read: {err}).\n{_HINT}") from err


def read_checkpoint(path: str | os.PathLike, *, map_location: Any = "cpu") -> dict[str, Any]:
    """``torch.load(path, weights_only=True)`` with a clear error for a truncated, corrupt or foreign file.

    Args:
        path: The checkpoint file.
        map_location: As for ``torch.load``. Default: ``"cpu"``.

    Raises:
        FileNotFoundError: If there is no such file.
        CheckpointFileError: If the file is truncated, corrupt or not a ``torch.save`` checkpoint (names the file).
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"No checkpoint file {str(path)!r}.")
    check_checkpoint_file(path)
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, OSError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile) as err:
        raise CheckpointFileError(f"{str(path)!r}: the checkpoint is truncated or corrupt ({err}).\n{_HINT}") from err
    if not isinstance(checkpoint, dict):
        raise CheckpointFileError(f"{str(path)!r}: holds a {type(checkpoint).__name__}, not a checkpoint dict.")
    return checkpoint
