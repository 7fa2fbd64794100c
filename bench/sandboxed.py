"""How every benchmark runs: modeld deployed in a booted sandbox, and the benchmark's own
script run again inside it as the driver, which prints its result as JSON on its last line."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def bench_sandbox() -> Iterator[tuple[Any, Path]]:
    """A booted sandbox with modeld's D-Bus policy, and a temporary directory for the run."""
    from sandbox import booted_sandbox

    with (
        tempfile.TemporaryDirectory(prefix="modeld-bench-") as tmp,
        booted_sandbox(dbus_policy_files=[REPO / "systemd" / "org.modeld1.conf"]) as sandbox,
    ):
        yield sandbox, Path(tmp)


def run_driver(sandbox: Any, script: str, *args: str, timeout: float) -> Any:
    """Run ``script`` with ``args`` inside ``sandbox`` on this interpreter; its JSON result."""
    proc = sandbox.exec(
        sys.executable,
        str(Path(script).resolve()),
        *args,
        env={"PYTHONPATH": str(REPO / "service"), "PATH": os.environ.get("PATH", "")},
        timeout=timeout,
    )
    return json.loads(proc.stdout.splitlines()[-1])
