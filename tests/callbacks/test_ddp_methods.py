"""A real 2-process DDP run on CPU (gloo) with prefix tuning (a projected prefix, so an encoder trains too)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]


def test_ddp_prefix_tuning_keeps_ranks_identical_and_trains(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    script = ROOT / "tests" / "callbacks" / "ddp_methods_script.py"
    result = subprocess.run([sys.executable, str(script), str(tmp_path)], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "unused" not in result.stderr.lower()
    rank0, rank1 = (load_file(tmp_path / f"rank{r}.safetensors") for r in (0, 1))
    assert list(rank0) == list(rank1) and len(rank0) == 5  # embedding + two Linear layers of the projection
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
    start = load_file(tmp_path / "init0.safetensors")
    assert all(not torch.equal(rank0[n], start[n]) for n in rank0)  # every tensor trained
