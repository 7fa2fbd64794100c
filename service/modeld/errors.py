"""One error hierarchy for everything modeld reports to callers.

Each class carries a stable D-Bus error name. Messages are one line a person can act on;
the D-Bus adapter maps these to ``DBusError`` and never lets a traceback cross the bus.
"""

from __future__ import annotations

ERROR_PREFIX = "org.modeld1.Error."


class ModeldError(Exception):
    """Base class: an expected failure with a one-line message."""

    dbus_name = ERROR_PREFIX + "Failed"

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))

    @property
    def message(self) -> str:
        return str(self)


class NoSuchModel(ModeldError):
    dbus_name = ERROR_PREFIX + "NoSuchModel"


class NoSuchBackend(ModeldError):
    dbus_name = ERROR_PREFIX + "NoSuchBackend"


class LoadFailed(ModeldError):
    dbus_name = ERROR_PREFIX + "LoadFailed"


class InCooldown(LoadFailed):
    """The model's last load failed and its cooldown runs; ``retry_after`` in seconds."""

    def __init__(self, message: str, *, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Busy(ModeldError):
    dbus_name = ERROR_PREFIX + "Busy"


class InsufficientResources(ModeldError):
    dbus_name = ERROR_PREFIX + "InsufficientResources"


class QueueFull(ModeldError):
    """Too many requests wait for a model already; ``retry_after`` is in seconds."""

    dbus_name = ERROR_PREFIX + "Busy"

    def __init__(self, message: str, *, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class InvalidConfig(ModeldError):
    dbus_name = ERROR_PREFIX + "InvalidConfig"


class AccessDenied(ModeldError):
    dbus_name = ERROR_PREFIX + "AccessDenied"


class InteractiveAuthorizationRequired(AccessDenied):
    """polkit would authorize after authentication, but the call did not allow interaction
    (D-Bus header flag ALLOW_INTERACTIVE_AUTHORIZATION): the caller may retry with it."""

    dbus_name = "org.freedesktop.DBus.Error.InteractiveAuthorizationRequired"


class PinnedModel(AccessDenied):
    """The owner refused an unload of a pinned model by a caller not authorized to manage."""


class InvalidArgs(ModeldError):
    dbus_name = "org.freedesktop.DBus.Error.InvalidArgs"


class SystemdError(ModeldError):
    """systemd refused or failed a job modeld asked for."""

    dbus_name = ERROR_PREFIX + "LoadFailed"
