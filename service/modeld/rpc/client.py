"""Client of one backend (LocalAI ``backend.Backend`` protocol).

Every call goes over one :class:`~modeld.rpc.http2.Http2Channel` to the backend's socket:
its life cycle (Health, LoadModel, Free) and the calls that serve requests (Predict,
PredictStream, Embedding, TokenizeString), where grpc.aio's per-message cost (a thread hop
and a loop wake-up per message) would dominate the front door's. Nothing here imports
grpcio, so the daemon never loads it (only the backends do).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
from collections.abc import AsyncIterator, Mapping
from typing import TypeVar

from google.protobuf.message import DecodeError

from modeld.errors import LoadFailed
from modeld.rpc import backend_pb2
from modeld.rpc.http2 import Http2Channel, RpcFailed, ServerStream, StatusCode

_SERVICE = "/backend.Backend/"
_HEALTH = backend_pb2.HealthMessage().SerializeToString()

_NOT_LISTENING = frozenset({errno.ECONNREFUSED, errno.ENOENT})
"""Connect failures of a backend that is not listening yet: its socket file appears at
bind(), a moment before listen() (refused), or is not there yet."""
CONNECT_RETRY_FIRST = 0.001
CONNECT_RETRY_MAX = 0.2
"""Health tries such a connect again after 1 ms, the delay doubling up to 200 ms."""


def build_model_options(model_path: str, options: Mapping[str, object]) -> backend_pb2.ModelOptions:
    """ModelOptions from a model's ``model`` path and its ``[options]`` table.

    ``MMap`` is on unless the table says otherwise (llama.cpp's and LocalAI's default;
    proto3 cannot tell an unset bool from false).
    """
    message = backend_pb2.ModelOptions(Model=model_path, ModelFile=model_path, MMap=True)
    fields = message.DESCRIPTOR.fields_by_name
    for key, value in options.items():
        field = fields.get(key)
        if field is None:
            raise LoadFailed(f"options.{key}: not a ModelOptions field")
        try:
            current = getattr(message, key)
            if hasattr(current, "extend"):
                current.extend(value if isinstance(value, list | tuple) else [value])
            else:
                setattr(message, key, value)
        except (TypeError, ValueError) as err:
            raise LoadFailed(f"options.{key}: {err}") from None
    return message


class BackendGone(Exception):
    """The backend's client was closed (its backend went away) before or during a call."""


class ReplyStream:
    """A PredictStream call under way: its replies in batches (all that arrived so far).

    Whoever opened it cancels it when done with it, however that ends (a no-op once the
    call ended by itself).
    """

    def __init__(self, client: BackendClient, stream: ServerStream) -> None:
        self._client = client
        self._stream = stream

    async def read_batch(self) -> list[backend_pb2.Reply]:
        """The replies that arrived since the last batch (waits for one); [] at the end.

        Raises RpcFailed (the call failed), BackendGone (the client was closed).
        """
        async with self._client.calling():
            return [_parse(backend_pb2.Reply, m) for m in await self._stream.read_batch()]

    def cancel(self) -> None:
        self._stream.cancel()


class BackendClient:
    """The channel to one backend process, kept for its lifetime."""

    def __init__(self, address: str) -> None:
        self.address = address
        self._channel = Http2Channel(address)
        self._closed = False

    @contextlib.asynccontextmanager
    async def calling(self) -> AsyncIterator[None]:
        """Around a serving call: BackendGone instead of any failure once closed."""
        if self._closed:
            raise BackendGone(self.address)
        try:
            yield
        except RpcFailed:
            if self._closed:
                raise BackendGone(self.address) from None
            raise

    async def predict(self, options: backend_pb2.PredictOptions) -> backend_pb2.Reply:
        async with self.calling():
            answer = await self._channel.unary(_SERVICE + "Predict", options.SerializeToString())
            return _parse(backend_pb2.Reply, answer)

    async def predict_stream(self, options: backend_pb2.PredictOptions) -> ReplyStream:
        async with self.calling():
            stream = await self._channel.server_stream(
                _SERVICE + "PredictStream", options.SerializeToString()
            )
        return ReplyStream(self, stream)

    async def embedding(self, options: backend_pb2.PredictOptions) -> backend_pb2.EmbeddingResult:
        async with self.calling():
            answer = await self._channel.unary(_SERVICE + "Embedding", options.SerializeToString())
            return _parse(backend_pb2.EmbeddingResult, answer)

    async def tokenize(
        self, options: backend_pb2.PredictOptions
    ) -> backend_pb2.TokenizationResponse:
        async with self.calling():
            answer = await self._channel.unary(
                _SERVICE + "TokenizeString", options.SerializeToString()
            )
            return _parse(backend_pb2.TokenizationResponse, answer)

    async def health(self, timeout: float | None = None) -> None:
        """Raise LoadFailed unless Health answers within ``timeout``.

        Waits for the backend to listen: a connect refused or finding no socket is tried
        again (:data:`CONNECT_RETRY_FIRST`, doubling up to :data:`CONNECT_RETRY_MAX`); any
        other failure fails at once. With no ``timeout``, a backend that never listens or
        never answers is for the caller's timeout or stall guard.
        """
        refusals: list[RpcFailed] = []
        try:
            async with asyncio.timeout(timeout):
                answer = await self._health_once_listening(refusals)
            _parse(backend_pb2.Reply, answer)
        except RpcFailed as err:
            raise LoadFailed(f"Health failed: {err.details or err.code.name}") from None
        except TimeoutError:
            if timeout is None:
                raise
            why = f"no answer within {timeout:g}s"
            if refusals:
                why += f" ({refusals[-1].details})"
            raise LoadFailed(f"Health failed: {why}") from None

    async def _health_once_listening(self, refusals: list[RpcFailed]) -> bytes:
        """Health's answer, its connect tried again while the backend does not listen
        (``refusals`` holds the last such failure, for the timeout's message)."""
        delay = CONNECT_RETRY_FIRST
        while True:
            try:
                return await self._channel.unary(_SERVICE + "Health", _HEALTH)
            except RpcFailed as err:
                if err.errno not in _NOT_LISTENING:
                    raise
                refusals[-1:] = [err]
            await asyncio.sleep(delay)
            delay = min(delay * 2, CONNECT_RETRY_MAX)

    async def load_model(self, options: backend_pb2.ModelOptions) -> None:
        """Call LoadModel without a deadline (the owner's stall timeout bounds it)."""
        try:
            answer = await self._channel.unary(_SERVICE + "LoadModel", options.SerializeToString())
            result = _parse(backend_pb2.Result, answer)
        except RpcFailed as err:
            raise LoadFailed(f"LoadModel failed: {err.details or err.code.name}") from None
        if not result.success:
            raise LoadFailed(f"backend refused LoadModel: {result.message or 'no reason given'}")

    async def free(self, timeout: float) -> None:
        """Best effort: ask the backend to release its model before it is stopped."""
        with contextlib.suppress(RpcFailed, TimeoutError):
            async with asyncio.timeout(timeout):
                await self._channel.unary(_SERVICE + "Free", _HEALTH)

    async def close(self) -> None:
        """Close the channel; calls still open fail (serving calls with BackendGone)."""
        self._closed = True
        await self._channel.close()


_M = TypeVar(
    "_M",
    backend_pb2.Reply,
    backend_pb2.Result,
    backend_pb2.EmbeddingResult,
    backend_pb2.TokenizationResponse,
)


def _parse(kind: type[_M], data: bytes) -> _M:
    """A backend's message, or RpcFailed(INTERNAL) if the bytes are not one."""
    message = kind()
    try:
        message.ParseFromString(data)
    except DecodeError as err:
        raise RpcFailed(
            StatusCode.INTERNAL, f"the backend's {kind.__name__} could not be parsed: {err}"
        ) from None
    return message
