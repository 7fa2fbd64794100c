"""Preloads with real systemd, D-Bus and HTTP: ``preload = true`` models load when modeld
starts (after READY, which they never delay, and after re-adoption) and when a reload adds
or newly marks them; a preload that fails or is refused is reported on its model while
modeld stays up and serves."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from busclient import SignalRecorder, call, connect
from dbus_next.aio.message_bus import MessageBus
from sandbox import Sandbox
from sandbox.deploy import Modeld, deploy, reference_model

pytestmark = pytest.mark.systemd

PRELOAD = "preload = true\n"
UNITS = ["modeld.service", "modeld.socket", "modeld.slice"]


@pytest.fixture
def cleanup(sandbox: Sandbox) -> Iterator[list[Modeld]]:
    """Deployments the test makes are stopped afterwards, leaving nothing behind."""
    deployments: list[Modeld] = []
    yield deployments
    for deployment in deployments:
        deployment.stop()
    sandbox.remove_units(UNITS)
    for deployment in deployments:
        assert deployment.scopes() == []
        assert deployment.backend_processes() == []


def path_of(name: str) -> str:
    return f"/org/modeld1/model/{name}"


async def get(bus: MessageBus, name: str, prop: str) -> Any:
    reply = await call(
        bus,
        "Get",
        "ss",
        ["org.modeld1.Model", prop],
        path=path_of(name),
        interface="org.freedesktop.DBus.Properties",
    )
    assert reply.error_name is None, reply.body
    return reply.body[0].value


def changed(recorder: SignalRecorder, name: str, prop: str) -> list[Any]:
    """The values of ``prop`` announced by PropertiesChanged on ``name``, in order."""
    return [
        body[1][prop].value
        for path, member, body in recorder.signals
        if path == path_of(name) and member == "PropertiesChanged" and prop in body[1]
    ]


async def until(
    bus: MessageBus,
    recorder: SignalRecorder,
    name: str,
    prop: str,
    holds: Callable[[Any], bool],
    timeout: float = 30.0,
) -> Any:
    """Wait until ``name``'s ``prop`` satisfies ``holds``: read once (the recorder already
    listens, so no change is missed), then on its PropertiesChanged signals."""
    value = await get(bus, name, prop)
    if holds(value):
        return value
    await recorder.wait_for(lambda: any(holds(v) for v in changed(recorder, name, prop)), timeout)
    return next(v for v in changed(recorder, name, prop) if holds(v))


def test_a_preload_model_loads_after_ready_and_is_kept_over_a_restart(
    sandbox: Sandbox, tmp_path: Path, cleanup: list[Modeld]
) -> None:
    modeld = Modeld(
        sandbox,
        tmp_path,
        models={
            "preloaded": reference_model(options=("load_delay=6",), extra=PRELOAD),
            "plain": reference_model(),
        },
    )
    cleanup.append(modeld)
    modeld.stop()
    modeld.install()
    sandbox.systemctl("start", "modeld.socket")
    sandbox.systemctl("start", "modeld.service")  # Type=notify: returns at READY=1

    # READY came while the preload still loads (6 s inside LoadModel), with no Load call.
    assert modeld.prop("preloaded", "State") == "loading"
    assert modeld.prop("plain", "State") == "unloaded"

    async def scenario() -> tuple[int, int, int]:
        async with connect(sandbox.bus_address) as bus:
            recorder = await SignalRecorder(bus).start()
            await until(bus, recorder, "preloaded", "State", lambda s: s == "ready")
            pid = await get(bus, "preloaded", "MainPID")
            recorder.signals.clear()
            # A restart re-adopts the backend (before the model objects are exported: no
            # signal); the preload then joins it as loaded, which announces a new LastUsed.
            await asyncio.to_thread(sandbox.systemctl, "restart", "modeld.service")
            await recorder.wait_for(lambda: changed(recorder, "preloaded", "LastUsed"))
            return (
                pid,
                await get(bus, "preloaded", "MainPID"),
                await get(bus, "preloaded", "LoadCount"),
            )

    pid, pid_after_restart, load_count = asyncio.run(scenario())
    assert pid_after_restart == pid
    assert load_count == 1
    assert modeld.prop("preloaded", "State") == "ready"
    journal = sandbox.journal(unit="modeld.service")
    assert journal.count("preloading preloaded") == 2
    assert f"re-adopted {modeld.prop('preloaded', 'Unit')}" in journal
    assert sandbox.journal(identifier="preloaded").count("listening on") == 1
    assert modeld.prop("plain", "State") == "unloaded"


def test_a_reload_loads_the_preload_models_it_adds_or_newly_marks(
    sandbox: Sandbox, tmp_path: Path, cleanup: list[Modeld]
) -> None:
    modeld = deploy(sandbox, tmp_path, {"a": reference_model(), "b": reference_model()})
    cleanup.append(modeld)
    assert modeld.prop("a", "State") == "unloaded"
    (modeld.models_dir / "a.toml").write_text(reference_model(extra=PRELOAD))
    (modeld.models_dir / "fresh.toml").write_text(reference_model(extra=PRELOAD))

    async def scenario() -> None:
        async with connect(sandbox.bus_address) as bus:
            recorder = await SignalRecorder(bus).start()
            reply = await call(bus, "Reload")
            assert reply.error_name is None, reply.body
            await recorder.wait_for(
                lambda: (
                    "ready" in recorder.states(path_of("fresh"))
                    and "ready" in recorder.states(path_of("a"))
                )
            )

    asyncio.run(scenario())
    assert modeld.prop("fresh", "LoadCount") == 1
    assert modeld.prop("a", "LoadCount") == 1
    assert modeld.prop("b", "State") == "unloaded"
    assert len(modeld.scopes()) == 2


def test_a_failed_preload_is_reported_on_the_model_and_modeld_serves(
    sandbox: Sandbox, tmp_path: Path, cleanup: list[Modeld]
) -> None:
    modeld = deploy(
        sandbox,
        tmp_path,
        {
            "broken": reference_model(
                options=("fail_load=the weights are corrupt",), extra=PRELOAD
            ),
            "orphan": 'backend = "nope"\n' + PRELOAD,
            "plain": reference_model(),
        },
    )
    cleanup.append(modeld)

    async def scenario() -> tuple[str, str]:
        async with connect(sandbox.bus_address) as bus:
            recorder = await SignalRecorder(bus).start()
            await until(bus, recorder, "broken", "State", lambda s: s == "failed")
            orphan = await until(bus, recorder, "orphan", "LastError", bool)
            return await get(bus, "broken", "LastError"), orphan

    broken, orphan = asyncio.run(scenario())
    assert "the weights are corrupt" in broken
    assert modeld.prop("broken", "RetryAfter") > time.time() * 1e6  # the failure cooldown
    assert orphan.startswith("preload refused: model orphan uses backend 'nope'")
    assert modeld.prop("orphan", "State") == "unloaded"

    assert sandbox.show("modeld.service", "ActiveState") == "active"
    status, body = modeld.http_post(
        "/v1/completions", {"model": "plain", "prompt": "The sea", "max_tokens": 4}
    )
    assert status == 200 and body["usage"]["completion_tokens"] == 4
    journal = sandbox.journal(unit="modeld.service")
    assert "preload of broken failed" in journal
    assert "preload of orphan refused" in journal
