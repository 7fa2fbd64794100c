"""Preloads (``preload = true``) on a real supervisor: real reference backends, a fake
systemd, no sleeps (tests wait on the owners' status events).

A preload is an ordinary load nobody waits for: the scheduler admits the preloads in name
order and its policy decides; a refusal is published as the model's LastError, a failed
load as any failed load (failed, LastError, the failure cooldown).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path

from fakes import FakeSystemd
from front import Watch, reference_model

from modeld.config import Config, load_config
from modeld.core.states import ModelState
from modeld.supervisor.registry import Supervisor
from modeld.supervisor.status import StatusChange

GiB = 1024**3


class Recorder(Watch):
    """A :class:`Watch` that also keeps the order in which models started loading."""

    def __init__(self) -> None:
        super().__init__()
        self.loading: list[str] = []

    def on_status_changed(self, change: StatusChange) -> None:
        if change.state_changed and change.after.state is ModelState.LOADING:
            self.loading.append(change.model)
        super().on_status_changed(change)

    def state(self, model: str) -> ModelState:
        status = self.status.get(model)
        return status.state if status else ModelState.UNLOADED

    def error(self, model: str) -> str:
        status = self.status.get(model)
        return status.last_error if status else ""


def configure(root: Path, models: Mapping[str, str], daemon: str = "") -> Config:
    """Write ``models`` (TOML by name; an old file not named is removed) and load them."""
    models_dir = root / "models.d"
    models_dir.mkdir(exist_ok=True)
    for old in models_dir.glob("*.toml"):
        if old.stem not in models:
            old.unlink()
    for name, text in models.items():
        (models_dir / f"{name}.toml").write_text(text)
    path = root / "modeld.toml"
    path.write_text(
        f'[daemon]\nmodels_dir = "{models_dir}"\nruntime_dir = "{root / "run"}"\n'
        f'backends_dirs = []\nmemory_budget = "infinity"\n{daemon}'
    )
    return load_config(path, host_memory=16 * GiB)


def run(config: Config, scenario: Callable[[Supervisor, Recorder], Awaitable[None]]) -> FakeSystemd:
    systemd = FakeSystemd()

    async def main() -> None:
        watch = Recorder()
        supervisor = Supervisor(config, systemd, watch, watch_pressure=False)
        await supervisor.start()
        try:
            await scenario(supervisor, watch)
        finally:
            await supervisor.shutdown()

    asyncio.run(asyncio.wait_for(main(), 120))
    return systemd


PRELOAD = "preload = true\n"


def test_every_preload_model_loads_in_name_order_and_no_other(tmp_path: Path) -> None:
    models = {
        "b": reference_model(extra=PRELOAD),
        "a": reference_model(extra=PRELOAD),
        "c": reference_model(),
    }

    async def scenario(supervisor: Supervisor, watch: Recorder) -> None:
        assert supervisor.preload() == ["a", "b"]
        await watch.until(lambda: watch.state("a").serving and watch.state("b").serving)
        assert watch.loading == ["a", "b"]
        assert supervisor.status("c").state is ModelState.UNLOADED
        assert supervisor.status("a").load_count == supervisor.status("b").load_count == 1

    systemd = run(configure(tmp_path, models), scenario)
    assert systemd.scopes == {}


def test_with_max_loaded_1_the_last_preload_in_name_order_stays(tmp_path: Path) -> None:
    """Documented in README: the second waits for the first to load, then evicts it."""
    models = {"a": reference_model(extra=PRELOAD), "b": reference_model(extra=PRELOAD)}

    async def scenario(supervisor: Supervisor, watch: Recorder) -> None:
        supervisor.preload()
        await watch.until(lambda: watch.state("b").serving)
        assert watch.loading == ["a", "b"]
        assert watch.unloads == [("a", "lru")]
        assert supervisor.status("a").load_count == 1
        assert supervisor.status("a").state is ModelState.UNLOADED

    run(configure(tmp_path, models, "max_loaded = 1\n"), scenario)


def test_a_preload_refused_by_a_pinned_model_is_reported_on_the_model(tmp_path: Path) -> None:
    models = {
        "pin": reference_model(extra='pinned = true\nconcurrency_groups = ["g"]\n'),
        "other": reference_model(extra=PRELOAD + 'concurrency_groups = ["g"]\n'),
        "orphan": 'backend = "nope"\n' + PRELOAD,
    }

    async def scenario(supervisor: Supervisor, watch: Recorder) -> None:
        await (await supervisor.load("pin"))  # as if re-adopted before the preloads start
        assert supervisor.preload() == ["orphan", "other"]
        await watch.until(lambda: bool(watch.error("other") and watch.error("orphan")))
        other = supervisor.status("other")
        assert other.last_error.startswith("preload refused: ")
        assert "without evicting pinned model pin" in other.last_error
        assert other.state is ModelState.UNLOADED
        assert other.retry_after_us == 0  # a refusal is not a failed load: no cooldown
        orphan = supervisor.status("orphan")
        assert orphan.last_error.startswith("preload refused: model orphan uses backend 'nope'")
        assert orphan.state is ModelState.UNLOADED
        assert supervisor.status("pin").state is ModelState.READY
        assert watch.loading == ["pin"]

    run(configure(tmp_path, models), scenario)


def test_a_preload_that_fails_is_failed_with_its_error_and_in_cooldown(tmp_path: Path) -> None:
    models = {
        "broken": reference_model("fail_load=the weights are corrupt", extra=PRELOAD),
        "fine": reference_model(),
    }

    async def scenario(supervisor: Supervisor, watch: Recorder) -> None:
        supervisor.preload()
        await watch.until(lambda: watch.state("broken") is ModelState.FAILED)
        broken = supervisor.status("broken")
        assert "the weights are corrupt" in broken.last_error
        assert not broken.last_error.startswith("preload refused")
        assert broken.retry_after_us > time.time_ns() // 1000
        await (await supervisor.load("fine"))  # the rest serves as before
        assert supervisor.status("fine").state is ModelState.READY

    systemd = run(configure(tmp_path, models), scenario)
    assert systemd.scopes == {}


def test_a_reload_preloads_the_models_it_adds_or_newly_marks(tmp_path: Path) -> None:
    first = configure(tmp_path, {"a": reference_model(extra=PRELOAD), "b": reference_model()})

    async def scenario(supervisor: Supervisor, watch: Recorder) -> None:
        supervisor.preload()
        await watch.until(lambda: watch.state("a").serving)
        await (await supervisor.unload("a"))
        second = configure(
            tmp_path,
            {
                "a": reference_model(extra=PRELOAD),  # preload before: left unloaded
                "b": reference_model(extra=PRELOAD),  # newly marked
                "c": reference_model(extra=PRELOAD),  # added
                "d": reference_model(),  # added, not preload
            },
        )
        await supervisor.reload(second)
        assert supervisor.preload(first) == ["b", "c"]
        await watch.until(lambda: watch.state("b").serving and watch.state("c").serving)
        assert watch.loading == ["a", "b", "c"]
        assert supervisor.status("a").state is ModelState.UNLOADED
        assert supervisor.status("d").state is ModelState.UNLOADED

    systemd = run(first, scenario)
    assert systemd.scopes == {}
