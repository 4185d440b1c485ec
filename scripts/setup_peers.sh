#!/usr/bin/env bash
# The peers scripts/peers.py measures star-export against, for MODEL (a checkpoint in the published llava-hf layout):
# OpenVINO GenAI's runtime in .venv (the `peers` extra), and its int4 / int8 exports of MODEL in WORK/ov-int4 and
# WORK/ov-int8, made by `optimum-cli export openvino` in a venv of its own (.peers-venv, ~6 GB: optimum-intel needs
# torchvision, which pulls a torch of its own with CUDA packages; ../shared/FIELD_NOTES.md). HF transformers runs in
# .venv. llama.cpp: llama-cpp-python built from source (~15 min on 2 cores) in .llama-venv with the transformers 4
# its converters pin, and MODEL converted into WORK/llama-cpp (Q4_0 and Q8_0 text, float16 CLIP + projector) by
# scripts/gguf_peer.py with the converters of the same llama.cpp release. SKIP_LLAMA_CPP=1 leaves llama.cpp out;
# OV_WEIGHTS="int4" and GGUF_QUANTS="Q4_0" make only those (a full-depth 7B: disk and time).
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
for w in ${OV_WEIGHTS:-int4 int8}; do
  if [ ! -f "$WORK/ov-$w/openvino_language_model.xml" ]; then
    echo "+ optimum-cli export openvino --model $MODEL --task image-text-to-text --weight-format $w $WORK/ov-$w" >&2
    .peers-venv/bin/optimum-cli export openvino --model "$MODEL" --task image-text-to-text --weight-format "$w" \
      "$WORK/ov-$w" > "$WORK/ov-$w.log" 2>&1 || { tail -20 "$WORK/ov-$w.log" >&2; exit 1; }
  fi
done
LLAMA_CPP_PYTHON=0.3.36
if [ "${SKIP_LLAMA_CPP:-0}" != 1 ]; then
  if ! .llama-venv/bin/python -c "import llama_cpp" 2>/dev/null; then
    python3 -m venv .llama-venv
    .llama-venv/bin/python -m pip install -q --upgrade pip
    # torch 2.13.0 is the CPU wheel on this disk; the rest is what llama.cpp's converters pin (requirements/)
    .llama-venv/bin/python -m pip install -q torch==2.13.0 transformers==4.57.6 sentencepiece safetensors pillow \
      "protobuf<5"
    CMAKE="-DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF"
    if grep -qw amx_tile /proc/cpuinfo; then
      # GCC 12 at -O2 miscompiles llama.cpp's AMX tile setup (every quantized model segfaults; FIELD_NOTES):
      # clang builds it, GCC builds without AMX
      if command -v clang >/dev/null; then
        export CC=clang CXX=clang++
        CMAKE="$CMAKE -DCMAKE_C_FLAGS=-D__AMX_INT8__\ -D__AMX_TILE__ -DCMAKE_CXX_FLAGS=-D__AMX_INT8__\ -D__AMX_TILE__"
      else
        echo "note: no clang: llama.cpp is built without AMX (apt-get install clang for its AMX kernels)" >&2
        CMAKE="$CMAKE -DCMAKE_C_FLAGS=-mno-amx-tile\ -mno-amx-int8\ -mno-amx-bf16"
        CMAKE="$CMAKE -DCMAKE_CXX_FLAGS=-mno-amx-tile\ -mno-amx-int8\ -mno-amx-bf16"
      fi
    fi
    echo "+ building llama-cpp-python $LLAMA_CPP_PYTHON from source (~15 min on 2 cores)" >&2
    CMAKE_ARGS="$CMAKE" CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) .llama-venv/bin/python -m pip install -q \
      --no-binary llama-cpp-python "llama-cpp-python==$LLAMA_CPP_PYTHON"
  fi
  if [ ! -f "$WORK/llama-cpp/mmproj-f16.gguf" ] || [ ! -f "$WORK/llama-cpp/text-q4_0.gguf" ]; then
    # the converters of the same release: its source distribution carries llama.cpp's tree
    SRC="$WORK/llama-cpp-src"
    if [ ! -d "$SRC/vendor/llama.cpp" ]; then
      mkdir -p "$SRC"
      .llama-venv/bin/python -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$LLAMA_CPP_PYTHON" -d "$SRC"
      tar xzf "$SRC"/llama_cpp_python-*.tar.gz -C "$SRC" --strip-components 1
    fi
    .llama-venv/bin/python scripts/gguf_peer.py --model "$MODEL" --work "$WORK" --llama-cpp "$SRC/vendor/llama.cpp" \
      --quants ${GGUF_QUANTS:-Q4_0 Q8_0}
  fi
fi
echo "peers ready in $WORK: python scripts/peers.py --model $MODEL --work $WORK" >&2
