"""The benchmark harness end to end in its tiny ``--smoke`` mode: it runs, and writes valid JSON and markdown.

Behaviour only (shapes of the output, that both libraries ran on the same model and inputs); never timings.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run([sys.executable, "-m", "benchmarks.run", "--smoke", "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads((out / "smoke.json").read_text())
    return doc, (out / "smoke.md").read_text(), proc


def test_smoke_run_writes_json_with_both_implementations(smoke: tuple) -> None:
    doc, _, _ = smoke
    assert doc["meta"]["mode"] == "smoke"
    assert {"python", "torch", "transformers", "peft"} <= set(doc["meta"]["versions"])
    rows = {(r["variant"], r["impl"]): r for r in doc["training"]}
    assert set(rows) == {("lora_qv", "ours"), ("lora_qv", "peft")}
    for row in rows.values():
        assert row["error"] is None
        assert row["step_s"]["n"] == 1 and row["step_s"]["median"] > 0
        assert row["peak_rss_mib"] > row["ready_rss_mib"] > 0
    ours, peft = rows[("lora_qv", "ours")], rows[("lora_qv", "peft")]
    assert ours["trainable"] == peft["trainable"] == 2 * 2 * 16 * (64 + 64)  # 2 blocks x (q, v) x r (in + out)
    # Same saved model, same inputs, B = 0 at the start: both libraries see exactly the base model's loss.
    assert ours["first_loss"] == pytest.approx(peft["first_loss"], rel=1e-6)
    assert math.isfinite(ours["vs_peft_step"]["median"]) and ours["vs_peft_rss"] > 0


def test_smoke_run_checks_goals_and_renders_markdown(smoke: tuple) -> None:
    doc, md, _ = smoke
    goals = {g["goal"]: g for g in doc["goals"]}
    assert any(name.startswith("step time ours/PEFT") for name in goals)
    assert all(g["met"] in (True, False, None) for g in goals.values())
    assert md.startswith("# Benchmarks: lightning-lora vs PEFT (smoke)")
    assert "| LoRA r16 q_proj,v_proj | ours |" in md and "| LoRA r16 q_proj,v_proj | peft |" in md
    assert "python -m benchmarks.run --smoke" in md
    cpu = doc["meta"]["cpu"]
    assert {"model_name", "avx2", "avx512_bf16", "amx", "native_bf16"} <= set(cpu)
    assert f"CPU capabilities: {cpu['model_name']}: AVX2 {'yes' if cpu['avx2'] else 'no'}" in md
    assert "measured before" not in md and "What limits" not in md  # only figures measured in this run


def test_run_rejects_a_missing_mode() -> None:
    proc = subprocess.run([sys.executable, "-m", "benchmarks.run"], cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2
    assert "one of the arguments --quick --full --smoke is required" in proc.stderr
