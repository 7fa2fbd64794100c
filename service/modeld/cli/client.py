"""A small asyncio D-Bus client for org.modeld1.

Plain method-call messages with known signatures: no introspection round-trip, so a
command costs one connection plus the calls it needs. Error replies become
:class:`CliError` carrying the D-Bus error name and its first line of text.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from modeld.cli.errors import CliError
from modeld.naming import BUS_NAME, MANAGER_INTERFACE, MANAGER_PATH, MODEL_INTERFACE
from modeld.system.dbus import (
    DBUS_INTERFACE,
    DBUS_NAME,
    DBUS_PATH,
    PROPERTIES_INTERFACE,
    BusType,
    Message,
    MessageBus,
    MessageType,
    Variant,
)

NO_SERVER = "org.freedesktop.DBus.Error.NoServer"
DISCONNECTED = "org.freedesktop.DBus.Error.Disconnected"
NO_REPLY = "org.freedesktop.DBus.Error.NoReply"

# Replies meaning "nobody owns org.modeld1 (and activation did not help)".
_UNREACHABLE = frozenset(
    {
        "org.freedesktop.DBus.Error.ServiceUnknown",
        "org.freedesktop.DBus.Error.NameHasNoOwner",
        NO_SERVER,
        DISCONNECTED,
    }
)
_UNREACHABLE_PREFIXES = ("org.freedesktop.DBus.Error.Spawn.", "org.freedesktop.systemd1.")

CONNECT_TIMEOUT = 10.0
CALL_TIMEOUT = 30.0
# Unload replies only once the backend has stopped.
LONG_CALL_TIMEOUT = 300.0


class ModelRef(NamedTuple):
    """One row of Manager.ListModels."""

    name: str
    state: str
    backend: str
    path: str


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def unwrap(value: Any) -> Any:
    """Variant (possibly nested in containers) -> plain Python value."""
    if isinstance(value, Variant):
        return unwrap(value.value)
    if isinstance(value, dict):
        return {k: unwrap(v) for k, v in value.items()}
    if isinstance(value, list):
        return [unwrap(v) for v in value]
    return value


class Client:
    """A connection to the bus modeld is on, and the calls modeldctl makes."""

    def __init__(self, bus: MessageBus, bus_label: str) -> None:
        self.bus = bus
        self.bus_label = bus_label

    @classmethod
    async def connect(cls, *, user: bool) -> Client:
        label = "session" if user else "system"
        bus_type = BusType.SESSION if user else BusType.SYSTEM
        try:
            bus = MessageBus(bus_type=bus_type)
            await asyncio.wait_for(bus.connect(), CONNECT_TIMEOUT)
        except TimeoutError:
            raise CliError(
                NO_SERVER, f"cannot reach {BUS_NAME} on the {label} bus: connection timed out"
            ) from None
        except Exception as exc:  # socket errors, bad address, authentication failure
            raise CliError(
                NO_SERVER, f"cannot reach {BUS_NAME} on the {label} bus: {_describe(exc)}"
            ) from None
        return cls(bus, label)

    async def close(self) -> None:
        """Disconnect and release the socket (dbus-next only shuts it down)."""
        self.bus.disconnect()  # type: ignore[no-untyped-call]
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.shield(self._disconnected()), 1.0)
        for resource in (getattr(self.bus, "_stream", None), getattr(self.bus, "_sock", None)):
            with contextlib.suppress(Exception):
                if resource is not None:
                    resource.close()

    async def _disconnected(self) -> None:
        await self.bus.wait_for_disconnect()  # type: ignore[no-untyped-call]

    # -- low level -----------------------------------------------------------------

    async def call(
        self,
        path: str,
        interface: str,
        member: str,
        signature: str = "",
        body: Sequence[Any] = (),
        *,
        destination: str = BUS_NAME,
        timeout: float = CALL_TIMEOUT,
    ) -> Message:
        """Call a method; return the reply message, raise CliError for an error reply."""
        msg = Message(
            destination=destination,
            path=path,
            interface=interface,
            member=member,
            signature=signature,
            body=list(body),
        )
        try:
            reply = await asyncio.wait_for(self.bus.call(msg), timeout)
        except TimeoutError:
            raise CliError(
                NO_REPLY, f"{destination} did not reply to {member} within {timeout:g} s"
            ) from None
        except Exception as exc:
            raise CliError(
                DISCONNECTED, f"lost the connection to the {self.bus_label} bus: {_describe(exc)}"
            ) from None
        if reply is None:  # only for no-reply-expected messages, which we never send
            raise CliError(NO_REPLY, f"no reply to {member}")
        if reply.message_type is MessageType.ERROR:
            raise self._error(reply)
        return reply

    def _error(self, reply: Message) -> CliError:
        name = reply.error_name or "org.freedesktop.DBus.Error.Failed"
        text = reply.body[0] if reply.body and isinstance(reply.body[0], str) else name
        if name in _UNREACHABLE or name.startswith(_UNREACHABLE_PREFIXES):
            first = text.strip().splitlines()[0] if text.strip() else name
            return CliError(name, f"cannot reach {BUS_NAME} on the {self.bus_label} bus: {first}")
        return CliError(name, text)

    async def add_match(self, rule: str) -> None:
        await self.call(DBUS_PATH, DBUS_INTERFACE, "AddMatch", "s", [rule], destination=DBUS_NAME)

    async def get_all(self, path: str, interface: str) -> tuple[dict[str, Any], int]:
        """All properties of ``interface`` at ``path`` and the reply's serial.

        The serial orders the snapshot against signals from the same sender.
        """
        reply = await self.call(path, PROPERTIES_INTERFACE, "GetAll", "s", [interface])
        props = {str(k): unwrap(v) for k, v in reply.body[0].items()}
        return props, reply.serial

    # -- org.modeld1.Manager -----------------------------------------------------------

    async def manager_properties(self) -> dict[str, Any]:
        return (await self.get_all(MANAGER_PATH, MANAGER_INTERFACE))[0]

    async def list_models(self) -> list[ModelRef]:
        reply = await self.call(MANAGER_PATH, MANAGER_INTERFACE, "ListModels")
        return [ModelRef(*(str(v) for v in row)) for row in reply.body[0]]

    async def get_model(self, name: str) -> tuple[str, str]:
        """The model's object path and the unique bus name of the modeld that answered."""
        reply = await self.call(MANAGER_PATH, MANAGER_INTERFACE, "GetModel", "s", [name])
        return str(reply.body[0]), reply.sender

    async def load(self, name: str, *, force: bool = False) -> str:
        options = {"force": Variant("b", True)} if force else {}
        reply = await self.call(MANAGER_PATH, MANAGER_INTERFACE, "Load", "sa{sv}", [name, options])
        return str(reply.body[0])

    async def unload(self, name: str, *, force: bool = False) -> None:
        options = {"force": Variant("b", True)} if force else {}
        await self.call(
            MANAGER_PATH,
            MANAGER_INTERFACE,
            "Unload",
            "sa{sv}",
            [name, options],
            timeout=LONG_CALL_TIMEOUT,
        )

    async def reload(self) -> None:
        await self.call(MANAGER_PATH, MANAGER_INTERFACE, "Reload")

    # -- org.modeld1.Model -------------------------------------------------------------

    async def model_properties(self, path: str) -> dict[str, Any]:
        return (await self.get_all(path, MODEL_INTERFACE))[0]

    async def set_pinned(self, path: str, pinned: bool) -> None:
        await self.call(path, MODEL_INTERFACE, "SetPinned", "b", [pinned])

    async def watch_model(self, path: str, owner: str) -> ModelWatch:
        """Subscribe to the model's PropertiesChanged (and to modeld leaving the bus).

        Returns once the bus has acknowledged the match rules, so nothing emitted after
        this returns can be missed.
        """
        watch = ModelWatch(self, path, owner)
        await watch.start()
        return watch


@dataclass
class Change:
    """One PropertiesChanged of a model, with the sender's message serial."""

    serial: int
    changed: dict[str, Any]
    invalidated: list[str] = field(default_factory=list)


class ModelWatch:
    """PropertiesChanged signals of one model, in the order modeld sent them."""

    def __init__(self, client: Client, path: str, owner: str) -> None:
        self._client = client
        self._path = path
        self._owner = owner
        self._queue: asyncio.Queue[Change | CliError] = asyncio.Queue()
        self._disconnect_task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._client.bus.add_message_handler(self._on_message)
        self._disconnect_task = asyncio.create_task(self._watch_disconnect())
        await self._client.add_match(
            f"type='signal',sender='{BUS_NAME}',path='{self._path}',"
            f"interface='{PROPERTIES_INTERFACE}',member='PropertiesChanged',arg0='{MODEL_INTERFACE}'"
        )
        await self._client.add_match(
            f"type='signal',sender='{DBUS_NAME}',path='{DBUS_PATH}',interface='{DBUS_INTERFACE}',"
            f"member='NameOwnerChanged',arg0='{BUS_NAME}'"
        )

    async def next(self) -> Change:
        item = await self._queue.get()
        if isinstance(item, CliError):
            raise item
        return item

    def close(self) -> None:
        self._client.bus.remove_message_handler(self._on_message)
        if self._disconnect_task is not None:
            self._disconnect_task.cancel()

    async def _watch_disconnect(self) -> None:
        with contextlib.suppress(Exception):
            # Shielded: cancelling this task must not cancel the bus's own future.
            await asyncio.shield(self._client._disconnected())
        self._queue.put_nowait(
            CliError(DISCONNECTED, f"lost the connection to the {self._client.bus_label} bus")
        )

    def _on_message(self, msg: Message) -> None:
        if msg.message_type is not MessageType.SIGNAL:
            return
        if (
            msg.member == "PropertiesChanged"
            and msg.interface == PROPERTIES_INTERFACE
            and msg.path == self._path
            and msg.sender == self._owner
            and msg.body
            and msg.body[0] == MODEL_INTERFACE
        ):
            changed = {str(k): unwrap(v) for k, v in msg.body[1].items()}
            self._queue.put_nowait(Change(msg.serial, changed, [str(p) for p in msg.body[2]]))
        elif (
            msg.member == "NameOwnerChanged"
            and msg.interface == DBUS_INTERFACE
            and msg.sender == DBUS_NAME
            and msg.body
            and msg.body[0] == BUS_NAME
            and msg.body[2] != self._owner
        ):
            self._queue.put_nowait(
                CliError(DISCONNECTED, f"modeld left the {self._client.bus_label} bus")
            )
