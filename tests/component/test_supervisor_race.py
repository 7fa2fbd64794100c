"""The supervisor (scheduler + owners) with real backends on a fake systemd: a request on A
races a load of B under a cap of 1. Without force, A is never unloaded while its request
runs and every request completes; with force, the load wins and the cut-off request fails
with the backend's error. The real-systemd version of this test hammers it for many more
rounds (tests/integration/test_eviction_race.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

from fakes import FakeSystemd

from modeld.config import load_config
from modeld.rpc import backend_pb2
from modeld.supervisor.registry import Supervisor
from modeld.supervisor.status import StatusChange

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
                await client.stub.Predict(backend_pb2.PredictOptions(Prompt="The sea", Tokens=4))
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
