"""The D-Bus API v1 is a contract: its members and signatures are pinned here."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import Any

import pytest
from dbus_next.constants import PropertyAccess
from dbus_next.service import ServiceInterface, dbus_property, method
from dbus_next.signature import Variant

from modeld.bus.authorization import Action, Rule, rule_of
from modeld.bus.gate import ExportError, check_rules
from modeld.bus.service import ManagerInterface, ModelInterface


def members(interface: Any) -> dict[str, tuple[str, ...]]:
    spec = interface.introspect()
    found: dict[str, tuple[str, ...]] = {}
    for member in spec.methods:
        found[f"method {member.name}"] = (member.in_signature, member.out_signature)
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
        "MemoryPeak": "t",
        "GpuMemory": "t",
        "Gpu": "s",
        "LastUsed": "t",
        "InFlight": "u",
        "Pinned": "b",
        "ConcurrencyGroups": "as",
        "LastError": "s",
        "LoadCount": "u",
        "RetryAfter": "t",
    }
    assert members(model) == {
        "method Load": ("a{sv}", "o"),
        "method Unload": ("a{sv}", ""),
        "method SetPinned": ("b", ""),
        **{f"property {name}": (sig, "read") for name, sig in expected_properties.items()},
    }


def declared_rules(interface: Any) -> dict[str, Rule | None]:
    found = {f"method {m.name}": rule_of(m.fn) for m in ServiceInterface._get_methods(interface)}
    for prop in ServiceInterface._get_properties(interface):
        if rule_of(prop.prop_getter) is not None:
            found[f"set {prop.name}"] = rule_of(prop.prop_getter)
    return found


def test_every_member_declares_its_rule() -> None:
    """Reads are open; state changes name the polkit action they will map to."""
    manager = ManagerInterface(requests=None, reload=None)  # type: ignore[arg-type]
    model = ModelInterface("demo", requests=None)  # type: ignore[arg-type]
    assert declared_rules(manager) == {
        "method Load": Rule.LOAD,
        "method Unload": Rule.UNLOAD,
        "method ListModels": Rule.READ,
        "method GetModel": Rule.READ,
        "method Reload": Rule.MANAGE,
        "method Acquire": Rule.USE,
        "set MaxLoaded": Rule.MANAGE,
    }
    assert declared_rules(model) == {
        "method Load": Rule.LOAD,
        "method Unload": Rule.UNLOAD,
        "method SetPinned": Rule.MANAGE,
    }
    check_rules(manager)
    check_rules(model)


def test_rules_decide_the_action_per_call() -> None:
    def pinned() -> bool:
        return True

    def unpinned() -> bool:
        return False

    def unasked() -> bool:
        raise AssertionError("pinned state asked for a rule that does not depend on it")

    def force(value: Any, signature: str = "b") -> dict[str, Variant]:
        return {"force": Variant(signature, value)}

    assert Rule.READ.action(force(True), unasked) is None
    assert Rule.USE.action(force(True), unasked) is Action.USE
    assert Rule.MANAGE.action({}, unasked) is Action.MANAGE
    assert Rule.LOAD.action({}, unasked) is Action.USE
    assert Rule.LOAD.action({"wait": Variant("b", True)}, unasked) is Action.USE
    assert Rule.LOAD.action(force(False), unasked) is Action.USE
    assert Rule.LOAD.action(force(True), unasked) is Action.MANAGE
    assert Rule.LOAD.action(force("yes", "s"), unasked) is Action.MANAGE  # malformed: stricter
    assert Rule.UNLOAD.action({}, unpinned) is Action.USE
    assert Rule.UNLOAD.action({}, pinned) is Action.MANAGE
    assert Rule.UNLOAD.action(force(True), unasked) is Action.MANAGE
    assert str(Action.USE) == "org.modeld1.use"
    assert str(Action.MANAGE) == "org.modeld1.manage"


class Undeclared(ManagerInterface):
    """The manager plus a method that forgot to declare its rule."""

    @method()
    async def Wipe(self):
        raise AssertionError("Wipe ran")


def _max_loaded_without_a_rule(self: Any) -> Any:
    return 0


_max_loaded_without_a_rule.__annotations__["return"] = "u"


class UndeclaredWrite(ManagerInterface):
    """The manager whose writable MaxLoaded forgot its rule for writes."""

    MaxLoaded = dbus_property(access=PropertyAccess.READ, name="MaxLoaded")(
        _max_loaded_without_a_rule
    )


def test_export_refuses_a_member_without_a_rule() -> None:
    with pytest.raises(ExportError, match=r"^org\.modeld1\.Manager\.Wipe declares no"):
        check_rules(Undeclared(requests=None, reload=None))  # type: ignore[arg-type]
    with pytest.raises(ExportError, match=r"MaxLoaded is writable but declares no rule"):
        check_rules(UndeclaredWrite(requests=None, reload=None))  # type: ignore[arg-type]


def test_the_property_tables_match_the_interfaces() -> None:
    from modeld.bus.api import MANAGER_PROPERTIES, MODEL_PROPERTIES, PROPERTIES

    manager = ManagerInterface(requests=None, reload=None)  # type: ignore[arg-type]
    model = ModelInterface("demo", requests=None)  # type: ignore[arg-type]
    for interface, table in ((manager, MANAGER_PROPERTIES), (model, MODEL_PROPERTIES)):
        assert PROPERTIES[interface.name] is table
        assert {p.name: p.signature for p in interface.introspect().properties} == table


def introspected(interface: Any) -> ET.Element:
    return interface.introspect().to_xml()


def test_every_property_says_how_it_announces_changes() -> None:
    """Caching clients (GDBus proxies) must know which copies to trust: every property is
    decided in api.CHANGES, and all but the default ones carry the standard annotation."""
    from modeld.bus.api import CHANGES, EMITS_CHANGED_SIGNAL, PROPERTIES, Changes

    assert {name: set(table) for name, table in CHANGES.items()} == {
        name: set(table) for name, table in PROPERTIES.items()
    }
    manager = ManagerInterface(requests=None, reload=None)  # type: ignore[arg-type]
    model = ModelInterface("demo", requests=None)  # type: ignore[arg-type]
    annotated: dict[str, str] = {}
    for interface in (manager, model):
        for prop in introspected(interface).iter("property"):
            values = [
                a.get("value")
                for a in prop.iter("annotation")
                if a.get("name") == EMITS_CHANGED_SIGNAL
            ]
            expected = CHANGES[interface.name][str(prop.get("name"))]
            assert values == ([] if expected is Changes.EMITS else [str(expected)])
            if values:
                annotated[f"{interface.name}.{prop.get('name')}"] = str(values[0])
    assert annotated == {
        "org.modeld1.Manager.Version": "const",
        "org.modeld1.Manager.MemoryUsed": "false",
        "org.modeld1.Model.Name": "const",
        "org.modeld1.Model.MemoryCurrent": "false",
    }


def test_every_argument_has_a_name() -> None:
    manager = ManagerInterface(requests=None, reload=None)  # type: ignore[arg-type]
    model = ModelInterface("demo", requests=None)  # type: ignore[arg-type]
    found: dict[str, list[tuple[str | None, str | None]]] = {}
    for interface in (manager, model):
        for member in (
            *introspected(interface).iter("method"),
            *introspected(interface).iter("signal"),
        ):
            found[f"{interface.name}.{member.get('name')}"] = [
                (arg.get("direction"), arg.get("name")) for arg in member.iter("arg")
            ]
    assert found == {
        "org.modeld1.Manager.Load": [("in", "name"), ("in", "options"), ("out", "model")],
        "org.modeld1.Manager.Unload": [("in", "name"), ("in", "options")],
        "org.modeld1.Manager.ListModels": [("out", "models")],
        "org.modeld1.Manager.GetModel": [("in", "name"), ("out", "model")],
        "org.modeld1.Manager.Reload": [],
        "org.modeld1.Manager.Acquire": [
            ("in", "name"),
            ("in", "options"),
            ("out", "endpoint"),
            ("out", "lease"),
        ],
        "org.modeld1.Manager.ModelLoaded": [("out", "name"), ("out", "path")],
        "org.modeld1.Manager.ModelUnloaded": [("out", "name"), ("out", "path"), ("out", "reason")],
        "org.modeld1.Model.Load": [("in", "options"), ("out", "model")],
        "org.modeld1.Model.Unload": [("in", "options")],
        "org.modeld1.Model.SetPinned": [("in", "pinned")],
    }


def test_argument_names_must_match_the_arguments() -> None:
    from modeld.bus.annotations import describe
    from modeld.bus.connection import introspection as intr

    spec = intr.Interface(
        "org.modeld1.Manager",
        methods=[intr.Method("Acquire", [], [intr.Arg("s", intr.ArgDirection.OUT)])],
    )
    with pytest.raises(ValueError, match="Acquire: 2 argument names for 1 arguments"):
        describe(spec)
