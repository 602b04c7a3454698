#!/usr/bin/env bash
# The offline demo: install into .venv (see _setup_venv.sh), then run training/demo.py:
# synthetic data -> contrastively pretrained image tower -> ClipCap training -> clipcap evaluate -> clipcap caption -> report.
# About 10 minutes on 2 CPU cores after installation; extra arguments go to training/demo.py.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/_setup_venv.sh demo
python training/demo.py --output_dir "${DEMO_OUTPUT:-demo_output}" "$@"
