"""Server-sent events: a response whose headers go out with its first event.

Until then the request can still be answered with an error status; afterwards an error
travels inside the stream as a ``data:`` event holding OpenAI's error object.

A fast stream's events are coalesced: an event written less than ``coalesce`` seconds
after the previous write is held back and goes out with the others of that span (one
write, one wake-up of the client instead of one per token); a slow stream (a person
reading a model's output) is written event by event, at once.
"""

from __future__ import annotations

import asyncio
import math
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
COALESCE_SECONDS = 0.005
"""The longest an event is held back to go out with the next ones."""
MAX_HELD_BYTES = 64 * 1024
"""Held-back events beyond this are written at once (and wait for the client to read)."""


class EventStream:
    """An SSE response to ``request``, opened (200 and headers sent) by its first write.

    Call :meth:`close` when done with it, however the request ended.
    """

    def __init__(self, request: web.Request, *, coalesce: float = COALESCE_SECONDS) -> None:
        self._request = request
        self.response = web.StreamResponse(status=200, headers=HEADERS)
        self._open = False
        self._coalesce = coalesce
        self._loop = asyncio.get_running_loop()
        self._held: list[bytes] = []
        self._held_bytes = 0
        self._last_write = -math.inf
        self._timer: asyncio.TimerHandle | None = None
        self._flusher: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._failure: Exception | None = None

    @property
    def opened(self) -> bool:
        return self._open

    async def comment(self, text: str) -> None:
        """A comment line (``: text``), which clients ignore: it shows the stream is alive."""
        await self._hold(b": " + text.encode() + b"\n\n")
        await self.flush()

    async def event(self, data: bytes) -> None:
        """One ``data:`` event (``data`` holds no newline); it may be held back briefly."""
        await self._hold(b"data: " + data + b"\n\n")

    async def finish(self) -> None:
        """End with ``data: [DONE]``."""
        await self.event(b"[DONE]")
        await self.flush()
        await self.response.write_eof()

    async def fail(self, error: ApiError) -> None:
        """End with an error event (OpenAI's error object), without ``[DONE]``."""
        await self.event(error.encoded())
        await self.flush()
        await self.response.write_eof()

    async def flush(self) -> None:
        """Write the held-back events now."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        async with self._lock:
            if self._failure is not None:
                raise self._failure
            if not self._held:
                return
            data = b"".join(self._held)
            self._held.clear()
            self._held_bytes = 0
            self._last_write = self._loop.time()
            if not self._open:
                self._open = True
                await self.response.prepare(self._request)
            await self.response.write(data)

    def close(self) -> None:
        """Drop what is still held back (the request is over)."""
        if self._timer is not None:
            self._timer.cancel()
        if self._flusher is not None:
            self._flusher.cancel()

    async def _hold(self, data: bytes) -> None:
        if self._failure is not None:
            raise self._failure
        self._held.append(data)
        self._held_bytes += len(data)
        if self._held_bytes >= MAX_HELD_BYTES:
            await self.flush()
        elif self._timer is None:
            due = self._last_write + self._coalesce
            if self._loop.time() >= due:
                await self.flush()
            else:
                self._timer = self._loop.call_at(due, self._flush_later)

    def _flush_later(self) -> None:
        self._timer = None
        self._flusher = self._loop.create_task(self._flush_in_background())

    async def _flush_in_background(self) -> None:
        try:
            await self.flush()
        except Exception as err:  # the client went away: the next write reports it
            self._failure = err


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
