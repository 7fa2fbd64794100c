"""Learned footprints in the supervisor: owners record the peak memory of a backend that
served when it goes; the scheduler admits a model by its learned peak.

Owners run real reference backends on a fake systemd whose scopes have cgroups in a fake
cgroupfs (a directory the test writes ``memory.peak`` and ``memory.current`` into); the
scheduler runs against recording effects. No sleeps: tests wait on published events.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from fakes import FakeMeasurements, FakeSystemd, RecordingEffects, model_config

from modeld.core.states import ModelState
from modeld.discovery import BUILTIN_BACKENDS_DIR, discover_backends
from modeld.errors import InsufficientResources, LoadFailed
from modeld.naming import scope_name
from modeld.supervisor.backend_run import OwnerContext
from modeld.supervisor.footprints import FootprintStore, footprint_key
from modeld.supervisor.owner import ModelOwner
from modeld.supervisor.records import RecordStore
from modeld.supervisor.scheduler import Scheduler, SchedulerPolicy
from modeld.supervisor.status import ModelStatus, StatusChange
from modeld.system.cgroup import CgroupLayout

DEMO = Path(__file__).resolve().parents[2] / "service" / "modeld" / "data" / "demo.txt"
M = 1024**2
G = 1024**3


class ScopedSystemd(FakeSystemd):
    """A fake systemd whose scopes report a ControlGroup under modeld.slice."""

    async def unit_property(self, unit: str, interface: str, name: str) -> Any:
        if name == "ControlGroup":
            return f"/modeld.slice/{unit}"
        return await super().unit_property(unit, interface, name)


class Host:
    def __init__(self, tmp: Path, state_dir: Path | None) -> None:
        runtime = tmp / "run"
        (runtime / "backends").mkdir(parents=True)
        self.tmp = tmp
        self.cgroupfs = tmp / "cgroupfs"
        self.state_dir = state_dir or tmp / "state"
        self.systemd = ScopedSystemd()
        self.changes: list[StatusChange] = []
        self._event = asyncio.Event()
        self.footprints = FootprintStore(self.state_dir)
        self.context = OwnerContext(
            systemd=self.systemd,
            cgroups=CgroupLayout(memory_root=self.cgroupfs, unified=True),
            runtime_dir=runtime,
            stall_timeout=60,
            stop_timeout=5,
            resolve_backend=discover_backends([BUILTIN_BACKENDS_DIR]).resolve,
            default_user=None,
            records=RecordStore(runtime / "state"),
            footprints=self.footprints,
        )
        self.owners: list[ModelOwner] = []

    # OwnerObserver
    def on_status_changed(self, change: StatusChange) -> None:
        self.changes.append(change)
        self._event.set()

    def on_loaded(self, model: str) -> None:
        self._event.set()

    def on_unloaded(self, model: str, reason: str) -> None:
        self._event.set()

    async def wait(self, predicate: Callable[[], bool]) -> None:
        while not predicate():
            self._event.clear()
            await asyncio.wait_for(self._event.wait(), 30)

    def owner(self, name: str, text: str = "") -> ModelOwner:
        config = model_config(self.tmp, name, f'model = "{DEMO}"\nmemory_max = "1G"\n{text}')
        owner = ModelOwner(config, self.context, self)
        self.owners.append(owner)
        return owner

    def kernel_reports(self, owner: ModelOwner, unit: str = "", **files: int) -> None:
        """Write the cgroup files of the owner's scope (or ``unit``'s): ``peak=`` is
        memory.peak, ``current=`` memory.current."""
        group = f"/modeld.slice/{unit}" if unit else owner.status.control_group
        directory = self.cgroupfs / group.lstrip("/")
        directory.mkdir(parents=True, exist_ok=True)
        for name, value in files.items():
            (directory / f"memory.{name}").write_text(f"{value}\n")

    async def close(self) -> None:
        for owner in self.owners:
            await owner.close()


@contextlib.asynccontextmanager
async def host(tmp: Path, state_dir: Path | None = None) -> AsyncIterator[Host]:
    h = Host(tmp, state_dir)
    try:
        yield h
    finally:
        await h.close()


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(scenario(), 60))


def test_the_owner_records_the_scopes_peak_on_unload_and_it_persists(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with host(tmp_path) as h:
            a = h.owner("a")
            assert a.status.memory_peak == 0
            await (await a.request_load())
            assert a.status.control_group.endswith(a.status.unit)
            h.kernel_reports(a, peak=150 * M, current=120 * M)
            assert a.status.memory_peak == 0  # learned when the backend goes, not before
            await (await a.request_unload("requested"))
            assert a.status.state is ModelState.UNLOADED
            assert a.status.memory_peak == 150 * M
            published = [c for c in h.changes if c.after.memory_peak != c.before.memory_peak]
            assert [c.after.memory_peak for c in published] == [150 * M]
            assert published[0].after.state is ModelState.UNLOADING  # before it is unloaded

            await (await a.request_load())  # a second run that touched less
            h.kernel_reports(a, peak=90 * M)
            await a.evict("memory")
            assert a.status.memory_peak == 150 * M, "the highest peak is kept"

        assert FootprintStore(h.state_dir).memory_peak("a", footprint_key(a.config)) == 150 * M
        async with host(tmp_path / "restarted", state_dir=h.state_dir) as again:
            assert again.owner("a").status.memory_peak == 150 * M
            assert again.owner("b").status.memory_peak == 0

    run(scenario)


def test_without_memory_peak_the_highest_use_seen_is_recorded(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with host(tmp_path) as h:
            a = h.owner("a")
            await (await a.request_load())
            h.kernel_reports(a, current=90 * M)
            request = a.begin_request()
            a.end_request(request)
            await h.wait(lambda: any(c.before.in_flight > c.after.in_flight for c in h.changes))
            h.kernel_reports(a, current=40 * M)  # it gave memory back before the unload
            await (await a.request_unload("requested"))
            assert a.status.memory_peak == 90 * M

    run(scenario)


def test_a_failed_load_teaches_nothing_and_a_new_configuration_forgets(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with host(tmp_path) as h:
            broken = h.owner("broken", 'options.Options = ["fail_load=no weights"]\n')
            h.kernel_reports(broken, unit=scope_name("broken", 1), peak=150 * M)
            with pytest.raises(LoadFailed):
                await (await broken.request_load())
            assert broken.status.memory_peak == 0
            assert h.footprints.get("broken", footprint_key(broken.config)) is None

            a = h.owner("a")
            first = a.config
            wider = model_config(h.tmp, "a", f'model = "{DEMO}"\nmemory_max = "2G"\n')
            await (await a.request_load())
            h.kernel_reports(a, peak=150 * M)
            a.reconfigure(wider)  # the running backend keeps the old settings
            await (await a.request_unload("requested"))
            assert a.status.memory_peak == 0, "a peak measured under the old memory_max"
            assert h.footprints.get("a", footprint_key(first)) is None

            a.reconfigure(first)
            await (await a.request_load())
            h.kernel_reports(a, peak=150 * M)
            await (await a.request_unload("requested"))
            assert a.status.memory_peak == 150 * M
            a.reconfigure(wider)
            await h.wait(lambda: a.status.memory_peak == 0)
            a.reconfigure(first)
            await h.wait(lambda: a.status.memory_peak == 150 * M)
            idle = model_config(
                h.tmp, "a", f'model = "{DEMO}"\nmemory_max = "1G"\nidle_timeout = "1h"\n'
            )
            a.reconfigure(idle)
            a.set_pinned(True)  # handled after the reconfiguration: something to wait for
            await h.wait(lambda: a.status.pinned)
            assert a.status.memory_peak == 150 * M, "a scheduling setting dropped the peak"

    run(scenario)


# -- the scheduler ---------------------------------------------------------------------------


def test_the_scheduler_admits_a_model_by_its_learned_peak(tmp_path: Path) -> None:
    """memory_max alone (2G) is over the 1G budget: refused at once; the learned peak (200M)
    fits. With another model using 600M, a learned 100M needs no eviction where its
    800M limit would."""

    async def scenario() -> None:
        effects, measure = RecordingEffects(), FakeMeasurements()
        scheduler = Scheduler(effects, measure, SchedulerPolicy(memory_budget=1 * G))
        try:
            statuses: dict[str, ModelStatus] = {}

            def track(name: str, text: str, **status: Any) -> None:
                statuses[name] = ModelStatus(**status)
                scheduler.track(model_config(tmp_path, name, text), statuses[name])

            def learn(name: str, peak: int) -> None:
                before = statuses[name]
                statuses[name] = ModelStatus(**{**_fields(before), "memory_peak": peak})
                scheduler.status_changed(StatusChange(name, before, statuses[name]))

            track("big", 'memory_max = "2G"\n')
            with pytest.raises(InsufficientResources, match=r"2\.0 GiB of memory \(memory_max\)"):
                await scheduler.load("big")
            learn("big", 200 * M)
            await scheduler.load("big")
            assert [e.name for e in effects.kinds("start_load")] == ["big"]

            measure.memory["/modeld.slice/a"] = 600 * M
            track("a", "", state=ModelState.READY, control_group="/modeld.slice/a")
            track("lean", 'memory_max = "800M"\n', memory_peak=100 * M)
            track("wide", 'memory_max = "800M"\n')
            await scheduler.load("lean")
            assert [e.name for e in effects.kinds("start_load")] == ["big", "lean"]
            assert effects.kinds("evict") == []
            await scheduler.flush()
            wide = scheduler.load("wide")  # the control: by its limit it needs room
            (eviction,) = await effects.wait_for("evict")
            assert (eviction.name, eviction.reason) == ("a", "memory")
            wide.cancel()
        finally:
            await scheduler.close()

    run(scenario)


def _fields(status: ModelStatus) -> dict[str, Any]:
    return {name: getattr(status, name) for name in status.__slots__}
