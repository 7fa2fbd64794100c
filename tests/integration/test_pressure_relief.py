"""Memory pressure on modeld.slice (real PSI stalls) makes modeld unload idle models."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from busclient import SignalRecorder, connect
from sandbox import Sandbox
from sandbox.deploy import REPO, Modeld, deploy, reference_model

pytestmark = pytest.mark.systemd

MODELS = {
    "old": reference_model(),
    "new": reference_model(),
    "kept": reference_model(extra="pinned = true\n"),
}


@pytest.fixture
def modeld(sandbox: Sandbox, tmp_path: Path) -> Iterator[Modeld]:
    deployment = deploy(sandbox, tmp_path, MODELS)
    yield deployment
    deployment.stop()
    sandbox.remove_units(["modeld.service", "modeld.socket", "modeld.slice"])


def test_pressure_on_the_slice_unloads_idle_models_lru_first(modeld: Modeld) -> None:
    sb = modeld.sandbox
    for name in ("kept", "old", "new"):
        modeld.load(name)
    journal = sb.journal(unit="modeld.service")
    assert "memory pressure relief on /sys/fs/cgroup/" in journal
    assert "modeld.slice/memory.pressure" in journal

    async def scenario() -> list[tuple[str, str]]:
        async with connect(sb.bus_address) as bus:
            recorder = await SignalRecorder(bus).start()
            load = asyncio.create_task(
                asyncio.to_thread(
                    sb.exec,
                    "systemd-run",
                    "--scope",
                    "--quiet",
                    "--slice=modeld.slice",
                    "--unit=pressure-load",
                    sys.executable,
                    str(REPO / "tests" / "pressure_load.py"),
                    "--seconds",
                    "10",
                    "--limit-mib",
                    "32",
                    "--file-mib",
                    "256",
                    "--ballast-mib",
                    "24",
                    input="\n",
                    timeout=60,
                )
            )
            await recorder.wait_for(lambda: recorder.unloaded("old"), 30)
            await load
            return [
                (body[0], body[2])
                for _p, member, body in recorder.signals
                if member == "ModelUnloaded"
            ]

    unloads = asyncio.run(scenario())
    assert unloads[0] == ("old", "pressure")  # least recently used first
    assert ("kept", "pressure") not in unloads  # pinned models stay
    assert modeld.prop("kept", "State") == "ready"
    assert "ms after the pressure event" in sb.journal(unit="modeld.service")
