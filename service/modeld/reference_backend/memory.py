"""Memory the reference backend holds on purpose (the ``alloc_mb`` knob)."""

from __future__ import annotations

from modeld.backend_kit.memory import MIB


def allocate_touched(mib: int) -> bytearray:
    """Allocate ``mib`` MiB and write every byte, so every page is really resident."""
    # bytearray(n) may come from calloc'ed, untouched pages; repeating a one-byte
    # bytearray is a memset over the whole buffer.
    return bytearray(b"\x5a") * (mib * MIB)
