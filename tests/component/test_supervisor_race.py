"""The supervisor (scheduler + owners) with real backends on a fake systemd: a request on A
races a load of B under a cap of 1. Without force, A is never unloaded while its request
runs and every request completes; with force, the load wins and the cut-off request fails
with the backend's error. The real-systemd version of this test hammers it for many more
rounds (tests/integration/test_eviction_race.py)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from fakes import FakeSystemd

from modeld.config import load_config
from modeld.rpc import backend_pb2
from modeld.supervisor.registry import Supervisor
from modeld.supervisor.status import StatusChange
from modeld.system.systemd import ScopeSpec

DEMO = Path(__file__).resolve().parents[2] / "service" / "modeld" / "data" / "demo.txt"
ROUNDS = 6


class Watch:
    """Observer that checks, at the moment A is unloaded, whether a request runs on it."""

    def __init__(self) -> None:
        self.running_on_a = 0
        self.unloads: list[tuple[str, str, int]] = []

    def on_status_changed(self, change: StatusChange) -> None: ...

    def on_loaded(self, model: str) -> None: ...

    def on_unloaded(self, model: str, reason: str) -> None:
        self.unloads.append((model, reason, self.running_on_a if model == "a" else 0))


def configure(tmp: Path) -> Path:
    models = tmp / "models.d"
    models.mkdir()
    for name in ("a", "b"):
        (models / f"{name}.toml").write_text(
            f'backend = "reference"\nmodel = "{DEMO}"\noptions.Options = ["predict_delay=0.05"]\n'
        )
    daemon = tmp / "modeld.toml"
    daemon.write_text(
        f'[daemon]\nmodels_dir = "{models}"\nruntime_dir = "{tmp / "run"}"\n'
        f'backends_dirs = []\nmax_loaded = 1\nmemory_budget = "infinity"\n'
    )
    return daemon


async def one_round(supervisor: Supervisor, watch: Watch, *, force: bool) -> BaseException | None:
    """A request on A and a load of B, started in the same loop turn; the request's error."""
    await (await supervisor.load("a", force=True))

    async def request() -> None:
        async with supervisor.serving("a") as ticket:
            client = await ticket.client()
            watch.running_on_a += 1
            try:
                await client.predict(backend_pb2.PredictOptions(Prompt="The sea", Tokens=4))
            finally:
                watch.running_on_a -= 1

    async def load_b() -> None:
        await (await supervisor.load("b", force=force))

    outcome, loaded = await asyncio.gather(request(), load_b(), return_exceptions=True)
    assert loaded is None, f"loading b failed: {loaded!r}"
    return outcome


def run(tmp: Path, scenario: Callable[[Supervisor, Watch], Awaitable[None]]) -> FakeSystemd:
    systemd = FakeSystemd()

    async def main() -> None:
        config = load_config(configure(tmp), host_memory=16 * 1024**3)
        watch = Watch()
        supervisor = Supervisor(config, systemd, watch, watch_pressure=False)
        await supervisor.start()
        try:
            await scenario(supervisor, watch)
        finally:
            await supervisor.shutdown()

    asyncio.run(asyncio.wait_for(main(), 120))
    return systemd


def test_without_force_a_is_never_evicted_while_its_request_runs(tmp_path: Path) -> None:
    async def scenario(supervisor: Supervisor, watch: Watch) -> None:
        for _ in range(ROUNDS):
            assert await one_round(supervisor, watch, force=False) is None
        a_unloads = [u for u in watch.unloads if u[0] == "a"]
        assert len(a_unloads) == ROUNDS  # b evicted a every round: after its request
        assert all(running == 0 for _, _, running in a_unloads), watch.unloads

    systemd = run(tmp_path, scenario)
    assert systemd.scopes == {}


def test_with_force_the_load_wins_and_a_cut_off_request_fails_honestly(tmp_path: Path) -> None:
    async def scenario(supervisor: Supervisor, watch: Watch) -> None:
        for _ in range(ROUNDS // 2):
            outcome = await one_round(supervisor, watch, force=True)
            a_unload = [u for u in watch.unloads if u[0] == "a"][-1]
            assert a_unload[1] == "lru"
            if a_unload[2]:  # evicted mid-request: the request saw it
                assert outcome is not None
        assert supervisor.status("b").state.serving

    systemd = run(tmp_path, scenario)
    assert systemd.scopes == {}


class SlowScopeSystemd(FakeSystemd):
    """A systemd that creates the scope (holding modeld's reference, as AddRef does) but
    answers StartTransientUnit only when told: an unload arrives in between."""

    def __init__(self) -> None:
        super().__init__()
        self.asked = asyncio.Event()
        self.answer = asyncio.Event()
        self.referenced: set[str] = set()

    async def start_scope(self, spec: ScopeSpec, pid: int) -> None:
        await super().start_scope(spec, pid)
        self.referenced.add(spec.unit)
        self.asked.set()
        await self.answer.wait()

    async def unref_unit(self, unit: str) -> None:
        await super().unref_unit(unit)
        self.referenced.discard(unit)


def test_an_unload_during_the_scope_start_drops_the_scope_too(tmp_path: Path) -> None:
    """Regression (found by the D-Bus fuzz test): a load cancelled while systemd was creating
    its scope left that scope loaded in systemd (failed: Result=resources), referenced by
    modeld, for ever: a scope without a model."""
    systemd = SlowScopeSystemd()

    async def main() -> None:
        config = load_config(configure(tmp_path), host_memory=16 * 1024**3)
        watch = Watch()
        supervisor = Supervisor(config, systemd, watch, watch_pressure=False)
        await supervisor.start()
        try:
            loaded = await supervisor.load("a")
            await asyncio.wait_for(systemd.asked.wait(), 30)
            unload = asyncio.ensure_future(supervisor.unload("a", force=True))
            await asyncio.sleep(0.2)  # let the unload cancel the load (it waits on systemd)
            systemd.answer.set()
            await unload
            with contextlib.suppress(Exception):
                await loaded
            assert not supervisor.status("a").state.serving
        finally:
            await supervisor.shutdown()

    asyncio.run(asyncio.wait_for(main(), 120))
    assert systemd.referenced == set(), systemd.calls
    assert ("stop_unit", "modeld-backend-a-1.scope") in systemd.calls


class StubbornScopeSystemd(SlowScopeSystemd):
    """As SlowScopeSystemd, and a cancelled StartTransientUnit call takes a while to end."""

    def __init__(self) -> None:
        super().__init__()
        self.cancelled = asyncio.Event()
        self.let_go = asyncio.Event()

    async def start_scope(self, spec: ScopeSpec, pid: int) -> None:
        try:
            await super().start_scope(spec, pid)
        except asyncio.CancelledError:
            self.cancelled.set()
            await self.let_go.wait()
            raise


@pytest.mark.filterwarnings("ignore::ResourceWarning")
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_restart_while_an_unload_cancels_a_load_ends(tmp_path: Path) -> None:
    """Regression (found by the D-Bus fuzz test, calls racing ``systemctl restart``): the
    owner, cancelled by detach() while it waited for its cancelled load to end, swallowed its
    own cancellation and ran on, so modeld never finished stopping. (detach() lets go of the
    backend's Popen while it runs, as a restart does: hence the ResourceWarning.)"""
    systemd = StubbornScopeSystemd()

    async def main() -> None:
        config = load_config(configure(tmp_path), host_memory=16 * 1024**3)
        watch = Watch()
        supervisor = Supervisor(config, systemd, watch, watch_pressure=False)
        await supervisor.start()
        await supervisor.load("a")
        await asyncio.wait_for(systemd.asked.wait(), 30)
        unload = asyncio.ensure_future(supervisor.unload("a", force=True))
        await asyncio.wait_for(systemd.cancelled.wait(), 30)
        detach = asyncio.ensure_future(supervisor.detach())
        await asyncio.sleep(0.1)
        systemd.let_go.set()
        await asyncio.wait_for(detach, 10)
        unload.cancel()
        for unit, pid in systemd.scopes.items():  # detached: left running, as for a restart
            for process in (pid, *systemd.specs[unit].extra_pids):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process, signal.SIGKILL)
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(process, 0)

    asyncio.run(asyncio.wait_for(main(), 60))
    gc.collect()  # the released Popen's warning, here, where it is ignored
