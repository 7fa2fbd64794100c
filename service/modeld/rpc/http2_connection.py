"""One HTTP/2 connection carrying gRPC unary and server-streaming calls (client side).

:class:`Http2Connection` is an :class:`asyncio.Protocol`: ``data_received`` parses every
frame of a socket read inline, cuts DATA payloads into gRPC messages and wakes each waiting
reader at most once per read; whatever it has to send back (SETTINGS and PING acks,
RST_STREAM, WINDOW_UPDATE) goes out as one write at the end of the read.

Receive flow control: DATA bytes are *held* until the reader takes the messages they
carried. :meth:`ServerStream.read_batch` releases them, and a WINDOW_UPDATE (stream and
connection, each at most once per release) goes out when more than half a window is owed.
Bytes of an incomplete message are released as they arrive while no whole message waits
unread, so a reply larger than the window still completes; bytes of streams that ended
unread are released at once. A reader that stops reading thus stops its backend after at
most one stream window (:data:`STREAM_WINDOW`) of unread messages, and a stalled stream
holds at most that much of the connection window (:data:`CONNECTION_WINDOW`).

Not supported (modeld's backends need none of it): TLS, client-streaming and bidi calls,
request metadata, compression (a compressed reply fails the call), deadlines (wrap calls in
:func:`asyncio.timeout`), server push (disabled), SETTINGS_MAX_CONCURRENT_STREAMS (the
grpc servers modeld talks to set no limit).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import ClassVar

from modeld.rpc import http2_wire as w
from modeld.rpc.http2_stream import ServerStream
from modeld.rpc.http2_wire import ProtocolViolation, RpcFailed, StatusCode

STREAM_WINDOW = 1 << 20
"""Receive window per stream: unread reply bytes a backend may send ahead of the reader."""
CONNECTION_WINDOW = 64 << 20
"""Receive window of the connection (64 stalled streams before the others wait)."""
MAX_FRAME = 1 << 20
"""Largest frame a backend may send (our SETTINGS_MAX_FRAME_SIZE)."""
MAX_HEADER_LIST = 64 << 10
"""Largest decoded header list accepted (our SETTINGS_MAX_HEADER_LIST_SIZE)."""

_LOCAL_SETTINGS = (
    (w.SETTINGS_ENABLE_PUSH, 0),
    (w.SETTINGS_INITIAL_WINDOW_SIZE, STREAM_WINDOW),
    (w.SETTINGS_MAX_FRAME_SIZE, MAX_FRAME),
    (w.SETTINGS_MAX_HEADER_LIST_SIZE, MAX_HEADER_LIST),
)
_TABLE_SIZE_ZERO = b"\x20"
"""HPACK dynamic table size update to 0, sent after the backend changed the table size
(our header blocks never use the dynamic table)."""

_unpack_frame = w.FRAME_HEADER.unpack_from
_unpack_u32 = w.U32.unpack_from
_UNAVAILABLE = StatusCode.UNAVAILABLE
_INTERNAL = StatusCode.INTERNAL

_Handler = Callable[["Http2Connection", int, int, bytes], None]


class Http2Connection(asyncio.Protocol):
    """Client side of one HTTP/2 connection (h2c, prior knowledge) to a gRPC server.

    Streams get odd, increasing ids. The connection stops *accepting* new calls after a
    GOAWAY, on stream-id exhaustion or once it failed; it closes itself when it no longer
    accepts calls and its last stream ended. Every failure of the connection fails all of
    its open streams with UNAVAILABLE. ``closed`` resolves once the socket is closed.
    """

    def __init__(self, authority: str) -> None:
        self.loop = asyncio.get_running_loop()
        self.closed: asyncio.Future[None] = self.loop.create_future()
        self._authority = authority
        self._transport: asyncio.Transport | None = None
        self._streams: dict[int, ServerStream] = {}
        self._next_id = 1
        self._failure: RpcFailed | None = None
        self._goaway = False
        self._out: list[bytes] | None = None
        self._buffer = bytearray()
        self._needed = 0
        self._header_blocks = w.HeaderBlocks(MAX_HEADER_LIST)
        self._header_cache: dict[str, bytes] = {}
        self._announce_table_size = False
        self._recv_window = CONNECTION_WINDOW
        self._owed = 0
        self._send_window = w.DEFAULT_WINDOW
        self._peer_initial_window = w.DEFAULT_WINDOW
        self._peer_max_frame = w.DEFAULT_MAX_FRAME
        self._blocked: list[ServerStream] = []

    # -- lifecycle -----------------------------------------------------------------

    @property
    def accepting(self) -> bool:
        """True while new calls may start on this connection."""
        return self._failure is None and not self._goaway and self._next_id <= w.MAX_STREAM_ID

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        credit = w.window_update(0, CONNECTION_WINDOW - w.DEFAULT_WINDOW)
        transport.write(w.PREFACE + w.settings(_LOCAL_SETTINGS) + credit)

    def connection_lost(self, exc: Exception | None) -> None:
        reason = f": {exc}" if exc is not None else ""
        self._fail_all(RpcFailed(_UNAVAILABLE, f"the connection to the backend closed{reason}"))
        if not self.closed.done():
            self.closed.set_result(None)

    def close(self, reason: str) -> None:
        """GOAWAY, close the socket and fail open calls with UNAVAILABLE (``reason``)."""
        self._fail_all(RpcFailed(_UNAVAILABLE, reason))
        self._close_transport(w.goaway(w.NO_ERROR))

    def _fail_connection(self, violation: ProtocolViolation) -> None:
        self._fail_all(RpcFailed(_UNAVAILABLE, f"HTTP/2 connection error: {violation.why}"))
        self._close_transport(w.goaway(violation.error_code, violation.why))

    def _fail_all(self, failure: RpcFailed) -> None:
        if self._failure is None:
            self._failure = failure
        for stream in list(self._streams.values()):
            self._finish(stream, failure)

    def _close_transport(self, last_words: bytes) -> None:
        transport = self._transport
        if transport is not None and not transport.is_closing():
            if self._out:
                transport.write(b"".join(self._out))
            self._out = None
            transport.write(last_words)
            transport.close()

    def _write(self, data: bytes) -> None:
        """Send now, or with the reply batch of the read being handled."""
        if self._out is not None:
            self._out.append(data)
            return
        transport = self._transport
        if transport is not None and not transport.is_closing():
            transport.write(data)

    # -- calls ---------------------------------------------------------------------

    def start(self, path: str, request: bytes, unary: bool = False) -> ServerStream:
        """Send a call's HEADERS and its request message (END_STREAM); RpcFailed if this
        connection no longer accepts calls."""
        if not self.accepting:
            raise self._failure or RpcFailed(_UNAVAILABLE, "the connection is going away")
        stream_id = self._next_id
        self._next_id = stream_id + 2
        stream = ServerStream(self, stream_id, STREAM_WINDOW, self._peer_initial_window, unary)
        self._streams[stream_id] = stream
        frames = self._headers_frames(stream_id, path)
        body = w.MESSAGE_PREFIX.pack(0, len(request)) + request
        size = len(body)
        if size <= min(self._peer_max_frame, self._send_window, stream._send_window):
            self._send_window -= size
            stream._send_window -= size
            frames.append(w.frame(w.DATA, w.FLAG_END_STREAM, stream_id, body))
            self._write(b"".join(frames))
        else:
            self._write(b"".join(frames))
            stream._pending = memoryview(body)
            self._send_pending(stream)
        return stream

    async def unary(self, path: str, request: bytes) -> bytes:
        """A unary call: its one reply message, or RpcFailed (UNIMPLEMENTED for zero or
        several messages, gRPC's code for a cardinality violation)."""
        stream = self.start(path, request, unary=True)
        while not stream._ended:
            await stream.wait()
        messages, stream._messages = stream._messages, []
        self.release(stream)
        if stream._outcome is not None:
            raise stream._outcome
        if len(messages) != 1:
            why = f"the backend sent {len(messages)} messages for a unary call"
            raise RpcFailed(StatusCode.UNIMPLEMENTED, why)
        return messages[0]

    def cancel_stream(self, stream: ServerStream) -> None:
        """Reset the stream unless it ended, drop its messages and give back their window."""
        if not stream._ended:
            self._write(w.rst_stream(stream.id, w.CANCEL))
            self._finish(stream, None)
        stream._outcome = RpcFailed(StatusCode.CANCELLED, "cancelled by the caller")
        stream._messages = []
        self.release(stream)

    def release(self, stream: ServerStream) -> None:
        """Give back the receive window of the stream's held bytes (see the module doc)."""
        held = stream._held
        if not held:
            return
        stream._held = 0
        out = []
        self._owed += held
        if self._owed > CONNECTION_WINDOW // 2:
            out.append(w.window_update(0, self._owed))
            self._recv_window += self._owed
            self._owed = 0
        if not stream._ended:
            stream._owed += held
            if stream._owed > STREAM_WINDOW // 2:
                out.append(w.window_update(stream.id, stream._owed))
                stream._recv_window += stream._owed
                stream._owed = 0
        if out:
            self._write(b"".join(out))

    def _headers_frames(self, stream_id: int, path: str) -> list[bytes]:
        block = self._header_cache.get(path)
        if block is None:
            block = self._header_cache[path] = w.request_header_block(path, self._authority)
        if self._announce_table_size:
            self._announce_table_size = False
            block = _TABLE_SIZE_ZERO + block
        size = self._peer_max_frame
        if len(block) <= size:
            return [w.frame(w.HEADERS, w.FLAG_END_HEADERS, stream_id, block)]
        chunks = [block[k : k + size] for k in range(0, len(block), size)]
        frames = [w.frame(w.HEADERS, 0, stream_id, chunks[0])]
        frames += [w.frame(w.CONTINUATION, 0, stream_id, chunk) for chunk in chunks[1:-1]]
        frames.append(w.frame(w.CONTINUATION, w.FLAG_END_HEADERS, stream_id, chunks[-1]))
        return frames

    def _send_pending(self, stream: ServerStream) -> None:
        """Send as much of the stream's request as the windows and frame size allow; a
        stream left with bytes to send waits in ``_blocked`` for a WINDOW_UPDATE."""
        data = stream._pending
        frames = []
        while data:
            allowed = min(len(data), self._peer_max_frame, self._send_window, stream._send_window)
            if allowed <= 0:
                if stream not in self._blocked:
                    self._blocked.append(stream)
                break
            chunk, data = data[:allowed], data[allowed:]
            self._send_window -= allowed
            stream._send_window -= allowed
            flags = 0 if data else w.FLAG_END_STREAM
            frames.append(w.frame(w.DATA, flags, stream.id, bytes(chunk)))
        stream._pending = data or None
        if frames:
            self._write(b"".join(frames))

    def _send_blocked(self) -> None:
        blocked, self._blocked = self._blocked, []
        for stream in blocked:
            if not stream._ended:
                self._send_pending(stream)

    def _finish(self, stream: ServerStream, outcome: RpcFailed | None) -> None:
        """End a stream: final outcome, out of the table, reader woken; the connection
        closes once it takes no new calls and this was its last stream."""
        if stream._ended:
            return
        if outcome is None and stream._partial is not None:
            outcome = RpcFailed(_INTERNAL, "the backend ended the call inside a message")
        stream._ended = True
        stream._outcome = outcome
        stream._partial = None
        stream._pending = None
        del self._streams[stream.id]
        if not stream._messages:
            self.release(stream)
        stream.wake()
        if not self._streams and self._failure is None and not self.accepting:
            self._close_transport(w.goaway(w.NO_ERROR))

    def _fail_stream(self, stream: ServerStream, failure: RpcFailed, error_code: int) -> None:
        self._write(w.rst_stream(stream.id, error_code))
        self._finish(stream, failure)

    # -- receive path ----------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self._failure is not None:
            return
        buffer = self._buffer
        if buffer:
            buffer += data
            if len(buffer) < self._needed:
                return
            data = bytes(buffer)
            buffer.clear()
        out: list[bytes] = []
        self._out = out
        try:
            self._parse(data)
        except ProtocolViolation as violation:
            self._fail_connection(violation)
        finally:
            if self._out is out:
                self._out = None
                if out:
                    self._write(b"".join(out))

    def _parse(self, data: bytes) -> None:
        """Handle every whole frame of ``data``; keep the incomplete tail in ``_buffer``."""
        n = len(data)
        i = 0
        while n - i >= 9:
            high, low, kind, flags, stream_id = _unpack_frame(data, i)
            length = (high << 16) | low
            if length > MAX_FRAME:
                raise ProtocolViolation(w.FRAME_SIZE_ERROR, f"{length}-byte frame")
            j = i + 9 + length
            if j > n:
                self._needed = j - i
                break
            if self._header_blocks.pending and kind != w.CONTINUATION:
                raise ProtocolViolation(w.PROTOCOL_ERROR, "header block interrupted")
            stream_id &= 0x7FFFFFFF
            if kind == w.DATA:
                self._on_data(stream_id, flags, data, i + 9, j)
            else:
                handler = self._handlers.get(kind)
                if handler is not None:
                    handler(self, flags, stream_id, data[i + 9 : j])
            i = j
        else:
            self._needed = 9
        if i < n:
            self._buffer += memoryview(data)[i:]

    def _on_data(self, stream_id: int, flags: int, data: bytes, p: int, end: int) -> None:
        length = end - p
        self._recv_window -= length
        if self._recv_window < 0:
            raise ProtocolViolation(w.FLOW_CONTROL_ERROR, "DATA beyond the connection window")
        stream = self._streams.get(stream_id)
        if stream is None:
            self._on_untracked_data(stream_id, length)
            return
        p, end = w.unpadded(flags, data, p, end)
        stream._recv_window -= length
        stream._held += length
        if stream._recv_window < 0 or not stream._headers_seen:
            why = "DATA beyond the stream window" if stream._headers_seen else "DATA first"
            self._fail_stream(stream, RpcFailed(_INTERNAL, why), w.PROTOCOL_ERROR)
            return
        had = len(stream._messages)
        failure = stream.take(data, p, end) if p < end else None
        if failure is not None:
            self._fail_stream(stream, failure, w.CANCEL)
        elif flags & w.FLAG_END_STREAM:
            why = "the backend ended the call without trailers"
            self._finish(stream, RpcFailed(_INTERNAL, why))
        elif len(stream._messages) > had:
            if not stream.unary:
                stream.wake()
        elif not stream._messages:
            self.release(stream)

    def _on_untracked_data(self, stream_id: int, length: int) -> None:
        """DATA of a stream that ended or was cancelled: its window goes straight back."""
        if stream_id == 0 or stream_id >= self._next_id or not stream_id & 1:
            raise ProtocolViolation(w.PROTOCOL_ERROR, f"DATA on idle stream {stream_id}")
        self._owed += length
        if self._owed > CONNECTION_WINDOW // 2:
            self._write(w.window_update(0, self._owed))
            self._recv_window += self._owed
            self._owed = 0

    def _on_headers(self, flags: int, stream_id: int, payload: bytes) -> None:
        block = self._header_blocks.headers(flags, stream_id, payload)
        if block is not None:
            self._on_header_list(stream_id, *block)

    def _on_continuation(self, flags: int, stream_id: int, payload: bytes) -> None:
        block = self._header_blocks.continuation(flags, stream_id, payload)
        if block is not None:
            self._on_header_list(stream_id, *block)

    def _on_header_list(self, stream_id: int, headers: w.HeaderList, end_stream: bool) -> None:
        """Response headers (a non-200 :status fails the call) or trailers (the outcome)."""
        stream = self._streams.get(stream_id)
        if stream is None:
            if stream_id >= self._next_id or not stream_id & 1:
                raise ProtocolViolation(w.PROTOCOL_ERROR, f"HEADERS on idle stream {stream_id}")
            return
        if not stream._headers_seen and not end_stream:
            stream._headers_seen = True
            status = next((value for name, value in headers if name == ":status"), "")
            if status != "200":
                failure = RpcFailed(w.status_from_http(status), f"HTTP status {status}")
                self._fail_stream(stream, failure, w.CANCEL)
        elif not end_stream:
            why = "the backend sent trailers without END_STREAM"
            self._fail_stream(stream, RpcFailed(_INTERNAL, why), w.PROTOCOL_ERROR)
        else:
            self._finish(stream, w.outcome_from_trailers(headers))

    def _on_rst_stream(self, flags: int, stream_id: int, payload: bytes) -> None:
        if len(payload) != 4 or stream_id == 0:
            raise ProtocolViolation(w.PROTOCOL_ERROR, "malformed RST_STREAM")
        stream = self._streams.get(stream_id)
        if stream is not None:
            self._finish(stream, w.failure_from_rst(_unpack_u32(payload)[0]))

    def _on_settings(self, flags: int, stream_id: int, payload: bytes) -> None:
        if stream_id != 0 or len(payload) % 6 or (flags & w.FLAG_ACK and payload):
            raise ProtocolViolation(w.PROTOCOL_ERROR, "malformed SETTINGS")
        if flags & w.FLAG_ACK:
            return
        for k in range(0, len(payload), 6):
            self._apply_setting(*w.SETTING.unpack_from(payload, k))
        self._write(w.frame(w.SETTINGS, w.FLAG_ACK, 0))
        self._send_blocked()

    def _apply_setting(self, key: int, value: int) -> None:
        if key == w.SETTINGS_INITIAL_WINDOW_SIZE:
            if value > w.MAX_WINDOW:
                raise ProtocolViolation(w.FLOW_CONTROL_ERROR, "INITIAL_WINDOW_SIZE too large")
            delta = value - self._peer_initial_window
            self._peer_initial_window = value
            for stream in self._streams.values():
                stream._send_window += delta
        elif key == w.SETTINGS_MAX_FRAME_SIZE:
            if not w.DEFAULT_MAX_FRAME <= value <= w.MAX_FRAME_LIMIT:
                raise ProtocolViolation(w.PROTOCOL_ERROR, "MAX_FRAME_SIZE out of range")
            self._peer_max_frame = value
        elif key == w.SETTINGS_HEADER_TABLE_SIZE:
            self._announce_table_size = True

    def _on_ping(self, flags: int, stream_id: int, payload: bytes) -> None:
        if stream_id != 0 or len(payload) != 8:
            raise ProtocolViolation(w.PROTOCOL_ERROR, "malformed PING")
        if not flags & w.FLAG_ACK:
            self._write(w.frame(w.PING, w.FLAG_ACK, 0, payload))

    def _on_goaway(self, flags: int, stream_id: int, payload: bytes) -> None:
        """Streams above the last id were not processed: they fail UNAVAILABLE; the others
        run to their end, after which the connection closes."""
        if stream_id != 0 or len(payload) < 8:
            raise ProtocolViolation(w.PROTOCOL_ERROR, "malformed GOAWAY")
        last, error_code = w.GOAWAY_HEAD.unpack_from(payload)
        last &= 0x7FFFFFFF
        self._goaway = True
        debug = payload[8:].decode(errors="replace")
        why = f"the backend is going away (GOAWAY code {error_code}{' ' if debug else ''}{debug})"
        for stream in [s for s in self._streams.values() if s.id > last]:
            self._finish(stream, RpcFailed(_UNAVAILABLE, why))
        if not self._streams:
            self._close_transport(w.goaway(w.NO_ERROR))

    def _on_window_update(self, flags: int, stream_id: int, payload: bytes) -> None:
        if len(payload) != 4:
            raise ProtocolViolation(w.FRAME_SIZE_ERROR, "malformed WINDOW_UPDATE")
        increment = _unpack_u32(payload)[0] & 0x7FFFFFFF
        if stream_id == 0:
            self._send_window += increment
            if increment == 0 or self._send_window > w.MAX_WINDOW:
                raise ProtocolViolation(w.FLOW_CONTROL_ERROR, "bad connection WINDOW_UPDATE")
        elif (stream := self._streams.get(stream_id)) is not None:
            stream._send_window += increment
            if increment == 0 or stream._send_window > w.MAX_WINDOW:
                why = "bad stream WINDOW_UPDATE"
                self._fail_stream(stream, RpcFailed(_INTERNAL, why), w.FLOW_CONTROL_ERROR)
        if self._blocked:
            self._send_blocked()

    def _on_push_promise(self, flags: int, stream_id: int, payload: bytes) -> None:
        raise ProtocolViolation(w.PROTOCOL_ERROR, "PUSH_PROMISE with push disabled")

    _handlers: ClassVar[dict[int, _Handler]] = {
        w.HEADERS: _on_headers,
        w.CONTINUATION: _on_continuation,
        w.RST_STREAM: _on_rst_stream,
        w.SETTINGS: _on_settings,
        w.PING: _on_ping,
        w.GOAWAY: _on_goaway,
        w.WINDOW_UPDATE: _on_window_update,
        w.PUSH_PROMISE: _on_push_promise,
    }
    """Control frames by type; PRIORITY and unknown types are ignored."""
