"""What a backend process gets: its environment, its user, where its output goes."""

from __future__ import annotations

import logging
import os
import pwd
import sys
from collections.abc import Mapping

from modeld.errors import LoadFailed
from modeld.supervisor.spawn import Credentials

log = logging.getLogger(__name__)

DEFAULT_BACKEND_USER = "modeld"
_SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_PASSED_THROUGH = ("LANG", "LC_ALL", "TZ", "LD_LIBRARY_PATH")
"""modeld's own variables a backend still sees: its locale, time zone and library path."""


def backend_environment(
    model_name: str, inherited: Mapping[str, str] = os.environ, *, gpu: str = ""
) -> dict[str, str]:
    """A clean environment, built from nothing: PATH, HOME, MODELD_PYTHON, MODELD_MODEL,
    LANG and PYTHONUNBUFFERED, CUDA_VISIBLE_DEVICES when placed on a GPU, and of modeld's
    own only :data:`_PASSED_THROUGH`; never NOTIFY_SOCKET, LISTEN_*, WATCHDOG_*,
    INVOCATION_ID, JOURNAL_STREAM, PYTHONPATH or anything else modeld was started with.

    ``MODELD_PYTHON`` and the first PATH entry point at modeld's own interpreter, so Python
    backends shipped with modeld run in modeld's environment (a venv or a distro install).
    ``gpu``, the device UUID a model was placed on, becomes CUDA_VISIBLE_DEVICES; models
    without ``gpu_memory`` are not placed and see the host's devices as usual.
    """
    interpreter_dir = os.path.dirname(sys.executable)
    env = {
        "PATH": f"{interpreter_dir}:{_SYSTEM_PATH}",
        "MODELD_PYTHON": sys.executable,
        "MODELD_MODEL": model_name,
        "HOME": "/",
        "LANG": "C.UTF-8",
        "PYTHONUNBUFFERED": "1",
    }
    if gpu:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    for key in _PASSED_THROUGH:
        if key in inherited:
            env[key] = inherited[key]
    return env


def default_backend_user(configured: str | None) -> str | None:
    """The daemon-wide backend user: configured, else ``modeld`` if it exists, else None.

    None means "modeld's own user"; the caller warns once about it.
    """
    if configured:
        return configured
    try:
        pwd.getpwnam(DEFAULT_BACKEND_USER)
    except KeyError:
        return None
    return DEFAULT_BACKEND_USER


def credentials_for(user: str | None) -> Credentials | None:
    """uid/gid to switch to, or None when the backend runs as modeld's own user."""
    if not user:
        return None
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise LoadFailed(f"backend user '{user}' does not exist") from None
    if entry.pw_uid == os.getuid():
        return None
    return Credentials(uid=entry.pw_uid, gid=entry.pw_gid)
