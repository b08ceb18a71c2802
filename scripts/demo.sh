#!/usr/bin/env bash
# Set everything up, then run the main job: fine-tune SmolLM2-135M-Instruct with LoRA on the date task (CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/lightning-lora fit --config examples/demo.yaml "$@"
