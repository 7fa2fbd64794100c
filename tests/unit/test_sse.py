"""The SSE stream: headers with the first write, events of a fast stream coalesced into one
write, a slow stream written event by event, failures of a background write reported at
the next event. The response is a recording fake; waits are on its writes."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from modeld.http import sse
from modeld.http.errors import ApiError
from modeld.http.sse import EventStream

COALESCE = 0.05


class FakeResponse:
    def __init__(self, fail_on: int | None = None) -> None:
        self.prepared = False
        self.writes: list[bytes] = []
        self.eof = False
        self.fail_on = fail_on
        self.written = asyncio.Event()

    async def prepare(self, request: object) -> None:
        self.prepared = True

    async def write(self, data: bytes) -> None:
        if self.fail_on is not None and len(self.writes) + 1 == self.fail_on:
            raise ConnectionResetError("the client went away")
        self.writes.append(data)
        self.written.set()

    async def write_eof(self) -> None:
        self.eof = True

    async def next_write(self) -> None:
        self.written.clear()
        await asyncio.wait_for(self.written.wait(), 5)


def run(scenario: Callable[[EventStream, FakeResponse], Awaitable[None]], **fake: Any) -> None:
    async def main() -> None:
        stream = EventStream(object(), coalesce=COALESCE)  # type: ignore[arg-type]
        response = FakeResponse(**fake)
        stream.response = response  # type: ignore[assignment]
        try:
            await scenario(stream, response)
        finally:
            stream.close()

    asyncio.run(main())


def test_the_first_event_opens_the_stream_at_once_and_a_burst_is_one_write() -> None:
    async def scenario(stream: EventStream, response: FakeResponse) -> None:
        assert not stream.opened and not response.prepared
        await stream.event(b"1")
        assert stream.opened and response.prepared and response.writes == [b"data: 1\n\n"]
        started = time.monotonic()
        await stream.event(b"2")
        await stream.event(b"3")
        assert len(response.writes) == 1  # held back
        await response.next_write()
        assert response.writes[1] == b"data: 2\n\ndata: 3\n\n"
        assert time.monotonic() - started < COALESCE * 20

    run(scenario)


def test_comments_and_the_end_write_what_is_held_back_in_order() -> None:
    async def scenario(stream: EventStream, response: FakeResponse) -> None:
        await stream.event(b"1")
        await stream.event(b"2")
        await stream.comment("still here")
        assert response.writes == [b"data: 1\n\n", b"data: 2\n\n: still here\n\n"]
        await stream.event(b"3")
        await stream.finish()
        assert b"".join(response.writes).endswith(b"data: 3\n\ndata: [DONE]\n\n")
        assert response.eof

    run(scenario)


def test_a_slow_stream_is_written_event_by_event() -> None:
    async def scenario(stream: EventStream, response: FakeResponse) -> None:
        for n in range(3):
            await stream.event(str(n).encode())
            assert response.writes[n:] == [f"data: {n}\n\n".encode()]  # written at once
            await _past(COALESCE)

    run(scenario)


async def _past(seconds: float) -> None:
    """Let ``seconds`` of loop time go by (the stream's clock) without holding anything."""
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    loop.call_at(loop.time() + seconds, done.set_result, None)
    await done


def test_much_held_back_is_written_at_once() -> None:
    async def scenario(stream: EventStream, response: FakeResponse) -> None:
        await stream.event(b"first")
        big = b"x" * (sse.MAX_HELD_BYTES // 4)
        for _ in range(4):
            await stream.event(big)
        assert len(response.writes) == 2 and len(response.writes[1]) > sse.MAX_HELD_BYTES

    run(scenario)


def test_a_failed_background_write_is_reported_by_the_next_event() -> None:
    async def scenario(stream: EventStream, response: FakeResponse) -> None:
        await stream.event(b"1")
        await stream.event(b"2")
        await _past(2 * COALESCE)  # the held-back event's write has failed meanwhile
        with pytest.raises(ConnectionResetError):
            await stream.event(b"more")
        with pytest.raises(ConnectionResetError):
            await stream.fail(ApiError(502, "backend error"))

    run(scenario, fail_on=2)
