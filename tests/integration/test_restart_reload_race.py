"""A Reload that arrives while modeld is being restarted is refused, and the restart ends
on its own (found by the chaos soak: a reload during the detach left modeld hanging until
systemd's stop timeout killed it)."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
from sandbox import Sandbox
from sandbox.deploy import Modeld, reference_model

pytestmark = pytest.mark.systemd


@pytest.fixture(scope="module")
def modeld(sandbox: Sandbox, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Modeld]:
    deployment = Modeld(
        sandbox,
        tmp_path_factory.mktemp("modeld-restart-reload"),
        models={f"rr{i}": reference_model() for i in range(3)},
    )
    with deployment.deployed():
        yield deployment


def test_reloads_racing_a_restart_neither_hang_it_nor_lose_a_backend(modeld: Modeld) -> None:
    sb = modeld.sandbox
    modeld.load("rr0")
    modeld.load("rr1")
    pids = {name: modeld.prop(name, "MainPID") for name in ("rr0", "rr1")}
    before = sb.journal(unit="modeld.service").count("timed out. Killing")
    stop = threading.Event()
    answers: list[str] = []

    def reload_until_stopped() -> None:
        while not stop.is_set():
            proc = modeld.call("Reload", check=False, timeout=20)
            answers.append("ok" if not hasattr(proc, "returncode") else proc.stderr.strip())

    spammer = threading.Thread(target=reload_until_stopped)
    spammer.start()
    try:
        for _ in range(3):
            sb.systemctl("restart", "modeld.service", timeout=60)
            modeld.http_get("/healthz")
    finally:
        stop.set()
        spammer.join(60)
    assert sb.journal(unit="modeld.service").count("timed out. Killing") == before
    assert sb.show("modeld.service", "Result") == "success"
    assert {name: modeld.prop(name, "MainPID") for name in pids} == pids  # re-adopted
    assert "ok" in answers  # reloads did run between the restarts
    modeld.unload("rr0")
    modeld.unload("rr1")
    assert modeld.scopes() == []
