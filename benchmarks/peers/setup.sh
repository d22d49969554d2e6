#!/usr/bin/env bash
# Create the peer virtual environments the accuracy benchmark uses, each with the
# CPU build of torch installed FIRST (torch==2.13.0 resolves to a local CPU wheel; any
# other torch spec pulls a multi-GB CUDA build), then the peer and its dependencies.
#   benchmarks/peers/setup.sh [llmc|torchao|all]
# llm-compressor pins its own transformers version, hence a venv of its own.
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

if [ "$which" = llmc ] || [ "$which" = all ]; then
  make_venv venv-llmc "torch==2.13.0" "llmcompressor==0.14.0.1" datasets
fi
if [ "$which" = torchao ] || [ "$which" = all ]; then
  make_venv venv-torchao "torch==2.13.0" "torchao==0.18.0" transformers safetensors
fi
