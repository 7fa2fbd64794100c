"""Backend output to the journal, and reading its tail back for error messages.

Backends write straight into a journald stream (like ``systemd-cat``), never into a pipe
read by modeld, so a restart of modeld cannot kill them with SIGPIPE.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
from pathlib import Path

JOURNAL_STDOUT = Path("/run/systemd/journal/stdout")
TAIL_LINES = 12
_TAIL_TIMEOUT = 3.0
_CONNECT_TIMEOUT = 1.0


def open_journal_stream(identifier: str) -> int | None:
    """Return a writable fd whose lines land in the journal tagged ``identifier``.

    None when journald is not reachable; the caller falls back to a log file.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(_CONNECT_TIMEOUT)
    try:
        sock.connect(str(JOURNAL_STDOUT))
        sock.shutdown(socket.SHUT_RD)
        header = f"{identifier}\n\n6\n0\n0\n0\n0\n"
        sock.sendall(header.encode())
    except OSError:
        sock.close()
        return None
    sock.settimeout(None)
    return sock.detach()


def open_log_file(path: Path) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640)


async def journal_tail(identifier: str, since_us: int) -> list[str]:
    """The last ``TAIL_LINES`` journal messages of ``identifier`` written since ``since_us``."""
    try:
        proc = await asyncio.create_subprocess_exec(
            "journalctl",
            "--no-pager",
            "-o",
            "json",
            "-n",
            str(TAIL_LINES * 4),
            f"SYSLOG_IDENTIFIER={identifier}",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )
    except OSError:
        return []
    try:
        async with asyncio.timeout(_TAIL_TIMEOUT):
            out, _ = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return []
    found: list[str] = []
    for raw in out.decode(errors="replace").splitlines():
        try:
            entry = json.loads(raw)
        except json.JSONDecodeError:
            continue
        if int(entry.get("__REALTIME_TIMESTAMP", 0)) < since_us:
            continue
        message = entry.get("MESSAGE")
        if isinstance(message, list):
            message = bytes(message).decode(errors="replace")
        if isinstance(message, str) and message.strip():
            found.append(message.rstrip())
    return found[-TAIL_LINES:]


def file_tail(path: Path) -> list[str]:
    try:
        with path.open("rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - 8192))
            data = handle.read()
    except OSError:
        return []
    found = [line for line in data.decode(errors="replace").splitlines() if line.strip()]
    return found[-TAIL_LINES:]
