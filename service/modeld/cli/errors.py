"""The one exception type modeldctl's commands raise for an expected failure."""

from __future__ import annotations

from typing import Any

from modeld.errors import InvalidConfig, LoadFailed, ModeldError, NoSuchBackend

FAILED = ModeldError.dbus_name
LOAD_FAILED = LoadFailed.dbus_name
INVALID_CONFIG = InvalidConfig.dbus_name
NO_SUCH_BACKEND = NoSuchBackend.dbus_name


class CliError(Exception):
    """A failure to report as ``modeldctl: <message>`` with exit status 1.

    ``name`` is the D-Bus error name modeld replied with (or the closest standard one
    for failures found locally); ``message`` is a single line. ``details`` are extra
    top-level keys for the ``--json`` error object.
    """

    def __init__(self, name: str, message: str, *, details: dict[str, Any] | None = None) -> None:
        lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
        self.name = name
        self.message = lines[0] if lines else name
        self.details = details or {}
        super().__init__(self.message)
