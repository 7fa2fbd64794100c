"""The front door on a real supervisor for component tests: no systemd, real backends.

:class:`Front` runs a :class:`Supervisor` (on :class:`FakeSystemd`, with real reference
backend processes) and modeld's HTTP server on a unix socket, on an event loop of their
own in a thread, so a whole test module can share one (backends start once). Tests talk
to it over the socket like any client and read the supervisor's side through
:meth:`Front.call`; :class:`Watch` lets them wait for status changes (events, not sleeps).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
from aiohttp import web
from fakes import FakeSystemd

from modeld.config import load_config
from modeld.http.app import HttpServer, build_app
from modeld.supervisor.registry import Supervisor
from modeld.supervisor.status import ModelStatus, StatusChange
from modeld.system.activation import bind_unix_socket

T = TypeVar("T")
DEMO = Path(__file__).resolve().parents[2] / "service" / "modeld" / "data" / "demo.txt"
TIMEOUT = 60.0


def reference_model(*options: str, extra: str = "") -> str:
    """A model's TOML: the reference backend on the demo text, with test knobs."""
    text = f'backend = "reference"\nmodel = "{DEMO}"\n{extra}'
    if options:
        text += "[options]\nOptions = [" + ", ".join(json.dumps(o) for o in options) + "]\n"
    return text


class Watch:
    """Supervisor observer: the latest status of each model, and waits on its changes."""

    def __init__(self) -> None:
        self.status: dict[str, ModelStatus] = {}
        self.unloads: list[tuple[str, str]] = []
        self._waiters: list[tuple[Callable[[], bool], asyncio.Future[None]]] = []

    def on_status_changed(self, change: StatusChange) -> None:
        self.status[change.model] = change.after
        for predicate, done in list(self._waiters):
            if not done.done() and predicate():
                done.set_result(None)

    def on_loaded(self, model: str) -> None: ...

    def on_unloaded(self, model: str, reason: str) -> None:
        self.unloads.append((model, reason))

    async def until(self, predicate: Callable[[], bool]) -> None:
        """Return once ``predicate()`` holds, checked now and at each status change."""
        if predicate():
            return
        waiter = (predicate, asyncio.get_running_loop().create_future())
        self._waiters.append(waiter)
        try:
            await asyncio.wait_for(waiter[1], TIMEOUT)
        finally:
            self._waiters.remove(waiter)

    def in_flight(self, model: str) -> int:
        status = self.status.get(model)
        return status.in_flight if status else 0


@dataclass
class RecordingMetrics:
    """A RequestMetrics that keeps every call (read them through Front.call)."""

    finished: list[tuple[str, str, int, float]] = field(default_factory=list)
    first_tokens: list[tuple[str, str, float]] = field(default_factory=list)

    def request_finished(self, model: str, route: str, status: int, seconds: float) -> None:
        self.finished.append((model, route, status, seconds))

    def first_token(self, model: str, route: str, seconds: float) -> None:
        self.first_tokens.append((model, route, seconds))


class Front:
    """A supervisor and the HTTP front door on a unix socket, in a thread of their own.

    ``native_cancellation`` False serves without aiohttp's handler cancellation, with
    modeld's own disconnect watch (what runs on aiohttp 3.8).
    """

    def __init__(
        self,
        models: Mapping[str, str],
        daemon: str = "",
        *,
        native_cancellation: bool = True,
    ) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="mfd-", dir="/tmp"))
        self.socket = self.root / "api.sock"
        self.watch = Watch()
        self.metrics = RecordingMetrics()
        self.systemd = FakeSystemd()
        self._native = native_cancellation
        self._config_file = self._configure(models, daemon)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self.supervisor: Supervisor = self.call(self._start())

    def _configure(self, models: Mapping[str, str], daemon: str) -> Path:
        models_dir = self.root / "models.d"
        models_dir.mkdir()
        for name, text in models.items():
            (models_dir / f"{name}.toml").write_text(text)
        path = self.root / "modeld.toml"
        path.write_text(
            f'[daemon]\nmodels_dir = "{models_dir}"\nruntime_dir = "{self.root / "run"}"\n'
            f'backends_dirs = []\nmemory_budget = "infinity"\n{daemon}'
        )
        return path

    async def _start(self) -> Supervisor:
        config = load_config(self._config_file, host_memory=16 * 1024**3)
        supervisor = Supervisor(config, self.systemd, self.watch, watch_pressure=False)
        await supervisor.start()
        sockets = [bind_unix_socket(self.socket)]
        if self._native:
            self._server = HttpServer(supervisor, self.metrics)
            await self._server.start(sockets)
        else:
            app = build_app(supervisor, self.metrics, watch_disconnects=True)
            self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
            await self._runner.setup()
            await web.SockSite(self._runner, sockets[0]).start()
        return supervisor

    def call(self, work: Coroutine[Any, Any, T], timeout: float = TIMEOUT) -> T:
        """Run ``work`` on the front door's loop and return its result."""
        return asyncio.run_coroutine_threadsafe(work, self._loop).result(timeout)

    def sync(self, read: Callable[[], T]) -> T:
        """Evaluate ``read`` on the front door's loop (between two of its steps)."""

        async def run() -> T:
            return read()

        return self.call(run())

    def until(self, predicate: Callable[[], bool]) -> None:
        self.call(self.watch.until(predicate))

    async def until_async(self, predicate: Callable[[], bool]) -> None:
        """:meth:`until` for a test's own event loop (which keeps running meanwhile)."""
        future = asyncio.run_coroutine_threadsafe(self.watch.until(predicate), self._loop)
        await asyncio.wrap_future(future)

    def load(self, name: str) -> None:
        async def load() -> None:
            await (await self.supervisor.load(name))

        self.call(load())

    def unload(self, name: str) -> None:
        async def unload() -> None:
            await (await self.supervisor.unload(name, force=True))

        self.call(unload())

    def queue(self, name: str) -> tuple[int, int]:
        """(waiting, running) of ``name``'s request queue."""
        return self.sync(lambda: self.supervisor.queue_figures(name))

    def close(self) -> None:
        async def stop() -> None:
            if self._native:
                await self._server.stop()
            else:
                await self._runner.cleanup()
            await self.supervisor.shutdown()

        try:
            self.call(stop())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            left = dict(self.systemd.scopes)
            for pid in left.values():  # a failed stop must not leave backends behind
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            self._loop.close()
            shutil.rmtree(self.root, ignore_errors=True)
        assert left == {}, left


# --------------------------------------------------------------------------- clients


def session(front: Front) -> aiohttp.ClientSession:
    """An aiohttp client on the front door's socket (use inside ``asyncio.run``)."""
    return aiohttp.ClientSession(
        connector=aiohttp.UnixConnector(path=str(front.socket)),
        timeout=aiohttp.ClientTimeout(total=TIMEOUT),
    )


@dataclass
class Answer:
    status: int
    headers: Mapping[str, str]
    body: Any
    text: str


async def request(
    front: Front,
    method: str,
    path: str,
    body: Any = None,
    *,
    raw: bytes | None = None,
    headers: Mapping[str, str] | None = None,
) -> Answer:
    """One request; ``body`` is sent as JSON, ``raw`` as it is."""
    data: bytes | io.BytesIO | None = raw
    if raw is None and body is not None:
        data = json.dumps(body).encode()
    if raw is not None and len(raw) > 1024 * 1024:
        data = io.BytesIO(raw)  # aiohttp warns about large bytes bodies
    async with (
        session(front) as client,
        client.request(method, f"http://modeld{path}", data=data, headers=headers) as response,
    ):
        text = await response.text()
        try:
            decoded = json.loads(text)
        except ValueError:
            decoded = None
        return Answer(response.status, dict(response.headers), decoded, text)


def fetch(front: Front, method: str, path: str, body: Any = None, **kwargs: Any) -> Answer:
    return asyncio.run(request(front, method, path, body, **kwargs))


class RawStream:
    """A request on a bare unix-socket connection (HTTP/1.0: no chunk framing), its answer
    read line by line, the connection closed whenever the test likes."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.status = 0
        self.headers: dict[str, str] = {}

    @classmethod
    async def send(cls, front: Front, path: str, body: Any) -> RawStream:
        """Send the request; the answer is not read yet."""
        reader, writer = await asyncio.open_unix_connection(str(front.socket))
        payload = json.dumps(body).encode()
        head = f"POST {path} HTTP/1.0\r\nHost: modeld\r\nContent-Length: {len(payload)}\r\n\r\n"
        writer.write(head.encode() + payload)
        await writer.drain()
        return cls(reader, writer)

    @classmethod
    async def open(cls, front: Front, path: str, body: Any) -> RawStream:
        """Send the request and read the answer's status and headers."""
        stream = await cls.send(front, path, body)
        await stream.read_head()
        return stream

    async def read_head(self) -> None:
        status_line = await self.line()
        self.status = int(status_line.split()[1])
        while header := await self.line():
            name, _, value = header.partition(":")
            self.headers[name.strip().lower()] = value.strip()

    async def line(self) -> str:
        data = await asyncio.wait_for(self.reader.readline(), TIMEOUT)
        return data.decode().rstrip("\r\n")

    async def event_line(self) -> str:
        """The next SSE line (``data: ...`` or ``: comment``); "" at the end of the answer."""
        while True:
            line = await self.line()
            if line.startswith(("data:", ":")) or self.reader.at_eof():
                return line

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


async def gather_answers(*work: Awaitable[T]) -> list[T]:
    return list(await asyncio.gather(*work))
