#!/usr/bin/env bash
# The offline demo: install into .venv (like scripts/test.sh), then run training/demo.py:
# synthetic data -> tiny CLIP -> ClipCap training -> clipcap evaluate -> clipcap caption -> report.
# About 10 minutes on 2 CPU cores after installation; extra arguments go to training/demo.py.
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
python -m pip install -q -e ".[demo]"
python training/demo.py --output_dir "${DEMO_OUTPUT:-demo_output}" "$@"
