"""How a training process treats freed host memory: keep it for the next iteration.

Caffe allocates every blob once and reuses the same buffers each iteration (SyncedMemory only
grows). PyTorch frees each activation after the backward pass and allocates it again in the
next forward; with glibc's default malloc, blocks above a (dynamic) threshold are ``mmap``-ed and
returned to the OS when freed, and free memory at the top of the heap is trimmed, so every
iteration page-faults its activations in again. Measured on LeNet at batch 64 (2 CPU threads):
17.2 ms/iter with the defaults, 13.6 ms/iter with the policy below
(benchmarks/train_speed.py).

The training tools (train, test, time) and ``pycaffe-alt run`` (an unchanged pycaffe program's
launcher) call :func:`keep_freed_memory` once at start; the library itself never changes the
allocator of a process that imports it.
"""
from __future__ import annotations

import ctypes
import os
import platform
import sys
from typing import Optional

# mallopt parameter numbers (glibc's malloc.h; facts of its ABI).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

# Blocks up to this size come from the heap (and are reused) instead of a fresh mmap each time.
MMAP_THRESHOLD = 64 << 20
# Free memory at the heap top is given back to the OS only beyond this much.
TRIM_THRESHOLD = 1 << 30

# The environment variables through which glibc users choose these settings themselves.
_USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_",
                  "GLIBC_TUNABLES")


def physical_memory() -> Optional[int]:
    """The machine's RAM in bytes (None where POSIX cannot say): what no host array can exceed."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return None


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed blocks of up to 64 MB for reuse (Caffe's blob reuse).

    Returns whether the policy was applied: not on other C libraries, nor when the user already
    chose malloc settings through the environment or preloads another allocator (jemalloc,
    tcmalloc), whose choices win.
    """
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    if any(name in os.environ for name in _USER_SETTINGS) or os.environ.get("LD_PRELOAD"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    # Setting the mmap threshold also stops glibc's dynamic adjustment of both thresholds.
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and \
        bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
