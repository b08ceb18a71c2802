"""``examples/method_comparison.py --smoke``: every method trains, exports and is measured; the table is written.

Behaviour only (the records' shape and consistency), never timings.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.tiny_lm import save_tiny_causal_lm

REPO = Path(__file__).resolve().parents[1]


def test_smoke_run_writes_a_row_per_method(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("matplotlib")
    monkeypatch.chdir(REPO)
    monkeypatch.syspath_prepend(str(REPO / "examples"))
    model = str(save_tiny_causal_lm(tmp_path / "tiny"))
    import method_comparison

    method_comparison.main(["--smoke", "--model", model, "--out", str(tmp_path / "results")])
    records = json.loads((tmp_path / "results" / "methods.json").read_text())["records"]
    assert [r["name"] for r in records] == method_comparison.METHODS
    for r in records:
        assert 0 < r["trainable_params"] < r["total_params"] and r["adapter_bytes"] > 0
        assert r["latency_unmerged_s"] > 0 and (r["latency_merged_s"] is not None) == r["name"].startswith("lora")
    table = (tmp_path / "results" / "methods.md").read_text()
    assert table.startswith("SMOKE RUN") and table.count("\n| `") == len(records)
    assert (tmp_path / "results" / "methods.png").stat().st_size > 0
    sys.modules.pop("method_comparison", None)
