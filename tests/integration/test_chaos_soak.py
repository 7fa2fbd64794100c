"""The chaos soak against a real modeld in the sandbox (issue 8, item 4).

CI runs it for ``MODELD_SOAK_SECONDS`` (default 75 s, plus the 16-backend re-adoption
measurement); ``MODELD_SOAK_SECONDS=3600`` soaks for an hour. ``MODELD_SOAK_SEED`` picks
the random schedule (default 8). The numbers are printed as JSON (``-s`` shows them) and
written to ``$MODELD_SOAK_REPORT`` when set.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from sandbox import Sandbox
from sandbox.deploy import Modeld, deploy
from soak.chaos import DAEMON, Chaos, soak_models

pytestmark = pytest.mark.systemd

SECONDS = float(os.environ.get("MODELD_SOAK_SECONDS", "75"))
SEED = int(os.environ.get("MODELD_SOAK_SEED", "8"))


@pytest.fixture(scope="module")
def modeld(sandbox: Sandbox, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Modeld]:
    deployment = deploy(
        sandbox, tmp_path_factory.mktemp("modeld-soak"), soak_models(), daemon=DAEMON
    )
    yield deployment
    deployment.stop()
    sandbox.remove_units(["modeld.service", "modeld.socket", "modeld.slice"])


def test_chaos_soak_loses_nothing(modeld: Modeld) -> None:
    report = asyncio.run(Chaos(modeld, SECONDS, SEED).main())
    text = json.dumps(report, indent=2)
    print(text)
    if os.environ.get("MODELD_SOAK_REPORT"):
        Path(os.environ["MODELD_SOAK_REPORT"]).write_text(text + "\n")
    assert report["invariant_violations"] == 0, report["violations"]
    assert report["leaks"] == [], report["leaks"]
    assert report["operations_total"] > 50
    faults = report["faults_injected"]
    for kind in ("kill -9 backend", "memory hog (alloc over memory_max)", "kill -9 modeld"):
        assert faults.get(kind, 0) >= 1, (kind, faults)
    assert faults["systemctl restart modeld"] >= 2
    assert report["outcomes"].get("hog:oom-killed", 0) >= 1
    assert report["crash_detection_latency_s"]["count"] >= 1
    assert report["readoption_16_backends"]["restart"]["readopted"] == 16
    assert report["readoption_16_backends"]["kill -9"]["readopted"] == 16
