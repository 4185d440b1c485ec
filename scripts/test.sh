#!/usr/bin/env bash
# Set up (idempotent) and run the test suite on 2 workers (the machine's 2 cores; a run takes about 16 minutes).
# Extra arguments go to pytest: `bash scripts/test.sh -m slow -n 0` runs the slow real-width tests, one at a time.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export ORT_DISABLE_TELEMETRY=1 HF_HUB_OFFLINE=1
.venv/bin/python -m pytest -q -p no:cacheprovider -n 2 "$@"
