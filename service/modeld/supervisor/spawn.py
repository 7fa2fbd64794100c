"""Starting a backend process behind a gate, so it runs only once it is in its scope.

The child is a tiny shell that blocks reading its stdin (a pipe) until modeld writes
``go``; modeld moves it into its transient scope first. If modeld fails before that, the
pipe closes, the gate exits 111 and the backend never runs outside its cgroup.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

GATE_EXIT_STATUS = 111
_GATE_SCRIPT = 'IFS= read -r token && [ "$token" = go ] || exit 111; exec "$@" </dev/null'
_GATE_KEEP_STDIN = 'IFS= read -r token && [ "$token" = go ] || exit 111; exec "$@"'
"""For a process whose stdin is a pipe it reads after the token (a log relay): the
shell's ``read`` takes the token line byte by byte and leaves the rest in the pipe."""


@dataclass(frozen=True, slots=True)
class ExitStatus:
    """How a process ended: ``code`` for exit(), ``signal`` when killed."""

    code: int | None
    signal: int | None

    @classmethod
    def from_wait_status(cls, status: int) -> ExitStatus:
        if os.WIFSIGNALED(status):
            return cls(code=None, signal=os.WTERMSIG(status))
        return cls(code=os.waitstatus_to_exitcode(status), signal=None)

    def describe(self) -> str:
        if self.signal is not None:
            try:
                name = signal.Signals(self.signal).name
            except ValueError:
                name = str(self.signal)
            return f"killed by {name}"
        if self.code is None:
            return "exited (status unknown: it was started by an earlier modeld)"
        return f"exited with status {self.code}"


UNKNOWN_EXIT = ExitStatus(code=None, signal=None)


@dataclass(frozen=True, slots=True)
class Credentials:
    uid: int
    gid: int


class WatchedProcess:
    """A backend process watched through a pidfd: no PID-reuse race, no polling.

    Exit is reported once through ``on_exit``.
    """

    def __init__(self, pid: int, on_exit: Callable[[ExitStatus], None]) -> None:
        self.pid = pid
        self.exit_status: ExitStatus | None = None
        self._on_exit = on_exit
        self._pidfd = os.pidfd_open(pid)
        asyncio.get_running_loop().add_reader(self._pidfd, self._on_pidfd)

    def _on_pidfd(self) -> None:
        status = self._collect()
        if status is None:
            return
        self._stop_watching()
        self.exit_status = status
        self._on_exit(status)

    def _collect(self) -> ExitStatus | None:
        """The exit status once the process has ended (None: not yet)."""
        return UNKNOWN_EXIT

    def _stop_watching(self) -> None:
        if self._pidfd >= 0:
            asyncio.get_running_loop().remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = -1

    def kill(self) -> None:
        """SIGKILL the process if it has not ended yet."""
        if self._pidfd >= 0:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)

    def close(self) -> None:
        """Stop caring about the process: kill it if it still runs (its end is still reported)."""
        if self.exit_status is None and self._pidfd >= 0:
            self.kill()

    def release(self) -> None:
        """Stop watching and leave the process running (modeld restarts; it re-adopts it)."""
        self._stop_watching()


class AdoptedProcess(WatchedProcess):
    """A backend started by an earlier modeld: not our child, so its exit status is lost."""


class GatedProcess(WatchedProcess):
    """A spawned backend that waits at its gate until :meth:`open_gate`."""

    def __init__(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str],
        cwd: str,
        output_fd: int,
        credentials: Credentials | None,
        on_exit: Callable[[ExitStatus], None],
        gate_pipe: tuple[int, int] | None = None,
        umask: int = -1,
    ) -> None:
        """``gate_pipe`` (read end, write end; both taken over): the token comes through
        this pipe and its read end stays the process's stdin (default: a pipe of its
        own, and stdin is /dev/null after the gate). ``umask``: the process's (-1:
        modeld's own)."""
        gate_read, self._gate_write = gate_pipe or os.pipe2(os.O_CLOEXEC)
        script = _GATE_SCRIPT if gate_pipe is None else _GATE_KEEP_STDIN
        try:
            self._popen = subprocess.Popen(
                ["/bin/sh", "-c", script, "modeld-gate", *argv],
                stdin=gate_read,
                stdout=output_fd,
                stderr=output_fd,
                env=dict(env),
                cwd=cwd,
                start_new_session=True,
                close_fds=True,
                user=credentials.uid if credentials else None,
                group=credentials.gid if credentials else None,
                extra_groups=[] if credentials else None,
                umask=umask,
            )
        except BaseException:
            os.close(self._gate_write)
            raise
        finally:
            os.close(gate_read)
        super().__init__(self._popen.pid, on_exit)

    def open_gate(self) -> None:
        """Let the backend exec; call only once it is inside its scope."""
        os.write(self._gate_write, b"go\n")
        self._close_gate()

    def close_gate(self) -> None:
        """Close the gate without opening it: the process exits 111 if still waiting."""
        self._close_gate()

    def _close_gate(self) -> None:
        if self._gate_write >= 0:
            os.close(self._gate_write)
            self._gate_write = -1

    def _collect(self) -> ExitStatus | None:
        try:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            return UNKNOWN_EXIT
        if pid == 0:
            return None
        self._popen.returncode = os.waitstatus_to_exitcode(status)
        return ExitStatus.from_wait_status(status)

    def _stop_watching(self) -> None:
        super()._stop_watching()
        self._close_gate()

    def close(self) -> None:
        self._close_gate()
        super().close()
