#!/usr/bin/env bash
# Install the project into a fresh virtual environment (.venv) and run the whole test suite.
# torch is installed first and pinned: an unpinned `pip install torch` pulls several GB of CUDA wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip
python -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
python -m pip install -q -e ".[dev]"
python -m pytest "$@"
