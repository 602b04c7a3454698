# Sourced by scripts/test.sh and scripts/demo.sh: create/activate $VENV (default .venv) and install the
# project with the extra named in $1. torch is installed first and pinned: an unpinned `pip install torch`
# pulls several GB of CUDA wheels.
VENV="${VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip
python -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
python -m pip install -q -e ".[$1]"
