"""Sockets passed by systemd socket activation (sd_listen_fds semantics)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

SD_LISTEN_FDS_START = 3


def take_listen_sockets() -> list[socket.socket]:
    """Return the inherited listening sockets and remove LISTEN_* from the environment."""
    pid = os.environ.pop("LISTEN_PID", None)
    count = os.environ.pop("LISTEN_FDS", None)
    os.environ.pop("LISTEN_FDNAMES", None)
    if pid != str(os.getpid()) or not count:
        return []
    sockets = []
    for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + int(count)):
        os.set_inheritable(fd, False)
        sockets.append(socket.socket(fileno=fd))
    return sockets


def bind_unix_socket(path: Path, mode: int = 0o666) -> socket.socket:
    """Bind a listening stream socket at ``path`` with ``mode`` (used without socket
    activation; a per-user modeld passes 0600, as its socket unit does)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_socket():
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    os.chmod(path, mode)
    sock.listen(128)
    return sock
