"""A lean gRPC client over HTTP/2 for modeld's backends (unary and server-streaming calls).

grpc.aio costs ~50 µs of client CPU per streamed message and ~200 µs per unary call; this
client parses frames inline in an :class:`asyncio.Protocol` (see
:mod:`modeld.rpc.http2_connection`) and hands out every message of a socket read at once.
It speaks h2c with prior knowledge over a unix socket or TCP, sends no metadata and accepts
no compression; requests and replies are serialized protobuf bytes::

    channel = Http2Channel("unix:/run/modeld/b.sock")
    reply = Reply.FromString(await channel.unary("/backend.Backend/Predict", request))
    stream = await channel.server_stream("/backend.Backend/PredictStream", request)
    try:
        while batch := await stream.read_batch():
            ...
    finally:
        stream.cancel()

Failures, whether a gRPC status or a broken connection, raise :class:`RpcFailed` (with
the ``errno`` of a connect that failed). Nothing here imports grpcio.
"""

from __future__ import annotations

import asyncio

from modeld.rpc.http2_connection import Http2Connection
from modeld.rpc.http2_stream import ServerStream
from modeld.rpc.http2_wire import RpcFailed, StatusCode

__all__ = ["Http2Channel", "RpcFailed", "ServerStream", "StatusCode"]


class Http2Channel:
    """gRPC calls over one HTTP/2 connection to a backend, opened on first use and again
    after it closed.

    Concurrent first calls share one connect. A connection that the backend closed, that
    failed, that got a GOAWAY or ran out of stream ids takes no new calls: the next call
    opens a new one, while calls already on the old one run to their end. After
    :meth:`close` every call fails with UNAVAILABLE.
    """

    def __init__(self, address: str) -> None:
        """``address`` is ``unix:/path/to.sock`` (or ``unix:///path``) or ``host:port``."""
        self.address = address
        self._unix_path, self._host, self._port = _parse_address(address)
        self._authority = "localhost" if self._unix_path is not None else address
        self._connection: Http2Connection | None = None
        self._connecting: asyncio.Task[Http2Connection] | None = None
        self._connections: set[Http2Connection] = set()
        self._closed = False

    async def unary(self, method: str, request: bytes) -> bytes:
        """Call ``method`` (``/backend.Backend/Predict``) with serialized ``request``; return
        the serialized reply. Cancelling the awaiting task cancels the call."""
        connection = self._connection
        if connection is None or not connection.accepting:
            connection = await self._open()
        return await connection.unary(method, request)

    async def server_stream(self, method: str, request: bytes) -> ServerStream:
        """Start a server-streaming call; returns once the request is sent. The caller
        must read the stream to its end or :meth:`ServerStream.cancel` it."""
        connection = self._connection
        if connection is None or not connection.accepting:
            connection = await self._open()
        return connection.start(method, request)

    async def close(self) -> None:
        """Close every connection; calls still open fail with UNAVAILABLE."""
        self._closed = True
        connecting = self._connecting
        if connecting is not None:
            await asyncio.wait([connecting])
        connections, self._connections = self._connections, set()
        self._connection = None
        for connection in connections:
            connection.close("channel closed")
        for connection in connections:
            await connection.closed

    async def _open(self) -> Http2Connection:
        """The connection for new calls: the current one, or one being or newly opened."""
        if self._closed:
            raise RpcFailed(StatusCode.UNAVAILABLE, "channel closed")
        task = self._connecting
        if task is None:
            task = asyncio.get_running_loop().create_task(self._connect())
            task.add_done_callback(self._connected)
            self._connecting = task
        return await asyncio.shield(task)

    async def _connect(self) -> Http2Connection:
        loop = asyncio.get_running_loop()

        def protocol() -> Http2Connection:
            return Http2Connection(self._authority)

        try:
            if self._unix_path is not None:
                _, connection = await loop.create_unix_connection(protocol, self._unix_path)
            else:
                _, connection = await loop.create_connection(protocol, self._host, self._port)
        except OSError as err:
            why = f"cannot connect to {self.address}: {err}"
            raise RpcFailed(StatusCode.UNAVAILABLE, why, err.errno) from None
        return connection

    def _connected(self, task: asyncio.Task[Http2Connection]) -> None:
        """Runs before any caller of :meth:`_open` resumes (it was added first)."""
        self._connecting = None
        if task.cancelled() or task.exception() is not None:
            return
        connection = task.result()
        if self._closed:
            connection.close("channel closed")
            return
        self._connections = {c for c in self._connections if not c.closed.done()}
        self._connections.add(connection)
        self._connection = connection


def _parse_address(address: str) -> tuple[str | None, str, int]:
    """(unix socket path, host, port) of a gRPC target; the path is None for TCP."""
    if address.startswith("unix:"):
        path = address[len("unix:") :]
        if path.startswith("///"):
            path = path[2:]
        if not path:
            raise ValueError(f"no socket path in {address!r}")
        return path, "", 0
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"not a unix:/path or host:port address: {address!r}")
    return None, host.strip("[]"), int(port)
