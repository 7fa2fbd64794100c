"""Who may call what: the rule every member of org.modeld1 declares, and the caller check.

Every exported method declares a :class:`Rule` with :func:`authorized`, and so does every
writable property (on its getter; reading is open to everyone). The gate
(:mod:`modeld.bus.gate`) refuses to export an interface with a member that declares none and
refuses calls to such a member, so a forgotten rule fails closed.

A rule names the polkit action a call needs, decided from the call's arguments alone
(``force`` needs ``manage``). Root, and modeld's own user (a per-user instance), hold every
action without asking; anyone else is asked about at polkitd, once per call (a per-user
instance, ``own_user_only``, never asks polkit: only its own user holds the actions), and refused
with AccessDenied naming the action when polkit says no or cannot be asked.

What depends on modeld's state is decided by its owner, not here: an unload of a pinned
model needs ``manage``, so the gate asks for ``use``, the method tells the owner whether the
caller holds ``manage`` (:func:`current_caller`), and only if the owner refuses for the pin
is polkit asked for ``manage`` (:meth:`Caller.require`) and the unload tried again.
"""

from __future__ import annotations

import contextvars
import enum
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from modeld.errors import AccessDenied, InteractiveAuthorizationRequired
from modeld.system.dbus import DBusError, MessageBus, call
from modeld.system.polkit import check_authorization

_CACHE_LIMIT = 4096
_RULE_ATTRIBUTE = "_modeld_rule"

MODEL_DETAIL = "org.modeld1.model"
"""The polkit detail naming the model a call concerns, for rules (``action.lookup``)."""

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
    UNLOAD = "org.modeld1.use, org.modeld1.manage with force or (owner's decision) if pinned"

    def action(self, options: Mapping[str, Any]) -> Action | None:
        """The action this call needs, or None if it is open.

        ``options`` is the call's ``a{sv}`` argument ({} if it has none). A malformed
        ``force`` counts as given (the stricter action; the method then refuses the option).
        An unload of a pinned model needs ``manage`` too, which its owner enforces.
        """
        if self is Rule.READ:
            return None
        if self is Rule.USE:
            return Action.USE
        if self is Rule.MANAGE or _forced(options):
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


@dataclass(frozen=True)
class Call:
    """One call to authorize: its sender's unique name (None: unknown), what it does (for
    messages: ``Load demo``), the model it concerns, whether polkit may interact."""

    sender: str | None
    what: str
    model: str | None = None
    interactive: bool = False


class Caller:
    """The caller of the call being served, with the actions it was found to hold."""

    def __init__(
        self, authorizer: Authorizer, call: Call, uid: int, granted: frozenset[Action]
    ) -> None:
        self._authorizer = authorizer
        self._call = call
        self.uid = uid
        self.granted = granted

    def holds(self, action: Action) -> bool:
        return action in self.granted

    async def require(self, action: Action, what: str) -> None:
        """Ask polkit for ``action`` too (for this call only); AccessDenied naming it, and
        ``what`` needs it, if refused."""
        if self.holds(action):
            return
        await self._authorizer.ask_polkit(action, replace(self._call, what=what), self.uid)
        self.granted = self.granted | {action}


_current: contextvars.ContextVar[Caller | None] = contextvars.ContextVar(
    "modeld_bus_caller", default=None
)


def current_caller() -> Caller | None:
    """The authorized caller of the method running (None for open members)."""
    return _current.get()


def serve_as(caller: Caller) -> None:
    """Make ``caller`` the current caller of the task dispatching the call (and so of the
    method's own task, which copies the context when it is created)."""
    _current.set(caller)


class Authorizer:
    """Asks polkitd whether a caller holds an action; root and modeld's own user always do.

    The calling connection's uid is cached (unique names are never reused); polkit's
    answers are not.
    """

    def __init__(self, bus: MessageBus, *, own_user_only: bool = False) -> None:
        """``own_user_only``: a per-user modeld; only its own uid holds the actions."""
        self._bus = bus
        self._uids: dict[str, int] = {}
        self._own_user_only = own_user_only
        self._privileged = frozenset({os.getuid()} if own_user_only else {0, os.getuid()})

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

    async def authorize(self, action: Action, call: Call) -> Caller:
        """The caller of ``call``, found to hold ``action``; AccessDenied naming it if not."""
        needs = f"{call.what} needs {action}"
        if call.sender is None:
            raise AccessDenied(f"{needs}: the caller is unknown")
        try:
            uid = await self.uid_of(call.sender)
        except DBusError as err:
            raise AccessDenied(f"{needs}: cannot identify the caller ({err.text})") from None
        if uid in self._privileged:
            return Caller(self, call, uid, frozenset(Action))
        if self._own_user_only:
            raise AccessDenied(
                f"{needs}: this is the per-user modeld of uid {os.getuid()}; only that user"
                f" may change its state (uid {uid} may not)"
            )
        await self.ask_polkit(action, call, uid)
        return Caller(self, call, uid, frozenset({action}))

    async def ask_polkit(self, action: Action, call: Call, uid: int) -> None:
        """Raise AccessDenied, naming ``action``, unless polkit authorizes ``call``'s sender.

        Fails closed: if polkitd is absent, fails or does not answer, the call is refused.
        """
        needs = f"{call.what} needs {action}"
        assert call.sender is not None
        details = {MODEL_DETAIL: call.model} if call.model is not None else {}
        try:
            answer = await check_authorization(
                self._bus, call.sender, action, details, interactive=call.interactive
            )
        except DBusError as err:
            raise AccessDenied(
                f"{needs}: uid {uid} is refused because polkit could not be asked ({err.text})"
            ) from None
        except TimeoutError:
            raise AccessDenied(
                f"{needs}: uid {uid} is refused because polkit did not answer in time"
            ) from None
        if answer.authorized:
            return
        if answer.challenge and not call.interactive:
            raise InteractiveAuthorizationRequired(
                f"{needs}: uid {uid} must authenticate, and the call does not allow"
                " interactive authorization"
            )
        raise AccessDenied(f"{needs}: uid {uid} is not authorized by polkit")
