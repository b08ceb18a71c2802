"""``benchmarks/e2e.py --smoke``: both sides (``lightning-lora fit`` and PEFT + Trainer) run on the same tiny model,
evaluate at the same steps, and the results are written as JSON and markdown. Behaviour only, never timings."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_e2e_smoke_runs_both_sides_and_writes_results(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "benchmarks.e2e", "--smoke", "--out", str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=600, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads((tmp_path / "e2e_smoke.json").read_text())
    ours, peft = doc["sides"]["ours"], doc["sides"]["peft_trainer"]
    for side in (ours, peft):
        assert [e["step"] for e in side["evals"]] == [2, 4]  # the same evaluation schedule on both sides
        assert all(0.0 <= e["accuracy"] <= 1.0 for e in side["evals"]) and side["peak_rss_mib"] > 0
        assert side["evals"][0]["elapsed_s"] > side["train_start_s"] > 0
    assert ours["trainable"] == peft["trainable"]  # same LoRA on the same model
    assert ours["packing"] is True and ours["precision"] == "fp32"  # the demo config; the suite pins auto to fp32
    assert {"model_name", "avx2", "avx512_bf16", "amx"} <= set(doc["meta"]["cpu"])
    md = (tmp_path / "e2e_smoke.md").read_text()
    assert "`python -m benchmarks.e2e --smoke`" in md and "| ours |" in md and "| peft_trainer |" in md
