"""Keep freed tensor memory in the process instead of handing it back to the OS each time.

glibc's malloc serves large blocks (from 128 KiB up, rising as it learns) with fresh ``mmap``
pages and unmaps them on ``free``; memory freed at the top of its heap goes back to the OS too.
A U-Net forward pass allocates and frees activations of megabytes each, so every pass touches
brand-new pages, and the kernel zero-fills each on first touch. Measured on a 2-core CPU
(benchmarks/RESULTS.md): 6,000 to 13,000 page faults per forward pass of the shipped U-Net at
batch 32 (25 to 50 MB faulted in again per pass), and the pass about 10% slower than with the
pages kept.

``keep_freed_memory`` raises the mmap threshold to glibc's largest (32 MiB) and the trim
threshold to 1 GiB, so freed blocks are reused. The process's resident memory then stays near
its peak until it exits, which for a command that runs one job is what it would reach anyway.
The command line calls it once at start; a library user may call it too. Off with
``MINIDIFF_KEEP_FREED_MEMORY=0``. Elsewhere than glibc (macOS, musl, Windows) it does nothing.
"""

from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's maximum on 64-bit systems; larger blocks still use mmap
TRIM_THRESHOLD = 1024 * 1024 * 1024


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to keep freed memory for reuse; True if it took the settings."""
    if os.environ.get("MINIDIFF_KEEP_FREED_MEMORY", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library this process already runs on
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # musl's mallopt exists but accepts nothing and returns 0.
    return mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
