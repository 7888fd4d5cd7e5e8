"""Keeping the process's resident memory flat over a long layer-by-layer run.

glibc's malloc raises its mmap threshold each time a large block is freed
(up to 32 MiB on 64-bit), after which tensors of a few MiB come from the heap
and freed ones stay resident: quantizing a 1.5B model grew by about 200 MB per
decoder layer (bench/memory_large_model.py). Two remedies:

* :func:`trim_heap` (``malloc_trim``) after each layer hands the freed heap
  back to the OS; ``fptq quantize`` does this after every layer, at no
  measurable cost, so the resident set stays flat from layer to layer.
* :func:`return_freed_memory_to_os` fixes the mmap threshold at 128 KiB, so
  large blocks are always mmapped and go back to the OS when freed; this also
  lowers the peak within a layer, but every large allocation then costs page
  faults, so quantization is slower. ``fptq quantize
  --low-memory`` applies it; it is a per-process setting (or set
  ``MALLOC_MMAP_THRESHOLD_=131072``).
"""
from __future__ import annotations

import ctypes
import functools
import ctypes.util
import sys

__all__ = ["return_freed_memory_to_os", "trim_heap", "M_MMAP_THRESHOLD", "process_memory"]

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number


@functools.lru_cache(maxsize=None)  # find_library runs ldconfig: once per process, not per call
def _libc_function(name: str):
    if not sys.platform.startswith("linux"):
        return None
    lib = ctypes.util.find_library("c")
    if not lib:
        return None
    try:
        return getattr(ctypes.CDLL(lib), name)
    except (OSError, AttributeError):
        return None


def trim_heap() -> bool:
    """Return the free memory of the C heap to the OS (glibc's ``malloc_trim(0)``); False where unavailable."""
    fn = _libc_function("malloc_trim")
    if fn is None:
        return False
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    fn(0)
    return True


def return_freed_memory_to_os(threshold_bytes: int = 128 * 1024) -> bool:
    """Ask glibc to serve blocks of ``threshold_bytes`` or more with mmap (fixed threshold).

    Returns whether the setting was applied (False on other platforms or C libraries).
    """
    mallopt = _libc_function("mallopt")
    if mallopt is None:
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return mallopt(M_MMAP_THRESHOLD, int(threshold_bytes)) == 1


def process_memory() -> dict[str, int]:
    """This process's resident memory now (``rss_bytes``) and its peak so far (``peak_rss_bytes``), from
    ``/proc/self/status`` (Linux); empty where that is unavailable."""
    keys = {"VmRSS": "rss_bytes", "VmHWM": "peak_rss_bytes"}
    out: dict[str, int] = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key = line.split(":", 1)[0]
                if key in keys:
                    out[keys[key]] = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return {}
    return out
