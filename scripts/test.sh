#!/usr/bin/env bash
# Set everything up, then lint and run the whole test suite (the README's test command; CI runs exactly this).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Lint first (the style rules in pyproject.toml), then the tests.
.venv/bin/ruff check .
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
