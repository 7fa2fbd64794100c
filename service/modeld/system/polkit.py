"""The polkit client: one CheckAuthorization call to polkitd for a caller on the system bus.

The subject is the caller's unique bus name (``system-bus-name``), which polkitd resolves to
its process and user itself, so modeld never has to trust a PID it was told. Nothing is
cached here: polkit keeps what an ``auth_admin_keep`` authentication earns.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass

from modeld.system.dbus import MessageBus, Variant, call

POLKIT_NAME = "org.freedesktop.PolicyKit1"
POLKIT_PATH = "/org/freedesktop/PolicyKit1/Authority"
POLKIT_INTERFACE = "org.freedesktop.PolicyKit1.Authority"

ALLOW_USER_INTERACTION = 1
"""CheckAuthorization flag: polkit may ask an authentication agent (and the call may take
as long as the person takes to answer)."""

CHECK_TIMEOUT = 25.0
"""How long a check that may not interact waits for polkitd (D-Bus's usual reply timeout)."""
INTERACTIVE_TIMEOUT = 300.0
"""How long a check that may interact waits: a person types a password meanwhile."""


@dataclass(frozen=True)
class Authorization:
    """polkit's answer: ``authorized``, or not but ``challenge`` (authentication would do)."""

    authorized: bool
    challenge: bool


async def check_authorization(
    bus: MessageBus,
    sender: str,
    action: str,
    details: Mapping[str, str],
    *,
    interactive: bool,
) -> Authorization:
    """Ask polkitd whether the connection ``sender`` may do ``action``.

    ``details`` reach polkit rules (``action.lookup(key)``) and messages (``$(key)``);
    ``interactive`` lets polkit ask an authentication agent. Raises DBusError when polkitd
    cannot be asked or fails, TimeoutError when it does not answer in time.
    """
    subject = ("system-bus-name", {"name": Variant("s", sender)})
    flags = ALLOW_USER_INTERACTION if interactive else 0
    async with asyncio.timeout(INTERACTIVE_TIMEOUT if interactive else CHECK_TIMEOUT):
        ((authorized, challenge, _details),) = await call(
            bus,
            POLKIT_NAME,
            POLKIT_PATH,
            POLKIT_INTERFACE,
            "CheckAuthorization",
            "(sa{sv})sa{ss}us",
            [list(subject), action, dict(details), flags, ""],
        )
    return Authorization(bool(authorized), bool(challenge))
