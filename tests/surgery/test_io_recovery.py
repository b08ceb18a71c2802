"""Atomic writes survive a real kill: the next write restores a swapped-out directory and removes stray temporaries."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_lora.surgery.io.atomic import atomic_dir, atomic_file, recover

ROOT = Path(__file__).resolve().parents[2]

# Writes `target` once, then rewrites it and SIGKILLs itself right after the swap's first rename (old copy aside).
_KILL_BETWEEN_RENAMES = """
import os, signal, sys
from pathlib import Path
from lightning_lora.surgery.io import atomic as _io
target = Path(sys.argv[1])
with _io.atomic_dir(target) as tmp:
    (tmp / "v").write_text("old")
real = os.replace
def replace(src, dst):
    real(src, dst)
    if Path(src) == target:
        os.kill(os.getpid(), signal.SIGKILL)
_io.os.replace = replace
with _io.atomic_dir(target) as tmp:
    (tmp / "v").write_text("new")
"""

_KILL_WHILE_WRITING_FILE = """
import os, signal, sys
from lightning_lora.surgery.io import atomic as _io
with _io.atomic_file(sys.argv[1]) as tmp:
    tmp.write_bytes(b"half")
    os.kill(os.getpid(), signal.SIGKILL)
"""


def _killed(script: str, target: Path) -> None:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    result = subprocess.run([sys.executable, "-c", script, str(target)], env=env, capture_output=True, timeout=60)
    assert result.returncode == -9, result.stderr.decode()[-2000:]


def test_kill_between_the_two_renames_is_undone_by_the_next_call(tmp_path: Path) -> None:
    target = tmp_path / "export"
    _killed(_KILL_BETWEEN_RENAMES, target)
    assert not target.exists()  # the state a kill leaves: the export path missing, the old copy hidden
    assert len(list(tmp_path.glob(".export.old-*"))) == 1
    with pytest.raises(RuntimeError, match="write failed"), atomic_dir(target):
        raise RuntimeError("write failed")  # even a next write that fails brings the old copy back
    assert (target / "v").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no .old-<pid>, no .tmp left


def test_next_successful_write_leaves_only_the_new_copy(tmp_path: Path) -> None:
    target = tmp_path / "export"
    _killed(_KILL_BETWEEN_RENAMES, target)
    with atomic_dir(target) as tmp:
        (tmp / "v").write_text("newer")
    assert (target / "v").read_text() == "newer"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_stray_temporary_file_of_a_killed_writer_is_removed(tmp_path: Path) -> None:
    target = tmp_path / "results.json"
    _killed(_KILL_WHILE_WRITING_FILE, target)
    assert len(list(tmp_path.glob(".results.json.*.tmp"))) == 1 and not target.exists()
    with atomic_file(target) as tmp:
        tmp.write_text("{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


def test_live_writers_and_other_targets_are_left_alone(tmp_path: Path) -> None:
    live = tmp_path / f".export.{os.getpid()}.abc123.tmp"  # this process: alive
    other = tmp_path / ".export.v2.99999999.abc.tmp"  # another target's temporary ("export.v2")
    live.mkdir()
    other.mkdir()
    assert recover(tmp_path / "export") == []
    assert live.exists() and other.exists()
