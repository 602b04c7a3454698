"""``modeling_clipcap.cpu_tuning``: glibc malloc settings, applied in a fresh process (they are process-wide)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from modeling_clipcap.cpu_tuning import MAX_MMAP_THRESHOLD, tune_cpu_allocator


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    import os

    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env={**os.environ, **env}
    )


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt tuning is for glibc on Linux")
def test_tuning_applies_and_is_idempotent():
    code = (
        "import ctypes, platform\n"
        "from modeling_clipcap.cpu_tuning import tune_cpu_allocator\n"
        "first = tune_cpu_allocator(); second = tune_cpu_allocator(mmap_threshold=1)\n"
        "print(platform.libc_ver()[0], first, second is first)\n"
    )
    out = run_python(code)
    assert out.returncode == 0, out.stderr
    libc, rest = out.stdout.split(" ", 1)
    if libc != "glibc":
        assert rest.startswith("None")
    else:
        assert f"'mmap_threshold': {MAX_MMAP_THRESHOLD}" in rest and rest.strip().endswith("True")


def test_env_switch_turns_it_off():
    code = "from modeling_clipcap.cpu_tuning import tune_cpu_allocator_from_env as t; print(t())"
    out = run_python(code, CLIPCAP_MALLOC_TUNING="0")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "None"


@pytest.mark.parametrize(
    "kwargs", [{"mmap_threshold": 0}, {"mmap_threshold": MAX_MMAP_THRESHOLD + 1}, {"top_pad": -1}]
)
def test_bad_values_are_refused(kwargs):
    with pytest.raises(ValueError, match="must be"):
        tune_cpu_allocator(**kwargs)
