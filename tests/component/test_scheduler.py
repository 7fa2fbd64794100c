"""The scheduler against recording effects: what it asks of owners, and what it does when
an owner refuses. No owners, no processes, no sleeps: tests settle evictions themselves and
synchronise with ``Scheduler.flush()``."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fakes import FakeMeasurements, RecordingEffects, model_config

from modeld.core.eviction import GpuView, decide_load
from modeld.core.states import ModelState
from modeld.errors import Busy, InCooldown, InsufficientResources, LoadFailed, NoSuchModel
from modeld.supervisor.scheduler import Scheduler, SchedulerPolicy
from modeld.supervisor.status import ModelStatus, StatusChange
from modeld.system.pressure import PressureReading

GiB = 1024**3
READY = ModelState.READY


class World:
    """A scheduler, its recorded effects, and the models' published statuses."""

    def __init__(self, tmp: Path, policy: SchedulerPolicy, **kwargs: Any) -> None:
        self.tmp = tmp
        self.effects = RecordingEffects()
        self.measure = FakeMeasurements()
        self.scheduler = Scheduler(self.effects, self.measure, policy, **kwargs)
        self.statuses: dict[str, ModelStatus] = {}

    def model(self, name: str, text: str = "", **status: Any) -> None:
        self.statuses[name] = ModelStatus(**status)
        self.scheduler.track(model_config(self.tmp, name, text), self.statuses[name])

    def publish(self, name: str, **changes: Any) -> None:
        """The owner of ``name`` commits ``changes``."""
        before = self.statuses[name]
        after = ModelStatus(**{**_fields(before), **changes})
        self.statuses[name] = after
        self.scheduler.status_changed(StatusChange(name, before, after))

    async def evicted(self, name: str) -> None:
        """The owner of ``name`` did the eviction: it publishes the unload, then settles."""
        self.publish(name, state=ModelState.UNLOADING)
        self.publish(name, state=ModelState.UNLOADED, unit="")
        self.effects.settle(name)
        await self.scheduler.flush()


def _fields(status: ModelStatus) -> dict[str, Any]:
    return {name: getattr(status, name) for name in status.__slots__}


@pytest.fixture
def world(tmp_path: Path) -> Iterator[Callable[..., Awaitable[World]]]:
    worlds: list[World] = []

    async def make(policy: SchedulerPolicy | None = None, **kwargs: Any) -> World:
        w = World(tmp_path, policy or SchedulerPolicy(max_loaded=1), **kwargs)
        worlds.append(w)
        return w

    yield make


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(scenario(), 20))


def test_a_load_with_room_starts_at_once_and_replies_with_its_completion(
    world: Callable[..., Awaitable[World]],
) -> None:
    async def scenario() -> None:
        w = await world(SchedulerPolicy(max_loaded=2))
        w.model("a", state=READY, last_used_us=1)
        w.model("b")
        completion = await w.scheduler.load("b")
        assert [e.kind for e in w.effects.effects] == ["start_load"]
        assert completion is w.effects.completions["b"]

    run(scenario)


def test_under_the_cap_the_lru_model_is_evicted_before_the_target_starts(
    world: Callable[..., Awaitable[World]],
) -> None:
    async def scenario() -> None:
        w = await world()
        w.model("a", state=READY, last_used_us=1)
        w.model("b")
        reply = w.scheduler.load("b")
        (eviction,) = await w.effects.wait_for("evict")
        assert (eviction.name, eviction.reason, eviction.force) == ("a", "lru", False)
        await w.scheduler.flush()
        assert not w.effects.kinds("start_load")  # nothing starts before a is gone
        await w.evicted("a")
        await reply
        assert [e.name for e in w.effects.kinds("start_load")] == ["b"]

    run(scenario)


def test_a_refused_eviction_is_decided_again_and_the_load_waits_for_the_model(
    world: Callable[..., Awaitable[World]],
) -> None:
    """The race of the issue: a request begins on a while the scheduler picks it."""

    async def scenario() -> None:
        w = await world()
        w.model("a", state=READY, last_used_us=1)
        w.model("b")
        reply = w.scheduler.load("b")
        await w.effects.wait_for("evict")
        w.publish("a", state=ModelState.BUSY, in_flight=1)  # the request the owner saw
        w.effects.settle("a", refusal="has 1 request(s) in flight")
        await w.scheduler.flush()
        assert len(w.effects.kinds("evict")) == 1  # waits: no second eviction while busy
        assert not w.effects.kinds("start_load")
        assert not reply.done()
        w.publish("a", state=READY, in_flight=0, last_used_us=5)  # the request ended
        (_, again) = await w.effects.wait_for("evict", 2)
        assert (again.name, again.reason, again.force) == ("a", "lru", False)
        await w.evicted("a")
        await reply
        assert [e.name for e in w.effects.kinds("start_load")] == ["b"]

    run(scenario)


def test_a_load_of_the_victim_itself_does_not_deadlock_with_the_refused_admission(
    world: Callable[..., Awaitable[World]],
) -> None:
    """Found by the sandbox race test: b evicts a; a request's load of a waits for b
    (reserved); a's owner refuses (the request) and b now waits for a. The load of a must
    be decided again when b's reservation ends, not only on a status change."""

    async def scenario() -> None:
        w = await world()
        w.model("a", state=READY, last_used_us=1)
        w.model("b")
        b_reply = w.scheduler.load("b")
        await w.effects.wait_for("evict")
        a_reply = w.scheduler.load("a")
        await w.scheduler.flush()
        assert not w.effects.kinds("start_load")  # a is going and b holds the slot
        w.publish("a", state=ModelState.BUSY, in_flight=1)
        w.effects.settle("a", refusal="has 1 request(s) in flight")
        await a_reply  # a stays and is served
        assert [e.name for e in w.effects.kinds("start_load")] == ["a"]
        assert not b_reply.done()  # b waits for a's request

    run(scenario)


def test_crossing_admissions_never_count_a_slot_twice(
    world: Callable[..., Awaitable[World]],
) -> None:
    """Found by the chaos soak (cap exceeded right after a re-adoption): m2's load evicts
    m3; a request's load of m3, which then looks like going, evicts m5 to make room for it.
    m3's owner refuses (the request): m3 stays. m5's eviction no longer makes room for
    anyone, so m2 must not count m5's slot as free: it must evict m0."""

    async def scenario() -> None:
        w = await world(SchedulerPolicy(max_loaded=3))
        w.model("m3", state=READY, last_used_us=1)
        w.model("m5", state=READY, last_used_us=2)
        w.model("m0", state=READY, last_used_us=3)
        w.model("m2")
        m2_reply = w.scheduler.load("m2")
        (first,) = await w.effects.wait_for("evict")
        assert first.name == "m3"
        m3_reply = w.scheduler.load("m3")
        (_, second) = await w.effects.wait_for("evict", 2)
        assert second.name == "m5"
        w.publish("m3", state=ModelState.BUSY, in_flight=1)
        w.publish("m5", state=ModelState.BUSY, in_flight=1)
        w.effects.settle("m3", refusal="has 1 request(s) in flight")
        await w.scheduler.flush()
        assert "m2" not in [e.name for e in w.effects.kinds("start_load")]
        (_, _, third) = await w.effects.wait_for("evict", 3)
        assert third.name == "m0"  # the only idle model makes the room
        w.effects.settle("m5", refusal="has 1 request(s) in flight")
        await m3_reply  # m3 stays and is served
        await w.scheduler.flush()
        assert "m2" not in [e.name for e in w.effects.kinds("start_load")]
        await w.evicted("m0")
        await m2_reply
        assert [e.name for e in w.effects.kinds("start_load")] == ["m3", "m2"]

    run(scenario)


def test_busy_victims_make_the_load_fail_with_busy_after_the_patience(
    world: Callable[..., Awaitable[World]],
) -> None:
    async def scenario() -> None:
        w = await world(SchedulerPolicy(max_loaded=1, patience=0.05))
        w.model("a", state=ModelState.BUSY, in_flight=1, last_used_us=1)
        w.model("b")
        with pytest.raises(Busy, match=r"b needs a evicted but it is still busy after 0\.05s"):
            await w.scheduler.load("b")
        assert w.effects.effects == []

    run(scenario)


def test_force_evicts_a_busy_model_and_tells_the_owner_it_may_interrupt(
    world: Callable[..., Awaitable[World]],
) -> None:
    async def scenario() -> None:
        w = await world()
        w.model("a", state=ModelState.BUSY, in_flight=1, last_used_us=1)
        w.model("b")
        reply = w.scheduler.load("b", force=True)
        (eviction,) = await w.effects.wait_for("evict")
        assert (eviction.name, eviction.force) == ("a", True)
        await w.evicted("a")
        await reply

    run(scenario)


def test_force_eviction_when_busy_in_the_policy_forces_too(
    world: Callable[..., Awaitable[World]],
) -> None:
    async def scenario() -> None:
        w = await world(SchedulerPolicy(max_loaded=1, force_eviction_when_busy=True))
        w.model("a", state=ModelState.BUSY, in_flight=1, last_used_us=1)
        w.model("b")
        w.scheduler.load("b")
        (eviction,) = await w.effects.wait_for("evict")
        assert eviction.force

    run(scenario)


def test_concurrent_loads_of_one_model_join_one_admission(
    world: Callable[..., Awaitable[World]],
) -> None:
    async def scenario() -> None:
        w = await world()
        w.model("a", state=READY, last_used_us=1)
        w.model("b")
        replies = [w.scheduler.load("b") for _ in range(4)]
        await w.effects.wait_for("evict")
        await w.evicted("a")
        completions = await asyncio.gather(*replies)
        assert len(w.effects.kinds("evict")) == 1
        assert len(w.effects.kinds("start_load")) == 1
        assert all(c is w.effects.completions["b"] for c in completions)

    run(scenario)


def test_a_target_whose_evictions_run_holds_its_place_against_other_loads(
    world: Callable[..., Awaitable[World]],
) -> None:
    async def scenario() -> None:
        w = await world()
        w.model("a", state=READY, last_used_us=1)
        w.model("b")
        w.model("c")
        w.scheduler.load("b")
        await w.effects.wait_for("evict")
        c_reply = w.scheduler.load("c")
        await w.scheduler.flush()
        # c sees b loading (busy) and a already going: it waits, evicts nothing
        assert [e.name for e in w.effects.kinds("evict")] == ["a"]
        await w.evicted("a")
        assert [e.name for e in w.effects.kinds("start_load")] == ["b"]
        w.publish("b", state=ModelState.LOADING)
        w.publish("b", state=READY, last_used_us=9)
        (_, second) = await w.effects.wait_for("evict", 2)
        assert second.name == "b"
        await w.evicted("b")
        await c_reply

    run(scenario)


def test_a_pinned_model_in_the_way_is_a_refusal_naming_it(
    world: Callable[..., Awaitable[World]],
) -> None:
    async def scenario() -> None:
        w = await world()
        w.model("keep", state=READY, pinned=True)
        w.model("b")
        with pytest.raises(InsufficientResources, match="pinned"):
            await w.scheduler.load("b")
        assert w.effects.effects == []

    run(scenario)


def test_an_owner_that_refuses_for_a_pin_set_meanwhile_is_not_asked_again(
    world: Callable[..., Awaitable[World]],
) -> None:
    async def scenario() -> None:
        w = await world()
        w.model("a", state=READY, last_used_us=1)
        w.model("b")
        reply = w.scheduler.load("b")
        await w.effects.wait_for("evict")
        w.publish("a", pinned=True)
        w.effects.settle("a", refusal="is pinned")
        with pytest.raises(InsufficientResources, match=r"remaining models are pinned \(a\)"):
            await reply
        assert len(w.effects.kinds("evict")) == 1

    run(scenario)


def test_unknown_and_removed_models(world: Callable[..., Awaitable[World]]) -> None:
    async def scenario() -> None:
        w = await world(SchedulerPolicy(max_loaded=1, patience=30))
        with pytest.raises(NoSuchModel):
            await w.scheduler.load("nope")
        w.model("a", state=ModelState.BUSY, in_flight=1)
        w.model("b")
        reply = w.scheduler.load("b")
        await w.scheduler.flush()
        w.scheduler.forget("b")
        with pytest.raises(NoSuchModel, match="removed"):
            await reply

    run(scenario)


def test_a_lower_cap_set_at_runtime_is_used_by_the_next_decision(
    world: Callable[..., Awaitable[World]],
) -> None:
    async def scenario() -> None:
        w = await world(SchedulerPolicy(max_loaded=0))
        w.model("a", state=READY, last_used_us=1)
        w.model("b", state=READY, last_used_us=2)
        w.model("c")
        w.scheduler.set_policy(SchedulerPolicy(max_loaded=2))
        w.scheduler.load("c")
        (eviction,) = await w.effects.wait_for("evict")
        assert eviction.name == "a"

    run(scenario)


def test_gpu_fit_measures_reports_and_waits_for_the_freed_memory(
    world: Callable[..., Awaitable[World]],
) -> None:
    async def scenario() -> None:
        w = await world(SchedulerPolicy())
        w.measure.devices = (GpuView("GPU-0", total=8 * GiB, free=2 * GiB),)
        w.measure.usage = {"a": {"GPU-0": 5 * GiB}}
        w.model("a", 'gpu_memory = "5G"\n', state=READY, gpu="GPU-0", control_group="/a")
        w.model("b", 'gpu_memory = "6G"\n')
        reply = w.scheduler.load("b")
        (eviction,) = await w.effects.wait_for("evict")
        assert (eviction.name, eviction.reason) == ("a", "gpu-memory")
        reports = w.effects.kinds("report_gpu_memory")
        assert [(r.name, r.used) for r in reports] == [("a", 5 * GiB)]
        await w.evicted("a")
        await reply
        (start,) = w.effects.kinds("start_load")
        assert start.gpu == "GPU-0" and start.after is not None
        await start.after
        assert w.measure.gpu_waits == [("GPU-0", 2 * GiB + 5 * GiB * 0.75)]

    run(scenario)


class PressureFile:
    """A PSI file whose stall ``total`` grows by a second at each read while ``stalling``."""

    def __init__(self) -> None:
        self.total = 0
        self.stalling = False

    def read(self) -> PressureReading:
        if self.stalling:
            self.total += 1_000_000
        return PressureReading(some_avg10=0.0, full_avg10=0.0, some_total_us=self.total)


def test_pressure_unloads_idle_models_lru_first_skipping_refusals_until_relieved(
    world: Callable[..., Awaitable[World]],
) -> None:
    psi = PressureFile()

    async def scenario() -> None:
        w = await world(SchedulerPolicy(), read_pressure=psi.read, pressure_window=0.0)
        w.model("old", state=READY, last_used_us=1)
        w.model("mid", state=READY, last_used_us=2)
        w.model("new", state=READY, last_used_us=3)
        w.model("kept", state=READY, last_used_us=0, pinned=True)
        w.model("busy", state=ModelState.BUSY, in_flight=1, last_used_us=0)
        w.scheduler.pressure()
        (first,) = await w.effects.wait_for("evict")
        assert (first.name, first.reason, first.force) == ("old", "pressure", False)
        w.publish("old", in_flight=1, state=ModelState.BUSY)
        w.effects.settle("old", refusal="has 1 request(s) in flight")
        (_, second) = await w.effects.wait_for("evict", 2)
        assert second.name == "mid"  # the refused one is skipped, not retried in a loop
        psi.stalling = True  # still stalling after that eviction: go on
        await w.evicted("mid")
        (_, _, third) = await w.effects.wait_for("evict", 3)
        assert third.name == "new"
        psi.stalling = False
        await w.evicted("new")  # no more stall: relief ends
        await w.scheduler.flush()
        assert len(w.effects.kinds("evict")) == 3
        assert not w.scheduler.hysteresis.relieving

    run(scenario)


def test_pressure_with_nothing_idle_to_unload_does_nothing(
    world: Callable[..., Awaitable[World]],
) -> None:
    async def scenario() -> None:
        w = await world(SchedulerPolicy(), read_pressure=PressureFile().read)
        w.model("kept", state=READY, pinned=True)
        w.model("busy", state=ModelState.BUSY, in_flight=2)
        w.scheduler.pressure()
        await w.scheduler.flush()
        assert w.effects.effects == []

    run(scenario)


def test_an_internal_error_fails_the_load_and_the_scheduler_goes_on(
    world: Callable[..., Awaitable[World]],
) -> None:
    calls: list[str] = []

    def broken_once(target: str, *args: Any) -> Any:
        calls.append(target)
        if len(calls) == 1:
            raise RuntimeError("boom")
        return decide_load(target, *args)

    async def scenario() -> None:
        w = await world(SchedulerPolicy(), decide=broken_once)
        w.model("a")
        with pytest.raises(LoadFailed, match=r"internal error in modeld's scheduler \(boom\)"):
            await w.scheduler.load("a")
        await w.scheduler.load("a")  # the next load is decided normally
        assert [e.name for e in w.effects.kinds("start_load")] == ["a"]

    run(scenario)


def test_a_model_in_cooldown_is_refused_at_once_unless_forced(
    world: Callable[..., Awaitable[World]],
) -> None:
    async def scenario() -> None:
        w = await world()
        w.model("a", state=READY, last_used_us=1)
        later = time.time_ns() // 1000 + 30_000_000
        w.model("b", state=ModelState.FAILED, last_error="LoadModel failed", retry_after_us=later)
        with pytest.raises(InCooldown, match=r"b: its last load failed \(LoadModel failed\)"):
            await w.scheduler.load("b")
        assert w.effects.effects == []  # nothing evicted for a load that cannot happen
        w.scheduler.load("b", force=True)
        (eviction,) = await w.effects.wait_for("evict")
        assert eviction.name == "a"
        await w.evicted("a")
        (start,) = w.effects.kinds("start_load")
        assert start.force  # the owner is told too: it decides again

    run(scenario)
