"""The supervisor: one owner per configured model; it routes requests to them.

Loads go through :mod:`modeld.supervisor.admission` (the eviction engine); requests are
counted in flight through the owners while they are served.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Iterable
from dataclasses import dataclass

from modeld.config import Config, ModelConfig
from modeld.core.eviction import Limits, decide_load
from modeld.core.states import ModelState
from modeld.discovery import BackendIndex, discover_backends, effective_backend_dirs
from modeld.errors import LoadFailed, ModeldError, NoSuchBackend, NoSuchModel, SystemdError
from modeld.naming import SLICE, UNIT_PREFIX, parse_scope_name, unit_escape
from modeld.supervisor.admission import Admission, DecideFunction
from modeld.supervisor.backend_client import BackendClient
from modeld.supervisor.backend_run import OwnerContext
from modeld.supervisor.owner import ModelOwner, OwnerObserver
from modeld.supervisor.pressure_relief import PressureRelief
from modeld.supervisor.records import RecordStore
from modeld.supervisor.status import ModelStatus, StatusChange
from modeld.system.cgroup import CgroupLayout
from modeld.system.gpu import GpuProbe, NullProbe
from modeld.system.inotify import DirectoryWatch
from modeld.system.pressure import pressure_file
from modeld.system.systemd import Systemd

log = logging.getLogger(__name__)


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
        systemd: Systemd,
        observer: OwnerObserver,
        *,
        cgroups: CgroupLayout | None = None,
        default_user: str | None = None,
        gpu: GpuProbe | None = None,
        decide: DecideFunction = decide_load,
    ) -> None:
        self.config = config
        self._systemd = systemd
        self._observer = observer
        self._cgroups = cgroups or CgroupLayout.detect()
        self._default_user = default_user
        self._owners: dict[str, ModelOwner] = {}
        self.gpu = gpu or NullProbe()
        self._admission = Admission(self._owners, self._cgroups, self.gpu, decide)
        self._parallel: dict[str, tuple[int, asyncio.Semaphore]] = {}
        self.pressure: PressureRelief | None = None
        self._generations: dict[str, int] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.backends: BackendIndex = discover_backends(
            effective_backend_dirs(config.daemon.backends_dirs)
        )
        self.max_loaded = config.daemon.max_loaded

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Prepare the runtime dir, clear scopes left by an earlier run, create owners."""
        backends_dir = self.config.daemon.runtime_dir / "backends"
        backends_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(backends_dir, 0o1733)
        self._sockets = DirectoryWatch(backends_dir)
        self._records = RecordStore(self.config.daemon.runtime_dir / "state")
        await self._apply_memory_budget()
        await self._adopt_or_collect()
        for model in self.config.models.values():
            if model.name not in self._owners:
                self._add_owner(model)
        self._start_pressure_relief()

    def _start_pressure_relief(self) -> None:
        path = pressure_file("/" + SLICE)
        if path is None:
            log.info("no PSI memory pressure file: pressure relief is off")
            return
        try:
            self.pressure = PressureRelief(path, self._owners)
        except OSError as err:
            log.warning("cannot watch %s for memory pressure (%s): relief is off", path, err)

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
            sockets=self._sockets,
            records=self._records,
            restart=self._restart,
        )
        owner = ModelOwner(
            model,
            context,
            self,
            last_generation=self._generations.get(unit_escape(model.name), 0),
        )
        self._owners[model.name] = owner
        return owner

    async def shutdown(self) -> None:
        """Stop every backend (reason ``shutdown``) and end the owners."""
        self._stop_background()
        await asyncio.gather(*(owner.close() for owner in self._owners.values()))

    def _stop_background(self) -> None:
        if self.pressure is not None:
            self.pressure.close()
        for task in list(self._tasks):
            task.cancel()
        self._sockets.close()

    async def detach(self) -> None:
        """End the owners but leave every backend running (modeld is being restarted)."""
        self._stop_background()
        await asyncio.gather(*(owner.detach() for owner in self._owners.values()))

    async def reload(self, config: Config) -> tuple[list[str], list[str]]:
        """Switch to ``config``: returns (added, removed) model names.

        Removed models are unloaded first; changed models use their new settings from
        their next load on.
        """
        removed = [name for name in self._owners if name not in config.models]
        added = [name for name in config.models if name not in self._owners]
        for name in removed:
            owner = self._owners.pop(name)
            await owner.close()
        self.config = config
        self.max_loaded = config.daemon.max_loaded
        await self._apply_memory_budget()
        self.backends = discover_backends(effective_backend_dirs(config.daemon.backends_dirs))
        for name, model in config.models.items():
            if name in self._owners:
                self._owners[name].reconfigure(model)
            else:
                self._add_owner(model)
        return added, removed

    # ---------------------------------------------------------------------- views

    def owner(self, name: str) -> ModelOwner:
        owner = self._owners.get(name)
        if owner is None:
            raise NoSuchModel(f"no model named {name!r} is configured")
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

    def memory_current(self, name: str) -> int:
        control_group = self.status(name).control_group
        if not control_group:
            return 0
        return self._cgroups.memory_current(control_group) or 0

    # ------------------------------------------------ OwnerObserver (fan-out)

    def on_status_changed(self, change: StatusChange) -> None:
        before, after = change.before, change.after
        if (before.state, before.in_flight, before.pinned) != (
            after.state,
            after.in_flight,
            after.pinned,
        ):
            self._admission.state_changed()
        self._observer.on_status_changed(change)

    def on_loaded(self, model: str) -> None:
        self._observer.on_loaded(model)
        if self._owners[model].status.gpu:
            self._spawn(self._admission.gpu_snapshot(), f"gpu-usage:{model}")

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
        limits = Limits(
            max_loaded=self.max_loaded,
            memory_budget=daemon.memory_budget,
            force_busy=force or daemon.force_eviction_when_busy,
        )
        patience = daemon.eviction_retries * daemon.eviction_retry_interval
        owner = self.owner(name)
        backend = owner.config.backend
        if self.backends.resolve(backend) is None:
            raise NoSuchBackend(
                f"model {name} uses backend {backend!r}, which is not installed in"
                f" {', '.join(str(d) for d in effective_backend_dirs(daemon.backends_dirs))}"
            )
        return await self._admission.admit(owner, limits, patience)

    def _restart(self, name: str) -> None:
        """Load ``name`` again after a crash, through admission like any other load."""

        async def restart() -> None:
            try:
                await (await self.load(name))
            except ModeldError as err:
                log.warning("restarting %s failed: %s", name, err)

        self._spawn(restart(), f"restart:{name}")

    async def unload(self, name: str, *, force: bool = False) -> asyncio.Future[None]:
        return await self.owner(name).request_unload("requested", force=force)

    def set_pinned(self, name: str, pinned: bool) -> None:
        self.owner(name).set_pinned(pinned)

    def set_max_loaded(self, value: int) -> None:
        """Cap the number of loaded models (0 = unlimited) until the next reload."""
        self.max_loaded = value

    def _semaphore(self, owner: ModelOwner) -> asyncio.Semaphore:
        """At most ``parallel`` requests reach a backend at once; more wait here."""
        parallel = owner.config.parallel
        current = self._parallel.get(owner.name)
        if current is None or current[0] != parallel:
            current = (parallel, asyncio.Semaphore(parallel))
            self._parallel[owner.name] = current
        return current[1]

    @contextlib.asynccontextmanager
    async def serving(self, name: str) -> AsyncIterator[BackendClient]:
        """Serve one request: load ``name`` if needed and count the request in flight.

        The request counts from the moment it is accepted (so the model is not evicted
        while the request waits for it) until the block ends.
        """
        owner = self.owner(name)
        async with self._semaphore(owner):
            request = owner.begin_request()
            try:
                await (await self.load(name))
                client = owner.client
                if client is None:
                    raise LoadFailed(f"{name} went away before the request could be served")
                yield client
            finally:
                owner.end_request(request)

    async def acquire(self, name: str) -> Lease:
        """Load ``name`` if needed and hand out a lease fd that keeps it in use."""
        owner = self.owner(name)
        request = owner.begin_request()
        try:
            await (await self.load(name))
        except BaseException:
            owner.end_request(request)
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
            owner.end_request(request)

        loop.add_reader(ours.fileno(), on_released)
        return Lease(endpoint=owner.status.endpoint, client_fd=theirs.detach())

    def status_line(self) -> str:
        """One line for systemd's STATUS=: what is loaded."""
        serving = [o for o in self._owners.values() if o.status.state is not ModelState.UNLOADED]
        parts = [f"{o.name} ({o.status.state})" for o in serving]
        loaded = self.loaded_count()
        head = f"{loaded} of {len(self._owners)} models loaded"
        return head + (": " + ", ".join(parts) if parts else "")
