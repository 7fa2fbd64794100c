"""Http2Channel against crafted frames: a fake gRPC server on a unix socket that the test
drives frame by frame (hpack for its header blocks), for what grpc servers rarely send.

Synchronisation: a PING from the fake server is a barrier. The client answers frames in
order and sends everything a read makes it send as one write, so whatever it sent because
of frames before the PING arrives before the PING's ACK.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import struct
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from hpack import Decoder, Encoder
from hypothesis import given, settings
from hypothesis import strategies as st

from modeld.rpc import http2_connection, http2_wire
from modeld.rpc import http2_wire as w
from modeld.rpc.http2 import Http2Channel, RpcFailed, ServerStream
from modeld.rpc.http2 import StatusCode as Code
from modeld.rpc.http2_connection import Http2Connection

PATH = "/backend.Backend/PredictStream"


def message(payload: bytes, compressed: int = 0) -> bytes:
    return struct.pack(">BL", compressed, len(payload)) + payload


@dataclass
class Frame:
    kind: int
    flags: int
    stream_id: int
    payload: bytes


class Peer:
    """The server side of one accepted connection, driven by the test."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.encoder = Encoder()
        self.decoder = Decoder()
        self.seen: list[Frame] = []
        self._preface = False
        self._pings = 0

    async def frame(self) -> Frame:
        if not self._preface:
            assert await self.reader.readexactly(len(w.PREFACE)) == w.PREFACE
            self._preface = True
        high, low, kind, flags, stream_id = w.FRAME_HEADER.unpack(await self.reader.readexactly(9))
        payload = await self.reader.readexactly((high << 16) | low)
        received = Frame(kind, flags, stream_id & 0x7FFFFFFF, payload)
        self.seen.append(received)
        return received

    async def next(self, kind: int, stream_id: int | None = None) -> Frame:
        """The client's next frame of ``kind`` (on ``stream_id``), skipping others."""
        while True:
            received = await self.frame()
            if received.kind == kind and stream_id in (None, received.stream_id):
                return received

    async def request(self) -> tuple[int, str, bytes]:
        """The next call: (stream id, :path, request message)."""
        headers = await self.next(w.HEADERS)
        assert headers.flags & w.FLAG_END_HEADERS
        path = dict(self.decoder.decode(headers.payload))[":path"]
        body = b""
        while True:
            data = await self.next(w.DATA, headers.stream_id)
            body += data.payload
            if data.flags & w.FLAG_END_STREAM:
                break
        assert body[0] == 0 and struct.unpack(">L", body[1:5])[0] == len(body) - 5
        return headers.stream_id, str(path), body[5:]

    def send(self, *frames: bytes) -> None:
        self.writer.write(b"".join(frames))

    def header_block(self, headers: list[tuple[str, str]]) -> bytes:
        return bytes(self.encoder.encode(headers))

    def response_headers(self, stream_id: int) -> bytes:
        block = self.header_block([(":status", "200"), ("content-type", "application/grpc")])
        return w.frame(w.HEADERS, w.FLAG_END_HEADERS, stream_id, block)

    def trailers(self, stream_id: int, status: int = 0, message: str = "") -> bytes:
        headers = [("grpc-status", str(status))]
        if message:
            headers.append(("grpc-message", urllib.parse.quote(message)))
        flags = w.FLAG_END_HEADERS | w.FLAG_END_STREAM
        return w.frame(w.HEADERS, flags, stream_id, self.header_block(headers))

    def data(self, stream_id: int, *messages: bytes, flags: int = 0) -> bytes:
        return w.frame(w.DATA, flags, stream_id, b"".join(message(m) for m in messages))

    async def barrier(self) -> list[Frame]:
        """Send a PING and return the frames the client sent before its ACK."""
        self._pings += 1
        token = struct.pack(">Q", self._pings)
        self.send(w.frame(w.PING, 0, 0, token))
        start = len(self.seen)
        while True:
            received = await self.frame()
            if received.kind == w.PING and received.flags & w.FLAG_ACK:
                assert received.payload == token
                return self.seen[start:-1]


class FakeServer:
    """A unix-socket listener handing each accepted connection to the test as a Peer."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.address = f"unix:{path}"
        self._peers: asyncio.Queue[Peer] = asyncio.Queue()
        self._server: asyncio.Server | None = None
        self.accepted: list[Peer] = []

    async def start(self) -> None:
        async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            peer = Peer(reader, writer)
            self.accepted.append(peer)
            await self._peers.put(peer)

        self._server = await asyncio.start_unix_server(accept, self.path)

    async def accept(self, settings: bytes = b"") -> Peer:
        """The next connection, after the server's SETTINGS (``settings`` payload)."""
        peer = await self._peers.get()
        peer.send(w.frame(w.SETTINGS, 0, 0, settings))
        return peer

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for peer in self.accepted:
            peer.writer.close()
            with contextlib.suppress(ConnectionError):
                await peer.writer.wait_closed()
        await self._server.wait_closed()


Scenario = Callable[[FakeServer, Http2Channel], Awaitable[None]]


def run(tmp_path: Path, scenario: Scenario) -> None:
    async def main() -> None:
        server = FakeServer(tmp_path / "h2.sock")
        await server.start()
        channel = Http2Channel(server.address)
        try:
            await scenario(server, channel)
        finally:
            await channel.close()
            await server.stop()

    asyncio.run(asyncio.wait_for(main(), 20))


async def failure(awaitable: Awaitable[object]) -> RpcFailed:
    with pytest.raises(RpcFailed) as caught:
        await awaitable
    return caught.value


async def read_all(stream: ServerStream) -> list[bytes]:
    messages: list[bytes] = []
    while batch := await stream.read_batch():
        messages += batch
    return messages


@contextlib.asynccontextmanager
async def opened(
    server: FakeServer, channel: Http2Channel, settings: bytes = b""
) -> AsyncIterator[tuple[Peer, ServerStream, int]]:
    """A streaming call accepted by the fake server: (peer, stream, stream id)."""
    stream_task = asyncio.ensure_future(channel.server_stream(PATH, b"req"))
    peer = await server.accept(settings)
    stream_id, path, body = await peer.request()
    assert (path, body) == (PATH, b"req")
    yield peer, await stream_task, stream_id


# -- receive path ------------------------------------------------------------------------


def test_messages_split_across_frames_several_per_frame_and_padded(tmp_path: Path) -> None:
    async def scenario(server: FakeServer, channel: Http2Channel) -> None:
        async with opened(server, channel) as (peer, stream, sid):
            big = message(b"three" * 50)
            padded = bytes([4]) + message(b"one") + message(b"two") + b"\0" * 4
            peer.send(
                peer.response_headers(sid),
                w.frame(w.DATA, w.FLAG_PADDED, sid, padded),
                w.frame(w.DATA, 0, sid, big[:3]),
            )
            assert await stream.read_batch() == [b"one", b"two"]
            peer.send(w.frame(w.DATA, 0, sid, big[3:100]))
            await peer.barrier()
            peer.send(w.frame(w.DATA, 0, sid, big[100:]), peer.data(sid, b"four"))
            peer.send(peer.trailers(sid))
            assert await read_all(stream) == [b"three" * 50, b"four"]
            assert await stream.read_batch() == []

    run(tmp_path, scenario)


def test_continuation_priority_and_padded_headers(tmp_path: Path) -> None:
    async def scenario(server: FakeServer, channel: Http2Channel) -> None:
        async with opened(server, channel) as (peer, stream, sid):
            block = peer.header_block([(":status", "200"), ("x-long", "v" * 300)])
            flags = w.FLAG_PADDED | w.FLAG_PRIORITY
            first = bytes([2]) + b"\0\0\0\0\x10" + block[:10] + b"\0\0"
            peer.send(
                w.frame(w.HEADERS, flags, sid, first),
                w.frame(w.CONTINUATION, 0, sid, block[10:20]),
                w.frame(w.CONTINUATION, w.FLAG_END_HEADERS, sid, block[20:]),
                w.frame(w.PRIORITY, 0, sid, b"\0\0\0\0\x10"),
                peer.data(sid, b"x"),
            )
            trailers = peer.header_block([("grpc-status", "0")])
            peer.send(
                w.frame(w.HEADERS, w.FLAG_END_STREAM, sid, trailers[:1]),
                w.frame(w.CONTINUATION, w.FLAG_END_HEADERS, sid, trailers[1:]),
            )
            assert await read_all(stream) == [b"x"]

    run(tmp_path, scenario)


def test_trailers_only_error_with_percent_encoded_message(tmp_path: Path) -> None:
    async def scenario(server: FakeServer, channel: Http2Channel) -> None:
        call = asyncio.ensure_future(channel.unary("/backend.Backend/Predict", b""))
        peer = await server.accept()
        sid, _, _ = await peer.request()
        block = peer.header_block(
            [
                (":status", "200"),
                ("content-type", "application/grpc"),
                ("grpc-status", "9"),
                ("grpc-message", "no model%20loaded: 100%25 %C3%A9"),
            ]
        )
        peer.send(w.frame(w.HEADERS, w.FLAG_END_HEADERS | w.FLAG_END_STREAM, sid, block))
        failed = await failure(call)
        assert failed.code == Code.FAILED_PRECONDITION
        assert failed.details == "no model loaded: 100% é"

    run(tmp_path, scenario)


def test_error_after_messages_is_raised_after_them(tmp_path: Path) -> None:
    async def scenario(server: FakeServer, channel: Http2Channel) -> None:
        async with opened(server, channel) as (peer, stream, sid):
            peer.send(peer.response_headers(sid), peer.data(sid, b"a", b"b"))
            peer.send(peer.trailers(sid, 13, "boom"))
            await peer.barrier()
            assert await stream.read_batch() == [b"a", b"b"]
            assert (await failure(stream.read_batch())).code == Code.INTERNAL
            assert (await failure(stream.read_batch())).details == "boom"

    run(tmp_path, scenario)


@pytest.mark.parametrize(
    ("error_code", "status"),
    [(w.REFUSED_STREAM, Code.UNAVAILABLE), (w.CANCEL, Code.CANCELLED), (2, Code.INTERNAL)],
)
def test_rst_stream_maps_to_status(tmp_path: Path, error_code: int, status: Code) -> None:
    async def scenario(server: FakeServer, channel: Http2Channel) -> None:
        async with opened(server, channel) as (peer, stream, sid):
            peer.send(peer.response_headers(sid), peer.data(sid, b"kept"))
            peer.send(w.rst_stream(sid, error_code))
            assert await stream.read_batch() == [b"kept"]
            assert (await failure(stream.read_batch())).code == status

    run(tmp_path, scenario)


@pytest.mark.parametrize(
    ("http_status", "status"),
    [("404", Code.UNIMPLEMENTED), ("503", Code.UNAVAILABLE), ("400", Code.INTERNAL)],
)
def test_non_200_status_is_mapped(tmp_path: Path, http_status: str, status: Code) -> None:
    async def scenario(server: FakeServer, channel: Http2Channel) -> None:
        async with opened(server, channel) as (peer, stream, sid):
            block = peer.header_block([(":status", http_status)])
            peer.send(w.frame(w.HEADERS, w.FLAG_END_HEADERS, sid, block))
            assert (await failure(stream.read_batch())).code == status
            assert (await peer.next(w.RST_STREAM, sid)).payload == w.U32.pack(w.CANCEL)

    run(tmp_path, scenario)


def test_ping_is_acked_and_settings_acked(tmp_path: Path) -> None:
    async def scenario(server: FakeServer, channel: Http2Channel) -> None:
        async with opened(server, channel) as (peer, _, _):
            await peer.barrier()
            client_settings = [f for f in peer.seen if f.kind == w.SETTINGS]
            assert [f.flags for f in client_settings] == [0, w.FLAG_ACK]
            values = dict(
                w.SETTING.unpack_from(client_settings[0].payload, k)
                for k in range(0, len(client_settings[0].payload), 6)
            )
            assert values[w.SETTINGS_ENABLE_PUSH] == 0
            assert values[w.SETTINGS_INITIAL_WINDOW_SIZE] == http2_connection.STREAM_WINDOW
            peer.send(w.frame(w.PING, 0, 0, b"12345678"))
            ack = await peer.next(w.PING)
            assert (ack.flags, ack.payload) == (w.FLAG_ACK, b"12345678")

    run(tmp_path, scenario)


def test_compressed_message_fails_internal(tmp_path: Path) -> None:
    async def scenario(server: FakeServer, channel: Http2Channel) -> None:
        async with opened(server, channel) as (peer, stream, sid):
            compressed = w.frame(w.DATA, 0, sid, message(b"zz", compressed=1))
            peer.send(peer.response_headers(sid), compressed)
            failed = await failure(stream.read_batch())
            assert failed.code == Code.INTERNAL and "compress" in failed.details
            assert (await peer.next(w.RST_STREAM, sid)).payload == w.U32.pack(w.CANCEL)

    run(tmp_path, scenario)


def test_oversized_length_prefix_is_refused_without_buffering(tmp_path: Path) -> None:
    async def scenario(server: FakeServer, channel: Http2Channel) -> None:
        async with opened(server, channel) as (peer, stream, sid):
            prefix = struct.pack(">BL", 0, w.MAX_MESSAGE + 1)
            peer.send(peer.response_headers(sid), w.frame(w.DATA, 0, sid, prefix + b"x" * 10))
            failed = await failure(stream.read_batch())
            assert failed.code == Code.RESOURCE_EXHAUSTED
            assert str(w.MAX_MESSAGE + 1) in failed.details
            await peer.next(w.RST_STREAM, sid)
            peer.send(w.frame(w.DATA, 0, sid, b"late data of the reset stream is dropped"))
            peer.send(peer.trailers(sid))
            await peer.barrier()
            assert (await failure(stream.read_batch())).code == Code.RESOURCE_EXHAUSTED

    run(tmp_path, scenario)


def test_unary_with_no_message_is_a_cardinality_violation(tmp_path: Path) -> None:
    async def scenario(server: FakeServer, channel: Http2Channel) -> None:
        call = asyncio.ensure_future(channel.unary("/backend.Backend/Health", b""))
        peer = await server.accept()
        sid, _, _ = await peer.request()
        peer.send(peer.response_headers(sid), peer.trailers(sid))
        assert (await failure(call)).code == Code.UNIMPLEMENTED

    run(tmp_path, scenario)


# -- flow control ------------------------------------------------------------------------

CHUNK = b"m" * (60 << 10)


def window_updates(frames: list[Frame], stream_id: int) -> int:
    return sum(
        w.U32.unpack(f.payload)[0]
        for f in frames
        if f.kind == w.WINDOW_UPDATE and f.stream_id == stream_id
    )


def test_window_is_credited_only_as_messages_are_read(tmp_path: Path) -> None:
    async def scenario(server: FakeServer, channel: Http2Channel) -> None:
        async with opened(server, channel) as (peer, stream, sid):
            count = http2_connection.STREAM_WINDOW // len(CHUNK)
            frames = [peer.data(sid, CHUNK) for _ in range(count)]
            peer.send(peer.response_headers(sid), *frames)
            assert window_updates(await peer.barrier(), sid) == 0
            assert len(await stream.read_batch()) == count
            after_read = await peer.barrier()
            assert window_updates(after_read, sid) == count * (len(CHUNK) + 5)
            assert window_updates(after_read, 0) == 0, "the connection window is far from half"

    run(tmp_path, scenario)


def test_an_incomplete_large_message_is_credited_as_it_arrives(tmp_path: Path) -> None:
    async def scenario(server: FakeServer, channel: Http2Channel) -> None:
        async with opened(server, channel) as (peer, stream, sid):
            big = message(b"b" * (3 * http2_connection.STREAM_WINDOW // 2))
            quarter = len(big) // 4
            peer.send(peer.response_headers(sid))
            peer.send(*(w.frame(w.DATA, 0, sid, big[k : k + quarter]) for k in (0, quarter)))
            assert window_updates(await peer.barrier(), sid) == 2 * quarter
            rest = [big[k : k + quarter] for k in range(2 * quarter, len(big), quarter)]
            peer.send(*(w.frame(w.DATA, 0, sid, part) for part in rest), peer.trailers(sid))
            assert await read_all(stream) == [big[5:]]

    run(tmp_path, scenario)


async def data_until(peer: Peer, stream_id: int, total: int) -> list[int]:
    """Sizes of the client's DATA frames on the stream until ``total`` bytes came."""
    sizes: list[int] = []
    while sum(sizes) < total:
        sizes.append(len((await peer.next(w.DATA, stream_id)).payload))
    return sizes


def test_request_is_split_by_the_peer_windows_and_frame_size(tmp_path: Path) -> None:
    async def scenario(server: FakeServer, channel: Http2Channel) -> None:
        small_window = w.SETTING.pack(w.SETTINGS_INITIAL_WINDOW_SIZE, 20_000)
        first = asyncio.ensure_future(channel.unary("/m", b""))
        peer = await server.accept(small_window)
        sid, _, _ = await peer.request()
        peer.send(peer.response_headers(sid), peer.data(sid, b""), peer.trailers(sid))
        await first  # the client has applied the server's SETTINGS
        call = asyncio.ensure_future(channel.server_stream(PATH, b"q" * 100_000))
        sid = (await peer.next(w.HEADERS)).stream_id
        assert await data_until(peer, sid, 20_000) == [w.DEFAULT_MAX_FRAME, 3_616]
        assert [f.kind for f in await peer.barrier()] == [], "blocked until more window"
        larger = w.SETTING.pack(w.SETTINGS_INITIAL_WINDOW_SIZE, 30_000)
        peer.send(w.frame(w.SETTINGS, 0, 0, larger))
        assert await data_until(peer, sid, 10_000) == [10_000], "open streams get the change"
        peer.send(w.window_update(sid, 80_000))
        connection_left = w.DEFAULT_WINDOW - 5 - 30_000
        assert await data_until(peer, sid, connection_left) == [16_384, 16_384, 2_762]
        assert [f.kind for f in await peer.barrier()] == [], "the connection window is spent"
        peer.send(w.window_update(0, 40_000))
        rest = await data_until(peer, sid, 100_005 - w.DEFAULT_WINDOW + 5)
        assert rest == [16_384, 16_384, 1_707]
        assert peer.seen[-1].flags == w.FLAG_END_STREAM
        peer.send(peer.response_headers(sid), peer.data(sid, b"ok"), peer.trailers(sid))
        assert await read_all(await call) == [b"ok"]

    run(tmp_path, scenario)


def test_larger_frames_and_table_size_from_the_peer_are_honoured(tmp_path: Path) -> None:
    async def scenario(server: FakeServer, channel: Http2Channel) -> None:
        peer_settings = w.SETTING.pack(w.SETTINGS_MAX_FRAME_SIZE, 1 << 20) + w.SETTING.pack(
            w.SETTINGS_HEADER_TABLE_SIZE, 0
        )
        first = asyncio.ensure_future(channel.unary("/m", b""))
        peer = await server.accept(peer_settings)
        sid, _, _ = await peer.request()
        peer.send(peer.response_headers(sid), peer.data(sid, b""), peer.trailers(sid))
        await first
        call = asyncio.ensure_future(channel.unary("/m", b"r" * 40_000))
        headers = await peer.next(w.HEADERS)
        assert headers.payload[0] == 0x20, "dynamic table size update to 0"
        assert dict(peer.decoder.decode(headers.payload))[":path"] == "/m"
        assert await data_until(peer, headers.stream_id, 40_005) == [40_005]
        call.cancel()
        await peer.next(w.RST_STREAM, headers.stream_id)

    run(tmp_path, scenario)


# -- connection lifecycle ----------------------------------------------------------------


def test_goaway_fails_streams_above_last_id_and_new_calls_use_a_new_connection(
    tmp_path: Path,
) -> None:
    async def scenario(server: FakeServer, channel: Http2Channel) -> None:
        first = asyncio.ensure_future(channel.server_stream(PATH, b"1"))
        peer = await server.accept()
        sid1, _, _ = await peer.request()
        second = await channel.server_stream(PATH, b"2")
        sid2, _, _ = await peer.request()
        peer.send(w.frame(w.GOAWAY, 0, 0, w.GOAWAY_HEAD.pack(sid1, 0) + b"bye"))
        failed = await failure(second.read_batch())
        assert failed.code == Code.UNAVAILABLE and "bye" in failed.details
        third = asyncio.ensure_future(channel.server_stream(PATH, b"3"))
        fresh = await server.accept()
        sid3, _, body = await fresh.request()
        assert (sid3, body) == (1, b"3")
        fresh.send(fresh.response_headers(sid3), fresh.data(sid3, b"new"), fresh.trailers(sid3))
        peer.send(peer.response_headers(sid1), peer.data(sid1, b"old"), peer.trailers(sid1))
        assert await read_all(await first) == [b"old"]
        assert await read_all(await third) == [b"new"]
        tail = await peer.reader.read()
        assert w.goaway(w.NO_ERROR) in tail, "the drained connection says goodbye and closes"
        assert sid2 > sid1

    run(tmp_path, scenario)


def test_a_protocol_error_fails_every_call_and_the_next_call_reconnects(tmp_path: Path) -> None:
    async def scenario(server: FakeServer, channel: Http2Channel) -> None:
        async with opened(server, channel) as (peer, stream, sid):
            other = await channel.server_stream(PATH, b"2")
            await peer.request()
            peer.send(w.frame(w.PUSH_PROMISE, w.FLAG_END_HEADERS, sid, b"\0\0\0\2"))
            for call in (stream, other):
                failed = await failure(call.read_batch())
                assert failed.code == Code.UNAVAILABLE and "PUSH_PROMISE" in failed.details
            goaway = await peer.next(w.GOAWAY)
            assert goaway.payload[4:8] == w.U32.pack(w.PROTOCOL_ERROR)
            call = asyncio.ensure_future(channel.unary("/m", b""))
            fresh = await server.accept()
            fresh_id, _, _ = await fresh.request()
            fresh.send(fresh.response_headers(fresh_id), fresh.data(fresh_id, b"x"))
            fresh.send(fresh.trailers(fresh_id))
            assert await call == b"x"

    run(tmp_path, scenario)


def test_cancelled_unary_task_sends_rst_stream(tmp_path: Path) -> None:
    async def scenario(server: FakeServer, channel: Http2Channel) -> None:
        call = asyncio.ensure_future(channel.unary("/backend.Backend/Predict", b"p"))
        peer = await server.accept()
        sid, _, _ = await peer.request()
        call.cancel()
        reset = await peer.next(w.RST_STREAM, sid)
        assert reset.payload == w.U32.pack(w.CANCEL)
        with pytest.raises(asyncio.CancelledError):
            await call

    run(tmp_path, scenario)


def test_cancelled_read_batch_and_cancel_are_idempotent(tmp_path: Path) -> None:
    async def scenario(server: FakeServer, channel: Http2Channel) -> None:
        async with opened(server, channel) as (peer, stream, sid):
            peer.send(peer.response_headers(sid))
            reader = asyncio.ensure_future(stream.read_batch())
            await peer.barrier()
            reader.cancel()
            await peer.next(w.RST_STREAM, sid)
            with pytest.raises(asyncio.CancelledError):
                await reader
            stream.cancel()
            stream.cancel()
            assert (await failure(stream.read_batch())).code == Code.CANCELLED
            assert [f.kind for f in await peer.barrier()].count(w.RST_STREAM) == 0

    run(tmp_path, scenario)


def test_close_fails_open_calls(tmp_path: Path) -> None:
    async def scenario(server: FakeServer, channel: Http2Channel) -> None:
        async with opened(server, channel) as (peer, stream, _):
            waiting = asyncio.ensure_future(stream.read_batch())
            await peer.barrier()
            await channel.close()
            failed = await failure(waiting)
            assert failed.code == Code.UNAVAILABLE and "channel closed" in failed.details
            assert (await peer.next(w.GOAWAY)).payload[4:8] == w.U32.pack(w.NO_ERROR)
            assert (await failure(channel.unary(PATH, b""))).code == Code.UNAVAILABLE

    run(tmp_path, scenario)


def test_reconnects_after_the_server_closed_the_connection(tmp_path: Path) -> None:
    async def scenario(server: FakeServer, channel: Http2Channel) -> None:
        async with opened(server, channel) as (peer, stream, _):
            peer.writer.close()
            failed = await failure(stream.read_batch())
            assert failed.code == Code.UNAVAILABLE
        call = asyncio.ensure_future(channel.unary("/backend.Backend/Health", b"h"))
        fresh = await server.accept()
        sid, _, body = await fresh.request()
        assert (sid, body) == (1, b"h")
        fresh.send(fresh.response_headers(sid), fresh.data(sid, b"OK"), fresh.trailers(sid))
        assert await call == b"OK"

    run(tmp_path, scenario)


def test_concurrent_first_calls_share_one_connect(tmp_path: Path) -> None:
    async def scenario(server: FakeServer, channel: Http2Channel) -> None:
        calls = [asyncio.ensure_future(channel.unary("/m", bytes([k]))) for k in range(3)]
        peer = await server.accept()
        for _ in calls:
            sid, _, body = await peer.request()
            peer.send(peer.response_headers(sid), peer.data(sid, body * 2), peer.trailers(sid))
        assert await asyncio.gather(*calls) == [b"\0\0", b"\1\1", b"\2\2"]
        assert len(server.accepted) == 1

    run(tmp_path, scenario)


def test_connect_failure_is_unavailable_with_the_os_error(tmp_path: Path) -> None:
    async def main() -> None:
        channel = Http2Channel(f"unix:{tmp_path}/missing.sock")
        failed = await failure(channel.unary("/m", b""))
        assert failed.code == Code.UNAVAILABLE and "No such file" in failed.details
        assert failed.errno == errno.ENOENT
        await channel.close()

    asyncio.run(main())


def test_exhausted_stream_ids_open_a_new_connection(tmp_path: Path) -> None:
    async def scenario(server: FakeServer, channel: Http2Channel) -> None:
        async with opened(server, channel) as (peer, stream, sid):
            connection = channel._connection
            assert connection is not None
            connection._next_id = w.MAX_STREAM_ID
            last = asyncio.ensure_future(channel.unary("/m", b"last"))
            last_id, _, _ = await peer.request()
            assert last_id == w.MAX_STREAM_ID and not connection.accepting
            call = asyncio.ensure_future(channel.unary("/m", b"next"))
            fresh = await server.accept()
            fresh_id, _, _ = await fresh.request()
            for p, i, reply in ((peer, last_id, b"1"), (fresh, fresh_id, b"2"), (peer, sid, b"3")):
                p.send(p.response_headers(i), p.data(i, reply), p.trailers(i))
            assert (await last, await call, await read_all(stream)) == (b"1", b"2", [b"3"])
            await connection.closed

    run(tmp_path, scenario)


# -- any split of the byte stream into reads ---------------------------------------------


class RecordingTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.written = bytearray()
        self.closing = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += data

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True


@st.composite
def reply_stream(draw: st.DrawFn) -> tuple[list[bytes], bytes]:
    """Messages and the server's bytes carrying them on stream 1: arbitrary DATA frame
    boundaries (with padding), interleaved PINGs, then OK trailers."""
    messages = draw(st.lists(st.binary(max_size=300), max_size=12))
    body = b"".join(message(m) for m in messages)
    cuts = sorted(draw(st.lists(st.integers(0, len(body)), max_size=8)))
    encoder = Encoder()
    out = [w.settings([(w.SETTINGS_MAX_FRAME_SIZE, 1 << 16)])]
    block = bytes(encoder.encode([(":status", "200")]))
    out.append(w.frame(w.HEADERS, w.FLAG_END_HEADERS, 1, block))
    for start, end in zip([0, *cuts], [*cuts, len(body)], strict=True):
        pad = draw(st.integers(0, 3))
        if pad:
            payload = bytes([pad - 1]) + body[start:end] + b"\0" * (pad - 1)
            out.append(w.frame(w.DATA, w.FLAG_PADDED, 1, payload))
        else:
            out.append(w.frame(w.DATA, 0, 1, body[start:end]))
        if draw(st.booleans()):
            out.append(w.frame(w.PING, 0, 0, b"\0" * 8))
    trailers = bytes(encoder.encode([("grpc-status", "0")]))
    out.append(w.frame(w.HEADERS, w.FLAG_END_HEADERS | w.FLAG_END_STREAM, 1, trailers))
    return messages, b"".join(out)


@settings(max_examples=150, deadline=None)
@given(reply=reply_stream(), data=st.data())
def test_any_split_into_reads_gives_the_same_messages(
    reply: tuple[list[bytes], bytes], data: st.DataObject
) -> None:
    messages, wire = reply
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=20)))

    async def main() -> list[bytes]:
        connection = Http2Connection("localhost")
        connection.connection_made(RecordingTransport())
        stream = connection.start(PATH, b"")
        for start, end in zip([0, *cuts], [*cuts, len(wire)], strict=True):
            connection.data_received(wire[start:end])
        return await read_all(stream)

    assert asyncio.run(main()) == messages


def test_status_codes_are_grpcs() -> None:
    import grpc  # the backends' library; the client must not need it

    assert [(c.name, c.value) for c in Code] == [(c.name, c.value[0]) for c in grpc.StatusCode]


def test_wire_helpers_round_trip() -> None:
    assert http2_wire.status_from_code(14) == Code.UNAVAILABLE
    assert http2_wire.status_from_code(99) == Code.UNKNOWN
    assert http2_wire.outcome_from_trailers([(":status", "502")]) is not None
    assert http2_wire.outcome_from_trailers([("grpc-status", "0")]) is None
