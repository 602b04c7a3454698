"""Process-wide CPU memory-allocator tuning for inference (glibc ``mallopt``).

Batched CPU decoding allocates the same large temporaries at every step: GPT-2's (rows, 50257) logits
(32 MB at beam 5 x batch 32), CLIP's (B x 50, 3072) MLP activations (20 MB at batch 32). With its default,
self-adjusting settings glibc serves blocks this large with ``mmap`` (``munmap`` on free) or trims them off
the top of the heap when they are freed, so the next step page-faults and zero-fills fresh pages again.
Fixing the mmap threshold at its maximum (32 MiB) and keeping freed memory (trim threshold, top pad) lets
those blocks be reused: on the benchmark machine the CLIP tower at batch 32 ran 6% faster and element-wise
ops on these tensors about 2x faster (``docs/performance.md``). This is the same effect the PyTorch CPU
tuning guides get by preloading jemalloc / tcmalloc.

It is a process-wide setting, so the library never applies it on import: the ``clipcap`` command line and
the benchmarks call :func:`tune_cpu_allocator`; applications may call it themselves. Set
``CLIPCAP_MALLOC_TUNING=0`` to turn it off for the command line.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

# glibc <malloc.h> parameter numbers
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3

#: glibc's upper limit for M_MMAP_THRESHOLD on 64-bit systems (4 * 1024 * 1024 * sizeof(long)).
MAX_MMAP_THRESHOLD = 32 * 1024 * 1024

_applied: dict[str, int] | None = None


def tune_cpu_allocator(
    mmap_threshold: int = MAX_MMAP_THRESHOLD,
    trim_threshold: int = 1024 * 1024 * 1024,
    top_pad: int = 64 * 1024 * 1024,
) -> dict[str, int] | None:
    """Make glibc keep and reuse large freed blocks instead of returning them to the OS at once.

    Args:
        mmap_threshold: allocations at least this large (bytes) still get their own ``mmap``;
            at most 32 MiB (glibc's limit).
        trim_threshold: free memory at the top of the heap kept before trimming (bytes).
        top_pad: extra bytes requested from the OS whenever the heap grows.

    Returns:
        The settings applied, or ``None`` where there is nothing to tune (not Linux/glibc, or
        ``mallopt`` refused a value). Idempotent.
    """
    global _applied
    if not 0 < mmap_threshold <= MAX_MMAP_THRESHOLD:
        raise ValueError(f"mmap_threshold must be in (0, {MAX_MMAP_THRESHOLD}] bytes, got {mmap_threshold}.")
    if trim_threshold < 0 or top_pad < 0:
        raise ValueError("trim_threshold and top_pad must be >= 0 bytes.")
    if _applied is not None:
        return _applied
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
        getattr(libc, "gnu_get_libc_version")  # glibc only: musl's mallopt ignores its arguments  # noqa: B009
    except (OSError, AttributeError):
        return None
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    settings = {"mmap_threshold": mmap_threshold, "trim_threshold": trim_threshold, "top_pad": top_pad}
    for param, value in (
        (_M_MMAP_THRESHOLD, mmap_threshold),
        (_M_TRIM_THRESHOLD, trim_threshold),
        (_M_TOP_PAD, top_pad),
    ):
        if mallopt(param, value) != 1:
            return None
    _applied = settings
    return settings


def tune_cpu_allocator_from_env() -> dict[str, int] | None:
    """:func:`tune_cpu_allocator` unless ``CLIPCAP_MALLOC_TUNING`` is ``0``/``false``/``no``/``off``."""
    if os.environ.get("CLIPCAP_MALLOC_TUNING", "1").strip().lower() in {"0", "false", "no", "off"}:
        return None
    return tune_cpu_allocator()
