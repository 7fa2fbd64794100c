"""journald's native protocol, the backends' log relay and modeld's journal log handler,
against a fake journald (a datagram socket in a temporary directory): no journald needed,
no sleeps (every wait is a receive with a timeout)."""

from __future__ import annotations

import array
import asyncio
import contextlib
import logging
import os
import signal
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from modeld.supervisor.spawn import GatedProcess
from modeld.system import journal_logging, journald
from modeld.system.journal_logging import JournalHandler, attributed_to


def decode(payload: bytes) -> dict[str, bytes]:
    """Parse one native-protocol entry (both the KEY=value and the binary form)."""
    fields: dict[str, bytes] = {}
    rest = payload
    while rest:
        line, _, after = rest.partition(b"\n")
        if b"=" in line:
            key, _, value = line.partition(b"=")
            fields[key.decode()] = value
            rest = after
        else:
            (size,) = struct.unpack("<Q", after[:8])
            fields[line.decode()] = after[8 : 8 + size]
            assert after[8 + size : 9 + size] == b"\n"
            rest = after[9 + size :]
    return fields


class FakeJournald:
    """A bound datagram socket standing in for /run/systemd/journal/socket."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(10)

    def receive(self) -> dict[str, bytes]:
        """The next entry (from a datagram or a memfd passed with an empty one)."""
        fds = array.array("i")
        data, ancdata, _, _ = self.sock.recvmsg(1 << 20, socket.CMSG_SPACE(fds.itemsize))
        for level, kind, raw in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(raw[: len(raw) - len(raw) % fds.itemsize])
        if fds:
            (fd,) = fds
            with os.fdopen(fd, "rb") as memfd:  # journald maps it from the start
                assert not data
                memfd.seek(0)
                return decode(memfd.read())
        return decode(data)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def journald_socket(tmp_path: Path) -> Iterator[FakeJournald]:
    fake = FakeJournald(tmp_path / "journal.sock")
    yield fake
    fake.close()


def test_values_with_newlines_use_the_binary_form() -> None:
    payload = journald.encode({"MESSAGE": "two\nlines", "MODELD_MODEL": "a b", "X": b"\x00"})
    assert payload.startswith(b"MESSAGE\n" + struct.pack("<Q", 9) + b"two\nlines\n")
    assert decode(payload) == {"MESSAGE": b"two\nlines", "MODELD_MODEL": b"a b", "X": b"\x00"}


def test_an_entry_too_big_for_a_datagram_goes_in_a_sealed_memfd(
    journald_socket: FakeJournald,
) -> None:
    journal = journald.Journal(journald_socket.path)
    big = "x" * (4 << 20)
    journal.send({"MESSAGE": big, "MODELD_MODEL": "m"})
    assert journald_socket.receive() == {"MESSAGE": big.encode(), "MODELD_MODEL": b"m"}
    journal.close()


def test_without_journald_sending_fails_and_available_says_so(tmp_path: Path) -> None:
    assert not journald.available(str(tmp_path / "none.sock"))
    with pytest.raises(OSError):
        journald.Journal(str(tmp_path / "none.sock")).send({"MESSAGE": "x"})


def test_the_relay_tags_every_line_and_drains_past_sigterm_until_its_input_closes(
    journald_socket: FakeJournald,
) -> None:
    read, write = os.pipe()
    argv = ["my model", "u.scope", journald_socket.path]
    relay = subprocess.Popen(
        [sys.executable, "-I", "-S", journald.__file__, *argv],
        stdin=read,
        env={},
    )
    os.close(read)
    os.write(write, b"first line\n")
    entry = journald_socket.receive()
    assert entry == {
        "MESSAGE": b"first line",
        "PRIORITY": b"6",
        "SYSLOG_IDENTIFIER": b"my model",
        "MODELD_MODEL": b"my model",
        "MODELD_UNIT": b"u.scope",
    }
    relay.send_signal(signal.SIGTERM)  # as stopping the scope does: ignored
    os.write(write, b"last words\x00\xff\nno newline at the end")
    os.close(write)
    assert journald_socket.receive()["MESSAGE"] == b"last words\x00\xff"
    assert journald_socket.receive()["MESSAGE"] == b"no newline at the end"
    assert relay.wait(10) == 0


def test_a_gate_pipe_carries_the_token_then_stays_the_process_input(tmp_path: Path) -> None:
    async def scenario() -> bytes:
        read, write = os.pipe2(os.O_CLOEXEC)
        out_read, out_write = os.pipe()
        exited = asyncio.Event()
        process = GatedProcess(
            ["cat"],
            env={"PATH": os.defpath},
            cwd=str(tmp_path),
            output_fd=out_write,
            credentials=None,
            on_exit=lambda _status: exited.set(),
            gate_pipe=(read, os.dup(write)),
        )
        os.close(out_write)
        process.open_gate()
        os.write(write, b"what the backend writes\n")
        os.close(write)
        await asyncio.wait_for(exited.wait(), 10)
        with os.fdopen(out_read, "rb") as out:
            return out.read()

    assert asyncio.run(scenario()) == b"what the backend writes\n"


@pytest.fixture
def handler(journald_socket: FakeJournald) -> Iterator[tuple[logging.Logger, JournalHandler]]:
    fallback = logging.StreamHandler(sys.stderr)
    h = JournalHandler(fallback, journal=journald.Journal(journald_socket.path))
    h.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("modeld.test-journal")
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    logger.addHandler(h)
    units = {"a": "modeld-backend-a-3.scope"}
    journal_logging.set_unit_lookup(lambda name: units.get(name, ""))
    yield logger, h
    logger.removeHandler(h)
    h.close()
    journal_logging.set_unit_lookup(lambda _name: "")


def test_records_carry_the_model_from_extra_or_from_the_owner_context(
    handler: tuple[logging.Logger, JournalHandler], journald_socket: FakeJournald
) -> None:
    logger, _ = handler
    logger.warning("about %s", "b", extra={"model": "b"})
    entry = journald_socket.receive()
    assert entry["MESSAGE"] == b"about b"
    assert entry["PRIORITY"] == b"4"
    assert entry["SYSLOG_IDENTIFIER"] == b"modeld"
    assert entry["MODELD_MODEL"] == b"b"
    assert "MODELD_UNIT" not in entry  # b has no scope
    assert entry["CODE_FUNC"].startswith(b"test_records_carry_the_model_from_extra")

    async def owner_task() -> None:
        logger.info("from the owner")
        await asyncio.create_task(child())  # a task the owner starts keeps the model

    async def child() -> None:
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            logger.exception("with a traceback")

    async def scenario() -> None:
        task = attributed_to("a", lambda: asyncio.create_task(owner_task()))
        await task
        logger.info("not about a model")

    asyncio.run(scenario())
    first, second, third = (journald_socket.receive() for _ in range(3))
    assert (first["MODELD_MODEL"], first["MODELD_UNIT"]) == (b"a", b"modeld-backend-a-3.scope")
    assert second["MODELD_MODEL"] == b"a"
    assert second["PRIORITY"] == b"3"
    assert second["MESSAGE"].startswith(b"with a traceback\nTraceback")
    assert b"RuntimeError: boom" in second["MESSAGE"]
    assert "MODELD_MODEL" not in third


def test_records_journald_refuses_go_to_the_fallback(tmp_path: Path) -> None:
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    h = JournalHandler(Keep(), journal=journald.Journal(str(tmp_path / "gone.sock")))
    h.handle(logging.makeLogRecord({"msg": "still logged", "levelno": logging.INFO}))
    assert [r.getMessage() for r in records] == ["still logged"]


def test_a_full_journald_queue_never_blocks_the_handler(journald_socket: FakeJournald) -> None:
    """journald not reading (its queue full): records go to the fallback, none is lost."""
    fell_back: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            fell_back.append(record)

    journal = journald.Journal(journald_socket.path, blocking=False)
    h = JournalHandler(Keep(), journal=journal)
    total = 3000
    for n in range(total):
        h.handle(logging.makeLogRecord({"msg": f"line {n}", "levelno": logging.INFO}))
    assert fell_back
    journald_socket.sock.setblocking(False)
    received = 0
    with contextlib.suppress(BlockingIOError):
        while journald_socket.sock.recv(65536):
            received += 1
    assert received + len(fell_back) == total
    h.close()
