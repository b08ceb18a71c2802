"""Atomic file and directory writes: a crash never leaves a half-written adapter or export behind.

Temporary names carry the writer's pid (``.<name>.<pid>.<random>.tmp``, ``.<name>.old-<pid>``), so the next write
to the same path can tell what a killed writer left behind from what a live one is still using: a killed
directory swap is undone (the old copy renamed back) and stray temporaries are removed.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed over ``path`` in one step."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    recover(target)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.{os.getpid()}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory beside ``path``; on success it replaces ``path`` (old contents removed).

    The swap is two renames (old aside, new in place), so readers see either the old or the new directory whole; a
    kill between them is undone by the next call (see :func:`recover`).
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    recover(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.{os.getpid()}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def recover(path: str | os.PathLike) -> list[Path]:
    """Clean up after a writer of ``path`` that was killed: restore a swapped-out old copy, remove stray temporaries.

    Only leftovers of processes that are no longer running are touched.

    Returns:
        The leftovers handled (restored or removed).
    """
    target = Path(path)
    handled = []
    for stray in sorted(target.parent.glob(f".{glob.escape(target.name)}.*")):
        match = re.fullmatch(r"(?:old-(\d+)|(\d+)\.[a-z0-9_]+\.tmp)", stray.name[len(target.name) + 2:])
        if match is None or _alive(int(match.group(1) or match.group(2))):
            continue
        if match.group(1) and not target.exists() and stray.is_dir():
            os.replace(stray, target)  # killed between the swap's two renames: the old copy comes back
        elif stray.is_dir():
            shutil.rmtree(stray, ignore_errors=True)
        else:
            stray.unlink(missing_ok=True)
        handled.append(stray)
    return handled


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True
