"""Print a pip constraints file of the distributions installed in a virtual environment.

Used by ``.ci/run`` to refresh ``constraints/tested.txt`` from the newest-releases job once its suite passed::

    python3 scripts/freeze_constraints.py .venv-ci-latest/bin/python > constraints/tested.txt.new

Leaves out this package (installed editable), the installers, and torch and its CUDA/Triton wheels: the scripts
install torch themselves (``TORCH_VERSION``), and a local build's version (``2.13.0+cpu``) exists on no index.
"""

from __future__ import annotations

import subprocess
import sys

SKIP = ("modeling-clipcap", "modeling_clipcap", "pip", "setuptools", "wheel", "torch", "triton")
SKIP_PREFIXES = ("nvidia-", "nvidia_", "cuda-", "cuda_")

HEADER = """\
# The versions the whole suite last passed with in CI's newest-releases job (.ci/run refreshes this file from
# that job: scripts/freeze_constraints.py). scripts/test.sh and scripts/demo.sh install under these constraints
# by default, so the README's commands work even on a day an upstream release breaks something; the package
# itself only declares ranges (pyproject.toml). CLIPCAP_CONSTRAINTS=latest installs the newest instead.
"""


def main(python: str) -> int:
    frozen = subprocess.run(
        [python, "-m", "pip", "freeze", "--exclude-editable", "--all"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.splitlines()
    lines = []
    for line in frozen:
        name = line.split("==")[0].strip().lower()
        if "==" not in line or name in SKIP or name.startswith(SKIP_PREFIXES):
            continue
        lines.append(line.strip())
    sys.stdout.write(HEADER + "\n".join(sorted(lines, key=str.lower)) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else sys.executable))
