"""A backend's output goes through its log relay, tagged with its model and scope, when
journald takes native entries (here a fake journald socket); the relay joins the scope with
the backend and is gone when the backend is (real backends, fake systemd, no sleeps)."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_owner_use import host, run

from modeld.system import journald


def entries(sock: socket.socket) -> list[dict[str, bytes]]:
    """Every entry received so far (the relay is gone, nothing more can come)."""
    found = []
    sock.setblocking(False)
    while True:
        try:
            data = sock.recv(1 << 20)
        except BlockingIOError:
            return found
        fields = {}
        for line in data.splitlines():
            key, _, value = line.partition(b"=")
            fields[key.decode()] = value
        found.append(fields)


@pytest.fixture
def sock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A fake journald: the datagram socket backends' relays send their entries to."""
    path = tmp_path / "journal.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as journal:
        journal.bind(str(path))
        monkeypatch.setattr(journald, "JOURNAL_SOCKET", str(path))
        yield journal


def test_backend_output_reaches_the_journal_tagged_with_its_model_and_scope(
    tmp_path: Path, sock: socket.socket
) -> None:

    async def scenario() -> None:
        async with host(tmp_path) as h:
            a = await h.loaded("a")
            (unit,) = h.systemd.specs
            assert unit == a.status.unit
            (relay_pid,) = h.systemd.specs[unit].extra_pids
            assert relay_pid != a.status.main_pid
            await (await a.request_unload("requested"))
            with pytest.raises(ProcessLookupError):  # reaped, not left as a zombie
                os.kill(relay_pid, 0)

    run(scenario)
    lines = entries(sock)
    messages = [e["MESSAGE"].decode() for e in lines]
    assert any("listening on unix:" in m for m in messages), messages
    assert any("SIGTERM received, exiting" in m for m in messages), messages  # the last words
    assert all(e["MODELD_MODEL"] == b"a" for e in lines)
    assert all(e["MODELD_UNIT"] == b"modeld-backend-a-1.scope" for e in lines)
    assert all(e["SYSLOG_IDENTIFIER"] == b"a" for e in lines)


def test_a_log_relay_that_dies_is_reported(tmp_path: Path, sock: socket.socket) -> None:
    warnings: list[str] = []
    seen = asyncio.Event()

    class Catch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            warnings.append(record.getMessage())
            seen.set()

    catch = Catch(logging.WARNING)
    logging.getLogger("modeld.supervisor.backend_run").addHandler(catch)

    async def scenario() -> None:
        async with host(tmp_path) as h:
            a = await h.loaded("a")
            (spec,) = h.systemd.specs.values()
            os.kill(spec.extra_pids[0], signal.SIGKILL)
            await asyncio.wait_for(seen.wait(), 10)
            await (await a.request_unload("requested"))

    try:
        run(scenario)
    finally:
        logging.getLogger("modeld.supervisor.backend_run").removeHandler(catch)
    assert warnings == ["model a: the log relay of its backend killed by SIGKILL"]


def test_without_backend_log_fields_there_is_no_relay(tmp_path: Path, sock: socket.socket) -> None:

    async def scenario() -> None:
        async with host(tmp_path) as h:
            h.context = dataclasses.replace(h.context, log_relay=False)
            a = await h.loaded("a")
            (spec,) = h.systemd.specs.values()
            assert spec.extra_pids == ()
            await (await a.request_unload("requested"))

    run(scenario)
