"""journald's native protocol: entries with fields of our own (``MODELD_MODEL=``).

An entry is one datagram to ``/run/systemd/journal/socket`` holding ``KEY=value\\n``
pairs; a value with a newline is sent in the binary form (``KEY\\n``, its length as a
little-endian 64-bit number, the bytes, ``\\n``); an entry too big for a datagram goes in
a sealed memfd passed along with an empty datagram (systemd's journal-send.c does the
same). See systemd's "Native Journal Protocol" document.

This module is also the **log relay** of backends (``python -I -S journald.py MODEL UNIT``):
a backend's output stream cannot carry fields (transient scopes refuse
``LogExtraFields=``, and the stdout stream protocol has no fields), so the backend writes
into a pipe read by this small process, inside the backend's scope, which sends each line
as an entry with ``MODELD_MODEL`` and ``MODELD_UNIT``. It runs isolated (``-I -S``): it
imports nothing but the standard library, not even the rest of modeld.
"""

from __future__ import annotations

import array
import contextlib
import errno
import fcntl
import os
import signal
import socket
import struct
import sys
from collections.abc import Mapping

JOURNAL_SOCKET = "/run/systemd/journal/socket"
LINE_MAX = 48 * 1024
"""Longer output lines are split, as journald's stream reader does (its LineMax=)."""

_SEALS = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE


def encode(fields: Mapping[str, str | bytes]) -> bytes:
    """One entry in the native protocol's datagram format."""
    parts = []
    for key, value in fields.items():
        data = value.encode("utf-8", "replace") if isinstance(value, str) else value
        name = key.encode()
        if b"\n" in data:
            parts.append(name + b"\n" + struct.pack("<Q", len(data)) + data + b"\n")
        else:
            parts.append(name + b"=" + data + b"\n")
    return b"".join(parts)


class Journal:
    """A datagram socket to journald (connected on first use, again after journald restarts).

    :meth:`send` raises OSError when journald is not there, and, unless ``blocking``,
    BlockingIOError when journald's queue is full (``net.unix.max_dgram_qlen``
    datagrams: 512 where systemd boots the host, 10 in many containers) instead of
    waiting; callers fall back.
    """

    def __init__(self, path: str | None = None, *, blocking: bool = True) -> None:
        self.path = path or JOURNAL_SOCKET
        self.blocking = blocking
        self._sock: socket.socket | None = None

    def _socket(self) -> socket.socket:
        if self._sock is None:
            kind = socket.SOCK_DGRAM | socket.SOCK_CLOEXEC
            if not self.blocking:
                kind |= socket.SOCK_NONBLOCK
            sock = socket.socket(socket.AF_UNIX, kind)
            try:
                sock.connect(self.path)
            except OSError:
                sock.close()
                raise
            self._sock = sock
        return self._sock

    def send(self, fields: Mapping[str, str | bytes]) -> None:
        payload = encode(fields)
        try:
            self._send(payload)
        except (ConnectionRefusedError, FileNotFoundError, BrokenPipeError):
            self.close()  # journald restarted (a new socket): connect again, once
            self._send(payload)

    def _send(self, payload: bytes) -> None:
        sock = self._socket()
        try:
            sock.send(payload)
        except OSError as err:
            if err.errno not in (errno.EMSGSIZE, errno.ENOBUFS):  # too big for a datagram
                raise
            self._send_memfd(sock, payload)

    @staticmethod
    def _send_memfd(sock: socket.socket, payload: bytes) -> None:
        fd = os.memfd_create("journal-entry", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.write(fd, payload)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
            rights = array.array("i", [fd]).tobytes()
            sock.sendmsg([], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, rights)])
        finally:
            os.close(fd)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def available(path: str | None = None) -> bool:
    """True when journald accepts native entries at ``path``."""
    try:
        Journal(path)._socket().close()
    except OSError:
        return False
    return True


def relay(model: str, unit: str, source: int = 0, path: str | None = None) -> int:
    """Send each line read from fd ``source`` to the journal, tagged with the model.

    Runs until the backend's output is closed (every writer gone): SIGTERM, which
    stopping the scope sends to every process in it, is ignored so the backend's last
    lines still get through. Lines journald refuses are dropped: the backend must never
    block on a full pipe because its logger is gone.
    """
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    journal = Journal(path)
    fixed = {
        "PRIORITY": "6",
        "SYSLOG_IDENTIFIER": model,
        "MODELD_MODEL": model,
        "MODELD_UNIT": unit,
    }
    with os.fdopen(source, "rb", buffering=LINE_MAX) as stream:
        while line := stream.readline(LINE_MAX):
            with contextlib.suppress(OSError):
                journal.send({"MESSAGE": line.rstrip(b"\n"), **fixed})
    journal.close()
    return 0


def main(argv: list[str]) -> int:
    """``journald.py MODEL UNIT [SOCKET]``: relay stdin to the journal."""
    model, unit, *rest = argv
    return relay(model, unit, path=rest[0] if rest else None)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
