"""Every property announced as emitting changes does emit them, as a caching client sees it.

A client over a private dbus-daemon keeps the properties of the manager and a model the way
a GDBus proxy does: ``GetAll`` once, then only ``PropertiesChanged``. After each change the
daemon can make (every field of a model's status, a MaxLoaded write, a reload changing the
configuration) it asks ``GetAll`` again on the same connection, so every signal sent before
that reply has arrived, and its copy must equal the answer for every property that is not a
live figure. A property mirrored without a signal, or sent with a stale value, fails here.
"""

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

from dbus_next.aio.message_bus import MessageBus
from dbus_next.constants import MessageType
from dbus_next.message import Message
from dbus_next.signature import Variant

from modeld.bus.api import CHANGES, PROPERTIES, Changes
from modeld.bus.authorization import Action, Authorizer, Call, Caller
from modeld.bus.connection import ModeldMessageBus
from modeld.bus.service import BusService
from modeld.core.states import ModelState
from modeld.naming import MANAGER_INTERFACE, MANAGER_PATH, MODEL_INTERFACE, model_object_path
from modeld.supervisor.status import ModelStatus, StatusChange
from modeld.system.dbus import call

PROPERTIES_INTERFACE = "org.freedesktop.DBus.Properties"
DEMO = model_object_path("demo")


def model_config(backend: str, groups: tuple[str, ...]) -> Any:
    return SimpleNamespace(backend=backend, concurrency_groups=groups)


class Supervisor:
    """What the bus reads of the supervisor, with statuses and configuration set by the test."""

    def __init__(self) -> None:
        self.statuses = {"demo": ModelStatus(), "other": ModelStatus()}
        self.max_loaded = 0
        self.config = SimpleNamespace(
            daemon=SimpleNamespace(memory_budget=1 << 30),
            models={"demo": model_config("reference", ()), "other": model_config("reference", ())},
        )

    def owners(self) -> list[Any]:
        return [
            SimpleNamespace(name=name, status=status, config=self.config.models[name])
            for name, status in self.statuses.items()
        ]

    def status(self, name: str) -> ModelStatus:
        return self.statuses[name]

    def loaded_count(self) -> int:
        return sum(1 for s in self.statuses.values() if s.state.occupies_slot)

    def memory_current(self, name: str) -> int:
        return 0

    def memory_used(self) -> int:
        return 0

    def set_max_loaded(self, value: int) -> None:
        self.max_loaded = value


class Root(Authorizer):
    """Every caller holds every action (the test is about signals, not authorization)."""

    def __init__(self) -> None:
        super().__init__(bus=None)  # type: ignore[arg-type]

    async def authorize(self, action: Action, call: Call) -> Caller:
        return Caller(self, call, 0, frozenset(Action))


@contextlib.asynccontextmanager
async def buses(bus_address: str) -> AsyncIterator[tuple[ModeldMessageBus, MessageBus]]:
    """modeld's connection and a client's to the private bus, both closed after."""
    service_bus = await ModeldMessageBus(bus_address=bus_address).connect()
    client_bus = await MessageBus(bus_address=bus_address).connect()
    try:
        yield service_bus, client_bus
    finally:
        for bus in (client_bus, service_bus):
            bus.disconnect()
            await bus.wait_for_disconnect()
            bus._sock.close()


async def never_reload() -> None:
    raise AssertionError("reloaded over the bus")


class CachingClient:
    """Property copies kept as a GDBus proxy keeps them: GetAll once, then PropertiesChanged."""

    def __init__(self, bus: MessageBus, service: str) -> None:
        self.bus = bus
        self.service = service
        self.cache: dict[tuple[str, str], dict[str, Any]] = {}
        self.signals = 0

    async def watch(self, path: str, interface: str) -> None:
        if not self.cache:
            self.bus.add_message_handler(self._on_message)
            rule = f"type='signal',sender='{self.service}',interface='{PROPERTIES_INTERFACE}'"
            await call(
                self.bus,
                "org.freedesktop.DBus",
                "/org/freedesktop/DBus",
                "org.freedesktop.DBus",
                "AddMatch",
                "s",
                [rule],
            )
        self.cache[(path, interface)] = await self.get_all(path, interface)

    async def get_all(self, path: str, interface: str) -> dict[str, Any]:
        (values,) = await call(
            self.bus, self.service, path, PROPERTIES_INTERFACE, "GetAll", "s", [interface]
        )
        return {name: variant.value for name, variant in values.items()}

    def _on_message(self, msg: Message) -> None:
        if msg.message_type is not MessageType.SIGNAL or msg.member != "PropertiesChanged":
            return
        interface, changed, invalidated = msg.body
        cached = self.cache.get((msg.path or "", interface))
        if cached is None:
            return
        self.signals += 1
        cached.update({name: variant.value for name, variant in changed.items()})
        for name in invalidated:
            cached.pop(name, None)

    async def check(self, step: str) -> None:
        """The copies equal fresh values for every property not announced as live."""
        for (path, interface), cached in self.cache.items():
            fresh = await self.get_all(path, interface)
            for name, changes in CHANGES[interface].items():
                if changes is Changes.LIVE:
                    continue
                if changes is Changes.INVALIDATES:
                    assert name not in cached or cached[name] == fresh[name], (step, name)
                    continue
                assert cached[name] == fresh[name], (step, interface, name)


def different(value: Any) -> Any:
    """Another value of the same type as ``value``, for any status field."""
    if isinstance(value, ModelState):
        return ModelState.READY if value is not ModelState.READY else ModelState.UNLOADING
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return (value + 7) % (1 << 32)
    if isinstance(value, str):
        return value + "x"
    raise AssertionError(f"no other value for {value!r}: teach the test this type")


def test_a_caching_client_follows_every_change_of_every_emitting_property(
    bus_address: str,
) -> None:
    supervisor = Supervisor()

    async def scenario() -> None:
        async with buses(bus_address) as (service_bus, client_bus):
            service = BusService(service_bus, supervisor, never_reload, authorizer=Root())  # type: ignore[arg-type]
            service.sync_models()
            client = CachingClient(client_bus, service_bus.unique_name)
            await client.watch(MANAGER_PATH, MANAGER_INTERFACE)
            await client.watch(DEMO, MODEL_INTERFACE)
            assert set(client.cache[(DEMO, MODEL_INTERFACE)]) == set(PROPERTIES[MODEL_INTERFACE])

            def change(model: str, **fields: Any) -> None:
                before = supervisor.statuses[model]
                after = dataclasses.replace(before, **fields)
                supervisor.statuses[model] = after
                service.on_status_changed(StatusChange(model, before, after))

            for field in dataclasses.fields(ModelStatus):
                value = getattr(supervisor.statuses["demo"], field.name)
                change("demo", **{field.name: different(value)})
                await client.check(f"demo's {field.name}")
            change("other", state=ModelState.LOADING)  # another model: the count changes
            await client.check("other loading")

            await call(
                client_bus,
                service_bus.unique_name,
                MANAGER_PATH,
                PROPERTIES_INTERFACE,
                "Set",
                "ssv",
                [MANAGER_INTERFACE, "MaxLoaded", Variant("u", 3)],
            )
            assert client.cache[(MANAGER_PATH, MANAGER_INTERFACE)]["MaxLoaded"] == 3
            await client.check("MaxLoaded set")

            supervisor.max_loaded = 0  # a reload: every configured value changes
            supervisor.config.daemon.memory_budget = 2 << 30
            supervisor.config.models["demo"] = model_config("llama-cpp", ("big",))
            service.sync_models()
            await client.check("reload")
            assert client.cache[(DEMO, MODEL_INTERFACE)]["ConcurrencyGroups"] == ["big"]
            assert client.signals >= len(dataclasses.fields(ModelStatus)) + 3

    asyncio.run(asyncio.wait_for(scenario(), 60))


class SignalLog:
    """Every signal modeld sends, in the order it arrives."""

    def __init__(self, bus: MessageBus) -> None:
        self.signals: list[tuple[str, str, Any]] = []
        self._arrived = asyncio.Event()
        self._bus = bus

    async def start(self, sender: str) -> None:
        self._bus.add_message_handler(self._on_message)
        await call(
            self._bus,
            "org.freedesktop.DBus",
            "/org/freedesktop/DBus",
            "org.freedesktop.DBus",
            "AddMatch",
            "s",
            [f"type='signal',sender='{sender}'"],
        )

    def _on_message(self, msg: Message) -> None:
        if msg.message_type is MessageType.SIGNAL and msg.path != "/org/freedesktop/DBus":
            self.signals.append((msg.path or "", msg.member or "", msg.body))
            self._arrived.set()

    async def until(self, count: int) -> None:
        """Wait until ``count`` signals have arrived in all."""
        while len(self.signals) < count:
            self._arrived.clear()
            await asyncio.wait_for(self._arrived.wait(), 10)

    def changed(self, start: int) -> list[dict[str, Any]]:
        """The properties of demo's PropertiesChanged signals from ``start`` on."""
        return [
            {name: variant.value for name, variant in body[1].items()}
            for path, member, body in self.signals[start:]
            if path == DEMO and member == "PropertiesChanged"
        ]


def test_use_changes_are_held_back_coalesced_and_never_overtaken(bus_address: str) -> None:
    """Requests starting and ending change a model's use (InFlight, LastUsed, ready <->
    busy): those changes wait a little and go out together, as the values then; anything
    else modeld sends (a reply, another signal, a lifecycle change) sends them first."""
    supervisor = Supervisor()
    supervisor.statuses["demo"] = ModelStatus(state=ModelState.READY, unit="demo.scope")

    async def scenario() -> None:
        async with buses(bus_address) as (service_bus, client_bus):
            # Long enough that nothing here goes out by the timer.
            service = BusService(
                service_bus,
                supervisor,  # type: ignore[arg-type]
                never_reload,
                authorizer=Root(),
                use_publish_delay=3600,
            )
            service.sync_models()
            client = CachingClient(client_bus, service_bus.unique_name)
            log = SignalLog(client_bus)
            await log.start(service_bus.unique_name)
            await client.watch(DEMO, MODEL_INTERFACE)
            await client.watch(MANAGER_PATH, MANAGER_INTERFACE)

            def change(**fields: Any) -> None:
                before = supervisor.statuses["demo"]
                after = dataclasses.replace(before, **fields)
                supervisor.statuses["demo"] = after
                service.on_status_changed(StatusChange("demo", before, after))

            # Held until the next message: a request starts and ends, another starts.
            start = len(log.signals)
            change(state=ModelState.BUSY, in_flight=1, last_used_us=5)
            change(state=ModelState.READY, in_flight=0, last_used_us=6)
            change(state=ModelState.BUSY, in_flight=1, last_used_us=7)
            await client.check("a request running")  # GetAll's reply follows the signal
            assert log.changed(start) == [{"State": "busy", "InFlight": 1, "LastUsed": 7}]

            # A blip that comes back is not sent; what did change is.
            start = len(log.signals)
            change(state=ModelState.READY, in_flight=0, last_used_us=8)
            change(state=ModelState.BUSY, in_flight=1, last_used_us=9)
            await client.check("another request")
            assert log.changed(start) == [{"LastUsed": 9}]

            # Another signal sends what is held first.
            start = len(log.signals)
            change(state=ModelState.READY, in_flight=0, last_used_us=10)
            service.on_loaded("other")
            await log.until(start + 2)
            assert [member for _, member, _ in log.signals[start:]] == [
                "PropertiesChanged",
                "ModelLoaded",
            ]

            # A lifecycle change goes out at once, with what was held.
            start = len(log.signals)
            change(state=ModelState.BUSY, in_flight=1, last_used_us=11)
            change(last_error="it broke")
            await log.until(start + 1)
            assert log.changed(start) == [
                {"State": "busy", "InFlight": 1, "LastUsed": 11, "LastError": "it broke"}
            ]

    asyncio.run(asyncio.wait_for(scenario(), 60))


def test_a_use_change_goes_out_by_itself_when_nothing_else_is_sent(bus_address: str) -> None:
    supervisor = Supervisor()
    supervisor.statuses["demo"] = ModelStatus(state=ModelState.READY, unit="demo.scope")

    async def scenario() -> None:
        async with buses(bus_address) as (service_bus, client_bus):
            service = BusService(service_bus, supervisor, never_reload, authorizer=Root())  # type: ignore[arg-type]
            service.sync_models()
            client = CachingClient(client_bus, service_bus.unique_name)
            log = SignalLog(client_bus)
            await log.start(service_bus.unique_name)
            await client.watch(DEMO, MODEL_INTERFACE)
            start = len(log.signals)
            before = supervisor.statuses["demo"]
            after = dataclasses.replace(before, state=ModelState.BUSY, in_flight=1)
            supervisor.statuses["demo"] = after
            service.on_status_changed(StatusChange("demo", before, after))
            await log.until(start + 1)  # nothing else was sent: the timer sent it
            assert log.changed(start) == [{"State": "busy", "InFlight": 1}]
            await client.check("after the delay")

    asyncio.run(asyncio.wait_for(scenario(), 60))
