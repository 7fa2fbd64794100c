"""Process memory figures and giving memory back to the kernel."""

from __future__ import annotations

import gc
import os
import resource

MIB = 1 << 20


def rss_bytes() -> int:
    """Current resident set size of this process, in bytes."""
    try:
        with open("/proc/self/statm", "rb") as f:
            resident_pages = int(f.read().split()[1])
        return resident_pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        # Peak rather than current, but better than nothing off Linux.
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def release_memory() -> None:
    """Collect garbage and ask glibc to return free heap memory to the kernel."""
    gc.collect()
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: freed memory still goes back where the allocator allows
