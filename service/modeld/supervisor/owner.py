"""The owner of one model: the only code that changes that model's state.

Every public method is a thin client that posts a message to the owner's inbox; the owner
task handles messages one at a time. Nobody outside reads the state to decide an action
(no check-then-act): they ask the owner, which decides with the state it alone writes.

A load runs as a sub-task of the owner so that an unload, a crash or a new request can be
handled while it is in progress; an unload and the clean-up after a crash run inline, so
requests that arrive meanwhile simply wait in the inbox. Every transition into a settled
state resolves the futures waiting on it.

When a backend that served goes away (unloaded, evicted, crashed), the owner learns its
footprint: the peak memory of its scope's cgroup, read just before the scope is stopped,
published as ``memory_peak`` and saved (:mod:`modeld.supervisor.footprints`) when it was
measured under the model's current configuration.

Use is counted here, from the moment a request is accepted (while it waits for the model
or a ``parallel`` slot too) until its caller ends it, and for every open lease. An eviction
(the scheduler making room) is refused while the model is in use or pinned unless forced;
an explicit unload waits for the use to end unless forced. A pin also refuses an explicit
unload, unless the caller was authorized to manage (a fact the D-Bus adapter passes along):
a pin keeps a model loaded against callers who may only use it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import signal
import time
from collections.abc import Awaitable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

from modeld.config import ModelConfig
from modeld.core.effects import EvictionRefused
from modeld.core.states import ModelState, check_transition
from modeld.errors import LoadFailed, ModeldError, PinnedModel
from modeld.naming import backend_socket, scope_name
from modeld.rpc.client import BackendClient
from modeld.supervisor.backend_run import BackendRun, OwnerContext
from modeld.supervisor.cooldown import cooldown_refusal, cooldown_seconds
from modeld.supervisor.footprints import Footprint, footprint_key
from modeld.supervisor.mailbox import serve
from modeld.supervisor.records import BackendRecord
from modeld.supervisor.spawn import AdoptedProcess, ExitStatus
from modeld.supervisor.status import ModelStatus, StatusChange
from modeld.system import journal
from modeld.units import format_size

log = logging.getLogger(__name__)

FREE_TIMEOUT = 1.0
ADOPT_HEALTH_TIMEOUT = 5.0
_EXIT_GRACE = 0.5


class OwnerObserver(Protocol):
    """Receives what owners commit; the D-Bus adapter and sd_notify status implement it."""

    def on_status_changed(self, change: StatusChange) -> None: ...

    def on_loaded(self, model: str) -> None: ...

    def on_unloaded(self, model: str, reason: str) -> None: ...


_PER_REQUEST = {ModelState.READY, ModelState.BUSY}
USE_SAMPLE_INTERVAL = 1.0
"""Seconds between memory samples taken as requests start and end (the fallback peak on
kernels that keep none; a sample per request would cost more than the request's routing)."""
"""Ready <-> busy follows every request: logged at debug level, not once per request."""
RESTART_BACKOFF_MAX = 60.0
HEALTHY_RUN = 60.0
"""A backend that served at least this long before it crashed restarts without backoff."""


@dataclass
class _Load:
    after: Awaitable[object] | None
    gpu: str
    force: bool
    accepted: asyncio.Future[asyncio.Future[None]]


@dataclass
class _Evict:
    reason: str
    force: bool
    done: asyncio.Future[None]


@dataclass
class _Unload:
    reason: str
    force: bool
    manage: bool
    accepted: asyncio.Future[asyncio.Future[None]]


@dataclass
class _Exited:
    generation: int


@dataclass
class _LoadDone:
    generation: int
    error: BaseException | None


@dataclass
class _SetPinned:
    pinned: bool


@dataclass
class _RequestBegun:
    request: int


@dataclass
class _RequestRunning:
    request: int
    at: float


@dataclass
class _RequestEnded:
    request: int


@dataclass
class _LeaseOpened:
    lease: int
    holder_uid: int | None


@dataclass
class _LeaseClosed:
    lease: int


@dataclass
class _Timeout:
    """An idle or busy timer of backend ``generation`` ran out."""

    kind: str
    generation: int


@dataclass
class _GpuUsage:
    used: int


@dataclass
class _Reconfigure:
    config: ModelConfig


@dataclass
class _Adopt:
    record: BackendRecord
    done: asyncio.Future[bool]


@dataclass
class _LoadRefused:
    error: str


_Message = (
    _Load
    | _Evict
    | _Unload
    | _Exited
    | _LoadDone
    | _SetPinned
    | _RequestBegun
    | _RequestRunning
    | _RequestEnded
    | _LeaseOpened
    | _LeaseClosed
    | _Timeout
    | _GpuUsage
    | _Reconfigure
    | _Adopt
    | _LoadRefused
)
_use_ids = itertools.count(1)


_CLEARED: dict[str, Any] = {
    "unit": "",
    "control_group": "",
    "main_pid": 0,
    "endpoint": "",
    "gpu": "",
    "gpu_memory": 0,
}
"""What a model publishes about its backend, as it is once the backend is gone."""


def _now_us() -> int:
    return time.time_ns() // 1000


class ModelOwner:
    """Owns one configured model: its state, its backend process and its scope."""

    def __init__(
        self,
        config: ModelConfig,
        context: OwnerContext,
        observer: OwnerObserver,
        *,
        last_generation: int = 0,
    ) -> None:
        self.config = config
        self._footprint_key = footprint_key(config)
        self.status = ModelStatus(
            memory_max=config.memory_max,
            pinned=config.pinned,
            memory_peak=context.footprints.memory_peak(config.name, self._footprint_key),
        )
        self._context = context
        self._observer = observer
        self._next_generation = last_generation + 1
        self._inbox: asyncio.Queue[_Message] = asyncio.Queue()
        self._backend: BackendRun | None = None
        self._load_task: asyncio.Task[None] | None = None
        self._load_waiters: list[asyncio.Future[None]] = []
        self._deferred_unloads: list[tuple[_Unload, asyncio.Future[None]]] = []
        self._restart_timer: asyncio.TimerHandle | None = None
        self._requests: dict[int, float | None] = {}
        """Requests counted in use: id -> when it began running on the backend (None while
        it waits for the model or a slot). Kept across backends: the caller always ends it."""
        self._leases: dict[int, int | None] = {}
        """Open leases and the uid of each holder (None: not known)."""
        self._ready_at = 0.0
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._failures_in_a_row = 0
        self._load_failures = 0
        self._task = asyncio.create_task(
            serve(self._inbox, self._handle, self._release_callers, f"model {config.name}"),
            name=f"owner:{config.name}",
        )

    @property
    def name(self) -> str:
        return self.config.name

    # ----------------------------------------------------------------- thin clients

    def request_load(
        self, after: Awaitable[object] | None = None, gpu: str = "", *, force: bool = False
    ) -> asyncio.Future[asyncio.Future[None]]:
        """Ask for a load; resolves once accepted, with a future for its completion.

        A model that is loading or ready is not started again: the caller joins the load.
        ``after`` is awaited before a new backend starts (the GPU giving memory back);
        ``gpu`` is the device it gets (CUDA_VISIBLE_DEVICES), "" for none. Only the
        scheduler asks, having made room first. While the failure cooldown runs a new
        backend is refused (InCooldown) unless ``force``.
        """
        accepted: asyncio.Future[asyncio.Future[None]] = asyncio.get_running_loop().create_future()
        self._inbox.put_nowait(_Load(after, gpu, force, accepted))
        return accepted

    def evict(self, reason: str, *, force: bool = False) -> asyncio.Future[None]:
        """Ask the owner to unload the model to make room (``reason``: lru, group, ...).

        The owner decides when it handles the request: it refuses (the future raises
        EvictionRefused) while requests are in flight or leases open, unless ``force``, and
        always while pinned. Resolves once the model is unloaded.
        """
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._inbox.put_nowait(_Evict(reason, force, done))
        return done

    async def request_unload(
        self, reason: str, *, force: bool = False, manage: bool = False
    ) -> asyncio.Future[None]:
        """Ask for an unload; returns once accepted, with a future for its completion.

        Without ``force`` the unload waits until no request is in flight and no lease open.
        While the model is pinned the unload is refused (PinnedModel) unless ``manage``: the
        caller is authorized to manage models. A pin set while an unload waits for the use to
        end refuses that unload the same way.
        """
        accepted: asyncio.Future[asyncio.Future[None]] = asyncio.get_running_loop().create_future()
        self._inbox.put_nowait(_Unload(reason, force, manage, accepted))
        return await accepted

    def set_pinned(self, pinned: bool) -> None:
        self._inbox.put_nowait(_SetPinned(pinned))

    def begin_request(self) -> int:
        """Count a request as in use from now on (while it waits for the model or a
        ``parallel`` slot, too); returns its id. The caller must end it."""
        request = next(_use_ids)
        self._inbox.put_nowait(_RequestBegun(request))
        return request

    def request_running(self, request: int) -> None:
        """The request was sent to the backend: the busy timeout measures it from now."""
        self._inbox.put_nowait(_RequestRunning(request, time.monotonic()))

    def end_request(self, request: int) -> None:
        self._inbox.put_nowait(_RequestEnded(request))

    def open_lease(self, holder_uid: int | None = None) -> int:
        """Count a lease (Acquire) as use until :meth:`close_lease`: the model is not
        evicted without force, never times out as busy, and its LastUsed is refreshed.
        While it is open, ``holder_uid`` may connect to the backend's socket."""
        lease = next(_use_ids)
        self._inbox.put_nowait(_LeaseOpened(lease, holder_uid))
        return lease

    def close_lease(self, lease: int) -> None:
        self._inbox.put_nowait(_LeaseClosed(lease))

    def _admit_lease_holders(self) -> None:
        """Let exactly the holders of open leases reach the backend's socket."""
        if self._backend is not None:
            holders = {uid for uid in self._leases.values() if uid is not None}
            self._backend.admit(frozenset(holders))

    def report_gpu_memory(self, used: int) -> None:
        """The backend's measured GPU memory (from NVML, attributed through its cgroup)."""
        self._inbox.put_nowait(_GpuUsage(used))

    @property
    def client(self) -> BackendClient | None:
        """The gRPC client of the serving backend (None when not serving).

        Requests use it only after :meth:`begin_request`, so the backend is not evicted
        under them; a backend that crashes meanwhile makes their RPC fail.
        """
        backend = self._backend
        if backend is None or not self.status.state.serving:
            return None
        return backend.client

    def report_refused_load(self, error: str) -> None:
        """A load nobody waits for (a preload) was refused before it reached this owner
        (admission: policy, busy victims, no backend): publish ``error`` as LastError,
        unless the model has a backend again by the time the owner handles it."""
        self._inbox.put_nowait(_LoadRefused(error))

    def reconfigure(self, config: ModelConfig) -> None:
        """Use ``config`` from the next load on (a running backend keeps its settings)."""
        self._inbox.put_nowait(_Reconfigure(config))

    async def adopt(self, record: BackendRecord) -> bool:
        """Take over a backend an earlier modeld left running; False if it is not usable.

        Must be the owner's first request. An unusable backend is stopped.
        """
        done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._inbox.put_nowait(_Adopt(record, done))
        return await done

    async def detach(self) -> None:
        """End the owner task and leave the backend running, for the next modeld to adopt."""
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        if self._backend is not None:
            await self._backend.release()

    async def close(self) -> None:
        """Stop the backend (reason ``shutdown``) and end the owner task."""
        done = await self.request_unload("shutdown", force=True, manage=True)
        with contextlib.suppress(ModeldError):
            await done
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    # ------------------------------------------------------------------ the owner task

    def _release_callers(self, message: _Message, err: Exception) -> None:
        """After an internal error, nobody waiting on this owner may hang: fail them all."""
        error = LoadFailed(f"{self.name}: internal error in modeld ({err}); see its journal")
        for future in (getattr(message, "accepted", None), getattr(message, "done", None)):
            if isinstance(future, asyncio.Future) and not future.done():
                future.set_exception(error)
        for _unload, done in self._deferred_unloads:
            if not done.done():
                done.set_exception(error)
        self._deferred_unloads.clear()
        self._resolve_waiters(error)

    async def _handle(self, message: _Message) -> None:
        match message:
            case _Load():
                self._on_load(message)
            case _Evict():
                await self._on_evict(message)
            case _Unload():
                await self._on_unload(message)
            case _Exited():
                await self._on_exited(message)
            case _LoadDone():
                await self._on_load_done(message)
            case _SetPinned(pinned=pinned):
                self._set(pinned=pinned)
                if pinned:
                    self._refuse_deferred_unloads()
                self._arm_timers()
            case _RequestBegun(request=request):
                self._requests[request] = None
                await self._use_changed()
            case _RequestRunning(request=request, at=at):
                if request in self._requests:
                    self._requests[request] = at
                    self._arm_timers()
            case _RequestEnded(request=request):
                if self._requests.pop(request, 0) != 0:
                    await self._use_changed()
            case _LeaseOpened(lease=lease, holder_uid=uid):
                self._leases[lease] = uid
                self._admit_lease_holders()
                await self._use_changed()
            case _LeaseClosed(lease=lease):
                if lease in self._leases:
                    del self._leases[lease]
                    self._admit_lease_holders()
                    await self._use_changed()
            case _Timeout():
                await self._on_timeout(message)
            case _GpuUsage(used=used):
                if self._backend is not None:
                    self._backend.gpu_memory_seen = max(self._backend.gpu_memory_seen, used)
                self._set(gpu_memory=used)
            case _Adopt():
                message.done.set_result(await self._on_adopt(message.record))
            case _LoadRefused(error=error):
                if not self.status.state.occupies_slot:
                    self._set(last_error=error)
            case _Reconfigure(config=config):
                if config != self.config:
                    self._load_failures = 0
                    self._set(retry_after_us=0)
                self.config = config
                key = footprint_key(config)
                if key != self._footprint_key:
                    self._footprint_key = key
                    self._set(memory_peak=self._context.footprints.memory_peak(self.name, key))
                if not self.status.state.occupies_slot:
                    self._set(memory_max=config.memory_max)

    def _set(self, **changes: Any) -> None:
        before = self.status
        after = replace(before, **changes)
        if after != before:
            self.status = after
            self._observer.on_status_changed(StatusChange(self.name, before, after))

    def _set_state(self, state: ModelState, **changes: object) -> None:
        old = self.status.state
        check_transition(old, state)
        level = logging.DEBUG if {old, state} == _PER_REQUEST else logging.INFO
        log.log(level, "model %s: %s -> %s", self.name, old, state)
        self._set(state=state, **changes)

    # ------------------------------------------------------------------------- load

    def _on_load(self, message: _Load) -> None:
        self._cancel_restart()
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        state = self.status.state
        if state.serving:
            if not self._in_use:  # in use, LastUsed is refreshed when the use ends
                self._set(last_used_us=_now_us())
            done.set_result(None)
        elif state is ModelState.LOADING:
            self._load_waiters.append(done)
        else:
            status = self.status
            refusal = cooldown_refusal(
                self.name, status.retry_after_us, status.last_error, _now_us()
            )
            if refusal is not None and not message.force:
                message.accepted.set_exception(refusal)
                return
            self._load_waiters.append(done)
            self._start_load(message.after, message.gpu)
        message.accepted.set_result(done)

    def _start_load(self, after: Awaitable[object] | None, gpu: str) -> None:
        generation = self._next_generation
        self._next_generation += 1
        backend = BackendRun(
            model=self.name,
            generation=generation,
            unit=scope_name(self.name, generation),
            socket=backend_socket(self._context.runtime_dir, self.name),
            started_us=_now_us(),
            footprint_key=self._footprint_key,
        )
        self._backend = backend
        self._admit_lease_holders()
        self._set_state(
            ModelState.LOADING,
            unit=backend.unit,
            endpoint=backend.address,
            last_error="",
            memory_max=self.config.memory_max,
            gpu=gpu,
        )
        self._load_task = asyncio.create_task(
            self._load_procedure(backend, after), name=f"load:{self.name}"
        )
        self._load_task.add_done_callback(lambda task: self._post_load_done(backend, task))

    def _post_load_done(self, backend: BackendRun, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        self._inbox.put_nowait(_LoadDone(backend.generation, task.exception()))

    async def _load_procedure(self, backend: BackendRun, after: Awaitable[object] | None) -> None:
        if after is not None:
            backend.phase = "waiting for GPU memory"
            with contextlib.suppress(Exception):
                await after
        await backend.launch(
            self.config,
            self._context,
            gpu=self.status.gpu,
            on_exit=lambda status: self._on_process_exit(backend, status),
            on_in_scope=lambda pid, cgroup: self._set(main_pid=pid, control_group=cgroup),
        )

    def _on_process_exit(self, backend: BackendRun, status: ExitStatus) -> None:
        backend.process_exited(status)
        self._inbox.put_nowait(_Exited(backend.generation))

    async def _on_load_done(self, message: _LoadDone) -> None:
        backend = self._backend
        if backend is None or backend.generation != message.generation:
            return
        if self.status.state is not ModelState.LOADING:
            return
        self._load_task = None
        if message.error is None:
            log.info("model %s: loaded in %s", self.name, backend.timings())
            state = ModelState.BUSY if self.status.in_flight else ModelState.READY
            self._load_failures = 0
            self._set_state(
                state,
                load_count=self.status.load_count + 1,
                last_used_us=_now_us(),
                retry_after_us=0,
            )
            self._ready_at = time.monotonic()
            self._save_record(backend)
            self._arm_timers()
            self._resolve_waiters(None)
            self._observer.on_loaded(self.name)
            return
        if backend.crash_status is None and backend.process is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_EXIT_GRACE):
                    await backend.exited.wait()
        summary = (
            message.error.message
            if isinstance(message.error, ModeldError)
            else f"{type(message.error).__name__}: {message.error}"
        )
        await self._fail(backend, summary)

    def _resolve_waiters(self, error: ModeldError | None) -> None:
        waiters, self._load_waiters = self._load_waiters, []
        for waiter in waiters:
            if waiter.done():
                continue
            if error is None:
                waiter.set_result(None)
            else:
                waiter.set_exception(error)

    def _save_record(self, backend: BackendRun) -> None:
        assert backend.process is not None
        self._context.records.save(
            BackendRecord(
                model=self.name,
                unit=backend.unit,
                generation=backend.generation,
                pid=backend.process.pid,
                socket=str(backend.socket),
                started_us=backend.started_us,
                load_count=self.status.load_count,
                footprint_key=backend.footprint_key,
            )
        )

    async def _on_adopt(self, record: BackendRecord) -> bool:
        backend = BackendRun(
            model=self.name,
            generation=record.generation,
            unit=record.unit,
            socket=Path(record.socket),
            started_us=record.started_us,
            scope_started=True,
            footprint_key=record.footprint_key,
            socket_ready=True,
        )
        self._backend = backend
        self._admit_lease_holders()
        self._next_generation = max(self._next_generation, record.generation + 1)
        self._set_state(
            ModelState.LOADING,
            unit=record.unit,
            endpoint=backend.address,
            main_pid=record.pid,
            load_count=record.load_count,
        )
        backend.phase = "being re-adopted"
        try:
            backend.process = AdoptedProcess(
                record.pid, lambda status: self._on_process_exit(backend, status)
            )
            await self._context.systemd.ref_unit(record.unit)
            self._set(control_group=await backend.watch_cgroup(self._context))
            backend.client = BackendClient(backend.address)
            await backend.client.health(timeout=ADOPT_HEALTH_TIMEOUT)
        except Exception as err:  # any failure: the backend is not usable, stop it
            log.warning(
                "model %s: cannot re-adopt %s (%s); stopping it", self.name, record.unit, err
            )
            await self._teardown(backend)
            self._backend = None
            self._set_state(ModelState.UNLOADING)
            self._set_state(ModelState.UNLOADED, **_CLEARED)
            return False
        log.info("model %s: re-adopted %s (pid %d)", self.name, record.unit, record.pid)
        self._set_state(ModelState.READY, last_used_us=_now_us())
        self._ready_at = time.monotonic()
        self._arm_timers()
        self._observer.on_loaded(self.name)
        return True

    # ---------------------------------------------------------------- crash and fail

    async def _on_exited(self, message: _Exited) -> None:
        backend = self._backend
        if backend is None or backend.generation != message.generation:
            return
        state = self.status.state
        if state is ModelState.LOADING:
            await self._cancel_load()
            await self._fail(backend, "")
        elif state.serving:
            await self._fail(backend, "")

    async def _cancel_load(self) -> None:
        """Cancel the load sub-task and wait for it to end.

        Its CancelledError is swallowed, but not the owner's own: an owner cancelled while
        it waits here (:meth:`detach` when modeld restarts) must end, or the restart hangs.
        """
        task, self._load_task = self._load_task, None
        if task is not None and not task.done():
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    raise
            except Exception:
                pass

    async def _fail(self, backend: BackendRun, summary: str) -> None:
        """Tear the backend down and settle in ``failed`` with a reason and LastError."""
        was_loading = self.status.state is ModelState.LOADING
        crash = backend.crash_status
        if crash is not None and backend.oom is not None:
            backend.oom.check()
        scope_result = await self._teardown(backend, scope_result=True)
        if not was_loading:
            self._learn_footprint(backend)
        self._set(**_CLEARED)
        reason = "failed"
        if crash is not None:
            oom = crash.signal == signal.SIGKILL and (
                scope_result == "oom-kill" or (backend.oom is not None and backend.oom.seen)
            )
            reason = "oom" if oom else "crashed"
            summary = f"backend {crash.describe()}"
            if oom:
                summary += (
                    f" after exceeding its memory limit ({format_size(self.config.memory_max)})"
                )
            if was_loading:
                summary += f" while {backend.phase}"
        tail = await journal.journal_tail(self.name, backend.started_us)
        if not tail:
            tail = journal.file_tail(backend.log_file)
        last_error = summary + ("\n" + "\n".join(tail) if tail else "")
        log.warning("model %s: %s", self.name, summary)
        self._backend = None
        retry_after_us = self.status.retry_after_us
        if was_loading:
            self._load_failures += 1
            wait = cooldown_seconds(self._load_failures)
            retry_after_us = _now_us() + int(wait * 1_000_000)
            log.info("model %s: the next load waits %gs (failure cooldown)", self.name, wait)
        self._set_state(ModelState.FAILED, last_error=last_error, retry_after_us=retry_after_us)
        detail = f"; last output: {tail[-1]}" if tail else ""
        self._resolve_waiters(LoadFailed(f"{self.name}: {summary}{detail}"))
        self._observer.on_unloaded(self.name, reason)
        if crash is not None and not was_loading and self.config.restart == "on-failure":
            self._schedule_restart()

    def _schedule_restart(self) -> None:
        """Load again after a crash, backing off 1 s, 2 s, 4 s ... up to a minute.

        Only a backend that crashed after it was ready is restarted: one that cannot load
        would only crash in a loop, so that stays ``failed`` for a person to look at.
        """
        if time.monotonic() - self._ready_at >= HEALTHY_RUN:
            self._failures_in_a_row = 0
        delay = min(RESTART_BACKOFF_MAX, 2.0**self._failures_in_a_row)
        self._failures_in_a_row += 1
        log.info("model %s: restarting in %.0f s (restart=on-failure)", self.name, delay)
        self._restart_timer = asyncio.get_running_loop().call_later(
            delay, self._context.restart, self.name
        )

    def _cancel_restart(self) -> None:
        if self._restart_timer is not None:
            self._restart_timer.cancel()
            self._restart_timer = None

    async def _teardown(self, backend: BackendRun, *, scope_result: bool = False) -> str | None:
        """Stop everything of ``backend``; returns the scope's Result when ``scope_result``
        and it had one. The caller publishes :data:`_CLEARED` with its next change."""
        result = await backend.stop(self._context, scope_result=scope_result)
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        return result

    # ----------------------------------------------------------------------- unload

    async def _on_unload(self, message: _Unload) -> None:
        if self.status.pinned and not message.manage:
            message.accepted.set_exception(self._pinned_refusal())
            return
        self._cancel_restart()
        self._failures_in_a_row = 0
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        state = self.status.state
        backend = self._backend
        if state is ModelState.FAILED:
            self._set_state(ModelState.UNLOADED)
        if backend is None or not state.occupies_slot:
            done.set_result(None)
            message.accepted.set_result(done)
            return
        if state.serving and self._in_use and not message.force:
            self._deferred_unloads.append((message, done))
            message.accepted.set_result(done)
            return
        message.accepted.set_result(done)
        await self._unload_now(backend, message.reason)
        done.set_result(None)

    def _learn_footprint(self, backend: BackendRun) -> None:
        """Remember the peak of ``backend`` (which served and is gone) when it ran under the
        current configuration; the highest peak under that configuration is published."""
        if backend.memory_peak <= 0 or backend.footprint_key != self._footprint_key:
            return
        measured = Footprint(backend.footprint_key, backend.memory_peak, backend.gpu_memory_seen)
        learned = self._context.footprints.learn(self.name, measured)
        log.info(
            "model %s: peak memory %s (learned: %s)",
            self.name,
            format_size(measured.memory_peak),
            format_size(learned.memory_peak),
        )
        self._set(memory_peak=learned.memory_peak)

    def _pinned_refusal(self) -> PinnedModel:
        return PinnedModel(
            f"{self.name} is pinned: only a caller authorized to manage models may unload it"
        )

    def _refuse_deferred_unloads(self) -> None:
        """The model was pinned: refuse the waiting unloads of callers who may not manage."""
        kept = []
        for unload, done in self._deferred_unloads:
            if unload.manage:
                kept.append((unload, done))
            elif not done.done():
                done.set_exception(self._pinned_refusal())
        self._deferred_unloads = kept

    async def _on_evict(self, message: _Evict) -> None:
        backend = self._backend
        if backend is None or not self.status.state.occupies_slot:
            message.done.set_result(None)
            return
        refusal = self._eviction_refusal(message.force)
        if refusal:
            message.done.set_exception(EvictionRefused(f"{self.name} {refusal}"))
            return
        self._cancel_restart()
        await self._unload_now(backend, message.reason)
        message.done.set_result(None)

    def _eviction_refusal(self, force: bool) -> str:
        """Why this model may not be evicted now ("" if it may)."""
        if self.status.pinned:
            return "is pinned"
        if force:
            return ""
        if self.status.state is ModelState.LOADING:
            return "is still loading"
        uses = []
        if self._requests:
            uses.append(f"{len(self._requests)} request(s) in flight")
        if self._leases:
            uses.append(f"{len(self._leases)} lease(s) open")
        return "has " + " and ".join(uses) if uses else ""

    @property
    def _in_use(self) -> bool:
        return bool(self._requests or self._leases)

    async def _unload_now(self, backend: BackendRun, reason: str, *, kill: bool = False) -> None:
        """Stop ``backend``: Free (best effort) then stop its scope; ``kill`` skips Free and
        SIGKILLs the whole scope first (a hung backend)."""
        was_loading = self.status.state is ModelState.LOADING
        self._set_state(ModelState.UNLOADING)
        if was_loading:
            await self._cancel_load()
            self._resolve_waiters(LoadFailed(f"{self.name}: load cancelled ({reason} unload)"))
        elif kill:
            await backend.kill(self._context)
        elif backend.client is not None and backend.crash_status is None:
            await backend.client.free(FREE_TIMEOUT)
        await self._teardown(backend)
        if not was_loading:
            self._learn_footprint(backend)
        self._backend = None
        self._set_state(ModelState.UNLOADED, **_CLEARED)
        self._observer.on_unloaded(self.name, reason)
        for _unload, done in self._deferred_unloads:
            if not done.done():
                done.set_result(None)
        self._deferred_unloads.clear()

    # -------------------------------------------------- requests, idle and busy timers

    async def _use_changed(self) -> None:
        in_flight = len(self._requests) + len(self._leases)
        state = self.status.state
        if self._backend is not None and state.serving:
            self._backend.sample_memory(self._context.cgroups, unless_within=USE_SAMPLE_INTERVAL)
        use = {"in_flight": in_flight, "last_used_us": _now_us()}
        if state is ModelState.READY and in_flight > 0:
            self._set_state(ModelState.BUSY, **use)
        elif state is ModelState.BUSY and in_flight == 0:
            self._set_state(ModelState.READY, **use)
        else:
            self._set(**use)
        self._arm_timers()
        if in_flight == 0 and self._deferred_unloads and self._backend is not None:
            unload, _ = self._deferred_unloads[0]
            await self._unload_now(self._backend, unload.reason)

    def _arm_timers(self) -> None:
        """(Re)arm the idle timer (ready, not in use, not pinned) and the busy timer (runs
        from the oldest request running on the backend; waiting requests and leases are use,
        not work, so they never time out as busy)."""
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        backend = self._backend
        if backend is None or not self.status.state.serving:
            return
        loop = asyncio.get_running_loop()
        idle, busy = self.config.idle_timeout, self.config.busy_timeout
        if not self._in_use and idle > 0 and not self.status.pinned:
            message = _Timeout("idle", backend.generation)
            self._timers["idle"] = loop.call_later(idle, self._inbox.put_nowait, message)
        running = [at for at in self._requests.values() if at is not None]
        if running and busy > 0:
            oldest = min(running)
            delay = max(0.0, oldest + busy - time.monotonic())
            message = _Timeout("busy", backend.generation)
            self._timers["busy"] = loop.call_later(delay, self._inbox.put_nowait, message)

    async def _on_timeout(self, message: _Timeout) -> None:
        backend = self._backend
        if backend is None or backend.generation != message.generation:
            return
        if message.kind == "idle":
            idle = self.status.state is ModelState.READY and not self._in_use
            if idle and not self.status.pinned:
                log.info("model %s: idle for %gs", self.name, self.config.idle_timeout)
                await self._unload_now(backend, "idle")
            return
        oldest = min((at for at in self._requests.values() if at is not None), default=None)
        busy_for = time.monotonic() - oldest if oldest is not None else 0.0
        if oldest is None or busy_for < self.config.busy_timeout:
            self._arm_timers()
            return
        log.warning(
            "model %s: busy for %.0fs (busy_timeout %gs): killing its backend",
            self.name,
            busy_for,
            self.config.busy_timeout,
        )
        await self._unload_now(backend, "busy-timeout", kill=True)
