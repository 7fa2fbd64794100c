"""Calls of org.modeld1.Manager's ``Load``/``Unload`` from inside the sandbox (benchmark
drivers): a message to time as a whole, and a call that raises on an error reply."""

from __future__ import annotations

from typing import Any


def manager_message(member: str, name: str, *, wait: bool) -> Any:
    """``member(name, {wait: true})`` (or no options) as a dbus-next Message."""
    from dbus_next.message import Message
    from dbus_next.signature import Variant

    options = {"wait": Variant("b", True)} if wait else {}
    return Message(
        destination="org.modeld1",
        path="/org/modeld1",
        interface="org.modeld1.Manager",
        member=member,
        signature="sa{sv}",
        body=[name, options],
    )


async def call_manager(bus: Any, member: str, name: str, *, wait: bool) -> None:
    """Call and wait for the reply; raise RuntimeError on an error reply."""
    reply = await bus.call(manager_message(member, name, wait=wait))
    if reply.error_name:
        raise RuntimeError(f"{member} {name} failed: {reply.body}")
