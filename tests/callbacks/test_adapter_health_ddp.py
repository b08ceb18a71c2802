"""AdapterHealth under a real 2-process DDP run on CPU: a non-finite loss on ONE rank moves every rank together."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]


def _run(out: Path, mode: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(ROOT / "tests" / "callbacks" / "ddp_health_script.py"), str(out), mode],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)


def test_skip_decision_is_shared_by_both_ranks(tmp_path: Path) -> None:
    result = _run(tmp_path, "skip")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert [(tmp_path / f"skipped{r}.txt").read_text() for r in (0, 1)] == ["[1]", "[1]"]  # rank 0 saw only finite
    rank0, rank1 = (load_file(tmp_path / f"rank{r}.safetensors") for r in (0, 1))
    assert all(torch.equal(rank0[n], rank1[n]) for n in rank0)  # no rank stepped alone


def test_stop_decision_stops_both_ranks(tmp_path: Path) -> None:
    result = _run(tmp_path, "stop")  # without the shared decision rank 0 would wait for rank 1 until the timeout
    assert result.returncode != 0
    assert "Non-finite loss at step 1 (on this or another rank)" in result.stderr
    assert (tmp_path / "stopped0.txt").read_text().startswith("Non-finite loss at step 1")
