"""Owners decide whether their model may go: requests, leases and pins against evictions.

Real reference backend processes, a fake systemd (no sandbox), no sleeps: tests wait on
the owner's published events.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from fakes import FakeSystemd, model_config

from modeld.core.effects import EvictionRefused
from modeld.core.states import ModelState
from modeld.discovery import BUILTIN_BACKENDS_DIR, discover_backends
from modeld.errors import InCooldown, LoadFailed, PinnedModel
from modeld.rpc import backend_pb2
from modeld.supervisor import owner as owner_module
from modeld.supervisor.backend_run import OwnerContext
from modeld.supervisor.owner import ModelOwner
from modeld.supervisor.records import RecordStore
from modeld.supervisor.status import StatusChange
from modeld.system.cgroup import CgroupLayout

DEMO = Path(__file__).resolve().parents[2] / "service" / "modeld" / "data" / "demo.txt"


class Observer:
    """Records what owners commit; ``wait`` blocks on the next event, never on a timer."""

    def __init__(self) -> None:
        self.changes: list[StatusChange] = []
        self.unloads: list[tuple[str, str]] = []
        self._event = asyncio.Event()

    def on_status_changed(self, change: StatusChange) -> None:
        self.changes.append(change)
        self._event.set()

    def on_loaded(self, model: str) -> None:
        self._event.set()

    def on_unloaded(self, model: str, reason: str) -> None:
        self.unloads.append((model, reason))
        self._event.set()

    def states(self, model: str) -> list[ModelState]:
        return [c.after.state for c in self.changes if c.model == model and c.state_changed]

    async def wait(self, predicate: Callable[[], bool]) -> None:
        while not predicate():
            self._event.clear()
            await asyncio.wait_for(self._event.wait(), 30)


class Host:
    """Owners on a fake systemd, sharing one runtime directory."""

    def __init__(self, tmp: Path) -> None:
        runtime = tmp / "run"
        (runtime / "backends").mkdir(parents=True)
        self.tmp = tmp
        self.systemd = FakeSystemd()
        self.observer = Observer()
        self.restarts: list[str] = []
        self.context = OwnerContext(
            systemd=self.systemd,
            cgroups=CgroupLayout.detect(),
            runtime_dir=runtime,
            stall_timeout=60,
            stop_timeout=5,
            resolve_backend=discover_backends([BUILTIN_BACKENDS_DIR]).resolve,
            default_user=None,
            records=RecordStore(runtime / "state"),
            restart=self.restarts.append,
        )
        self.owners: list[ModelOwner] = []

    def owner(self, name: str, text: str = "") -> ModelOwner:
        config = model_config(self.tmp, name, f'model = "{DEMO}"\n{text}')
        owner = ModelOwner(config, self.context, self.observer)
        self.owners.append(owner)
        return owner

    async def loaded(self, name: str, text: str = "") -> ModelOwner:
        owner = self.owner(name, text)
        await (await owner.request_load())
        return owner

    async def close(self) -> None:
        for owner in self.owners:
            await owner.close()


@contextlib.asynccontextmanager
async def host(tmp: Path) -> AsyncIterator[Host]:
    h = Host(tmp)
    try:
        yield h
    finally:
        await h.close()
    assert h.systemd.scopes == {}, "a scope was left behind"


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(scenario(), 60))


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_request_in_flight_makes_the_owner_refuse_an_unforced_eviction(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with host(tmp_path) as h:
            a = await h.loaded("a")
            pid = a.status.main_pid
            request = a.begin_request()
            with pytest.raises(EvictionRefused, match="a has 1 request"):
                await a.evict("lru")
            assert a.status.state is ModelState.BUSY
            assert alive(pid)
            a.end_request(request)
            await a.evict("lru")
            assert a.status.state is ModelState.UNLOADED
            assert h.observer.unloads == [("a", "lru")]
            assert not alive(pid)

    run(scenario)


def test_the_race_of_the_issue_a_request_accepted_in_the_same_turn_as_the_eviction(
    tmp_path: Path,
) -> None:
    """Reproduction from the issue: begin_request, then an eviction, in one loop turn.

    Before owners decided, admission's forced unload took the model down with the request
    in flight (busy -> unloading -> unloaded, reason lru).
    """

    async def scenario() -> None:
        async with host(tmp_path) as h:
            a = await h.loaded("a")
            request = a.begin_request()
            eviction = a.evict("lru")
            with pytest.raises(EvictionRefused):
                await eviction
            assert ModelState.UNLOADING not in h.observer.states("a")
            assert h.observer.unloads == []
            a.end_request(request)

    run(scenario)


def test_an_eviction_that_comes_first_wins_and_the_request_waits_for_the_next_load(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        async with host(tmp_path) as h:
            a = await h.loaded("a")
            eviction = a.evict("lru")
            request = a.begin_request()
            await eviction
            await h.observer.wait(lambda: a.status.in_flight == 1)
            assert a.status.state is ModelState.UNLOADED  # the request is still counted
            await (await a.request_load())
            assert a.status.state is ModelState.BUSY  # and holds the model it waited for
            with pytest.raises(EvictionRefused):
                await a.evict("lru")
            a.end_request(request)
            await h.observer.wait(lambda: a.status.state is ModelState.READY)

    run(scenario)


def test_a_forced_eviction_interrupts_work_but_never_a_pin(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with host(tmp_path) as h:
            a = await h.loaded("a")
            request = a.begin_request()
            a.request_running(request)
            a.set_pinned(True)
            with pytest.raises(EvictionRefused, match="a is pinned"):
                await a.evict("lru", force=True)
            a.set_pinned(False)
            await a.evict("lru", force=True)
            assert h.observer.unloads == [("a", "lru")]
            a.end_request(request)

    run(scenario)


def test_a_pin_refuses_an_explicit_unload_unless_the_caller_may_manage(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with host(tmp_path) as h:
            a = await h.loaded("a", "pinned = true\n")
            with pytest.raises(PinnedModel, match="a is pinned: only a caller authorized"):
                await a.request_unload("requested")
            with pytest.raises(PinnedModel):
                await a.request_unload("requested", force=True)
            assert a.status.state is ModelState.READY
            lease = a.open_lease()
            done = await a.request_unload("requested", manage=True)
            await h.observer.wait(lambda: a.status.in_flight == 1)
            assert not done.done()  # waits for the lease, pinned or not
            assert a.status.state is ModelState.BUSY
            a.close_lease(lease)
            await done
            assert h.observer.unloads == [("a", "requested")]

    run(scenario)


def test_a_pin_set_while_unloads_wait_refuses_those_of_callers_who_may_not_manage(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        async with host(tmp_path) as h:
            a = await h.loaded("a")
            lease = a.open_lease()
            use_only = await a.request_unload("requested")
            managed = await a.request_unload("requested", manage=True)
            a.set_pinned(True)
            with pytest.raises(PinnedModel, match="a is pinned"):
                await use_only
            assert not managed.done()
            a.close_lease(lease)
            await managed
            assert h.observer.unloads == [("a", "requested")]

    run(scenario)


def test_a_lease_outlives_the_busy_timeout_and_still_blocks_eviction(tmp_path: Path) -> None:
    """Leases are use, not work: a model held only by a lease is never busy-timed-out.

    The clock is a second model with the same busy_timeout and a request that runs on it
    from after the lease was opened: once that one is killed, the lease is older than the
    busy timeout too.
    """

    async def scenario() -> None:
        async with host(tmp_path) as h:
            text = 'busy_timeout = "0.5s"\noptions.Options = ["predict_delay=60"]\n'
            held = await h.loaded("held", text)
            clock = await h.loaded("clock", text)
            lease = held.open_lease()
            await h.observer.wait(lambda: held.status.state is ModelState.BUSY)
            request = clock.begin_request()
            clock.request_running(request)
            assert clock.client is not None
            predict = asyncio.ensure_future(
                clock.client.predict(backend_pb2.PredictOptions(Prompt="x", Tokens=1))
            )
            await h.observer.wait(lambda: ("clock", "busy-timeout") in h.observer.unloads)
            await asyncio.gather(predict, return_exceptions=True)  # cut off with its backend
            clock.end_request(request)
            assert held.status.state is ModelState.BUSY
            assert all(model != "held" for model, _ in h.observer.unloads)
            with pytest.raises(EvictionRefused, match="1 lease"):
                await held.evict("lru")
            used_before = held.status.last_used_us
            held.close_lease(lease)
            await h.observer.wait(lambda: held.status.state is ModelState.READY)
            assert held.status.last_used_us > used_before  # released: LastUsed refreshed
            await held.evict("lru")

    run(scenario)


@pytest.mark.parametrize(("healthy_run", "failures"), [(0.0, 1), (3600.0, 2)])
def test_the_restart_backoff_starts_over_after_a_healthy_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, healthy_run: float, failures: int
) -> None:
    monkeypatch.setattr(owner_module, "HEALTHY_RUN", healthy_run)

    async def scenario() -> None:
        async with host(tmp_path) as h:
            a = h.owner("a", 'restart = "on-failure"\noptions.Options = ["crash_after=0.2"]\n')
            for crashes in (1, 2):
                await (await a.request_load())
                await h.observer.wait(
                    lambda n=crashes: h.observer.unloads.count(("a", "crashed")) == n  # type: ignore[misc]
                )
            assert a._failures_in_a_row == failures

    run(scenario)


def test_a_failed_load_starts_a_cooldown_that_force_skips_and_a_new_config_ends(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        async with host(tmp_path) as h:
            broken = 'options.Options = ["fail_load=no weights"]\n'
            a = h.owner("a", broken)
            with pytest.raises(LoadFailed, match="no weights"):
                await (await a.request_load())
            first = a.status.retry_after_us
            assert first / 1e6 - time.time() == pytest.approx(10, abs=2)
            with pytest.raises(InCooldown, match=r"a: its last load failed .* again in 1\ds"):
                await a.request_load()
            assert [c for c in h.systemd.calls if c[0] == "start_scope"] == [
                ("start_scope", "modeld-backend-a-1.scope")
            ]  # refused at once: nothing was started
            with pytest.raises(LoadFailed, match="no weights"):
                await (await a.request_load(force=True))
            assert (a.status.retry_after_us - first) / 1e6 == pytest.approx(10, abs=2)  # 20 s
            a.reconfigure(model_config(tmp_path, "a", f'model = "{DEMO}"\n'))
            await (await a.request_load())
            assert a.status.state is ModelState.READY
            assert a.status.retry_after_us == 0

    run(scenario)


def test_lease_holders_may_reach_the_private_socket_while_their_lease_is_open(
    tmp_path: Path,
) -> None:
    from modeld.system.acl import ACL_XATTR, decode_users

    def users(path: Path) -> dict[int, int]:
        try:
            return decode_users(os.getxattr(path, ACL_XATTR))
        except OSError:
            return {}

    async def scenario() -> None:
        async with host(tmp_path) as h:
            early = h.owner("a")
            lease = early.open_lease(holder_uid=4242)  # before the backend exists
            await (await early.request_load(after=None, gpu="", force=False))
            socket = Path(early.status.endpoint.removeprefix("unix:"))
            assert users(socket) == {4242: 6} and users(socket.parent) == {4242: 1}
            second = early.open_lease(holder_uid=4343)
            await h.observer.wait(lambda: early.status.in_flight == 2)
            assert users(socket) == {4242: 6, 4343: 6}
            early.close_lease(lease)
            early.close_lease(second)
            await h.observer.wait(lambda: early.status.in_flight == 0)
            assert users(socket) == {} and users(socket.parent) == {}
            root = early.open_lease(holder_uid=0)  # root needs no entry
            await h.observer.wait(lambda: early.status.in_flight == 1)
            assert users(socket) == {}
            early.close_lease(root)

    run(scenario)
