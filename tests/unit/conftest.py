"""Fixtures shared by the unit tests."""

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

DBUS_DAEMON = shutil.which("dbus-daemon")


@pytest.fixture
def bus_address(tmp_path: Path) -> Iterator[str]:
    """A private session dbus-daemon, gone after the test."""
    if DBUS_DAEMON is None:
        pytest.skip("dbus-daemon is not installed")
    proc = subprocess.Popen(
        [
            DBUS_DAEMON,
            "--session",
            "--nofork",
            "--print-address",
            f"--address=unix:path={tmp_path}/bus",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        address = proc.stdout.readline().strip()
        assert address.startswith("unix:"), address
        yield address
    finally:
        proc.terminate()
        proc.wait(5)
        if proc.stdout is not None:
            proc.stdout.close()
