"""One call's receive side on an HTTP/2 connection: :class:`ServerStream`.

The connection (:mod:`modeld.rpc.http2_connection`) feeds DATA payloads into
:meth:`ServerStream.take`, which cuts them into gRPC messages, and ends the stream; the
caller takes the messages with :meth:`ServerStream.read_batch`.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

from modeld.rpc import http2_wire as w
from modeld.rpc.http2_wire import RpcFailed, StatusCode

_unpack_prefix = w.MESSAGE_PREFIX.unpack_from


class StreamOwner(Protocol):
    """What a stream needs of its connection."""

    loop: asyncio.AbstractEventLoop

    def release(self, stream: ServerStream) -> None:
        """Give back the receive window of bytes the reader took or that nobody will read."""

    def cancel_stream(self, stream: ServerStream) -> None:
        """Reset the stream (unless it ended) and drop its unread messages."""


class ServerStream:
    """The replies of one call, read with :meth:`read_batch`.

    A stream must be read until :meth:`read_batch` returns ``[]`` or raises, or be
    cancelled: an abandoned stream keeps its share of the connection's receive window
    (callers use ``try: ... finally: stream.cancel()``). One reader at a time.

    The underscored attributes are the connection's to change. Invariants: once ``_ended``
    is true the stream is out of its connection's table and ``_outcome`` (None for OK) is
    final, except that :meth:`cancel` replaces it with CANCELLED; ``_held`` counts DATA bytes
    whose receive window is not yet given back (see :meth:`StreamOwner.release`).
    """

    __slots__ = (
        "_cancelled",
        "_ended",
        "_headers_seen",
        "_held",
        "_messages",
        "_outcome",
        "_owed",
        "_owner",
        "_partial",
        "_pending",
        "_recv_window",
        "_send_window",
        "_waiter",
        "id",
        "unary",
    )

    def __init__(
        self,
        owner: StreamOwner,
        stream_id: int,
        recv_window: int,
        send_window: int,
        unary: bool,
    ) -> None:
        self.id = stream_id
        self.unary = unary
        """A unary call's reader is woken at the end only, not per message."""
        self._owner = owner
        self._messages: list[bytes] = []
        self._partial: bytearray | None = None
        self._headers_seen = False
        self._ended = False
        self._cancelled = False
        self._outcome: RpcFailed | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._held = 0
        self._owed = 0
        self._recv_window = recv_window
        self._send_window = send_window
        self._pending: memoryview | None = None

    async def read_batch(self) -> list[bytes]:
        """Every whole message received so far, waiting while there is none.

        Returns ``[]`` once the call ended OK; raises :class:`RpcFailed` (after the messages
        received before it) if it ended otherwise. Cancelling the awaiting task cancels the
        call (RST_STREAM CANCEL).
        """
        while True:
            messages = self._messages
            if messages:
                self._messages = []
                self._owner.release(self)
                return messages
            if self._ended:
                if self._outcome is not None:
                    raise self._outcome
                return messages
            await self.wait()

    def cancel(self) -> None:
        """Cancel the call (RST_STREAM CANCEL unless it already ended) and drop unread
        messages; idempotent. Later :meth:`read_batch` calls raise CANCELLED."""
        if not self._cancelled:
            self._cancelled = True
            self._owner.cancel_stream(self)

    async def wait(self) -> None:
        """Wait for the connection's next wake-up; a cancelled wait cancels the call."""
        if self._waiter is not None:
            raise RuntimeError("ServerStream.read_batch called by two readers at once")
        waiter = self._waiter = self._owner.loop.create_future()
        try:
            await waiter
        except asyncio.CancelledError:
            self.cancel()
            raise
        finally:
            self._waiter = None

    def wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def take(self, data: bytes, p: int, end: int) -> RpcFailed | None:
        """Append the whole messages of DATA payload ``data[p:end]`` and keep the bytes of an
        incomplete one; the failure of a compressed or oversized message, else None."""
        if self._partial is not None:
            self._partial += memoryview(data)[p:end]
            return self._drain_partial()
        messages = self._messages
        while end - p >= 5:
            compressed, size = _unpack_prefix(data, p)
            q = p + 5 + size
            if q > end or compressed:
                break
            messages.append(data[p + 5 : q])
            p = q
        if p == end:
            return None
        self._partial = bytearray(memoryview(data)[p:end])
        return self._drain_partial()

    def _drain_partial(self) -> RpcFailed | None:
        """Move whole messages out of ``_partial``, checking each prefix as soon as it is in."""
        buffer = self._partial
        assert buffer is not None
        n = len(buffer)
        p = 0
        while n - p >= 5:
            compressed, size = _unpack_prefix(buffer, p)
            if compressed:
                why = "the backend sent a compressed message; compression is not supported"
                return RpcFailed(StatusCode.INTERNAL, why)
            if size > w.MAX_MESSAGE:
                why = f"received message larger than max ({size} vs. {w.MAX_MESSAGE})"
                return RpcFailed(StatusCode.RESOURCE_EXHAUSTED, why)
            q = p + 5 + size
            if q > n:
                break
            self._messages.append(bytes(buffer[p + 5 : q]))
            p = q
        if p == n:
            self._partial = None
        elif p:
            del buffer[:p]
        return None
