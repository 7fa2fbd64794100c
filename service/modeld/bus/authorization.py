"""Who may change modeld's state.

dbus-next does not pass the sender to method handlers, so a message handler that runs
before dispatch records it in a context variable; the method's task inherits the context.
Root (and modeld's own user, for per-user instances) may change state; polkit is not
consulted yet, so other users are refused.
"""

from __future__ import annotations

import contextvars
import os

from modeld.errors import AccessDenied
from modeld.system.dbus import DBusError, MessageBus, call

_sender: contextvars.ContextVar[str | None] = contextvars.ContextVar("dbus_sender", default=None)
_CACHE_LIMIT = 4096


class Authorizer:
    """Checks the calling connection's uid; unique names are never reused, so uids cache."""

    def __init__(self, bus: MessageBus) -> None:
        self._bus = bus
        self._uids: dict[str, int] = {}

    @staticmethod
    def remember_sender(sender: str | None) -> None:
        _sender.set(sender)

    async def uid_of(self, sender: str) -> int:
        uid = self._uids.get(sender)
        if uid is None:
            (uid,) = await call(
                self._bus,
                "org.freedesktop.DBus",
                "/org/freedesktop/DBus",
                "org.freedesktop.DBus",
                "GetConnectionUnixUser",
                "s",
                [sender],
            )
            if len(self._uids) >= _CACHE_LIMIT:
                self._uids.clear()
            self._uids[sender] = uid
        return int(uid)

    async def check(self, action: str) -> None:
        """Raise AccessDenied unless the current caller may perform ``action``."""
        sender = _sender.get()
        if sender is None:
            raise AccessDenied(f"{action}: caller unknown")
        try:
            uid = await self.uid_of(sender)
        except DBusError as err:
            raise AccessDenied(f"{action}: cannot identify the caller ({err.text})") from None
        if uid in (0, os.getuid()):
            return
        raise AccessDenied(
            f"{action}: uid {uid} may not change modeld's state; only root may"
            " (polkit authorization is not supported yet)"
        )
