"""The process heap (glibc's malloc): freed memory handed back to the OS, so that a long-running
decoder's resident size is what it holds."""

from __future__ import annotations

import ctypes
import functools
import sys


@functools.cache  # looked up once: the decoder trims each time its work runs out
def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def return_freed_memory() -> None:
    """Give freed heap pages back to the OS (glibc keeps freed blocks below its mmap threshold in
    the process, where the resident size still counts them)."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):  # musl has none
        libc.malloc_trim(0)
