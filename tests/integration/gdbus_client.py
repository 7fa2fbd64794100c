"""A desktop program's view of modeld: GDBus proxies (Gio.DBusProxy) on the system bus.

Runs on Debian's /usr/bin/python3 (python3-gi; the test venv has no gi), against the bus
in DBUS_SYSTEM_BUS_ADDRESS. It makes proxies for the manager and one model with their
property cache on (as GLib programs do: it is only updated from PropertiesChanged), runs
each step given on the command line, then asks GetAll over the same connection while
the main loop runs and reads the cache when the reply is dispatched (every signal sent
before that reply has been by then). It prints one JSON object: the annotations GIO
parsed from the introspection data and, per step, the cached and the fresh values of every
property; the test compares them.

    gdbus_client.py MODEL STEP...   steps: load unload pin unpin max-loaded=N reload
"""

from __future__ import annotations

import json
import sys
from typing import Any

import gi

gi.require_version("Gio", "2.0")
from gi.repository import Gio, GLib  # noqa: E402

BUS_NAME = "org.modeld1"
MANAGER_PATH = "/org/modeld1"
MANAGER = "org.modeld1.Manager"
MODEL = "org.modeld1.Model"
EMITS_CHANGED_SIGNAL = "org.freedesktop.DBus.Property.EmitsChangedSignal"
TIMEOUT_MS = 120_000


class Client:
    def __init__(self, model: str) -> None:
        self.loop = GLib.MainLoop()
        self.bus = Gio.bus_get_sync(Gio.BusType.SYSTEM, None)
        (self.model_path,) = self.call(MANAGER_PATH, MANAGER, "GetModel", ("s", model))
        self.proxies = {
            MANAGER: self.proxy(MANAGER_PATH, MANAGER),
            MODEL: self.proxy(self.model_path, MODEL),
        }
        self.paths = {MANAGER: MANAGER_PATH, MODEL: self.model_path}

    def proxy(self, path: str, interface: str) -> Gio.DBusProxy:
        return Gio.DBusProxy.new_sync(
            self.bus, Gio.DBusProxyFlags.NONE, None, BUS_NAME, path, interface, None
        )

    def call(
        self, path: str, interface: str, member: str, args: tuple[str, Any] | None = None
    ) -> Any:
        parameters = GLib.Variant(f"({args[0]})", args[1:]) if args else None
        reply = self.bus.call_sync(
            BUS_NAME,
            path,
            interface,
            member,
            parameters,
            None,
            Gio.DBusCallFlags.NONE,
            TIMEOUT_MS,
            None,
        )
        return reply.unpack()

    def annotations(self) -> dict[str, dict[str, str]]:
        """Property -> its EmitsChangedSignal annotation ("" when none), as GIO reads it."""
        found: dict[str, dict[str, str]] = {}
        for interface, path in self.paths.items():
            (xml,) = self.call(path, "org.freedesktop.DBus.Introspectable", "Introspect")
            info = Gio.DBusNodeInfo.new_for_xml(xml).lookup_interface(interface)
            found[interface] = {
                prop.name: Gio.DBusAnnotationInfo.lookup(prop.annotations, EMITS_CHANGED_SIGNAL)
                or ""
                for prop in info.properties
            }
        return found

    def step(self, step: str) -> None:
        wait = {"wait": GLib.Variant("b", True)}
        model = self.proxies[MODEL]
        if step == "load":
            model.call_sync("Load", GLib.Variant("(a{sv})", (wait,)), 0, TIMEOUT_MS, None)
        elif step == "unload":
            model.call_sync("Unload", GLib.Variant("(a{sv})", (wait,)), 0, TIMEOUT_MS, None)
        elif step in ("pin", "unpin"):
            pinned = GLib.Variant("(b)", (step == "pin",))
            model.call_sync("SetPinned", pinned, 0, TIMEOUT_MS, None)
        elif step.startswith("max-loaded="):
            value = GLib.Variant("u", int(step.partition("=")[2]))
            self.call(
                MANAGER_PATH,
                "org.freedesktop.DBus.Properties",
                "Set",
                ("ssv", MANAGER, "MaxLoaded", value),
            )
        elif step == "reload":
            self.proxies[MANAGER].call_sync("Reload", None, 0, TIMEOUT_MS, None)
        else:
            raise SystemExit(f"unknown step {step!r}")

    def get_all(self, interface: str) -> tuple[dict[str, Any], dict[str, Any]]:
        """(fresh values from GetAll, the proxy's cache when the reply is dispatched).

        The reply comes on the proxy's connection after every signal sent before it, and
        GDBus dispatches them in that order: the cache then holds exactly what they said.
        """
        replies: list[tuple[dict[str, Any], dict[str, Any]]] = []

        def done(bus: Gio.DBusConnection, result: Gio.AsyncResult) -> None:
            fresh = dict(bus.call_finish(result).unpack()[0])
            replies.append((fresh, self.cached(interface)))
            self.loop.quit()

        self.bus.call(
            BUS_NAME,
            self.paths[interface],
            "org.freedesktop.DBus.Properties",
            "GetAll",
            GLib.Variant("(s)", (interface,)),
            None,
            Gio.DBusCallFlags.NONE,
            TIMEOUT_MS,
            None,
            done,
        )
        self.loop.run()
        return replies[0]

    def cached(self, interface: str) -> dict[str, Any]:
        proxy = self.proxies[interface]
        return {
            name: proxy.get_cached_property(name).unpack()
            for name in proxy.get_cached_property_names() or ()
        }


def main(argv: list[str]) -> int:
    model, *steps = argv
    client = Client(model)
    report: dict[str, Any] = {"annotations": client.annotations(), "steps": []}
    for step in ["start", *steps]:
        if step != "start":
            client.step(step)
        fresh, cached = {}, {}
        for interface in client.proxies:
            fresh[interface], cached[interface] = client.get_all(interface)
        report["steps"].append({"step": step, "fresh": fresh, "cached": cached})
    json.dump(report, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
