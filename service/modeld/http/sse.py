"""Server-sent events: a response whose headers go out with its first event.

Until then the request can still be answered with an error status; afterwards an error
travels inside the stream as a ``data:`` event holding OpenAI's error object.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TypeVar

from aiohttp import web

from modeld.http.errors import ApiError

T = TypeVar("T")

HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}


class EventStream:
    """An SSE response to ``request``, opened (200 and headers sent) by its first write."""

    def __init__(self, request: web.Request) -> None:
        self._request = request
        self.response = web.StreamResponse(status=200, headers=HEADERS)
        self._open = False

    @property
    def opened(self) -> bool:
        return self._open

    async def _write(self, data: bytes) -> None:
        if not self._open:
            self._open = True
            await self.response.prepare(self._request)
        await self.response.write(data)

    async def comment(self, text: str) -> None:
        """A comment line (``: text``), which clients ignore: it shows the stream is alive."""
        await self._write(b": " + text.encode() + b"\n\n")

    async def event(self, data: bytes) -> None:
        """One ``data:`` event (``data`` holds no newline)."""
        await self._write(b"data: " + data + b"\n\n")

    async def finish(self) -> None:
        """End with ``data: [DONE]``."""
        await self.event(b"[DONE]")
        await self.response.write_eof()

    async def fail(self, error: ApiError) -> None:
        """End with an error event (OpenAI's error object), without ``[DONE]``."""
        await self.event(error.encoded())
        await self.response.write_eof()


async def await_with_comments(
    work: asyncio.Future[T],
    stream: EventStream,
    comment: Callable[[], str],
    *,
    grace: float,
    interval: float,
    deadline: Callable[[], float | None] = lambda: None,
) -> T:
    """Wait for ``work``; if it takes longer than ``grace`` seconds, send ``comment()``
    then and every ``interval`` seconds after, until it is done.

    ``deadline()`` is the monotonic time at which to give up (None: none), asked at each
    wake-up; past it, TimeoutError is raised. ``work`` is cancelled if the wait ends
    without its result (an error, the deadline, or the caller being cancelled).
    """
    try:
        wait = grace
        while True:
            limit = deadline()
            if limit is not None:
                wait = min(wait, max(0.0, limit - time.monotonic()))
            await asyncio.wait((work,), timeout=wait)
            if work.done():
                return work.result()
            limit = deadline()
            if limit is not None and time.monotonic() >= limit:
                raise TimeoutError
            await stream.comment(comment())
            wait = interval
    finally:
        if not work.done():
            work.cancel()
