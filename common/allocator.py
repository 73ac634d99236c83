"""Freed memory kept in the process, where one process trains cohorts round after round.

The cohort engine allocates and frees activations of 1–30 MB at every step (a chunk of 256 users × 64 rows ×
128 hidden units is 8 MB a tensor). glibc's malloc hands blocks that large back to the kernel: above its mmap
threshold (which adapts, up to 32 MB) a block is its own mapping, unmapped when freed, and the heap's free top is
trimmed once it passes its trim threshold. The next step then page-faults the same memory in again and the kernel
zero-fills every page of it: about 26,000 minor page faults in a returning round of 256 `small` users and
45,000–64,000 for 500 (`benchmarks/bench_cohort_engine.py --allocator default` prints them; 0–2,700 with this
setting), about 4 % of the round's time (docs/simulation.md).

`keep_freed_memory` fixes the mmap threshold at glibc's largest (32 MB) and raises the trim threshold to 1 GiB, so
that a block freed at one step is reused at the next from the process's own heap. A process keeps its peak heap
(up to 1 GiB of free memory above it), which suits a simulated node; a device's client, which trains one user,
does not call it. Elsewhere than Linux with glibc it does nothing (the allocator is another one).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 1024 * 1024    # glibc refuses more: HEAP_MAX_SIZE / 2 on 64-bit
TRIM_THRESHOLD = 1024 * 1024 * 1024

_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Tune glibc's malloc for this process (once); True when it is glibc's and took both settings."""
    global _applied
    if _applied is None:
        _applied = _mallopt()
    return _applied


def _mallopt() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
        if not hasattr(libc, "gnu_get_libc_version"):   # glibc's own symbol: musl's mallopt changes nothing
            return False
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
