"""The D-Bus connection: dbus-next's client types, connecting, and one-call requests.

Together with :mod:`modeld.bus.connection` (the org.modeld1 side) this is the only place
that imports dbus-next, which keeps a move to dbus-fast an import-level change.
"""

from __future__ import annotations

from typing import Any, TypeVar

from dbus_next.aio.message_bus import MessageBus
from dbus_next.constants import BusType, MessageFlag, MessageType, NameFlag, RequestNameReply
from dbus_next.errors import DBusError
from dbus_next.message import Message
from dbus_next.signature import Variant

__all__ = [
    "DBUS_INTERFACE",
    "DBUS_NAME",
    "DBUS_PATH",
    "OBJECT_MANAGER_INTERFACE",
    "PROPERTIES_INTERFACE",
    "BusType",
    "DBusError",
    "Message",
    "MessageBus",
    "MessageType",
    "NameFlag",
    "RequestNameReply",
    "Variant",
    "call",
    "call_no_reply",
    "connect",
]

DBUS_NAME = "org.freedesktop.DBus"
DBUS_PATH = "/org/freedesktop/DBus"
DBUS_INTERFACE = "org.freedesktop.DBus"
PROPERTIES_INTERFACE = "org.freedesktop.DBus.Properties"
OBJECT_MANAGER_INTERFACE = "org.freedesktop.DBus.ObjectManager"

_Bus = TypeVar("_Bus", bound=MessageBus)


async def connect(bus_class: type[_Bus], bus_type: BusType = BusType.SYSTEM) -> _Bus:
    """Connect a ``bus_class`` (MessageBus or a subclass) with unix-fd passing negotiated.

    The fds carry Acquire's leases.
    """
    bus = bus_class(bus_type=bus_type, negotiate_unix_fd=True)
    await bus.connect()
    return bus


def _method_call(
    destination: str,
    path: str,
    interface: str,
    member: str,
    signature: str,
    body: list[Any] | None,
) -> Message:
    return Message(
        destination=destination,
        path=path,
        interface=interface,
        member=member,
        signature=signature,
        body=body or [],
    )


async def call(
    bus: MessageBus,
    destination: str,
    path: str,
    interface: str,
    member: str,
    signature: str = "",
    body: list[Any] | None = None,
) -> list[Any]:
    """Call a method and return the reply body; raise DBusError on an error reply."""
    reply = await bus.call(_method_call(destination, path, interface, member, signature, body))
    assert reply is not None
    if reply.message_type is MessageType.ERROR:
        text = reply.body[0] if reply.body else reply.error_name
        raise DBusError(reply.error_name, text)
    return list(reply.body)


async def call_no_reply(
    bus: MessageBus,
    destination: str,
    path: str,
    interface: str,
    member: str,
    signature: str = "",
    body: list[Any] | None = None,
) -> None:
    """Call a method without asking for a reply (nor an error): for best-effort calls."""
    message = _method_call(destination, path, interface, member, signature, body)
    message.flags = MessageFlag.NO_REPLY_EXPECTED
    await bus.send(message)
