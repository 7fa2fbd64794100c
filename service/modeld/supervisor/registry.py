"""The supervisor: one owner per configured model, one scheduler; it routes requests.

Loads go through :mod:`modeld.supervisor.scheduler` (admission by the eviction engine, and
memory pressure relief), which acts on the owners only through :class:`OwnerEffects`;
requests and leases are counted as use by the owners while they last.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from modeld.config import Config, ModelConfig
from modeld.core.eviction import decide_load
from modeld.core.states import ModelState
from modeld.discovery import BackendIndex, discover_backends, effective_backend_dirs
from modeld.errors import (
    InCooldown,
    LoadFailed,
    ModeldError,
    NoSuchBackend,
    NoSuchModel,
    SystemdError,
)
from modeld.naming import SLICE, UNIT_PREFIX, parse_scope_name, shown, unit_escape
from modeld.rpc.client import BackendClient
from modeld.supervisor.backend_run import OwnerContext
from modeld.supervisor.footprints import FootprintStore
from modeld.supervisor.measurements import HostMeasurements
from modeld.supervisor.owner import ModelOwner, OwnerObserver
from modeld.supervisor.records import RecordStore
from modeld.supervisor.request_queue import RequestQueue
from modeld.supervisor.scheduler import DecideFunction, Scheduler, SchedulerPolicy
from modeld.supervisor.status import ModelStatus, StatusChange
from modeld.supervisor.systemd_api import SystemdApi
from modeld.system.backend_dir import prepare_backends_dir
from modeld.system.cgroup import CgroupLayout
from modeld.system.gpu import GpuProbe, NullProbe
from modeld.system.journal_logging import attributed_to
from modeld.system.pressure import PressureTrigger, pressure_file, read_pressure

log = logging.getLogger(__name__)


PRESSURE_WINDOW_US = 2_000_000
"""The PSI trigger window: 2 s is the shortest one allowed without CAP_SYS_RESOURCE."""


class OwnerEffects:
    """The scheduler's effects (:class:`modeld.core.effects.SchedulerEffects`) on owners."""

    def __init__(self, owners: Mapping[str, ModelOwner]) -> None:
        self._owners = owners

    def _owner(self, name: str) -> ModelOwner:
        owner = self._owners.get(name)
        if owner is None:
            raise NoSuchModel(f"model {name!r} was removed")
        return owner

    def evict(self, name: str, reason: str, force: bool) -> asyncio.Future[None]:
        return self._owner(name).evict(reason, force=force)

    def start_load(
        self, name: str, gpu: str, after: Awaitable[object] | None, force: bool
    ) -> asyncio.Future[asyncio.Future[None]]:
        return self._owner(name).request_load(after=after, gpu=gpu, force=force)

    def report_gpu_memory(self, name: str, used: int) -> None:
        owner = self._owners.get(name)
        if owner is not None:
            owner.report_gpu_memory(used)


class Ticket:
    """A request's place in its model's queue (see :meth:`Supervisor.serving`)."""

    def __init__(
        self, supervisor: Supervisor, owner: ModelOwner, queue: RequestQueue, request: int
    ) -> None:
        self._supervisor = supervisor
        self._owner = owner
        self._queue = queue
        self._request = request
        self.has_slot = False

    async def client(self) -> BackendClient:
        """Load the model if needed, wait for a slot, and return the backend's client.

        Raises what a load raises (Busy, InsufficientResources, LoadFailed).
        """
        await (await self._supervisor.load(self._owner.name))
        await self._queue.take_slot()
        self.has_slot = True
        client = self._owner.client
        if client is None:
            raise LoadFailed(f"{self._owner.name} went away before the request could be served")
        self._owner.request_running(self._request)
        return client


@dataclass(frozen=True, slots=True)
class Lease:
    """A client's claim on a model: it counts as in use until the fd is closed."""

    endpoint: str
    client_fd: int


class Supervisor:
    """Routes requests to model owners and decides admission through the policy."""

    def __init__(
        self,
        config: Config,
        systemd: SystemdApi,
        observer: OwnerObserver,
        *,
        cgroups: CgroupLayout | None = None,
        default_user: str | None = None,
        gpu: GpuProbe | None = None,
        decide: DecideFunction = decide_load,
        watch_pressure: bool = True,
        state_dir: Path | None = None,
        slice_cgroup: str = "/" + SLICE,
    ) -> None:
        """``state_dir``: where learned footprints persist (None: in memory only).
        ``slice_cgroup``: the cgroup of modeld.slice (below a user manager's own cgroup for
        a per-user modeld), whose memory pressure is watched."""
        self.config = config
        self._state_dir = state_dir
        self._systemd = systemd
        self._observer = observer
        self._cgroups = cgroups or CgroupLayout.detect()
        self._default_user = default_user
        self._owners: dict[str, ModelOwner] = {}
        self.gpu = gpu or NullProbe()
        self._pressure_path = pressure_file(slice_cgroup) if watch_pressure else None
        path = self._pressure_path
        self.max_loaded = config.daemon.max_loaded
        self._scheduler = Scheduler(
            OwnerEffects(self._owners),
            HostMeasurements(self._cgroups, self.gpu),
            SchedulerPolicy.from_daemon(config.daemon),
            read_pressure=(lambda: read_pressure(path)) if path is not None else None,
            decide=decide,
        )
        self._queues: dict[str, RequestQueue] = {}
        self.pressure: PressureTrigger | None = None
        self._generations: dict[str, int] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.backends: BackendIndex = discover_backends(
            effective_backend_dirs(config.daemon.backends_dirs)
        )

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Prepare the runtime dir, clear scopes left by an earlier run, create owners."""
        prepare_backends_dir(self.config.daemon.runtime_dir / "backends")
        self._records = RecordStore(self.config.daemon.runtime_dir / "state")
        self._footprints = FootprintStore(self._state_dir)
        await self._apply_memory_budget()
        await self._adopt_or_collect()
        for model in self.config.models.values():
            if model.name not in self._owners:
                self._add_owner(model)
        self._start_pressure_relief()

    def _start_pressure_relief(self) -> None:
        """A PSI trigger on modeld.slice wakes the scheduler, which unloads idle models."""
        path = self._pressure_path
        if path is None:
            log.info("no PSI memory pressure file: pressure relief is off")
            return
        try:
            self.pressure = PressureTrigger(
                path,
                stall_us=self._scheduler.hysteresis.stall_us(PRESSURE_WINDOW_US),
                window_us=PRESSURE_WINDOW_US,
                on_pressure=self._scheduler.pressure,
                on_gone=lambda: log.warning("%s is gone: pressure relief is off", path),
            )
        except OSError as err:
            log.warning("cannot watch %s for memory pressure (%s): relief is off", path, err)
            return
        log.info(
            "memory pressure relief on %s (trigger: %d ms of stall per %d s)",
            path,
            self.pressure.stall_us // 1000,
            self.pressure.window_us // 1_000_000,
        )

    async def _apply_memory_budget(self) -> None:
        """The budget for all backends together is also the limit of modeld.slice."""
        try:
            await self._systemd.set_memory_max(SLICE, self.config.daemon.memory_budget)
        except SystemdError as err:
            log.warning("%s; the budget is not enforced by the kernel", err)

    async def _adopt_or_collect(self) -> None:
        """Re-adopt the backends an earlier modeld left running; stop the rest of its scopes.

        A scope is adopted when its record matches it, its model is still configured, its
        process is still in it and answers Health; anything else is stopped.
        """
        records = self._records.load_all()
        for unit, state in await self._systemd.list_units([f"{UNIT_PREFIX}*.scope"]):
            parsed = parse_scope_name(unit)
            if parsed is None:
                continue
            escaped, generation = parsed
            self._generations[escaped] = max(self._generations.get(escaped, 0), generation)
            record = records.pop(unit, None)
            model = self.config.models.get(record.model) if record else None
            if (
                record is not None
                and model is not None
                and model.name not in self._owners
                and state == "active"
                and record.pid in await self._systemd.unit_pids(unit)
            ):
                owner = self._add_owner(model)
                with contextlib.suppress(ModeldError):
                    if await owner.adopt(record):
                        continue
            else:
                log.warning("stopping %s left behind by an earlier modeld", unit)
                await self._systemd.stop_unit(unit)
                await self._systemd.unref_unit(unit)
            self._records.remove(unit)
        for unit in records:
            self._records.remove(unit)

    def _add_owner(self, model: ModelConfig) -> ModelOwner:
        context = OwnerContext(
            systemd=self._systemd,
            cgroups=self._cgroups,
            runtime_dir=self.config.daemon.runtime_dir,
            stall_timeout=self.config.daemon.load_stall_timeout,
            stop_timeout=self.config.daemon.stop_timeout,
            resolve_backend=self.backends.resolve,
            default_user=self._default_user,
            memory_ceiling=self.config.daemon.memory_budget,
            records=self._records,
            footprints=self._footprints,
            log_relay=self.config.daemon.backend_log_fields,
            restart=self._restart,
        )
        # Everything the owner logs (its task and what that starts) is about this model.
        owner = attributed_to(
            model.name,
            lambda: ModelOwner(
                model,
                context,
                self,
                last_generation=self._generations.get(unit_escape(model.name), 0),
            ),
        )
        self._owners[model.name] = owner
        self._scheduler.track(model, owner.status)
        return owner

    async def shutdown(self) -> None:
        """Stop every backend (reason ``shutdown``) and end the owners."""
        await self._stop_background()
        await asyncio.gather(*(owner.close() for owner in self._owners.values()))

    async def _stop_background(self) -> None:
        if self.pressure is not None:
            self.pressure.close()
        await self._scheduler.close()
        for task in list(self._tasks):
            task.cancel()

    async def detach(self) -> None:
        """End the owners but leave every backend running (modeld is being restarted)."""
        await self._stop_background()
        await asyncio.gather(*(owner.detach() for owner in self._owners.values()))

    async def reload(self, config: Config) -> tuple[list[str], list[str]]:
        """Switch to ``config``: returns (added, removed) model names.

        Removed models are unloaded first; changed models use their new settings from
        their next load on. ``max_loaded`` goes back to the configured value: a runtime
        ``MaxLoaded`` write lasts until the next reload.
        """
        removed = [name for name in self._owners if name not in config.models]
        added = [name for name in config.models if name not in self._owners]
        for name in removed:
            self._scheduler.forget(name)
            owner = self._owners.pop(name)
            await owner.close()
        self.config = config
        self.max_loaded = config.daemon.max_loaded
        self._scheduler.set_policy(SchedulerPolicy.from_daemon(config.daemon))
        await self._apply_memory_budget()
        self.backends = discover_backends(effective_backend_dirs(config.daemon.backends_dirs))
        for name, model in config.models.items():
            if name in self._owners:
                self._owners[name].reconfigure(model)
                self._scheduler.track(model)
            else:
                self._add_owner(model)
        return added, removed

    # ---------------------------------------------------------------------- views

    def owner(self, name: str) -> ModelOwner:
        owner = self._owners.get(name)
        if owner is None:
            raise NoSuchModel(f"no model named {shown(name)} is configured")
        return owner

    def owners(self) -> Iterable[ModelOwner]:
        return self._owners.values()

    def status(self, name: str) -> ModelStatus:
        return self.owner(name).status

    def loaded_count(self) -> int:
        return sum(1 for o in self._owners.values() if o.status.state.occupies_slot)

    def memory_used(self) -> int:
        total = 0
        for owner in self._owners.values():
            if owner.status.control_group:
                total += self._cgroups.memory_current(owner.status.control_group) or 0
        return total

    def unit_of(self, name: str) -> str:
        """The scope unit of ``name``'s backend ("" when none or not configured)."""
        owner = self._owners.get(name)
        return owner.status.unit if owner is not None else ""

    def memory_current(self, name: str) -> int:
        control_group = self.status(name).control_group
        if not control_group:
            return 0
        return self._cgroups.memory_current(control_group) or 0

    # ------------------------------------------------ OwnerObserver (fan-out)

    def on_status_changed(self, change: StatusChange) -> None:
        self._scheduler.status_changed(change)
        self._observer.on_status_changed(change)

    def on_loaded(self, model: str) -> None:
        self._observer.on_loaded(model)

    def on_unloaded(self, model: str, reason: str) -> None:
        self._observer.on_unloaded(model, reason)

    def _spawn(self, work: Awaitable[object], name: str) -> None:
        async def run() -> None:
            await work

        task = asyncio.create_task(run(), name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------------- requests

    async def load(self, name: str, *, force: bool = False) -> asyncio.Future[None]:
        """Admit a load of ``name`` (evicting as the engine says); returns its completion.

        ``force`` lets it evict busy models; without it a load waits for them up to
        ``eviction_retries * eviction_retry_interval``, then fails with Busy.
        """
        daemon = self.config.daemon
        owner = self.owner(name)
        backend = owner.config.backend
        found = self.backends.resolve(backend)
        if found is None:
            raise NoSuchBackend(
                f"model {name} uses backend {backend!r}, which is not installed in"
                f" {', '.join(str(d) for d in effective_backend_dirs(daemon.backends_dirs))}"
            )
        if found.unavailable is not None:
            raise NoSuchBackend(
                f"model {name} uses backend {backend!r}, which cannot run here: {found.unavailable}"
            )
        return asyncio.ensure_future(await self._scheduler.load(name, force=force))

    def set_max_loaded(self, value: int) -> None:
        """Cap loaded models at ``value`` (0: no cap) until the next reload."""
        self.max_loaded = value
        self._scheduler.set_policy(
            SchedulerPolicy.from_daemon(self.config.daemon, max_loaded=value)
        )

    def _restart(self, name: str) -> None:
        """Load ``name`` again after a crash, through admission like any other load."""

        async def restart() -> None:
            try:
                await (await self.load(name))
            except ModeldError as err:
                log.warning("restarting %s failed: %s", name, err)

        self._spawn(restart(), f"restart:{name}")

    def preload(self, previous: Config | None = None) -> list[str]:
        """Start the preloads (``preload = true``); returns their names, in name order.

        Without ``previous`` (at start, after re-adoption): every preload model. After a
        reload from ``previous``: the preload models it adds or newly marks ``preload``;
        those that were preload models before are left as they are, loaded or not.

        Each is an ordinary load nobody waits for (a D-Bus ``Load`` without ``wait``), asked
        of the scheduler in name order: the policy decides, so a later one may evict an
        earlier one (``max_loaded``) and a pin can refuse one. A refusal is logged and
        published as the model's LastError; a load that fails is published by its owner
        (``failed``, LastError, the failure cooldown) like any other.
        """
        names = []
        for name, model in self.config.models.items():
            before = previous.models.get(name) if previous is not None else None
            if model.preload and (before is None or not before.preload):
                names.append(name)
                self._spawn(self._preload(name), f"preload:{name}")
        return names

    async def _preload(self, name: str) -> None:
        log.info("preloading %s", name, extra={"model": name})
        try:
            done = await self.load(name)
        except ModeldError as err:
            log.warning("preload of %s refused: %s", name, err, extra={"model": name})
            owner = self._owners.get(name)
            if owner is not None and not isinstance(err, InCooldown):  # LastError has its cause
                owner.report_refused_load(f"preload refused: {err}")
            return
        try:
            await done
        except ModeldError as err:  # its owner published it
            log.warning("preload of %s failed: %s", name, err, extra={"model": name})

    async def unload(
        self, name: str, *, force: bool = False, manage: bool = False
    ) -> asyncio.Future[None]:
        """Ask ``name``'s owner for an unload (see :meth:`ModelOwner.request_unload`)."""
        return await self.owner(name).request_unload("requested", force=force, manage=manage)

    def set_pinned(self, name: str, pinned: bool) -> None:
        self.owner(name).set_pinned(pinned)

    def queue(self, name: str) -> RequestQueue:
        """The request queue of ``name`` (resized for the next requests after a reload)."""
        config = self.owner(name).config
        queue = self._queues.get(name)
        if queue is None or queue.resized(config.parallel, config.max_queue):
            queue = RequestQueue(name, config.parallel, config.max_queue)
            self._queues[name] = queue
        return queue

    def queue_figures(self, name: str) -> tuple[int, int]:
        """(waiting, running) requests of ``name``'s queue; reading creates nothing."""
        queue = self._queues.get(name)
        return (queue.waiting, queue.running) if queue is not None else (0, 0)

    @contextlib.asynccontextmanager
    async def serving(self, name: str) -> AsyncIterator[Ticket]:
        """Serve one request of ``name``: the block holds its place until it ends.

        Raises NoSuchModel, or QueueFull when ``max_queue`` requests already wait. The
        request counts as use of the model from here (so the model is not evicted while it
        waits to load or for a ``parallel`` slot) until the block ends; the busy timeout
        measures it from when it gets its slot (:meth:`Ticket.client`).
        """
        owner = self.owner(name)
        queue = self.queue(name)
        queue.enter()
        request = owner.begin_request()
        ticket = Ticket(self, owner, queue, request)
        try:
            yield ticket
        finally:
            queue.leave(had_slot=ticket.has_slot)
            owner.end_request(request)

    async def acquire(self, name: str, holder_uid: int | None = None) -> Lease:
        """Load ``name`` if needed and hand out a lease fd that keeps it in use; while it
        is open, ``holder_uid`` may connect to the backend's socket (the endpoint)."""
        owner = self.owner(name)
        lease = owner.open_lease(holder_uid)
        try:
            await (await self.load(name))
        except BaseException:
            owner.close_lease(lease)
            raise
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        ours.setblocking(False)
        loop = asyncio.get_running_loop()

        def on_released() -> None:
            with contextlib.suppress(BlockingIOError):
                if ours.recv(64):
                    return
            loop.remove_reader(ours.fileno())
            ours.close()
            owner.close_lease(lease)

        loop.add_reader(ours.fileno(), on_released)
        return Lease(endpoint=owner.status.endpoint, client_fd=theirs.detach())

    def status_line(self) -> str:
        """One line for systemd's STATUS=: what is loaded."""
        serving = [o for o in self._owners.values() if o.status.state is not ModelState.UNLOADED]
        parts = [f"{o.name} ({o.status.state})" for o in serving]
        loaded = self.loaded_count()
        head = f"{loaded} of {len(self._owners)} models loaded"
        return head + (": " + ", ".join(parts) if parts else "")
