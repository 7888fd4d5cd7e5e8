"""Keeping the process's resident memory flat over a long layer-by-layer run.

glibc's malloc raises its mmap threshold each time a large block is freed
(up to 32 MiB on 64-bit), after which tensors of a few MiB come from the heap
and freed ones stay resident: quantizing a 1.5B model grew by about 200 MB per
decoder layer (bench/memory_large_model.py). Fixing the threshold keeps large
blocks mmapped, so they go back to the OS when freed. This is a per-process
setting: the CLI applies it at start; Python API users can call
:func:`return_freed_memory_to_os` or set ``MALLOC_MMAP_THRESHOLD_=131072``.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

__all__ = ["return_freed_memory_to_os", "M_MMAP_THRESHOLD"]

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number


def return_freed_memory_to_os(threshold_bytes: int = 128 * 1024) -> bool:
    """Ask glibc to serve blocks of ``threshold_bytes`` or more with mmap (fixed threshold).

    Returns whether the setting was applied (False on other platforms or C libraries).
    """
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return mallopt(M_MMAP_THRESHOLD, int(threshold_bytes)) == 1
