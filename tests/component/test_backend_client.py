"""BackendClient's life-cycle calls (Health, LoadModel, Free) over its HTTP/2 channel,
against the real reference backend and against sockets that refuse, are missing, or never
answer: the waits, retries and error messages the owner relies on."""

from __future__ import annotations

import asyncio
import errno
import socket
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest
from reference_process import ROOT, ReferenceProcess

from modeld.errors import LoadFailed
from modeld.rpc import backend_pb2 as pb
from modeld.rpc import client as client_module
from modeld.rpc.client import BackendClient
from modeld.rpc.http2 import RpcFailed, StatusCode

DEMO = ROOT / "service" / "modeld" / "data" / "demo.txt"
PROMPT = pb.PredictOptions(Prompt="The sea", Tokens=4, TopP=1.0)


@pytest.fixture
def sock(tmp_path: Path) -> Path:
    path = tmp_path / "b.sock"
    assert len(str(path)) < 100, "unix socket path too long"
    return path


@pytest.fixture
def start_backend(sock: Path) -> Iterator[Callable[..., ReferenceProcess]]:
    started: list[ReferenceProcess] = []

    def start(*knobs: str) -> ReferenceProcess:
        backend = ReferenceProcess(sock, *knobs)
        started.append(backend)
        return backend

    yield start
    for backend in started:
        backend.stop()


def run(coroutine: Awaitable[None]) -> None:
    async def main() -> None:
        await asyncio.wait_for(coroutine, 60)

    asyncio.run(main())


def bound_not_listening(path: Path) -> socket.socket:
    """A socket file that refuses connections, as a backend's between bind() and listen()."""
    bound = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    bound.bind(str(path))
    return bound


class Attempts:
    """Wraps the client's channel: each Health attempt's time and failure errno."""

    def __init__(self, client: BackendClient) -> None:
        self.times: list[float] = []
        self.errnos: list[int | None] = []
        self.refused = asyncio.Event()
        self.missing = asyncio.Event()
        channel = client._channel
        unary = channel.unary

        async def counted(method: str, request: bytes) -> bytes:
            self.times.append(asyncio.get_running_loop().time())
            try:
                return await unary(method, request)
            except RpcFailed as err:
                self.errnos.append(err.errno)
                if err.errno == errno.ECONNREFUSED and self.errnos.count(err.errno) >= 3:
                    self.refused.set()
                if err.errno == errno.ENOENT:
                    self.missing.set()
                raise

        channel.unary = counted  # type: ignore[method-assign]


def test_health_waits_for_a_socket_that_refuses_then_is_missing_then_listens(
    sock: Path, start_backend: Callable[..., ReferenceProcess]
) -> None:
    async def main() -> None:
        bound = bound_not_listening(sock)
        client = BackendClient(f"unix:{sock}")
        attempts = Attempts(client)
        health = asyncio.ensure_future(client.health())
        await attempts.refused.wait()
        bound.close()
        sock.unlink()
        await attempts.missing.wait()
        assert not health.done()
        start_backend()
        await health
        assert set(attempts.errnos) == {errno.ECONNREFUSED, errno.ENOENT}
        gaps = [b - a for a, b in zip(attempts.times, attempts.times[1:], strict=False)]
        assert all(gap >= 0.0009 for gap in gaps), gaps  # no busy loop
        await client.load_model(pb.ModelOptions(Model="demo.txt", ModelFile=str(DEMO)))
        assert (await client.predict(PROMPT)).message
        await client.free(5.0)
        with pytest.raises(RpcFailed) as freed:
            await client.predict(PROMPT)
        assert freed.value.code is StatusCode.FAILED_PRECONDITION
        await client.close()

    run(main())


def test_the_retry_delay_grows_to_its_cap(sock: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(client_module, "CONNECT_RETRY_MAX", 0.004)

    async def main() -> None:
        with bound_not_listening(sock):
            client = BackendClient(f"unix:{sock}")
            attempts = Attempts(client)
            with pytest.raises(LoadFailed) as failed:
                await client.health(timeout=0.3)
            await client.close()
        message = str(failed.value)
        assert message.startswith("Health failed: no answer within 0.3s (cannot connect to")
        assert "Connection refused" in message
        # 1, 2, 4 ms then 4 ms each: ~75 in 0.3 s; uncapped doubling would make 9
        assert len(attempts.times) > 20, attempts.times

    run(main())


def test_health_fails_at_once_on_other_connect_errors(tmp_path: Path) -> None:
    async def main() -> None:
        client = BackendClient(f"unix:{tmp_path}/not-a-dir/b.sock")
        attempts = Attempts(client)
        with pytest.raises(LoadFailed, match=r"Health failed: cannot connect .*Not a directory"):
            await client.health()
        assert attempts.errnos == [errno.ENOTDIR]
        await client.close()

    (tmp_path / "not-a-dir").write_text("")
    run(main())


def test_health_reports_the_backends_own_words(
    sock: Path, start_backend: Callable[..., ReferenceProcess]
) -> None:
    backend = start_backend("health=error")
    assert backend.listening.wait(30), backend.log

    async def main() -> None:
        client = BackendClient(backend.address)
        with pytest.raises(LoadFailed) as failed:
            await client.health(timeout=10)
        assert str(failed.value) == "Health failed: unhealthy as asked (health=error)"
        await client.close()

    run(main())


def test_a_silent_peer_times_health_out_and_free_gives_up(sock: Path) -> None:
    async def main() -> None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
            listener.bind(str(sock))
            listener.listen()
            client = BackendClient(f"unix:{sock}")
            with pytest.raises(LoadFailed, match=r"^Health failed: no answer within 0.1s$"):
                await client.health(timeout=0.1)
            await client.free(0.1)
            await client.close()

    run(main())


def test_load_model_refusal_and_failure_messages(
    sock: Path, start_backend: Callable[..., ReferenceProcess]
) -> None:
    backend = start_backend()
    assert backend.listening.wait(30), backend.log

    async def main() -> None:
        client = BackendClient(backend.address)
        await client.health(timeout=10)
        refused = pb.ModelOptions(ModelFile=str(DEMO), Options=["fail_load=corrupt weights"])
        with pytest.raises(LoadFailed) as failed:
            await client.load_model(refused)
        assert str(failed.value) == "backend refused LoadModel: corrupt weights"
        crashing = pb.ModelOptions(ModelFile=str(DEMO), Options=["crash_on_load=9"])
        with pytest.raises(LoadFailed, match=r"^LoadModel failed: the connection to the backend"):
            await client.load_model(crashing)
        await client.free(1.0)  # the backend is gone: best effort, no error
        await client.close()

    run(main())
