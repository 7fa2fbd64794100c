"""Who may call what: the rule every member of org.modeld1 declares, and the caller check.

Every exported method declares a :class:`Rule` with :func:`authorized`, and so does every
writable property (on its getter; reading is open to everyone). The gate
(:mod:`modeld.bus.gate`) refuses to export an interface with a member that declares none and
refuses calls to such a member, so a forgotten rule fails closed.

A rule names the polkit action it needs. polkit is not consulted yet: root (and modeld's own
user, for per-user instances) hold every action; other users are refused. A per-user modeld
(``own_user_only``) never asks polkit: only its own user holds the actions.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from modeld.errors import AccessDenied
from modeld.system.dbus import DBusError, MessageBus, call

_CACHE_LIMIT = 4096
_RULE_ATTRIBUTE = "_modeld_rule"

_F = TypeVar("_F", bound=Callable[..., Any])


class Action(enum.StrEnum):
    """The polkit actions a state change needs (see the contract's Authorization)."""

    USE = "org.modeld1.use"
    MANAGE = "org.modeld1.manage"


class Rule(enum.Enum):
    """What a caller needs for one member; :meth:`action` decides it for one call."""

    READ = "open to everyone"
    USE = "org.modeld1.use"
    MANAGE = "org.modeld1.manage"
    LOAD = "org.modeld1.use, org.modeld1.manage with force"
    UNLOAD = "org.modeld1.use, org.modeld1.manage with force or for a pinned model"

    def action(self, options: Mapping[str, Any], pinned: Callable[[], bool]) -> Action | None:
        """The action this call needs, or None if it is open.

        ``options`` is the call's ``a{sv}`` argument ({} if it has none); ``pinned`` says
        whether the model the call concerns is pinned. A malformed ``force`` counts as given
        (the stricter action; the method then refuses the option).
        """
        if self is Rule.READ:
            return None
        if self is Rule.USE:
            return Action.USE
        if self is Rule.MANAGE:
            return Action.MANAGE
        if _forced(options) or (self is Rule.UNLOAD and pinned()):
            return Action.MANAGE
        return Action.USE


def _forced(options: Mapping[str, Any]) -> bool:
    force = options.get("force")
    if force is None:
        return False
    if getattr(force, "signature", None) != "b":
        return True
    return bool(force.value)


def authorized(rule: Rule) -> Callable[[_F], _F]:
    """Declare the rule of an exported method, or of writes to a property (on its getter)."""

    def declare(fn: _F) -> _F:
        setattr(fn, _RULE_ATTRIBUTE, rule)
        return fn

    return declare


def rule_of(fn: Callable[..., Any]) -> Rule | None:
    """The rule ``fn`` declares with :func:`authorized`, or None."""
    rule = getattr(fn, _RULE_ATTRIBUTE, None)
    return rule if isinstance(rule, Rule) else None


class Authorizer:
    """Checks the calling connection's uid; unique names are never reused, so uids cache."""

    def __init__(self, bus: MessageBus, *, own_user_only: bool = False) -> None:
        """``own_user_only``: a per-user modeld; only its own uid holds the actions."""
        self._bus = bus
        self._uids: dict[str, int] = {}
        self._own_user_only = own_user_only

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

    async def check(self, action: Action, sender: str | None, what: str) -> None:
        """Raise AccessDenied, naming ``action``, unless ``sender`` may do ``what``."""
        needs = f"{what} needs {action}"
        if sender is None:
            raise AccessDenied(f"{needs}: the caller is unknown")
        try:
            uid = await self.uid_of(sender)
        except DBusError as err:
            raise AccessDenied(f"{needs}: cannot identify the caller ({err.text})") from None
        if uid == os.getuid() or (uid == 0 and not self._own_user_only):
            return
        if self._own_user_only:
            raise AccessDenied(
                f"{needs}: this is the per-user modeld of uid {os.getuid()}; only that user"
                f" may change its state (uid {uid} may not)"
            )
        raise AccessDenied(
            f"{needs}: uid {uid} may not change modeld's state; only root may"
            " (polkit authorization is not supported yet)"
        )
