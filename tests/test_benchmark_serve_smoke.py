"""``python -m benchmarks.serve --smoke`` runs end to end and writes its JSON and markdown (behaviour, not speed)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("litserve")
pytest.importorskip("openai")

REPO = Path(__file__).resolve().parent.parent


def test_serve_benchmark_smoke(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "benchmarks.serve", "--smoke", "--out", str(tmp_path)], cwd=REPO, check=False,
                          capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads((tmp_path / "serve_smoke.json").read_text())
    modes = doc["modes"]
    assert set(modes) == {"one_adapter", "mixed", "short_alone", "short_behind_long", "batching_off", "swapping"}
    for name in ("one_adapter", "mixed", "batching_off", "swapping"):
        assert modes[name]["requests"] == 4 and modes[name]["tokens"] == 4 * 8, name  # ignore_eos: every token
        assert modes[name]["tokens_per_s"] > 0 and modes[name]["p95_s"] >= modes[name]["p50_s"] > 0
    assert modes["short_behind_long"]["tokens"] == 1  # one short request of 8 // 8 tokens
    assert len(doc["goals"]) == 4 and all(g["met"] in (True, False) for g in doc["goals"])
    md = (tmp_path / "serve_smoke.md").read_text()
    assert md.startswith("# Serving benchmark (smoke)") and "python -m benchmarks.serve --smoke" in md
