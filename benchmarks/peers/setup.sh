#!/usr/bin/env bash
# Create the peer virtual environments the accuracy benchmark uses, each with the
# CPU build of torch installed FIRST (torch==2.13.0 resolves to a local CPU wheel; any
# other torch spec pulls a multi-GB CUDA build), then the peer and its dependencies.
#   benchmarks/peers/setup.sh [llmc|torchao|llamacpp|all]
# llm-compressor pins its own transformers version, hence a venv of its own.
# llamacpp builds llama-cpp-python from its sdist (no torch; ~12 min on 2 cores) for
# benchmarks/generate_speed.py; `all` leaves it out because of that build time.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
PY="${PYTHON:-python3}"
which="${1:-all}"

make_venv() {  # name, packages...
  local dir="$HERE/$1"; shift
  if [ -x "$dir/bin/python" ] && [ -f "$dir/.complete" ]; then
    echo "[peers] $dir exists"; return
  fi
  rm -rf "$dir"
  "$PY" -m venv "$dir"
  "$dir/bin/pip" install -q --upgrade pip
  "$dir/bin/pip" install -q "torch==2.13.0"
  "$dir/bin/pip" install -q "$@"
  # The CPU torch must have survived the peer's dependency resolution.
  "$dir/bin/python" -c "import torch; assert not torch.version.cuda, torch.__version__"
  touch "$dir/.complete"
  echo "[peers] $dir ready"
}

# Pinned: the version seen building and running here (see /work/shared/FINDINGS.md).
LLAMACPP_VERSION=0.3.36
make_llamacpp_venv() {
  local dir="$HERE/venv-llamacpp"
  if [ -x "$dir/bin/python" ] && [ -f "$dir/.complete" ]; then
    echo "[peers] $dir exists"; return
  fi
  rm -rf "$dir"
  "$PY" -m venv "$dir"
  "$dir/bin/pip" install -q --upgrade pip
  # CPU only, tuned for this CPU (NATIVE); BLAS/CUDA/curl off and no tests/examples/tools,
  # which roughly halves the build. --no-binary forces the sdist so NATIVE takes effect.
  local start=$SECONDS
  CMAKE_ARGS="-DGGML_NATIVE=ON -DGGML_BLAS=OFF -DGGML_CUDA=OFF -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF \
-DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF" CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-2}" \
    "$dir/bin/pip" install -v --no-cache-dir --no-binary llama-cpp-python "llama-cpp-python==$LLAMACPP_VERSION"
  "$dir/bin/python" -c "import llama_cpp; print('[peers] llama_cpp', llama_cpp.__version__)"
  touch "$dir/.complete"
  echo "[peers] $dir ready (build took $((SECONDS - start)) s)"
}

if [ "$which" = llmc ] || [ "$which" = all ]; then
  make_venv venv-llmc "torch==2.13.0" "llmcompressor==0.14.0.1" datasets
fi
if [ "$which" = torchao ] || [ "$which" = all ]; then
  make_venv venv-torchao "torch==2.13.0" "torchao==0.18.0" transformers safetensors
fi
if [ "$which" = llamacpp ]; then
  make_llamacpp_venv
fi
