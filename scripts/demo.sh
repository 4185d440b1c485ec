#!/usr/bin/env bash
# Set up, export tiny-llava (embedded random model, no download) at keep 58, run it on the shipped
# example image, and validate it against the eager PyTorch reference.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export ORT_DISABLE_TELEMETRY=1 HF_HUB_OFFLINE=1 PATH="$PWD/.venv/bin:$PATH"
star-export --model tiny-llava --keep 58 --out engine/ --force
star-run engine/ --image star_export/assets/example.png --prompt "What is in the image?" --max-new-tokens 16
star-validate engine/
