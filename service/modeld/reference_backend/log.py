"""One-line log messages to stderr, prefixed with the backend name and pid."""

from __future__ import annotations

import os
import sys
import threading

_lock = threading.Lock()


def log(message: str) -> None:
    """Write ``message`` to stderr as ``reference-backend[PID]: message`` and flush."""
    line = f"reference-backend[{os.getpid()}]: {message}\n"
    with _lock:
        try:
            sys.stderr.write(line)
            sys.stderr.flush()
        except (OSError, ValueError):
            pass  # stderr closed: nothing better to do
