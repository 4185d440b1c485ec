#!/usr/bin/env bash
# Create .venv-triton (idempotent): the environment Triton's Python-backend stub runs model.py in. The stub bundled
# in nvidia-pytriton is built against numpy 1.x (under numpy 2 its BYTES tensors arrive corrupted), so this
# environment pins numpy < 2; torch is installed first as torch==2.13.0 (the CPU wheel, see scripts/setup.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv-triton/bin/python ] || "$PY" -m venv .venv-triton
.venv-triton/bin/python -m pip install -q --upgrade pip
.venv-triton/bin/python -m pip install -q torch==2.13.0
.venv-triton/bin/python -m pip install -q "numpy<2" "nvidia-pytriton>=0.7" -e .
