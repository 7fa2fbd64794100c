"""Wait for files to appear in a directory, driven by inotify (no polling).

One watch lives as long as the directory is used: closing an inotify instance waits for an
RCU grace period in the kernel (about 10 ms here), far too slow for every backend start.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import os
import struct
from pathlib import Path

_IN_CLOEXEC = 0o2000000
_IN_NONBLOCK = 0o4000
_IN_CREATE = 0x100
_IN_MOVED_TO = 0x80
_EVENT_HEADER = struct.Struct("iIII")

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


class DirectoryWatch:
    """Resolves waiters as soon as an entry of that name is created in ``directory``."""

    def __init__(self, directory: Path) -> None:
        self._fd = _libc.inotify_init1(_IN_CLOEXEC | _IN_NONBLOCK)
        if self._fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1 failed")
        if _libc.inotify_add_watch(self._fd, os.fsencode(directory), _IN_CREATE | _IN_MOVED_TO) < 0:
            err = ctypes.get_errno()
            os.close(self._fd)
            raise OSError(err, f"inotify_add_watch {directory} failed")
        self._directory = directory
        self._waiters: dict[str, list[asyncio.Future[None]]] = {}
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._fd, self._on_readable)

    def _on_readable(self) -> None:
        try:
            data = os.read(self._fd, 65536)
        except BlockingIOError:
            return
        offset = 0
        while offset < len(data):
            _wd, _mask, _cookie, length = _EVENT_HEADER.unpack_from(data, offset)
            offset += _EVENT_HEADER.size
            name = os.fsdecode(data[offset : offset + length].rstrip(b"\0"))
            offset += length
            self._resolve(name)

    def _resolve(self, name: str) -> None:
        for waiter in self._waiters.pop(name, []):
            if not waiter.done():
                waiter.set_result(None)

    async def wait_for(self, name: str) -> None:
        """Return once ``name`` exists in the directory (at once if it already does)."""
        waiter: asyncio.Future[None] = self._loop.create_future()
        self._waiters.setdefault(name, []).append(waiter)
        if (self._directory / name).exists():
            self._resolve(name)
        try:
            await waiter
        finally:
            waiters = self._waiters.get(name)
            if waiters is not None and waiter in waiters:
                waiters.remove(waiter)
                if not waiters:
                    del self._waiters[name]

    def close(self) -> None:
        if self._fd >= 0:
            self._loop.remove_reader(self._fd)
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> DirectoryWatch:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()
