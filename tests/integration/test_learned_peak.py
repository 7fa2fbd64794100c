"""Kernel-measured footprints with real systemd, D-Bus and cgroups: a model's MemoryPeak is
learned when its backend unloads (announced with PropertiesChanged), survives a restart of
modeld in its state directory, and admits the model under a budget its memory_max alone
would exceed."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import pytest
from busclient import SignalRecorder, connect
from sandbox import Sandbox
from sandbox.deploy import Modeld, deploy, reference_model

pytestmark = pytest.mark.systemd

MiB = 1024**2
ALLOC = ("alloc_mb=100",)
MODELS = {
    "fed": reference_model(memory_max="600M", options=ALLOC),
    "twin": reference_model(memory_max="600M", options=ALLOC),  # same, never unloaded
}


@pytest.fixture(scope="module")
def modeld(sandbox: Sandbox, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Modeld]:
    deployment = deploy(
        sandbox, tmp_path_factory.mktemp("modeld-peak"), MODELS, daemon='memory_budget = "1G"\n'
    )
    yield deployment
    deployment.stop()
    sandbox.remove_units(["modeld.service", "modeld.socket", "modeld.slice"])


def unload_recording_peak(modeld: Modeld, name: str) -> list[int]:
    """Unload ``name``; the MemoryPeak values its PropertiesChanged signals announced."""
    path = modeld.model_path(name)

    async def scenario() -> list[int]:
        async with connect(modeld.sandbox.bus_address) as bus:
            recorder = await SignalRecorder(bus).start()
            await asyncio.to_thread(modeld.unload, name)

            def announced() -> list[int]:
                return [
                    body[1]["MemoryPeak"].value
                    for signal_path, member, body in recorder.signals
                    if signal_path == path
                    and member == "PropertiesChanged"
                    and "MemoryPeak" in body[1]
                ]

            await recorder.wait_for(lambda: announced() and "unloaded" in recorder.states(path))
            return announced()

    return asyncio.run(scenario())


def test_the_peak_is_learned_on_unload_kept_across_restarts_and_admits_the_model(
    modeld: Modeld,
) -> None:
    modeld.load("fed")
    assert modeld.prop("fed", "MemoryPeak") == 0  # nothing learned before it unloads
    assert modeld.prop("fed", "MemoryCurrent") > 100 * MiB
    announced = unload_recording_peak(modeld, "fed")
    peak = modeld.prop("fed", "MemoryPeak")
    assert announced == [peak]
    assert 100 * MiB < peak < 600 * MiB, "not the backend's use (alloc_mb=100)"
    saved = json.loads(modeld.sandbox.exec("cat", "/var/lib/modeld/footprints.json").stdout)
    assert saved["fed"]["memory_peak"] == peak
    assert "twin" not in saved

    modeld.stop()
    modeld.start()
    assert modeld.prop("fed", "MemoryPeak") == peak, "the learned peak did not persist"
    assert modeld.prop("twin", "MemoryPeak") == 0

    modeld.daemon = 'memory_budget = "500M"\n'  # below both models' memory_max (600M)
    modeld.restart()
    refused = modeld.load("twin", check=False)
    assert refused.returncode != 0
    assert "twin needs 600.0 MiB of memory (memory_max) but the budget" in refused.stderr
    modeld.load("fed")  # admitted by its learned peak + margin
    assert modeld.prop("fed", "State") == "ready"
    assert modeld.prop("fed", "MemoryMax") == 600 * MiB  # still the scope's limit
    assert modeld.prop("fed", "MemoryPeak") == peak
    modeld.unload("fed")
