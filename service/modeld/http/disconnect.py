"""Cancelling a request's handler when its client goes away.

aiohttp >= 3.9 does it when the server is built with ``handler_cancellation=True``
(:func:`cancellation_option`). Older versions (Debian 12 ships 3.8) never cancel a handler
on a disconnect, so there :class:`DisconnectWatch` looks at the request's transport every
``interval`` seconds and cancels the handler's task once it is gone.
"""

from __future__ import annotations

import asyncio
import inspect
from typing import Any

from aiohttp import web, web_server

WATCH_INTERVAL = 0.25
"""Seconds between two looks at a request's connection, where aiohttp cannot cancel."""


def cancellation_option() -> dict[str, Any]:
    """The server option that makes aiohttp cancel handlers, if this aiohttp has it."""
    if "handler_cancellation" in inspect.signature(web_server.Server.__init__).parameters:
        return {"handler_cancellation": True}
    return {}


class DisconnectWatch:
    """Cancels the current task once ``request``'s connection is closed (until ``close``)."""

    def __init__(self, request: web.Request, interval: float = WATCH_INTERVAL) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._task = task
        self._request = request
        self._interval = interval
        self._loop = asyncio.get_running_loop()
        self._timer = self._loop.call_later(interval, self._look)

    def _look(self) -> None:
        transport = self._request.transport
        if transport is None or transport.is_closing():
            self._task.cancel()
            return
        self._timer = self._loop.call_later(self._interval, self._look)

    def close(self) -> None:
        self._timer.cancel()
