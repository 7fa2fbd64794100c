"""A backend's private directory under ``<runtime_dir>/backends/``, holding its socket.

Only modeld and the backend may enter it (0750, owned by the backend's user and group),
and the socket in it is made 0660 once it appears: no other local user can reach a
backend's gRPC service behind modeld's back. The directory of backends itself is 0711:
modeld's to list, everyone's to traverse (a path alone gives nothing away).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
from pathlib import Path

BACKENDS_DIR_MODE = 0o711
BACKEND_DIR_MODE = 0o750
SOCKET_MODE = 0o660
BACKEND_UMASK = 0o027
"""The umask backends start with: nothing they create is readable by other users."""


def prepare_backends_dir(path: Path) -> None:
    """Create ``<runtime_dir>/backends`` (or fix its mode)."""
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, BACKENDS_DIR_MODE)


def prepare_backend_dir(path: Path, owner: tuple[int, int] | None) -> None:
    """A fresh, empty private directory at ``path`` owned by ``owner`` (uid, gid; None:
    modeld's own user). Whatever an earlier backend left there is removed first."""
    if path.is_symlink() or path.exists():
        remove_backend_dir(path)
    path.mkdir(mode=BACKEND_DIR_MODE)
    os.chmod(path, BACKEND_DIR_MODE)  # mkdir's mode is subject to modeld's umask
    if owner is not None:
        os.chown(path, *owner)


def secure_socket(path: Path) -> None:
    """Make the backend's socket 0660 (it was created under the backend's umask).

    The directory is the backend's: what is at ``path`` is opened without following a
    symlink and changed only if it is a socket, so a backend cannot make modeld change
    another file's mode.
    """
    try:
        fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        if stat.S_ISSOCK(os.fstat(fd).st_mode):
            os.chmod(f"/proc/self/fd/{fd}", SOCKET_MODE)
    finally:
        os.close(fd)


def remove_backend_dir(path: Path) -> None:
    """Remove the private directory and everything in it (the backend is gone)."""
    if path.is_symlink() or not path.is_dir():
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        return
    shutil.rmtree(path, ignore_errors=True)
