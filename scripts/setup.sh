#!/usr/bin/env bash
# Create .venv and install star-export. torch is installed first as torch==2.13.0: on a CPU-only
# machine that resolves to the local CPU wheel; a bare torch requirement would pull GBs of CUDA packages.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e ".[test]"
