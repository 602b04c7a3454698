#!/usr/bin/env bash
# Install the project into a virtual environment (.venv; see _setup_venv.sh) and run the whole test suite.
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/_setup_venv.sh dev
python -m pytest "$@"
