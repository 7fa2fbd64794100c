"""One-line log messages to stderr, prefixed with the backend's name and pid."""

from __future__ import annotations

import os
import sys
import threading

_lock = threading.Lock()
_name = "backend"


def set_name(name: str) -> None:
    """Name the process in every following line (``<name>[PID]: message``)."""
    global _name
    _name = name


def log(message: str) -> None:
    """Write ``message`` to stderr as ``<name>[PID]: message`` and flush."""
    line = f"{_name}[{os.getpid()}]: {message}\n"
    with _lock:
        try:
            sys.stderr.write(line)
            sys.stderr.flush()
        except (OSError, ValueError):
            pass  # stderr closed: nothing better to do
