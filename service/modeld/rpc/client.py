"""gRPC client of one backend (LocalAI ``backend.Backend`` protocol).

Two channels to the same socket: grpcio's for the backend's life cycle (Health, LoadModel,
Free: rare, and grpcio's waiting for a socket that does not listen yet is what a load
needs), and :class:`~modeld.rpc.http2.Http2Channel` for the calls that serve requests
(Predict, PredictStream, Embedding, TokenizeString), where grpc.aio's per-message cost
(a thread hop and a loop wake-up per message) would dominate the front door's.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Mapping
from typing import TypeVar

import grpc
import grpc.aio
from google.protobuf.message import DecodeError

from modeld.errors import LoadFailed
from modeld.rpc import backend_pb2, backend_pb2_grpc
from modeld.rpc.http2 import Http2Channel, RpcFailed, ServerStream

_SERVICE = "/backend.Backend/"

# A first connect that fails (socket bound but not yet listening) would otherwise wait out
# gRPC's ~1 s reconnect backoff.
_CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 5),
    ("grpc.min_reconnect_backoff_ms", 5),
    ("grpc.max_reconnect_backoff_ms", 200),
    ("grpc.enable_retries", 0),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
]


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
    """The channels to one backend process, kept for its lifetime."""

    def __init__(self, address: str) -> None:
        self.address = address
        self._channel = grpc.aio.insecure_channel(address, options=_CHANNEL_OPTIONS)
        self.stub = backend_pb2_grpc.BackendStub(self._channel)
        self._serving = Http2Channel(address)
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
            answer = await self._serving.unary(_SERVICE + "Predict", options.SerializeToString())
            return _parse(backend_pb2.Reply, answer)

    async def predict_stream(self, options: backend_pb2.PredictOptions) -> ReplyStream:
        async with self.calling():
            stream = await self._serving.server_stream(
                _SERVICE + "PredictStream", options.SerializeToString()
            )
        return ReplyStream(self, stream)

    async def embedding(self, options: backend_pb2.PredictOptions) -> backend_pb2.EmbeddingResult:
        async with self.calling():
            answer = await self._serving.unary(_SERVICE + "Embedding", options.SerializeToString())
            return _parse(backend_pb2.EmbeddingResult, answer)

    async def tokenize(
        self, options: backend_pb2.PredictOptions
    ) -> backend_pb2.TokenizationResponse:
        async with self.calling():
            answer = await self._serving.unary(
                _SERVICE + "TokenizeString", options.SerializeToString()
            )
            return _parse(backend_pb2.TokenizationResponse, answer)

    async def health(self, timeout: float | None = None) -> None:
        """Raise LoadFailed unless Health answers (waits for the connection; a backend that
        never answers is for the caller's timeout or stall guard)."""
        try:
            await self.stub.Health(
                backend_pb2.HealthMessage(), wait_for_ready=True, timeout=timeout
            )
        except grpc.aio.AioRpcError as err:
            raise LoadFailed(f"Health failed: {err.details() or err.code().name}") from None

    async def load_model(self, options: backend_pb2.ModelOptions) -> None:
        """Call LoadModel without a deadline (the owner's stall timeout bounds it)."""
        try:
            result = await self.stub.LoadModel(options)
        except grpc.aio.AioRpcError as err:
            raise LoadFailed(f"LoadModel failed: {err.details() or err.code().name}") from None
        if not result.success:
            raise LoadFailed(f"backend refused LoadModel: {result.message or 'no reason given'}")

    async def free(self, timeout: float) -> None:
        """Best effort: ask the backend to release its model before it is stopped."""
        with contextlib.suppress(grpc.aio.AioRpcError):
            await self.stub.Free(backend_pb2.HealthMessage(), timeout=timeout)

    async def close(self) -> None:
        """Close both channels; serving calls still open fail with BackendGone."""
        self._closed = True
        await self._serving.close()
        await self._channel.close(grace=None)


_M = TypeVar("_M", backend_pb2.Reply, backend_pb2.EmbeddingResult, backend_pb2.TokenizationResponse)


def _parse(kind: type[_M], data: bytes) -> _M:
    """A backend's message, or RpcFailed(INTERNAL) if the bytes are not one."""
    message = kind()
    try:
        message.ParseFromString(data)
    except DecodeError as err:
        raise RpcFailed(
            grpc.StatusCode.INTERNAL, f"the backend's {kind.__name__} could not be parsed: {err}"
        ) from None
    return message
