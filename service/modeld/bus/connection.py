"""The org.modeld1 side of dbus-next: the API's message bus and the service decorators.

With :mod:`modeld.system.dbus` (the connection itself) this is the only place that imports
dbus-next, which keeps a move to dbus-fast an import-level change.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from typing import Any

from dbus_next import introspection
from dbus_next.constants import ErrorType, MessageFlag, PropertyAccess
from dbus_next.service import ServiceInterface, dbus_property, method, signal

from modeld.errors import ERROR_PREFIX
from modeld.naming import MANAGER_PATH
from modeld.system.dbus import (
    OBJECT_MANAGER_INTERFACE,
    DBusError,
    Message,
    MessageBus,
    MessageType,
    Variant,
)

INTERNAL_ERROR = ERROR_PREFIX + "Internal"

__all__ = [
    "INTERNAL_ERROR",
    "DBusError",
    "ErrorType",
    "Message",
    "MessageFlag",
    "MessageType",
    "ModeldMessageBus",
    "PropertyAccess",
    "ServiceInterface",
    "Variant",
    "dbus_property",
    "introspection",
    "method",
    "signal",
]


class ModeldMessageBus(MessageBus):
    """MessageBus that emits ObjectManager signals from the manager's path.

    dbus-next sends InterfacesAdded/Removed from the exported object's own path; clients
    such as GDBus's ObjectManagerClient listen on the ObjectManager's path.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._close_after_send: set[int] = set()
        self._method_tasks: set[asyncio.Future[Any]] = set()
        self._first: Callable[[], None] | None = None
        self._sending_first = False

    def _make_method_handler(self, interface: ServiceInterface, method: Any) -> Any:
        """Coroutine methods: keep a strong reference and reply to errors without a traceback.

        dbus-next holds no reference to the task and lets a DBusError escape its done
        callback (asyncio then logs it as an unhandled exception).
        """
        if not asyncio.iscoroutinefunction(method.fn):
            return super()._make_method_handler(interface, method)

        def handler(msg: Message, send_reply: Any) -> None:
            def done(future: asyncio.Future[Any]) -> None:
                self._method_tasks.discard(future)
                try:
                    result = future.result()
                except DBusError as err:
                    send_reply(err._as_message(msg))
                    return
                except Exception as err:  # the adapter maps errors; this is a last guard
                    send_reply(Message.new_error(msg, INTERNAL_ERROR, f"internal error: {err}"))
                    return
                body, fds = ServiceInterface._fn_result_to_body(result, method.out_signature_tree)
                send_reply(Message.new_method_return(msg, method.out_signature, body, fds))

            args = ServiceInterface._msg_body_to_args(msg)
            future = asyncio.ensure_future(method.fn(interface, *args))
            self._method_tasks.add(future)
            future.add_done_callback(done)

        return handler

    def close_after_send(self, fd: int) -> None:
        """Close our copy of ``fd`` once the message carrying it has been written."""
        self._close_after_send.add(fd)

    def before_send(self, first: Callable[[], None]) -> None:
        """Call ``first`` before sending any message (but those it sends itself), so that
        what it sends is never overtaken by a message made after it was due."""
        self._first = first

    def send(self, msg: Message) -> Any:
        if self._first is not None and not self._sending_first:
            self._sending_first = True
            try:
                self._first()
            finally:
                self._sending_first = False
        future = self._write_now(msg)
        to_close = [fd for fd in msg.unix_fds or () if fd in self._close_after_send]
        if to_close:

            def close_fds(_future: Any) -> None:
                for fd in to_close:
                    self._close_after_send.discard(fd)
                    os.close(fd)

            future.add_done_callback(close_fds)
        return future

    def _write_now(self, msg: Message) -> Any:
        """Send ``msg`` now when nothing is queued before it; returns dbus-next's future.

        dbus-next queues every message and writes it from the next loop iteration: an
        epoll_ctl to watch the socket, a wake-up, another epoll_ctl to stop. Only what the
        socket does not take at once is left to that writer.
        """
        writer = self._writer
        idle = writer.buf is None and not writer.messages.qsize()
        if self._disconnected or not self.unique_name or not idle:
            return super().send(msg)
        if not msg.serial:
            msg.serial = self.next_serial()
        future = self._loop.create_future()
        writer.buffer_message(msg, future)
        writer.write_callback()
        if writer.buf is not None or writer.messages.qsize():
            self._loop.add_writer(self._fd, writer.write_callback)
        return future

    def _emit_interface_added(self, path: str, interface: ServiceInterface) -> None:
        if self._disconnected or path == MANAGER_PATH:
            return

        def on_properties(_iface: Any, result: Any, _user_data: Any, _err: Any) -> None:
            self.send(
                Message.new_signal(
                    path=MANAGER_PATH,
                    interface=OBJECT_MANAGER_INTERFACE,
                    member="InterfacesAdded",
                    signature="oa{sa{sv}}",
                    body=[path, {interface.name: result or {}}],
                )
            )

        ServiceInterface._get_all_property_values(interface, on_properties)

    def _emit_interface_removed(self, path: str, removed_interfaces: list[str]) -> None:
        if self._disconnected or path == MANAGER_PATH:
            return
        self.send(
            Message.new_signal(
                path=MANAGER_PATH,
                interface=OBJECT_MANAGER_INTERFACE,
                member="InterfacesRemoved",
                signature="oas",
                body=[path, removed_interfaces],
            )
        )
