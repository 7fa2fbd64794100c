"""modeld's D-Bus service over a private dbus-daemon: the gate (deny by default), Unload.

The real BusService and Gate serve a fake supervisor; the caller's uid comes from an
Authorizer whose uid lookup is replaced (the tests run as one user), so the real check and
its error text are exercised.
"""

import asyncio
import contextlib
import dataclasses
import gc
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator, Awaitable, Callable
from types import SimpleNamespace
from typing import Any

import pytest
from dbus_next.aio.message_bus import MessageBus
from dbus_next.service import method
from dbus_next.signature import Variant

from modeld.bus import gate as gate_module
from modeld.bus.authorization import Action, Authorizer
from modeld.bus.connection import DBusError, ModeldMessageBus
from modeld.bus.gate import ExportError, Gate
from modeld.bus.service import BusService, ManagerInterface, _Requests
from modeld.errors import Busy, NoSuchModel
from modeld.naming import MANAGER_PATH, model_object_path
from modeld.supervisor.status import ModelStatus
from modeld.system.dbus import call

MANAGER = "org.modeld1.Manager"
MODEL = "org.modeld1.Model"
ACCESS_DENIED = "org.modeld1.Error.AccessDenied"


@dataclasses.dataclass
class FakeOwner:
    name: str
    status: ModelStatus
    config: Any = dataclasses.field(
        default_factory=lambda: type("C", (), {"backend": "reference", "concurrency_groups": ()})
    )


class FakeSupervisor:
    """What the bus needs of the supervisor; records every state change it is asked for."""

    def __init__(self) -> None:
        self._owners = {
            "demo": FakeOwner("demo", ModelStatus()),
            "keep": FakeOwner("keep", ModelStatus(pinned=True)),
        }
        self.config = SimpleNamespace(
            daemon=SimpleNamespace(memory_budget=2**64 - 1),
            models={name: owner.config for name, owner in self._owners.items()},
        )
        self.changes: list[tuple[Any, ...]] = []
        self.max_loaded = 0
        self.unloading: asyncio.Future[None] | None = None

    def owners(self) -> list[FakeOwner]:
        return list(self._owners.values())

    def owner(self, name: str) -> FakeOwner:
        if name not in self._owners:
            raise NoSuchModel(f"no model named {name!r} is configured")
        return self._owners[name]

    def status(self, name: str) -> ModelStatus:
        return self.owner(name).status

    def memory_current(self, name: str) -> int:
        return 0

    def loaded_count(self) -> int:
        return 0

    async def load(self, name: str, *, force: bool = False) -> asyncio.Future[None]:
        self.owner(name)
        self.changes.append(("load", name, force))
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done

    async def unload(self, name: str, *, force: bool = False) -> asyncio.Future[None]:
        self.owner(name)
        self.changes.append(("unload", name, force))
        self.unloading = asyncio.get_running_loop().create_future()
        return self.unloading

    def set_pinned(self, name: str, pinned: bool) -> None:
        self.changes.append(("set_pinned", name, pinned))

    def set_max_loaded(self, value: int) -> None:
        self.changes.append(("set_max_loaded", value))
        self.max_loaded = value

    async def acquire(self, name: str) -> Any:
        raise AssertionError("acquire is not exercised here")


class AsUid(Authorizer):
    """The real check, for a caller with a fixed uid; remembers what it was asked."""

    def __init__(self, uid: int) -> None:
        super().__init__(bus=None)  # type: ignore[arg-type]
        self.uid = uid
        self.asked: list[tuple[str, str]] = []

    async def uid_of(self, sender: str) -> int:
        return self.uid

    async def check(self, action: Action, sender: str | None, what: str) -> None:
        self.asked.append((str(action), what))
        await super().check(action, sender, what)


@contextlib.asynccontextmanager
async def buses(address: str) -> AsyncIterator[tuple[ModeldMessageBus, MessageBus]]:
    """modeld's connection and a client's, both closed afterwards."""
    service = await ModeldMessageBus(bus_address=address, negotiate_unix_fd=True).connect()
    client = await MessageBus(bus_address=address).connect()
    try:
        yield service, client
    finally:
        for bus in (client, service):
            bus.disconnect()
            await bus.wait_for_disconnect()
            bus._stream.close()
            bus._sock.close()


Scenario = Callable[[ModeldMessageBus, MessageBus], Awaitable[None]]


def run(address: str, scenario: Scenario) -> None:
    async def main() -> None:
        async with buses(address) as (service, client):
            await scenario(service, client)

    asyncio.run(main())


class Caller:
    """Calls modeld's objects from the client connection."""

    def __init__(self, client: MessageBus, service: ModeldMessageBus) -> None:
        self._client = client
        self._destination = service.unique_name

    async def __call__(self, path: str, interface: str, member: str, *args: Any) -> list[Any]:
        signature, body = args if args else ("", [])
        return await call(self._client, self._destination, path, interface, member, signature, body)

    async def error(self, path: str, interface: str, member: str, *args: Any) -> DBusError:
        with pytest.raises(DBusError) as raised:
            await self(path, interface, member, *args)
        return raised.value

    async def set_property(self, name: str, variant: Variant) -> list[Any]:
        return await self(
            MANAGER_PATH,
            "org.freedesktop.DBus.Properties",
            "Set",
            "ssv",
            [MANAGER, name, variant],
        )


async def never_reload() -> None:
    raise AssertionError("reloaded")


def test_every_state_change_is_refused_before_it_runs_naming_its_action(
    bus_address: str,
) -> None:
    supervisor = FakeSupervisor()
    nobody = AsUid(65534)
    force = {"force": Variant("b", True)}
    demo, keep = model_object_path("demo"), model_object_path("keep")
    calls: list[tuple[tuple[Any, ...], str, str]] = [
        ((MANAGER_PATH, MANAGER, "Load", "sa{sv}", ["demo", {}]), "use", "Load demo"),
        ((MANAGER_PATH, MANAGER, "Load", "sa{sv}", ["demo", force]), "manage", "Load demo"),
        ((MANAGER_PATH, MANAGER, "Unload", "sa{sv}", ["demo", {}]), "use", "Unload demo"),
        ((MANAGER_PATH, MANAGER, "Unload", "sa{sv}", ["demo", force]), "manage", "Unload demo"),
        ((MANAGER_PATH, MANAGER, "Unload", "sa{sv}", ["keep", {}]), "manage", "Unload keep"),
        ((MANAGER_PATH, MANAGER, "Acquire", "sa{sv}", ["demo", {}]), "use", "Acquire demo"),
        ((MANAGER_PATH, MANAGER, "Reload"), "manage", "Reload"),
        ((demo, MODEL, "Load", "a{sv}", [{}]), "use", "Load demo"),
        ((demo, MODEL, "Load", "a{sv}", [force]), "manage", "Load demo"),
        ((demo, MODEL, "Unload", "a{sv}", [{}]), "use", "Unload demo"),
        ((keep, MODEL, "Unload", "a{sv}", [{}]), "manage", "Unload keep"),
        ((demo, MODEL, "SetPinned", "b", [True]), "manage", "SetPinned demo"),
    ]

    async def scenario(service: ModeldMessageBus, client: MessageBus) -> None:
        BusService(service, supervisor, never_reload, authorizer=nobody).sync_models()
        caller = Caller(client, service)
        for target, action, what in calls:
            err = await caller.error(*target)
            assert err.type == ACCESS_DENIED, (target, err.text)
            assert err.text == (
                f"{what} needs org.modeld1.{action}: uid 65534 may not change modeld's state;"
                " only root may (polkit authorization is not supported yet)"
            )
        with pytest.raises(DBusError) as raised:
            await caller.set_property("MaxLoaded", Variant("u", 3))
        assert raised.value.type == ACCESS_DENIED
        assert raised.value.text.startswith("set MaxLoaded needs org.modeld1.manage: uid 65534")

    run(bus_address, scenario)
    assert supervisor.changes == []
    assert supervisor.max_loaded == 0
    assert nobody.asked == [
        *((f"org.modeld1.{action}", what) for _, action, what in calls),
        ("org.modeld1.manage", "set MaxLoaded"),
    ]


def test_reads_are_open_and_ask_nobody(bus_address: str) -> None:
    supervisor = FakeSupervisor()
    nobody = AsUid(65534)

    async def scenario(service: ModeldMessageBus, client: MessageBus) -> None:
        BusService(service, supervisor, never_reload, authorizer=nobody).sync_models()
        caller = Caller(client, service)
        (models,) = await caller(MANAGER_PATH, MANAGER, "ListModels")
        assert [m[0] for m in models] == ["demo", "keep"]
        assert await caller(MANAGER_PATH, MANAGER, "GetModel", "s", ["keep"]) == [
            model_object_path("keep")
        ]
        err = await caller.error(MANAGER_PATH, MANAGER, "GetModel", "s", ["nope"])
        assert err.type == "org.modeld1.Error.NoSuchModel"
        (pinned,) = await caller(
            model_object_path("keep"),
            "org.freedesktop.DBus.Properties",
            "Get",
            "ss",
            [MODEL, "Pinned"],
        )
        assert pinned.value is True
        (xml,) = await caller(MANAGER_PATH, "org.freedesktop.DBus.Introspectable", "Introspect")
        access = {p.get("name"): p.get("access") for p in ET.fromstring(xml).iter("property")}
        assert access["MaxLoaded"] == "readwrite"
        assert access["Version"] == "read"

    run(bus_address, scenario)
    assert nobody.asked == []
    assert supervisor.changes == []


def test_allowed_changes_run_and_property_writes_are_checked(bus_address: str) -> None:
    supervisor = FakeSupervisor()
    root = AsUid(0)

    async def scenario(service: ModeldMessageBus, client: MessageBus) -> None:
        BusService(service, supervisor, never_reload, authorizer=root).sync_models()
        caller = Caller(client, service)
        path = model_object_path("demo")
        assert await caller(path, MODEL, "Load", "a{sv}", [{}]) == [path]
        await caller(path, MODEL, "SetPinned", "b", [True])
        assert await caller.set_property("MaxLoaded", Variant("u", 2)) == []
        (value,) = await caller(
            MANAGER_PATH, "org.freedesktop.DBus.Properties", "Get", "ss", [MANAGER, "MaxLoaded"]
        )
        assert value.value == 2
        with pytest.raises(DBusError) as raised:
            await caller.set_property("MaxLoaded", Variant("s", "2"))
        assert raised.value.type == "org.freedesktop.DBus.Error.InvalidArgs"
        assert raised.value.text == "MaxLoaded takes 'u', not 's'"
        with pytest.raises(DBusError) as raised:
            await caller.set_property("Version", Variant("s", "2"))
        assert raised.value.type == "org.freedesktop.DBus.Error.PropertyReadOnly"
        assert raised.value.text == "property Version is read-only"
        with pytest.raises(DBusError) as raised:
            await caller.set_property("Nope", Variant("s", "2"))
        assert raised.value.type == "org.freedesktop.DBus.Error.UnknownProperty"
        err = await caller.error(MANAGER_PATH, MANAGER, "Load", "sa{sv}", ["nope", {}])
        assert err.type == "org.modeld1.Error.NoSuchModel"

    run(bus_address, scenario)
    assert supervisor.changes == [
        ("load", "demo", False),
        ("set_pinned", "demo", True),
        ("set_max_loaded", 2),
    ]
    assert ("org.modeld1.manage", "set MaxLoaded") in root.asked


class Undeclared(ManagerInterface):
    """The manager plus a method that forgot to declare its rule."""

    wiped: bool = False

    @method()
    async def Wipe(self):
        Undeclared.wiped = True


def test_a_method_without_a_rule_fails_closed(
    bus_address: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = AsUid(0)  # a caller who would be allowed anything

    async def write(*_args: Any) -> None:
        raise AssertionError("written")

    async def scenario(service: ModeldMessageBus, client: MessageBus) -> None:
        gate = Gate(service, root, pinned=lambda _name: False, write=write)  # type: ignore[arg-type]
        interface = Undeclared(_Requests(FakeSupervisor(), service), never_reload)  # type: ignore[arg-type]
        with pytest.raises(ExportError, match="Wipe declares no authorization rule"):
            gate.export(MANAGER_PATH, interface)
        monkeypatch.setattr(gate_module, "check_rules", lambda _interface: None)
        gate.export(MANAGER_PATH, interface)  # as if registration had not checked
        err = await Caller(client, service).error(MANAGER_PATH, MANAGER, "Wipe")
        assert err.type == ACCESS_DENIED
        assert err.text == "Wipe: org.modeld1.Manager.Wipe declares no rule; refused"

    run(bus_address, scenario)
    assert not Undeclared.wiped
    assert root.asked == []


async def started(supervisor: FakeSupervisor) -> asyncio.Future[None]:
    for _ in range(500):
        if supervisor.unloading is not None:
            return supervisor.unloading
        await asyncio.sleep(0.01)
    raise AssertionError("the unload never reached the supervisor")


def test_unload_waits_for_the_unload_unless_wait_is_false(
    bus_address: str, caplog: pytest.LogCaptureFixture
) -> None:
    supervisor = FakeSupervisor()
    path = model_object_path("demo")
    no_wait = {"wait": Variant("b", False)}

    async def scenario(service: ModeldMessageBus, client: MessageBus) -> None:
        BusService(service, supervisor, never_reload, authorizer=AsUid(0)).sync_models()
        caller = Caller(client, service)

        reply = asyncio.ensure_future(
            caller(MANAGER_PATH, MANAGER, "Unload", "sa{sv}", ["demo", {}])
        )
        unloading = await started(supervisor)
        await asyncio.sleep(0.2)
        assert not reply.done()  # no options: waits, as Unload always did
        unloading.set_result(None)
        assert await reply == []

        supervisor.unloading = None
        reply = asyncio.ensure_future(
            caller(path, MODEL, "Unload", "a{sv}", [{"wait": Variant("b", True)}])
        )
        (await started(supervisor)).set_exception(Busy("demo is busy"))
        with pytest.raises(DBusError) as raised:
            await reply
        assert raised.value.type == "org.modeld1.Error.Busy"

        supervisor.unloading = None
        assert await asyncio.wait_for(caller(path, MODEL, "Unload", "a{sv}", [no_wait]), 5) == []
        unloading = await started(supervisor)
        assert not unloading.done()  # replied while the unload goes on
        unloading.set_exception(Busy("demo is busy"))
        await asyncio.sleep(0)
        supervisor.unloading = None
        del unloading
        gc.collect()

        err = await caller.error(path, MODEL, "Unload", "a{sv}", [{"wait": Variant("s", "no")}])
        assert err.type == "org.freedesktop.DBus.Error.InvalidArgs"

    run(bus_address, scenario)
    assert supervisor.changes == [("unload", "demo", False)] * 3
    assert "never retrieved" not in caplog.text  # the failure of the unawaited unload is consumed
