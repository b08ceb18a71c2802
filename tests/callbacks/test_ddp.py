"""A real 2-process DDP run on CPU (gloo), in a subprocess so that pytest's own process is never forked."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]


def test_ddp_lora_with_gradient_checkpointing_keeps_ranks_identical(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(ROOT / "tests" / "callbacks" / "ddp_script.py"), str(tmp_path)],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "unused" not in result.stderr.lower()  # no unused-parameter complaints from DDP
    rank0, rank1 = (load_file(tmp_path / f"rank{r}.safetensors") for r in (0, 1))
    assert list(rank0) == list(rank1) and len(rank0) == 8  # 2 layers x (q, v) x (A, B)
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
    assert all(rank0[n].abs().sum() > 0 for n in rank0 if ".lora_B." in n)  # trained
