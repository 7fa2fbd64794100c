"""Backends on a short leash, checked from inside a real backend (the reference backend's
``report_identity`` knob logs what its process was given) and from outside (the socket's
directory and mode, the scope's limits, another user trying to connect)."""

from __future__ import annotations

import json
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sandbox import Sandbox
from sandbox.deploy import Modeld, reference_model

pytestmark = pytest.mark.systemd

NOBODY = 65534
PYTHON = "/usr/bin/python3"
"""Debian's: nobody may not run this checkout's venv interpreter (it lives under /root)."""
BUDGET = 3 * 1024**3
REFERENCE_DIR = Path(__file__).resolve().parents[2] / "service/modeld/data/backends/reference"
ALLOWED_ENV = {
    "PATH",
    "HOME",
    "LANG",
    "LC_ALL",
    "TZ",
    "LD_LIBRARY_PATH",
    "MODELD_PYTHON",
    "MODELD_MODEL",
    "PYTHONUNBUFFERED",
    "PYTHONPATH",  # set by run.sh itself, to the package it sits in
    "PWD",  # set by run.sh's shell
}


@pytest.fixture(scope="module")
def modeld(sandbox: Sandbox, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Modeld]:
    deployment = Modeld(
        sandbox,
        tmp_path_factory.mktemp("modeld-leash"),
        python=PYTHON,
        daemon=f"memory_budget = {BUDGET}\n",
        models={
            "leashed": reference_model(options=("report_identity",), extra='user = "nobody"\n'),
            "unbounded": reference_model(memory_max="infinity"),
        },
    )
    with deployment.deployed():
        yield deployment


def identity(modeld: Modeld, name: str) -> dict[str, Any]:
    lines = modeld.sandbox.journal(identifier=name).splitlines()
    reports = [line.split("identity: ", 1)[1] for line in lines if "identity: " in line]
    assert reports, "the backend reported no identity"
    return dict(json.loads(reports[-1]))


def test_a_backend_gets_its_user_a_clean_environment_and_only_stdio(modeld: Modeld) -> None:
    modeld.load("leashed")
    seen = identity(modeld, "leashed")
    assert (seen["uid"], seen["euid"], seen["gid"]) == (NOBODY, NOBODY, NOBODY)
    assert set(seen["groups"]) <= {NOBODY}  # no supplementary group of modeld's
    assert seen["umask"] == 0o027
    assert seen["cwd"] == str(REFERENCE_DIR)
    fds = seen["inherited_fds"]
    assert list(fds) == ["0", "1", "2"], fds
    assert fds["0"] == "/dev/null" and fds["1"] == fds["2"]  # stdio to the journal
    environ = seen["environ"]
    assert set(environ) <= ALLOWED_ENV, set(environ) - ALLOWED_ENV
    assert environ["MODELD_PYTHON"] == PYTHON
    assert environ["MODELD_MODEL"] == "leashed"
    assert environ["PATH"].split(":")[0] == str(Path(PYTHON).parent)


def test_the_socket_is_private_to_modeld_and_its_backend(modeld: Modeld) -> None:
    modeld.load("leashed")
    backends = modeld.sandbox.run_dir / "modeld" / "backends"
    private = backends / "leashed"
    socket = private / "backend.sock"
    assert modeld.prop("leashed", "Endpoint") == "unix:/run/modeld/backends/leashed/backend.sock"
    assert stat.S_IMODE(backends.stat().st_mode) == 0o711
    info = private.stat()
    assert (stat.S_IMODE(info.st_mode), info.st_uid, info.st_gid) == (0o750, NOBODY, NOBODY)
    info = socket.stat()
    assert stat.S_ISSOCK(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o660
    assert info.st_uid == NOBODY

    probe = (
        "import socket, sys\n"
        "s = socket.socket(socket.AF_UNIX)\n"
        "try:\n    s.connect(sys.argv[1])\nexcept PermissionError:\n    sys.exit(13)\n"
    )
    as_daemon = ("setpriv", "--reuid=1", "--regid=1", "--clear-groups")
    proc = modeld.sandbox.exec(
        *as_daemon,
        "/usr/bin/python3",
        "-c",
        probe,
        "/run/modeld/backends/leashed/backend.sock",
        check=False,
    )
    assert proc.returncode == 13, proc.stderr  # another user cannot reach the backend

    modeld.unload("leashed")
    assert not private.exists()
    assert modeld.leftovers("leashed") == []


def test_every_scope_has_a_memory_and_a_task_limit(modeld: Modeld) -> None:
    modeld.load("leashed")
    modeld.load("unbounded")
    sb = modeld.sandbox
    leashed, unbounded = modeld.prop("leashed", "Unit"), modeld.prop("unbounded", "Unit")
    assert sb.show(leashed, "MemoryMax") == str(256 * 1024**2)
    assert sb.show(unbounded, "MemoryMax") == str(BUDGET)  # no memory_max: the budget
    assert sb.show(leashed, "TasksMax") == sb.show(unbounded, "TasksMax") == "4096"
    modeld.unload("leashed")
    modeld.unload("unbounded")
    assert modeld.scopes() == []
