"""A reference backend process on a unix socket, for tests of modeld's backend client."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT = 30.0


class ReferenceProcess:
    """``python -m modeld.reference_backend`` on ``sock`` with ``knobs``; its stderr is
    collected in :attr:`log`, and :attr:`listening` is set once it says it listens."""

    def __init__(self, sock: Path, *knobs: str) -> None:
        self.address = f"unix:{sock}"
        env = {**os.environ, "PYTHONPATH": str(ROOT / "service")}
        args = [f"--knob={knob}" for knob in knobs]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "modeld.reference_backend", "--addr", self.address, *args],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.log: list[str] = []
        self.listening = threading.Event()
        self._settled = threading.Event()
        """Set once it listens or its stderr ended (it exited)."""
        self._drain = threading.Thread(target=self._read_log, daemon=True)
        self._drain.start()

    @classmethod
    def started(cls, sock: Path, *knobs: str) -> ReferenceProcess:
        """A process that already listens (the test fails with its log if it exits)."""
        process = cls(sock, *knobs)
        process._settled.wait(START_TIMEOUT)
        if not process.listening.is_set():
            process.stop()
            pytest.fail(f"reference backend did not listen: {''.join(process.log)}")
        return process

    def _read_log(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.log.append(line)
            if "listening on" in line:
                self.listening.set()
                self._settled.set()
        self._settled.set()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self._drain.join(10)
        assert self.proc.stderr is not None
        self.proc.stderr.close()
