"""modeld's own tasks never use asyncio.wait_for.

On Python 3.11 (Debian 12's), ``asyncio.wait_for`` loses a cancellation that arrives while
the awaited future is completing (CPython gh-86296, fixed in 3.12 by building it on
``asyncio.timeout``): the cancelled task goes on as if nothing happened. An owner that lost
the cancellation of ``detach`` while its backend's unload finished went back to waiting for
messages, and ``systemctl restart modeld`` hung until systemd killed it (seen in
tests/integration/test_dbus_fuzz.py under load). ``async with asyncio.timeout(...)`` keeps
the cancellation; this test keeps wait_for out of the daemon.
"""

import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "service" / "modeld"
CLIENT_SIDE = ("cli/", "rpc/backend_pb2_grpc.py")
"""Processes that are not the daemon (modeldctl) and generated code."""


def test_the_daemon_never_calls_asyncio_wait_for() -> None:
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE).as_posix()
        if relative.startswith(CLIENT_SIDE):
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"\basyncio\.wait_for\(", line):
                offenders.append(f"{relative}:{number}: {line.strip()}")
    assert offenders == [], "use `async with asyncio.timeout(...)` instead:\n" + "\n".join(
        offenders
    )
