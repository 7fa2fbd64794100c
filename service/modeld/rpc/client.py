"""gRPC client of one backend (LocalAI ``backend.Backend`` protocol)."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping

import grpc
import grpc.aio

from modeld.errors import LoadFailed
from modeld.rpc import backend_pb2, backend_pb2_grpc

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


class BackendClient:
    """One channel per backend process, kept for its lifetime."""

    def __init__(self, address: str) -> None:
        self.address = address
        self._channel = grpc.aio.insecure_channel(address, options=_CHANNEL_OPTIONS)
        self.stub = backend_pb2_grpc.BackendStub(self._channel)

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
        await self._channel.close(grace=None)
