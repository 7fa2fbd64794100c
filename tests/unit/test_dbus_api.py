"""The D-Bus API v1 is a contract: its members and signatures are pinned here."""

from __future__ import annotations

from typing import Any

from modeld.bus.service import ManagerInterface, ModelInterface


def members(interface: Any) -> dict[str, tuple[str, ...]]:
    spec = interface.introspect()
    found: dict[str, tuple[str, ...]] = {}
    for method in spec.methods:
        found[f"method {method.name}"] = (method.in_signature, method.out_signature)
    for signal in spec.signals:
        found[f"signal {signal.name}"] = (signal.signature,)
    for prop in spec.properties:
        found[f"property {prop.name}"] = (prop.signature, prop.access.value)
    return found


def test_manager_interface_matches_the_contract() -> None:
    manager = ManagerInterface(requests=None, reload=None)  # type: ignore[arg-type]
    assert manager.name == "org.modeld1.Manager"
    assert members(manager) == {
        "method Load": ("sa{sv}", "o"),
        "method Unload": ("sa{sv}", ""),
        "method ListModels": ("", "a(ssso)"),
        "method GetModel": ("s", "o"),
        "method Reload": ("", ""),
        "method Acquire": ("sa{sv}", "sh"),
        "signal ModelLoaded": ("so",),
        "signal ModelUnloaded": ("sos",),
        "property Version": ("s", "read"),
        "property LoadedCount": ("u", "read"),
        "property MaxLoaded": ("u", "readwrite"),
        "property MemoryBudget": ("t", "read"),
        "property MemoryUsed": ("t", "read"),
    }


def test_model_interface_matches_the_contract() -> None:
    model = ModelInterface("demo", requests=None)  # type: ignore[arg-type]
    assert model.name == "org.modeld1.Model"
    expected_properties = {
        "Name": "s",
        "Backend": "s",
        "State": "s",
        "Unit": "s",
        "ControlGroup": "s",
        "MainPID": "u",
        "Endpoint": "s",
        "MemoryCurrent": "t",
        "MemoryMax": "t",
        "GpuMemory": "t",
        "Gpu": "s",
        "LastUsed": "t",
        "InFlight": "u",
        "Pinned": "b",
        "ConcurrencyGroups": "as",
        "LastError": "s",
        "LoadCount": "u",
    }
    assert members(model) == {
        "method Load": ("a{sv}", "o"),
        "method Unload": ("a{sv}", ""),
        "method SetPinned": ("b", ""),
        **{f"property {name}": (sig, "read") for name, sig in expected_properties.items()},
    }


def test_every_state_changing_member_asks_for_authorization_first() -> None:
    import asyncio

    import pytest
    from dbus_next.errors import DBusError

    from modeld.bus.service import _Requests
    from modeld.errors import AccessDenied

    class Untouchable:
        def __getattr__(self, name: str) -> Any:
            raise AssertionError(f"supervisor.{name} used before authorization")

    asked: list[str] = []

    class Deny:
        async def check(self, action: str) -> None:
            asked.append(action)
            raise AccessDenied(f"{action}: not allowed")

    async def reload() -> None:
        raise AssertionError("reloaded before authorization")

    requests = _Requests(Untouchable(), Deny(), bus=None)  # type: ignore[arg-type]
    manager = ManagerInterface(requests, reload)
    model = ModelInterface("demo", requests)
    from dbus_next.service import ServiceInterface

    def handler(interface: Any, name: str) -> Any:
        """The function dbus-next dispatches to (the decorated attribute drops results)."""
        return next(m.fn for m in ServiceInterface._get_methods(interface) if m.name == name)

    calls = [
        (manager, "Load", ("demo", {})),
        (manager, "Unload", ("demo", {})),
        (manager, "Reload", ()),
        (manager, "Acquire", ("demo", {})),
        (model, "Load", ({},)),
        (model, "Unload", ({},)),
        (model, "SetPinned", (True,)),
    ]
    for interface, name, args in calls:
        with pytest.raises(DBusError) as raised:
            asyncio.run(handler(interface, name)(interface, *args))
        assert raised.value.type == "org.modeld1.Error.AccessDenied", name
    assert asked == [
        "load demo",
        "unload demo",
        "reload",
        "acquire demo",
        "load demo",
        "unload demo",
        "pin demo",
    ]


def test_the_property_tables_match_the_interfaces() -> None:
    from modeld.bus.api import MANAGER_PROPERTIES, MODEL_PROPERTIES, PROPERTIES

    manager = ManagerInterface(requests=None, reload=None)  # type: ignore[arg-type]
    model = ModelInterface("demo", requests=None)  # type: ignore[arg-type]
    for interface, table in ((manager, MANAGER_PROPERTIES), (model, MODEL_PROPERTIES)):
        assert PROPERTIES[interface.name] is table
        assert {p.name: p.signature for p in interface.introspect().properties} == table
