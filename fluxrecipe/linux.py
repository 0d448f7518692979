"""Linux (glibc) calls Python does not expose; each is a no-op where it is not available."""

from __future__ import annotations

import ctypes
import os
import sys

_libc = None
if sys.platform.startswith("linux"):
    try:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    except (OSError, AttributeError):
        _libc = None

SYNC_FILE_RANGE_WAIT_BEFORE, SYNC_FILE_RANGE_WRITE, SYNC_FILE_RANGE_WAIT_AFTER = 1, 2, 4
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def sync_file_range(fd: int, offset: int, nbytes: int, flags: int) -> bool:
    """Start (or wait for) writeback of a byte range; False where the call is not available or failed."""
    return _libc is not None and _libc.sync_file_range(fd, offset, nbytes, flags) == 0


def keep_freed_memory() -> None:
    """Let glibc keep and reuse freed buffers of up to 32 MiB instead of handing each back to the kernel.

    The executor allocates and frees a few MB per chunk, thousands of times; by default glibc returns such
    blocks to the kernel, and faulting them in again costs more than the arithmetic (measured: a 1M-element
    lerp took 13 ms instead of 1 ms). What is kept is bounded by the executor's own peak working set.
    """
    if _libc is not None and hasattr(_libc, "mallopt") and os.environ.get("MALLOC_MMAP_THRESHOLD_") is None:
        _libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)
        _libc.mallopt(_M_TRIM_THRESHOLD, 256 << 20)


def release_freed_memory() -> None:
    """Hand the buffers glibc kept (keep_freed_memory: up to M_TRIM_THRESHOLD per thread's arena) back to the
    kernel: where one phase of work ends and another, on other threads, begins, so the two do not add up."""
    if _libc is not None and hasattr(_libc, "malloc_trim"):
        _libc.malloc_trim(0)
