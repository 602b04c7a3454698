# Sourced by scripts/test.sh and scripts/demo.sh: create/activate $VENV (default .venv) and install the
# project with the extra named in $1.
#
# Which versions: $CLIPCAP_CONSTRAINTS (default constraints/tested.txt)
#   constraints/tested.txt   the set CI last ran green with the newest releases (what the README installs,
#                            so the demo works even on a day an upstream release breaks something)
#   constraints/minimum.txt  the declared lower bounds, exactly (CI's minimum-versions job)
#   latest                   whatever the package index has today (CI's newest-releases job)
# torch is installed first and pinned: an unpinned `pip install torch` pulls several GB of CUDA wheels.
VENV="${VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
CLIPCAP_CONSTRAINTS="${CLIPCAP_CONSTRAINTS:-constraints/tested.txt}"
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip
python -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
if [ "$CLIPCAP_CONSTRAINTS" = "latest" ]; then
  python -m pip install -q -e ".[$1]"  # a fresh venv resolves the newest releases
else
  if [ ! -f "$CLIPCAP_CONSTRAINTS" ]; then
    echo "CLIPCAP_CONSTRAINTS=$CLIPCAP_CONSTRAINTS: no such file (use a file under constraints/ or 'latest')" >&2
    return 2 2>/dev/null || exit 2
  fi
  python -m pip install -q -c "$CLIPCAP_CONSTRAINTS" -e ".[$1]"
fi
