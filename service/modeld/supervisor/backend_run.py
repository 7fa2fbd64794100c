"""One run (generation) of a model's backend: starting it and stopping all of it.

Starting: spawn behind the gate, create the scope with the child's pid, open the gate, watch
the cgroup for OOM kills, then wait for the socket (inotify), Health and LoadModel, failing
only after a whole stall timeout without progress. Stopping: stop the scope (SIGTERM, then
SIGKILL after the stop timeout), wait for the process, drop systemd's reference, remove the
socket. Only the model's owner uses a run; the run never touches the model's state, it
reports through the callbacks it is given.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modeld.config import ModelConfig
from modeld.discovery import Backend
from modeld.errors import LoadFailed, SystemdError
from modeld.naming import BACKEND_SOCKET_NAME, SLICE
from modeld.rpc.client import BackendClient, build_model_options
from modeld.supervisor.environment import backend_environment, credentials_for
from modeld.supervisor.footprints import FootprintStore
from modeld.supervisor.records import RecordStore
from modeld.supervisor.spawn import Credentials, ExitStatus, GatedProcess, WatchedProcess
from modeld.supervisor.systemd_api import SystemdApi
from modeld.system import journal, journald
from modeld.system.acl import EXECUTE, READ, WRITE, grant_users
from modeld.system.backend_dir import (
    BACKEND_UMASK,
    prepare_backend_dir,
    remove_backend_dir,
    secure_socket,
)
from modeld.system.cgroup import (
    CgroupLayout,
    OomWatch,
    cpu_ticks,
    pids_in_cgroup,
    process_cgroup,
)
from modeld.system.inotify import DirectoryWatch
from modeld.system.systemd import ScopeSpec
from modeld.units import UINT64_MAX

log = logging.getLogger(__name__)

RELAY_DRAIN_TIMEOUT = 2.0
"""How long a stopped backend's log relay may take to send its last lines."""


async def until_listening(path: Path) -> None:
    """Return once the unix socket at ``path`` accepts connections.

    inotify shows the socket file at bind(), a moment before listen(); a connection in
    between is refused. The moment is short (the backend is between two system calls),
    but modeld, woken by the same bind(), often runs right then. No event marks listen(),
    so this tries again, yielding to the loop, a few times a millisecond (finer than the
    connect retry of the client's Health, which starts at 1 ms). Any other error is left
    for Health to report.
    """
    delay = 0.0002
    while True:
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        try:
            probe.connect(str(path))
            return
        except ConnectionRefusedError:
            pass
        except OSError:  # EAGAIN (its backlog is full: it listens), or gone: Health says
            return
        finally:
            probe.close()
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.01)


@dataclass(frozen=True)
class OwnerContext:
    """Everything an owner and its backend runs need from the rest of modeld."""

    systemd: SystemdApi
    cgroups: CgroupLayout
    runtime_dir: Path
    stall_timeout: float
    """0 turns stall detection off."""
    stop_timeout: float
    resolve_backend: Callable[[str], Backend | None]
    default_user: str | None
    records: RecordStore
    """Where ready backends are recorded for re-adoption after a restart."""
    log_relay: bool = True
    """Backends' output goes through a log relay that adds MODELD_MODEL (daemon key
    ``backend_log_fields``)."""
    memory_ceiling: int = UINT64_MAX
    """MemoryMax of a scope whose model sets no ``memory_max`` (the memory budget)."""
    restart: Callable[[str], None] = lambda _name: None
    """Asks the supervisor to load a model again (``restart = "on-failure"``)."""
    footprints: FootprintStore = field(default_factory=FootprintStore)
    """The learned peak memory of each model (in memory only unless given a directory)."""


@dataclass
class BackendRun:
    """The running parts of one generation of a model's backend."""

    model: str
    generation: int
    unit: str
    socket: Path
    started_us: int
    process: WatchedProcess | None = None
    client: BackendClient | None = None
    oom: OomWatch | None = None
    control_group: str = ""
    scope_requested: bool = False
    """StartTransientUnit was (about to be) sent: systemd may hold the scope, and our
    reference on it (AddRef), even if the start was cancelled or failed."""
    scope_started: bool = False
    stopping: bool = False
    phases: list[tuple[str, float]] = field(
        default_factory=lambda: [("starting", time.monotonic())]
    )
    crash_status: ExitStatus | None = None
    """How the process ended when it ended on its own (not stopped by modeld)."""
    exited: asyncio.Event = field(default_factory=asyncio.Event)
    relay: GatedProcess | None = None
    """The log relay that sends the backend's output to the journal (in its scope)."""
    relay_exited: asyncio.Event = field(default_factory=asyncio.Event)
    socket_ready: bool = False
    """The socket exists and is secured: admissions apply to it at once."""
    admitted: frozenset[int] | None = None
    """Users (lease holders) who may connect to the socket besides root and the backend
    (None until the owner first says: what an earlier modeld granted is then undone)."""
    footprint_key: str = ""
    """The configuration it was started with (:func:`footprints.footprint_key`; "": unknown)."""
    memory_seen: int = 0
    """The highest memory.current read from its cgroup (the peak when the kernel keeps none)."""
    memory_peak: int = 0
    """The peak memory of its scope, read by :meth:`stop` before the scope goes (0: unknown)."""
    gpu_memory_seen: int = 0
    """The most GPU memory NVML attributed to it."""
    memory_sampled_at: float = -math.inf
    """When :meth:`sample_memory` last read the cgroup (monotonic seconds)."""

    @property
    def address(self) -> str:
        return f"unix:{self.socket}"

    @property
    def log_file(self) -> Path:
        """Where the backend's output goes when journald is not reachable (beside its
        private directory, which goes with the backend)."""
        return self.socket.parent.with_suffix(".log")

    @property
    def phase(self) -> str:
        """What the load is doing now, in words ("waiting for Health")."""
        return self.phases[-1][0]

    @phase.setter
    def phase(self, phase: str) -> None:
        self.phases.append((phase, time.monotonic()))

    def timings(self) -> str:
        """How long each load phase took, for the log line of a finished load."""
        ends = [t for _, t in self.phases[1:]] + [time.monotonic()]
        total = (ends[-1] - self.phases[0][1]) * 1000
        spans = zip(self.phases, ends, strict=True)
        steps = ", ".join(f"{phase} {(end - start) * 1000:.1f}" for (phase, start), end in spans)
        return f"{total:.0f} ms ({steps})"

    def process_exited(self, status: ExitStatus) -> None:
        """Record the end of the process (called from its pidfd watcher)."""
        if self.oom is not None:
            self.oom.process_exited = True
        if not self.stopping:
            self.crash_status = status
        self.exited.set()

    # ------------------------------------------------------------------------ start

    async def launch(
        self,
        config: ModelConfig,
        context: OwnerContext,
        *,
        gpu: str,
        on_exit: Callable[[ExitStatus], None],
        on_in_scope: Callable[[int, str], None],
    ) -> None:
        """Start the backend and load the model; raises LoadFailed (or SystemdError).

        ``on_in_scope`` gets the process's pid and the scope's cgroup once it is in its scope.
        """
        definition = context.resolve_backend(config.backend)
        if definition is None:
            raise LoadFailed(f"backend '{config.backend}' of model {self.model} is not installed")
        options = build_model_options(config.model, config.options)
        credentials = credentials_for(config.user or context.default_user)
        prepare_backend_dir(
            self.socket.parent, (credentials.uid, credentials.gid) if credentials else None
        )
        self.phase = "spawning"
        output_fd = self._open_output(credentials, relay=context.log_relay)
        try:
            process = GatedProcess(
                [str(definition.run), "--addr", self.address],
                env=backend_environment(self.model, gpu=gpu),
                cwd=str(definition.directory),
                output_fd=output_fd,
                credentials=credentials,
                on_exit=on_exit,
                umask=BACKEND_UMASK,
            )
        except BaseException:
            if self.relay is not None:
                self.stopping = True
                self.relay.close()
            raise
        finally:
            os.close(output_fd)
        self.process = process
        self.phase = "creating its scope"
        await self._start_scope(config, context)
        self.phase = "opening the gate"
        if self.relay is not None:
            self.relay.open_gate()
        process.open_gate()
        on_in_scope(process.pid, await self.watch_cgroup(context))
        await self._guard_stall(context, self._handshake(context, options))

    def _open_output(self, credentials: Credentials | None, *, relay: bool) -> int:
        """The backend's stdout and stderr: a pipe to its log relay (started behind its
        own gate, so it joins the scope first) when ``relay`` and journald takes native
        entries, else a journal stream (no MODELD_MODEL field), else a file."""
        if relay and journald.available():
            read, write = os.pipe2(os.O_CLOEXEC)
            output = os.dup(write)
            devnull = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
            try:
                self.relay = GatedProcess(
                    [
                        sys.executable,
                        *("-I", "-S", journald.__file__),
                        *(self.model, self.unit, journald.JOURNAL_SOCKET),
                    ],
                    env={},
                    cwd="/",
                    output_fd=devnull,
                    credentials=credentials,
                    on_exit=self._relay_ended,
                    gate_pipe=(read, write),
                )
                return output
            except OSError as err:
                os.close(output)
                log.warning(
                    "model %s: no log relay (%s): output without MODELD_MODEL", self.model, err
                )
            finally:
                os.close(devnull)
        output_fd = journal.open_journal_stream(self.model)
        return output_fd if output_fd is not None else journal.open_log_file(self.log_file)

    def _relay_ended(self, status: ExitStatus) -> None:
        self.relay_exited.set()
        if not self.stopping and status != ExitStatus(code=0, signal=None):
            # Its backend's next line then fails (EPIPE, or SIGPIPE for most programs).
            log.warning("model %s: the log relay of its backend %s", self.model, status.describe())

    async def _start_scope(self, config: ModelConfig, context: OwnerContext) -> None:
        assert self.process is not None
        spec = ScopeSpec(
            unit=self.unit,
            description=f"modeld backend for model {self.model} ({config.backend})",
            slice=SLICE,
            memory_max=(
                config.memory_max if config.memory_max != UINT64_MAX else context.memory_ceiling
            ),
            memory_high=config.memory_high,
            tasks_max=config.tasks_max,
            cpu_weight=config.cpu_weight,
            stop_timeout_s=context.stop_timeout,
            extra_pids=(self.relay.pid,) if self.relay is not None else (),
        )
        self.scope_requested = True
        await context.systemd.start_scope(spec, self.process.pid)
        self.scope_started = True

    async def watch_cgroup(self, context: OwnerContext) -> str:
        """Learn the scope's cgroup and watch it for OOM kills (while the backend starts).

        The process's own cgroup is the scope's (it is in the scope); systemd is asked only
        when that cannot be read or is not named after the scope.
        """
        control_group = process_cgroup(self.process.pid) if self.process is not None else None
        if control_group is None or not control_group.endswith(f"/{self.unit}"):
            control_group = await context.systemd.unit_property(self.unit, "Scope", "ControlGroup")
        if control_group:
            self.control_group = control_group
            self.oom = OomWatch(context.cgroups, control_group)
        return self.control_group

    async def _handshake(self, context: OwnerContext, options: Any) -> None:
        self.phase = "waiting for its socket"
        with DirectoryWatch(self.socket.parent) as watch:
            await watch.wait_for(self.socket.name)
        secure_socket(self.socket)
        self.socket_ready = True
        self._apply_admission()
        await until_listening(self.socket)
        self.client = BackendClient(self.address)
        self.phase = "waiting for Health"
        await self.client.health()
        self.phase = "in LoadModel"
        await self.client.load_model(options)

    def _progress_sample(self, cgroups: CgroupLayout) -> tuple[int, int]:
        """CPU time and memory of the backend's processes (those of its scope): changes mean
        the load progresses."""
        pids = pids_in_cgroup(self.control_group) if self.control_group else set()
        if self.process is not None and self.process.exit_status is None:
            pids.add(self.process.pid)
        memory = cgroups.memory_current(self.control_group) if self.control_group else None
        self.memory_seen = max(self.memory_seen, memory or 0)
        return cpu_ticks(pids), memory or 0

    def sample_memory(self, cgroups: CgroupLayout, *, unless_within: float = 0.0) -> None:
        """Note the cgroup's memory use now (for :attr:`memory_seen`), unless it was read
        less than ``unless_within`` seconds ago."""
        now = time.monotonic()
        if self.control_group and now - self.memory_sampled_at >= unless_within:
            self.memory_sampled_at = now
            current = cgroups.memory_current(self.control_group) or 0
            self.memory_seen = max(self.memory_seen, current)

    def _read_peak(self, cgroups: CgroupLayout) -> None:
        """The scope's peak memory while its cgroup still exists: the kernel's high-water
        mark, else (an older kernel, or the cgroup already gone) the highest use seen."""
        if not self.control_group:
            return
        self.sample_memory(cgroups)
        peak = cgroups.memory_peak(self.control_group)
        self.memory_peak = peak if peak else self.memory_seen

    async def _guard_stall(self, context: OwnerContext, work: Awaitable[None]) -> None:
        """Run ``work`` until done; fail it only after a whole stall timeout without progress."""
        if context.stall_timeout <= 0:
            await work
            return
        task = asyncio.ensure_future(work)
        last = self._progress_sample(context.cgroups)
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=context.stall_timeout)
                if done:
                    return task.result()
                sample = self._progress_sample(context.cgroups)
                if sample == last:
                    raise LoadFailed(
                        f"backend made no progress for {context.stall_timeout:g}s"
                        f" while {self.phase}"
                    )
                last = sample
        finally:
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    # ------------------------------------------------------------------------- stop

    async def kill(self, context: OwnerContext) -> None:
        """SIGKILL every process of the scope at once (a hung backend)."""
        self.stopping = True
        await context.systemd.kill_unit(self.unit, signal.SIGKILL)

    async def stop(self, context: OwnerContext, *, scope_result: bool = False) -> str | None:
        """Stop everything of this run; returns the scope's Result when ``scope_result`` and
        it had one. What systemd could not stop is SIGKILLed. Reads the scope's peak memory
        (:attr:`memory_peak`) first."""
        self.stopping = True
        self._read_peak(context.cgroups)
        systemd = context.systemd
        result: str | None = None
        stopped = False
        try:
            if self.scope_started:
                await systemd.stop_unit(self.unit)
                stopped = True
            elif self.process is not None:
                self.process.kill()
        except SystemdError as err:
            log.warning("model %s: %s; killing the process", self.model, err)
            if self.process is not None:
                self.process.kill()
        if self.process is not None:
            try:
                async with asyncio.timeout(context.stop_timeout + 5):
                    await self.exited.wait()
            except TimeoutError:
                self.process.kill()
                await self.exited.wait()
            self.process.close()
        if self.relay is not None:
            await self._end_relay()
        if self.scope_started:
            if scope_result:
                result = await systemd.unit_property(self.unit, "Scope", "Result")
            if not stopped:
                await systemd.kill_unit(self.unit, signal.SIGKILL)
            await systemd.unref_unit(self.unit)
        elif self.scope_requested:
            await self._drop_unstarted_scope(systemd)
        if self.oom is not None:
            self.oom.close()
        if self.client is not None:
            await self.client.close()
        self._remove_socket()
        context.records.remove(self.unit)
        return result

    async def _drop_unstarted_scope(self, systemd: SystemdApi) -> None:
        """A scope whose start was cancelled (an unload during the load) or failed (its
        processes were gone when systemd moved them: Result=resources) may still be loaded
        in systemd, held by our AddRef, and would never be collected. systemd handles one
        connection's calls in order, so these come after the StartTransientUnit call."""
        with contextlib.suppress(SystemdError):
            await systemd.stop_unit(self.unit)
        await systemd.unref_unit(self.unit)

    def admit(self, users: frozenset[int]) -> None:
        """Let ``users`` (and no other user but root and the backend's) reach the socket:
        an ACL on its private directory and on it, applied once the socket exists."""
        if users != self.admitted:
            self.admitted = users
            if self.socket_ready:
                self._apply_admission()

    def _apply_admission(self) -> None:
        if self.socket.name != BACKEND_SOCKET_NAME:
            return  # a socket of a modeld from before private directories: not private
        users = (self.admitted or frozenset()) - {0}
        try:
            grant_users(self.socket.parent, users, EXECUTE)
            grant_users(self.socket, users, READ | WRITE)
        except OSError as err:
            log.warning(
                "model %s: cannot let lease holders (uids %s) reach the backend: %s",
                self.model,
                ", ".join(map(str, sorted(users))) or "none",
                err.strerror or err,
            )

    def _remove_socket(self) -> None:
        """Remove the backend's private directory (or, for a backend started by a modeld
        from before private directories, its socket alone)."""
        if self.socket.name == BACKEND_SOCKET_NAME:
            remove_backend_dir(self.socket.parent)
        else:
            with contextlib.suppress(FileNotFoundError):
                self.socket.unlink()

    async def _end_relay(self) -> None:
        """The relay ends once the backend's output is closed; give it a moment to send
        the last lines (the scope is normally empty already), then make sure."""
        assert self.relay is not None
        self.relay.close_gate()
        if self.relay.exit_status is None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(RELAY_DRAIN_TIMEOUT):
                    await self.relay_exited.wait()
        self.relay.close()

    async def release(self) -> None:
        """Stop watching but leave the backend running (modeld restarts and re-adopts it)."""
        if self.process is not None:
            self.process.release()
        if self.relay is not None:
            self.relay.release()
        if self.oom is not None:
            self.oom.close()
        if self.client is not None:
            await self.client.close()
