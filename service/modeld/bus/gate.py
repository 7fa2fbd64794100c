"""The one place calls to org.modeld1 are authorized, before dispatch; deny by default.

Interfaces are exported through :meth:`Gate.export`, which refuses (:class:`ExportError`) an
interface whose properties differ from :mod:`modeld.bus.api` or with a method or writable
property that declares no :class:`~modeld.bus.authorization.Rule`. The gate's message handler
sees every method call first: a call to a member without a rule is refused with AccessDenied,
a call to an open member goes on to dbus-next, and any other call is dispatched only after the
caller was found to hold the action its rule names for that call.

Property writes never reach dbus-next: every property is read-only to it. The gate answers
every ``Set`` on its interfaces; one of a property listed in :data:`modeld.bus.api.WRITABLE`
is authorized here, then applied by the gate's ``write`` callback.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine, Mapping
from typing import Any

from modeld.bus import api
from modeld.bus.annotations import describe
from modeld.bus.authorization import Action, Authorizer, rule_of
from modeld.bus.connection import (
    INTERNAL_ERROR,
    DBusError,
    ErrorType,
    Message,
    MessageFlag,
    MessageType,
    ModeldMessageBus,
    PropertyAccess,
    ServiceInterface,
)
from modeld.bus.connection import introspection as intr
from modeld.errors import AccessDenied, InvalidArgs, ModeldError
from modeld.system.dbus import PROPERTIES_INTERFACE

log = logging.getLogger(__name__)


class ExportError(Exception):
    """An interface breaks the API's rules: a programming error, never a caller's."""


class ApiInterface(ServiceInterface):
    """An interface of org.modeld1, exported through a :class:`Gate`.

    Its properties are read-only to dbus-next; those listed in :data:`api.WRITABLE`
    introspect as read-write, and the gate applies writes to them. Its introspection data
    carries the annotations and argument names of :mod:`modeld.bus.annotations`.
    """

    def model_of(self, args: Mapping[str, Any]) -> str | None:
        """The model a call with these named arguments concerns (its ``name``), if any."""
        name = args.get("name")
        return name if isinstance(name, str) else None

    def introspect(self) -> intr.Interface:
        spec = super().introspect()
        writable = api.WRITABLE.get(self.name, frozenset())
        spec.properties = [
            intr.Property(p.name, p.signature, PropertyAccess.READWRITE)
            if p.name in writable
            else p
            for p in spec.properties
        ]
        return describe(spec)


def check_rules(interface: ServiceInterface) -> None:
    """Raise ExportError unless ``interface`` matches the API tables and declares every rule."""
    name = interface.name
    table = api.PROPERTIES.get(name)
    if table is None or not isinstance(interface, ApiInterface):
        raise ExportError(f"{name} is not an interface of the org.modeld1 API")
    properties = [p for p in ServiceInterface._get_properties(interface) if not p.disabled]
    if {p.name: p.signature for p in properties} != table:
        raise ExportError(f"{name}: the properties differ from modeld.bus.api's table")
    writable = api.WRITABLE.get(name, frozenset())
    for prop in properties:
        if prop.access.writable():
            raise ExportError(f"{name}.{prop.name}: writes go through the gate, not dbus-next")
        declared = rule_of(prop.prop_getter) is not None
        if prop.name in writable and not declared:
            raise ExportError(f"{name}.{prop.name} is writable but declares no rule for writes")
        if prop.name not in writable and declared:
            raise ExportError(f"{name}.{prop.name} declares a rule for writes but is read-only")
    for method in ServiceInterface._get_methods(interface):
        if not method.disabled and rule_of(method.fn) is None:
            raise ExportError(f"{name}.{method.name} declares no authorization rule")


class Gate:
    """Exports org.modeld1 interfaces and authorizes every call to them before dispatch."""

    def __init__(
        self,
        bus: ModeldMessageBus,
        authorizer: Authorizer,
        *,
        pinned: Callable[[str], bool],
        write: Callable[[ApiInterface, str, Any], None],
    ) -> None:
        """``pinned(model)`` feeds rules that depend on it; ``write`` applies a property write."""
        self._bus = bus
        self._authorizer = authorizer
        self._pinned = pinned
        self._write = write
        self._objects: dict[str, list[ApiInterface]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        bus.add_message_handler(self._on_message)

    def export(self, path: str, interface: ApiInterface) -> None:
        check_rules(interface)
        self._bus.export(path, interface)
        self._objects.setdefault(path, []).append(interface)

    def unexport(self, path: str, interface: ApiInterface) -> None:
        self._bus.unexport(path, interface)
        exported = self._objects.get(path, [])
        if interface in exported:
            exported.remove(interface)
        if not exported:
            self._objects.pop(path, None)

    def _interface(self, path: str | None, name: str | None) -> ApiInterface | None:
        for interface in self._objects.get(path or "", ()):
            if interface.name == name:
                return interface
        return None

    def _on_message(self, msg: Message) -> bool | None:
        if msg.message_type is not MessageType.METHOD_CALL:
            return None
        try:
            return self._route(msg)
        except Exception as err:
            self._reply_error(msg, msg.member or "call", err)
            return True

    def _route(self, msg: Message) -> bool | None:
        """Refuse, answer, or authorize-then-dispatch a call; None leaves it to dbus-next."""
        if msg.interface == PROPERTIES_INTERFACE:
            if msg.member == "Set" and msg.signature == "ssv":
                return self._on_set(msg)
            return None
        interface = self._interface(msg.path, msg.interface)
        if interface is None:
            return None
        for method in ServiceInterface._get_methods(interface):
            if (
                not method.disabled
                and method.name == msg.member
                and method.in_signature == msg.signature
            ):
                return self._on_call(msg, interface, method)
        return None

    def _on_call(self, msg: Message, interface: ApiInterface, method: Any) -> bool | None:
        args = {
            arg.name: value
            for arg, value in zip(method.introspection.in_args, msg.body, strict=True)
        }
        model = interface.model_of(args)
        what = f"{method.name} {model}" if model is not None else method.name
        rule = rule_of(method.fn)
        if rule is None:
            return self._deny(
                msg, f"{what}: {interface.name}.{method.name} declares no rule; refused"
            )
        options = args.get("options")
        action = rule.action(
            options if isinstance(options, dict) else {},
            lambda: model is not None and self._pinned(model),
        )
        if action is None:
            return None
        self._spawn(self._call(msg, action, what, interface, method))
        return True

    def _on_set(self, msg: Message) -> bool | None:
        interface_name, prop_name, variant = msg.body
        interface = self._interface(msg.path, interface_name)
        if interface is None:
            return None
        props = [
            p
            for p in ServiceInterface._get_properties(interface)
            if p.name == prop_name and not p.disabled
        ]
        if not props:
            text = f"{interface_name} has no property {prop_name}"
            return self._error(msg, ErrorType.UNKNOWN_PROPERTY.value, text)
        if prop_name not in api.WRITABLE.get(interface_name, ()):
            text = f"property {prop_name} is read-only"
            return self._error(msg, ErrorType.PROPERTY_READ_ONLY.value, text)
        what = f"set {prop_name}"
        rule = rule_of(props[0].prop_getter)
        if rule is None:
            return self._deny(
                msg, f"{what}: {interface_name}.{prop_name} declares no rule; refused"
            )
        action = rule.action({}, lambda: False)
        self._spawn(self._set(msg, action, what, interface, prop_name, variant))
        return True

    async def _allowed(self, msg: Message, action: Action | None, what: str) -> bool:
        if action is None:
            return True
        try:
            await self._authorizer.check(action, msg.sender, what)
        except ModeldError as err:
            self._deny(msg, err.message)
            return False
        return True

    async def _call(
        self, msg: Message, action: Action, what: str, interface: ApiInterface, method: Any
    ) -> None:
        if not await self._allowed(msg, action, what):
            return
        try:
            self._bus._make_method_handler(interface, method)(msg, lambda r: self._reply(msg, r))
        except Exception as err:
            self._reply_error(msg, what, err)

    async def _set(
        self,
        msg: Message,
        action: Action | None,
        what: str,
        interface: ApiInterface,
        prop_name: str,
        variant: Any,
    ) -> None:
        if not await self._allowed(msg, action, what):
            return
        try:
            signature = api.PROPERTIES[interface.name][prop_name]
            if variant.signature != signature:
                raise InvalidArgs(f"{prop_name} takes {signature!r}, not {variant.signature!r}")
            self._write(interface, prop_name, variant.value)
        except Exception as err:
            self._reply_error(msg, what, err)
            return
        self._reply(msg, Message.new_method_return(msg))

    def _deny(self, msg: Message, text: str) -> bool:
        log.warning("%s", text)
        return self._error(msg, AccessDenied.dbus_name, text)

    def _error(self, msg: Message, name: str, text: str) -> bool:
        self._reply(msg, Message.new_error(msg, name, text))
        return True

    def _reply_error(self, msg: Message, what: str, err: Exception) -> None:
        if isinstance(err, ModeldError):
            log.warning("%s: %s", what, err)
            reply = Message.new_error(msg, err.dbus_name, err.message)
        elif isinstance(err, DBusError):
            reply = Message.new_error(msg, err.type, err.text)
        else:
            log.error("internal error in %s", what, exc_info=err)
            reply = Message.new_error(
                msg, INTERNAL_ERROR, f"internal error in {what}: {err}; see modeld's journal"
            )
        self._reply(msg, reply)

    def _reply(self, msg: Message, reply: Message) -> None:
        if not msg.flags & MessageFlag.NO_REPLY_EXPECTED:
            self._bus.send(reply)

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
