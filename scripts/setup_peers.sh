#!/usr/bin/env bash
# The peers scripts/peers.py measures star-export against, for MODEL (a checkpoint in the published llava-hf layout):
# OpenVINO GenAI's runtime in .venv (the `peers` extra), and its int4 / int8 exports of MODEL in WORK/ov-int4 and
# WORK/ov-int8, made by `optimum-cli export openvino` in a venv of its own (.peers-venv, ~6 GB: optimum-intel needs
# torchvision, which pulls a torch of its own with CUDA packages; ../shared/FIELD_NOTES.md). HF transformers runs in
# .venv. llama.cpp is not set up here (a ~15-minute source build and a GGUF conversion of the vision tower).
#   bash scripts/setup_peers.sh MODEL WORK
set -euo pipefail
MODEL=$1
WORK=$2
cd "$(dirname "$0")/.."
.venv/bin/python -m pip install -q -e ".[peers]"
OV=$(.venv/bin/python -c "import openvino; print(openvino.__version__.split('-')[0])")
if [ ! -x .peers-venv/bin/optimum-cli ]; then
  python3 -m venv .peers-venv
  .peers-venv/bin/python -m pip install -q --upgrade pip
  .peers-venv/bin/python -m pip install -q torchvision "optimum-intel[openvino]" nncf "openvino==$OV"
fi
mkdir -p "$WORK"
for w in int4 int8; do
  if [ ! -f "$WORK/ov-$w/openvino_language_model.xml" ]; then
    echo "+ optimum-cli export openvino --model $MODEL --task image-text-to-text --weight-format $w $WORK/ov-$w" >&2
    .peers-venv/bin/optimum-cli export openvino --model "$MODEL" --task image-text-to-text --weight-format "$w" \
      "$WORK/ov-$w" > "$WORK/ov-$w.log" 2>&1 || { tail -20 "$WORK/ov-$w.log" >&2; exit 1; }
  fi
done
echo "peers ready in $WORK: python scripts/peers.py --model $MODEL --work $WORK" >&2
