"""Http2Channel against the real reference backend (a grpcio server in a subprocess):
the same replies as grpc.aio, concurrent calls on one connection, cancellation, errors,
and a backend killed and restarted on the same socket."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterator
from pathlib import Path

import grpc.aio
import pytest
from reference_process import ROOT, ReferenceProcess

from modeld.rpc import backend_pb2 as pb
from modeld.rpc import backend_pb2_grpc as pb_grpc
from modeld.rpc.http2 import Http2Channel, RpcFailed, ServerStream
from modeld.rpc.http2 import StatusCode as Code

DEMO = ROOT / "service" / "modeld" / "data" / "demo.txt"
PREDICT = "/backend.Backend/Predict"
STREAM = "/backend.Backend/PredictStream"
LOAD = "/backend.Backend/LoadModel"
SHORT = pb.PredictOptions(Prompt="The sea", Tokens=8, TopP=1.0)
LONG = pb.PredictOptions(Prompt="The sea", Tokens=300, TopP=1.0)
ENDLESS = pb.PredictOptions(Prompt="The sea", Tokens=10**7, TopP=1.0)
Token = tuple[bytes, int, int]


@pytest.fixture
def sock(tmp_path: Path) -> Path:
    path = tmp_path / "b.sock"
    assert len(str(path)) < 100, "unix socket path too long"
    return path


@pytest.fixture
def backend(sock: Path) -> Iterator[ReferenceProcess]:
    started = ReferenceProcess.started(sock)
    yield started
    started.stop()


async def load(channel: Http2Channel) -> None:
    result = pb.Result.FromString(await channel.unary(LOAD, load_request()))
    assert result.success, result.message


def load_request() -> bytes:
    return pb.ModelOptions(Model="demo.txt", ModelFile=str(DEMO)).SerializeToString()


def token(reply: pb.Reply) -> Token:
    return reply.message, reply.tokens, reply.prompt_tokens


async def stream_tokens(channel: Http2Channel, options: pb.PredictOptions) -> list[Token]:
    stream = await channel.server_stream(STREAM, options.SerializeToString())
    tokens: list[Token] = []
    try:
        while batch := await stream.read_batch():
            tokens += [token(pb.Reply.FromString(m)) for m in batch]
    finally:
        stream.cancel()
    return tokens


async def predict(channel: Http2Channel, options: pb.PredictOptions = SHORT) -> Token:
    return token(pb.Reply.FromString(await channel.unary(PREDICT, options.SerializeToString())))


def run(coroutine: object) -> None:
    assert asyncio.iscoroutine(coroutine)
    asyncio.run(asyncio.wait_for(coroutine, 60))


def test_same_replies_as_grpc_aio(backend: ReferenceProcess) -> None:
    async def scenario() -> None:
        channel = Http2Channel(backend.address)
        reference = grpc.aio.insecure_channel(backend.address)
        stub = pb_grpc.BackendStub(reference)
        try:
            await load(channel)
            expected_stream = [token(r) async for r in stub.PredictStream(LONG)]
            assert len(expected_stream) == LONG.Tokens
            assert await stream_tokens(channel, LONG) == expected_stream
            assert await predict(channel) == token(await stub.Predict(SHORT))
            assert await predict(channel, LONG) == token(await stub.Predict(LONG))
        finally:
            await channel.close()
            await reference.close()

    run(scenario())


def test_predict_before_load_model_fails_with_the_backends_status(
    backend: ReferenceProcess,
) -> None:
    async def scenario() -> None:
        channel = Http2Channel(backend.address)
        try:
            with pytest.raises(RpcFailed) as unary:
                await predict(channel)
            with pytest.raises(RpcFailed) as streamed:
                await stream_tokens(channel, SHORT)
        finally:
            await channel.close()
        for failed in (unary.value, streamed.value):
            assert (failed.code, failed.details) == (Code.FAILED_PRECONDITION, "no model loaded")

    run(scenario())


def test_concurrent_streams_and_unary_calls_share_one_connection(backend: ReferenceProcess) -> None:
    async def scenario() -> None:
        channel = Http2Channel(backend.address)
        try:
            await load(channel)
            alone = await stream_tokens(channel, LONG)
            single = await predict(channel)
            connection = channel._connection
            results = await asyncio.gather(
                *(stream_tokens(channel, LONG) for _ in range(4)),
                *(predict(channel) for _ in range(3)),
            )
            assert results == [alone] * 4 + [single] * 3
            assert channel._connection is connection
        finally:
            await channel.close()

    run(scenario())


def test_cancel_mid_stream_then_the_channel_still_works(backend: ReferenceProcess) -> None:
    async def scenario() -> None:
        channel = Http2Channel(backend.address)
        try:
            await load(channel)
            stream = await channel.server_stream(STREAM, ENDLESS.SerializeToString())
            received = 0
            while received < 50:
                received += len(await stream.read_batch())
            stream.cancel()
            with pytest.raises(RpcFailed) as cancelled:
                await stream.read_batch()
            assert cancelled.value.code == Code.CANCELLED
            assert len(await stream_tokens(channel, LONG)) == LONG.Tokens
            assert (await predict(channel))[1] == SHORT.Tokens
        finally:
            await channel.close()

    run(scenario())


async def read_until_failure(stream: ServerStream) -> RpcFailed:
    with pytest.raises(RpcFailed) as failed:
        while await stream.read_batch():
            pass
    return failed.value


def test_backend_killed_mid_stream_then_restarted(backend: ReferenceProcess, sock: Path) -> None:
    async def scenario() -> None:
        channel = Http2Channel(backend.address)
        try:
            await load(channel)
            stream = await channel.server_stream(STREAM, ENDLESS.SerializeToString())
            assert await stream.read_batch()
            old = channel._connection
            backend.proc.send_signal(signal.SIGKILL)
            assert (await read_until_failure(stream)).code == Code.UNAVAILABLE
            restarted = await asyncio.to_thread(ReferenceProcess.started, sock)
            try:
                await load(channel)
                assert (await predict(channel))[1] == SHORT.Tokens
                assert channel._connection is not old
            finally:
                restarted.stop()
        finally:
            await channel.close()

    run(scenario())
