"""A small asyncio D-Bus client for tests: calls, signal capture and fd passing."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from dbus_next.aio.message_bus import MessageBus
from dbus_next.constants import MessageType
from dbus_next.message import Message


@contextlib.asynccontextmanager
async def connect(address: str) -> AsyncIterator[MessageBus]:
    bus = await MessageBus(bus_address=address, negotiate_unix_fd=True).connect()
    try:
        yield bus
    finally:
        bus.disconnect()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(bus.wait_for_disconnect(), 2)
        # dbus-next 0.2.3 never closes its socket on disconnect
        bus._sock.close()


async def call(
    bus: MessageBus,
    member: str,
    signature: str = "",
    body: list[Any] | None = None,
    *,
    path: str = "/org/modeld1",
    interface: str = "org.modeld1.Manager",
    destination: str = "org.modeld1",
) -> Message:
    """Call and return the reply message (METHOD_RETURN or ERROR)."""
    reply = await bus.call(
        Message(
            destination=destination,
            path=path,
            interface=interface,
            member=member,
            signature=signature,
            body=body or [],
        )
    )
    assert reply is not None
    return reply


class SignalRecorder:
    """Records signals from org.modeld1 (manager signals and PropertiesChanged)."""

    def __init__(self, bus: MessageBus) -> None:
        self.bus = bus
        self.signals: list[tuple[str, str, list[Any]]] = []
        self._changed = asyncio.Event()

    async def start(self) -> SignalRecorder:
        self.bus.add_message_handler(self._on_message)
        await call(
            self.bus,
            "AddMatch",
            "s",
            ["type='signal',sender='org.modeld1'"],
            path="/org/freedesktop/DBus",
            interface="org.freedesktop.DBus",
            destination="org.freedesktop.DBus",
        )
        return self

    def _on_message(self, msg: Message) -> None:
        if msg.message_type is not MessageType.SIGNAL or not msg.interface or not msg.path:
            return
        if msg.interface.startswith("org.modeld1") or msg.member == "PropertiesChanged":
            self.signals.append((msg.path, msg.member or "", list(msg.body)))
            self._changed.set()

    def unloaded(self, name: str) -> list[str]:
        """Reasons of the ModelUnloaded signals seen for ``name``."""
        return [
            body[2]
            for _p, member, body in self.signals
            if member == "ModelUnloaded" and body[0] == name
        ]

    def states(self, path: str) -> list[str]:
        """The State values announced by PropertiesChanged on ``path``, in order."""
        found = []
        for signal_path, member, body in self.signals:
            if signal_path == path and member == "PropertiesChanged" and "State" in body[1]:
                found.append(body[1]["State"].value)
        return found

    async def wait_for(self, predicate: Any, timeout: float = 30.0) -> None:
        async def loop() -> None:
            while not predicate():
                self._changed.clear()
                await self._changed.wait()

        await asyncio.wait_for(loop(), timeout)
