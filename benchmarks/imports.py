"""Import cost of ``lightning_lora``, each measurement in a fresh interpreter, and whether it pulls in PEFT.

Two probes alternate: ``import lightning_lora`` alone, and ``import lightning`` followed by
``import lightning_lora`` (the extra time a Lightning user pays for our package).
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

from benchmarks.pool import REPO_ROOT, worker_env
from benchmarks.stats import summary

_ALONE = """
import json, sys, time
t0 = time.perf_counter(); import lightning_lora; t1 = time.perf_counter()
heavy = [m for m in ("peft", "lightning", "bitsandbytes", "transformers") if m in sys.modules]
print(json.dumps({"lightning_lora_s": t1 - t0, "imported": heavy}))
"""

_AFTER_LIGHTNING = """
import json, time
t0 = time.perf_counter(); import lightning; t1 = time.perf_counter(); import lightning_lora; t2 = time.perf_counter()
print(json.dumps({"lightning_s": t1 - t0, "increment_s": t2 - t1}))
"""


def _probe(code: str) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT,
                         env=worker_env(2), check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure_imports(repeats: int) -> dict[str, Any]:
    """Alternate the two probes ``repeats`` times; return the summaries and the heavy modules imported."""
    alone: list[float] = []
    lightning: list[float] = []
    increment: list[float] = []
    heavy: set[str] = set()
    for i in range(repeats):
        probes = [_ALONE, _AFTER_LIGHTNING] if i % 2 == 0 else [_AFTER_LIGHTNING, _ALONE]
        for code in probes:
            result = _probe(code)
            if "lightning_lora_s" in result:
                alone.append(result["lightning_lora_s"])
                heavy.update(result["imported"])
            else:
                lightning.append(result["lightning_s"])
                increment.append(result["increment_s"])
        print(f"  [imports] repeat {i + 1} done", file=sys.stderr, flush=True)
    return {"lightning_lora_s": summary(alone), "lightning_s": summary(lightning),
            "increment_after_lightning_s": summary(increment), "heavy_modules_imported": sorted(heavy),
            "imports_peft": "peft" in heavy}
