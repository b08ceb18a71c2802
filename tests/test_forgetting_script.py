"""examples/forgetting.py wires up end to end (smoke mode: one row, one step, tiny model, in a temp directory)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

from tests.tiny_lm import save_tiny_causal_lm

REPO = Path(__file__).resolve().parents[1]


def test_forgetting_script_smoke(tmp_path: Path) -> None:
    model = save_tiny_causal_lm(tmp_path / "tiny")
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    result = subprocess.run([sys.executable, str(REPO / "examples" / "forgetting.py"), "--smoke", "--only",
                             "lora_attention_r4", "--model", str(model), "--out", str(tmp_path / "results"),
                             "--workdir", str(tmp_path)], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    record = json.loads((tmp_path / "results" / "forgetting.json").read_text())["records"][0]
    assert record["name"] == "lora_attention_r4" and record["kl"] > 0 and math.isfinite(record["ppl"])
    assert "| `lora_attention_r4` |" in (tmp_path / "results" / "forgetting.md").read_text()
