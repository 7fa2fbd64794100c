"""HTTP/2 and gRPC wire vocabulary for :mod:`modeld.rpc.http2`: frame layout, constants,
header blocks (encoding requests', reassembling and decoding the backend's) and the mapping
of HTTP/2 outcomes to gRPC status codes.

No I/O here; the connection in :mod:`modeld.rpc.http2_connection` uses it on its hot path,
so the frame header and message prefix are plain :class:`struct.Struct` objects.
"""

from __future__ import annotations

import enum
import struct
import urllib.parse
from collections.abc import Iterable

from hpack import Decoder, Encoder, NeverIndexedHeaderTuple
from hpack.exceptions import HPACKError

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

DATA = 0x0
HEADERS = 0x1
PRIORITY = 0x2
RST_STREAM = 0x3
SETTINGS = 0x4
PUSH_PROMISE = 0x5
PING = 0x6
GOAWAY = 0x7
WINDOW_UPDATE = 0x8
CONTINUATION = 0x9

FLAG_END_STREAM = 0x1
FLAG_ACK = 0x1
FLAG_END_HEADERS = 0x4
FLAG_PADDED = 0x8
FLAG_PRIORITY = 0x20

SETTINGS_HEADER_TABLE_SIZE = 0x1
SETTINGS_ENABLE_PUSH = 0x2
SETTINGS_MAX_CONCURRENT_STREAMS = 0x3
SETTINGS_INITIAL_WINDOW_SIZE = 0x4
SETTINGS_MAX_FRAME_SIZE = 0x5
SETTINGS_MAX_HEADER_LIST_SIZE = 0x6

NO_ERROR = 0x0
PROTOCOL_ERROR = 0x1
INTERNAL_ERROR = 0x2
FLOW_CONTROL_ERROR = 0x3
FRAME_SIZE_ERROR = 0x6
REFUSED_STREAM = 0x7
CANCEL = 0x8
COMPRESSION_ERROR = 0x9
ENHANCE_YOUR_CALM = 0xB
INADEQUATE_SECURITY = 0xC

DEFAULT_WINDOW = 65_535
DEFAULT_MAX_FRAME = 16_384
MAX_FRAME_LIMIT = (1 << 24) - 1
MAX_WINDOW = (1 << 31) - 1
MAX_STREAM_ID = (1 << 31) - 1

MAX_MESSAGE = 64 << 20
"""Largest reply message accepted (what modeld's grpc.aio channel allowed before)."""

FRAME_HEADER = struct.Struct(">BHBBL")
"""Frame header: 24-bit length as (high byte, low 16 bits), type, flags, stream id."""
MESSAGE_PREFIX = struct.Struct(">BL")
"""gRPC length prefix of a message: compressed flag, length."""
U32 = struct.Struct(">L")
SETTING = struct.Struct(">HL")
GOAWAY_HEAD = struct.Struct(">LL")


class StatusCode(enum.Enum):
    """gRPC status codes, named and numbered as gRPC defines them (the daemon does not
    import grpcio; its backends do, and their :class:`grpc.StatusCode` has the same names)."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


_HTTP_STATUS = {
    400: StatusCode.INTERNAL,
    401: StatusCode.UNAUTHENTICATED,
    403: StatusCode.PERMISSION_DENIED,
    404: StatusCode.UNIMPLEMENTED,
    429: StatusCode.UNAVAILABLE,
    502: StatusCode.UNAVAILABLE,
    503: StatusCode.UNAVAILABLE,
    504: StatusCode.UNAVAILABLE,
}
_RST_STATUS = {
    REFUSED_STREAM: StatusCode.UNAVAILABLE,
    CANCEL: StatusCode.CANCELLED,
    ENHANCE_YOUR_CALM: StatusCode.RESOURCE_EXHAUSTED,
    INADEQUATE_SECURITY: StatusCode.PERMISSION_DENIED,
}
_GRPC_STATUS = {code.value: code for code in StatusCode}


class RpcFailed(Exception):
    """A call that ended with a gRPC status other than OK, or whose connection failed.

    ``code`` is the :class:`StatusCode`; ``details`` is the server's grpc-message
    (percent-decoded), or a sentence saying what failed on our side. ``errno`` is the
    ``OSError`` errno when the failure was a connect that failed (ECONNREFUSED: nothing
    listens on the socket yet; ENOENT: no socket file), else None.
    """

    def __init__(self, code: StatusCode, details: str, errno: int | None = None) -> None:
        super().__init__(code, details)
        self.code = code
        self.details = details
        self.errno = errno

    def __str__(self) -> str:
        return f"{self.code.name}: {self.details}"


class ProtocolViolation(Exception):
    """The backend broke HTTP/2 in a way that ends the connection (GOAWAY ``error_code``)."""

    def __init__(self, error_code: int, why: str) -> None:
        super().__init__(why)
        self.error_code = error_code
        self.why = why


def frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    """One HTTP/2 frame (``payload`` must fit the peer's MAX_FRAME_SIZE)."""
    n = len(payload)
    return FRAME_HEADER.pack(n >> 16, n & 0xFFFF, kind, flags, stream_id) + payload


def rst_stream(stream_id: int, error_code: int) -> bytes:
    return frame(RST_STREAM, 0, stream_id, U32.pack(error_code))


def window_update(stream_id: int, increment: int) -> bytes:
    return frame(WINDOW_UPDATE, 0, stream_id, U32.pack(increment))


def goaway(error_code: int, debug: str = "") -> bytes:
    """GOAWAY from a client: it never accepts server-initiated streams (last id 0)."""
    return frame(GOAWAY, 0, 0, GOAWAY_HEAD.pack(0, error_code) + debug.encode())


def settings(values: Iterable[tuple[int, int]]) -> bytes:
    return frame(SETTINGS, 0, 0, b"".join(SETTING.pack(key, value) for key, value in values))


def request_header_block(path: str, authority: str) -> bytes:
    """The HPACK block of a gRPC request to ``path``.

    Only static-table hits and never-indexed literals: it leaves the peer's dynamic table
    untouched, so one block serves every call to the same path on any connection.
    """
    headers = [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", path),
        (":authority", authority),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
        ("user-agent", "modeld-http2"),
    ]
    return bytes(Encoder().encode([NeverIndexedHeaderTuple(k, v) for k, v in headers]))


def status_from_code(value: int) -> StatusCode:
    return _GRPC_STATUS.get(value, StatusCode.UNKNOWN)


def status_from_http(http_status: str) -> StatusCode:
    """The gRPC code of a response whose :status is not 200 (gRPC's http-grpc mapping)."""
    try:
        return _HTTP_STATUS.get(int(http_status), StatusCode.UNKNOWN)
    except ValueError:
        return StatusCode.UNKNOWN


def failure_from_rst(error_code: int) -> RpcFailed:
    """The failure of a stream the server reset (gRPC's RST_STREAM mapping)."""
    code = _RST_STATUS.get(error_code, StatusCode.INTERNAL)
    return RpcFailed(code, f"stream reset by the backend (HTTP/2 error code {error_code})")


def outcome_from_trailers(headers: list[tuple[str, str]]) -> RpcFailed | None:
    """None for grpc-status 0, else the call's failure (trailers or a trailers-only reply).

    A missing grpc-status falls back to the HTTP status, as gRPC clients do.
    """
    status: str | None = None
    message = ""
    http_status = "200"
    for name, value in headers:
        if name == "grpc-status":
            status = value
        elif name == "grpc-message":
            message = urllib.parse.unquote(value, errors="replace")
        elif name == ":status":
            http_status = value
    if status is None:
        if http_status != "200":
            return RpcFailed(status_from_http(http_status), f"HTTP status {http_status}")
        return RpcFailed(StatusCode.UNKNOWN, "the backend sent no grpc-status")
    if status == "0":
        return None
    try:
        code = status_from_code(int(status))
    except ValueError:
        code = StatusCode.UNKNOWN
    return RpcFailed(code, message)


def unpadded(flags: int, payload: bytes | memoryview, start: int, end: int) -> tuple[int, int]:
    """The bounds of a DATA or HEADERS payload ``payload[start:end]`` without its padding."""
    if flags & FLAG_PADDED:
        if start >= end or payload[start] >= end - start:
            raise ProtocolViolation(PROTOCOL_ERROR, "padding longer than the frame")
        return start + 1, end - payload[start]
    return start, end


HeaderList = list[tuple[str, str]]


class HeaderBlocks:
    """Reassembles header blocks (HEADERS, then CONTINUATION frames) and decodes them.

    One per connection: the HPACK dynamic table is connection state, so every block is
    decoded, also those of streams nobody waits for any more. While a block is incomplete
    (:attr:`pending`), any frame other than its CONTINUATION is a protocol error.
    """

    def __init__(self, max_header_list: int) -> None:
        self._decoder = Decoder()
        self._decoder.max_header_list_size = max_header_list
        self._max_block = 4 * max_header_list
        self._stream_id = 0
        self._block = bytearray()
        self._end_stream = False
        self.pending = False

    def headers(self, flags: int, stream_id: int, payload: bytes) -> tuple[HeaderList, bool] | None:
        """A HEADERS frame: its (headers, END_STREAM) if it completes a block, else None."""
        start, end = unpadded(flags, payload, 0, len(payload))
        if flags & FLAG_PRIORITY:
            start += 5
        if start > end or stream_id == 0:
            raise ProtocolViolation(PROTOCOL_ERROR, "malformed HEADERS")
        end_stream = bool(flags & FLAG_END_STREAM)
        if flags & FLAG_END_HEADERS:
            return self._decode(payload[start:end]), end_stream
        self.pending = True
        self._stream_id = stream_id
        self._block = bytearray(payload[start:end])
        self._end_stream = end_stream
        return None

    def continuation(
        self, flags: int, stream_id: int, payload: bytes
    ) -> tuple[HeaderList, bool] | None:
        """A CONTINUATION frame: as :meth:`headers`."""
        if not self.pending or stream_id != self._stream_id:
            raise ProtocolViolation(PROTOCOL_ERROR, "unexpected CONTINUATION")
        self._block += payload
        if len(self._block) > self._max_block:
            raise ProtocolViolation(ENHANCE_YOUR_CALM, "header block too large")
        if not flags & FLAG_END_HEADERS:
            return None
        self.pending = False
        block, self._block = bytes(self._block), bytearray()
        return self._decode(block), self._end_stream

    def _decode(self, block: bytes) -> HeaderList:
        try:
            return [(str(name), str(value)) for name, value in self._decoder.decode(block)]
        except (HPACKError, ValueError) as err:
            raise ProtocolViolation(
                COMPRESSION_ERROR, f"undecodable header block ({err})"
            ) from None
