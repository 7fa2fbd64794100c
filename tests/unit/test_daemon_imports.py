"""The daemon's process never imports grpcio (~9 MB of idle RSS): it talks to its backends
through modeld.rpc.http2. Only the backends (and their generated stubs) use grpcio."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import modeld

SERVICE = Path(modeld.__file__).resolve().parent.parent
BACKEND_SIDE = ("modeld.reference_backend", "modeld.llama_backend", "modeld.backend_kit")
"""Packages that run in backend processes, with ``modeld.rpc.backend_pb2_grpc``."""

CHECK = """
import importlib, pkgutil, sys
import modeld

backend_side = {backend_side!r}
imported = []
for info in pkgutil.walk_packages(modeld.__path__, "modeld."):
    name = info.name
    if name.startswith(backend_side) or name in ("modeld.__main__", "modeld.rpc.backend_pb2_grpc"):
        continue
    importlib.import_module(name)
    imported.append(name)
    if "grpc" in sys.modules:
        sys.exit(f"importing {{name}} imported grpc")
print("\\n".join(imported))
"""


def python(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(SERVICE)}
    return subprocess.run(
        [sys.executable, *args], env=env, capture_output=True, text=True, timeout=120, check=False
    )


def test_no_daemon_module_imports_grpc() -> None:
    done = python("-c", CHECK.format(backend_side=BACKEND_SIDE))
    assert done.returncode == 0, done.stderr
    imported = set(done.stdout.split())
    for name in (
        "modeld.daemon",
        "modeld.cli.main",
        "modeld.rpc.client",
        "modeld.rpc.http2",
        "modeld.rpc.http2_connection",
        "modeld.rpc.http2_stream",
        "modeld.rpc.http2_wire",
        "modeld.rpc.backend_pb2",
        "modeld.supervisor.owner",
        "modeld.http.app",
        "modeld.bus.service",
        "modeld.system.systemd",
    ):
        assert name in imported


def test_the_check_sees_a_module_that_imports_grpc() -> None:
    """Without the backend side left out, the same check fails: it can fail."""
    done = python("-c", CHECK.format(backend_side=()))
    assert done.returncode != 0
    assert "imported grpc" in done.stderr


def test_python_m_modeld_version() -> None:
    done = python("-m", "modeld", "--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"modeld {modeld.__version__}"
