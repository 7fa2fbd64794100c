"""Readiness of a backend's socket: it counts once it listens, not when its file appears."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

from modeld.supervisor.backend_run import until_listening


def test_a_backend_socket_counts_once_it_listens_not_when_it_appears(tmp_path: Path) -> None:
    """bind() makes the file (inotify fires), listen() comes after: a gRPC connection in
    between is refused and then backs off for 100 ms."""

    async def scenario() -> None:
        path = tmp_path / "backend.sock"
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(str(path))
        waiting = asyncio.create_task(until_listening(path))
        await asyncio.sleep(0)  # its first try was refused: it waits
        assert not waiting.done()
        server.listen()
        await asyncio.wait_for(waiting, 10)
        server.close()

    asyncio.run(scenario())
