"""The runnable example scripts in examples/ (the YAML configs are run by tests/cli/test_cli.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_callback_quickstart_runs_and_exports(tmp_path: Path) -> None:
    """The README's "add one callback" snippet trains, exports, resumes and loads without errors."""
    result = subprocess.run([sys.executable, str(REPO / "examples/callback_quickstart.py")], cwd=tmp_path,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "out/export/adapter/adapter_config.json").is_file()
    assert (tmp_path / "out/export/merged/config.json").is_file()
    report = json.loads((tmp_path / "out/export/export.json").read_text())
    assert report["max_abs_diff"] < 1e-4
