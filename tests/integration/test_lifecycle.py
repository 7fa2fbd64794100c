"""modeld's own lifecycle under systemd: cap, reload, invalid config, watchdog, stop, crash."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from busclient import SignalRecorder, call, connect
from dbus_next.signature import Variant
from sandbox import Sandbox
from sandbox.deploy import Modeld, deploy, reference_model

pytestmark = pytest.mark.systemd

MODELS = {"a": reference_model(), "b": reference_model(), "c": reference_model()}


@pytest.fixture
def modeld(sandbox: Sandbox, tmp_path: Path) -> Iterator[Modeld]:
    deployment = deploy(sandbox, tmp_path, MODELS, daemon='max_loaded = 2\nmemory_budget = "3G"\n')
    yield deployment
    deployment.stop()
    sandbox.remove_units(["modeld.service", "modeld.socket", "modeld.slice"])
    assert deployment.scopes() == []
    assert deployment.backend_processes() == []


def modeld_host_pid(sb: Sandbox) -> int:
    """Host PID of modeld's main process (for signals from the test)."""
    ns_pid = int(sb.show("modeld.service", "MainPID"))
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("NSpid:"):
                ids = line.split()[1:]
                if (
                    len(ids) > 1
                    and int(ids[-1]) == ns_pid
                    and "modeld" in (entry / "cmdline").read_text()
                ):
                    return int(entry.name)
    raise AssertionError(f"no host process for namespace pid {ns_pid}")


def test_the_cap_evicts_the_least_recently_used_model(modeld: Modeld) -> None:
    async def scenario() -> list[str]:
        async with connect(modeld.sandbox.bus_address) as bus:
            recorder = await SignalRecorder(bus).start()
            for name in ("a", "b", "a", "c"):
                reply = await call(bus, "Load", "sa{sv}", [name, {"wait": Variant("b", True)}])
                assert reply.error_name is None, reply.body
            await recorder.wait_for(lambda: recorder.unloaded("b"))
            return recorder.unloaded("b")

    assert asyncio.run(scenario()) == ["lru"]
    assert modeld.prop("a", "State") == "ready"
    assert modeld.prop("b", "State") == "unloaded"
    assert modeld.prop("c", "State") == "ready"
    assert modeld.manager_prop("LoadedCount") == 2
    assert len(modeld.scopes()) == 2


def test_the_memory_budget_limits_modeld_slice(modeld: Modeld) -> None:
    sb = modeld.sandbox
    assert sb.show("modeld.slice", "MemoryMax") == str(3 * 1024**3)
    assert modeld.manager_prop("MemoryBudget") == 3 * 1024**3
    assert sb.memory_max("/modeld.slice") == 3 * 1024**3
    modeld.load("a")
    assert modeld.manager_prop("MemoryUsed") > 1024 * 1024


def test_max_loaded_is_writable_and_pinned_models_are_not_evicted(modeld: Modeld) -> None:
    sb = modeld.sandbox
    sb.busctl(
        "set-property", "org.modeld1", "/org/modeld1", "org.modeld1.Manager", "MaxLoaded", "u", "1"
    )
    assert modeld.manager_prop("MaxLoaded") == 1
    modeld.load("a")
    modeld.call(
        "SetPinned", "b", "true", path=modeld.model_path("a"), interface="org.modeld1.Model"
    )
    assert modeld.prop("a", "Pinned") is True
    proc = modeld.load("b", check=False)
    assert proc.returncode != 0
    assert "max_loaded=1 reached" in proc.stderr and "pinned (a)" in proc.stderr
    assert modeld.prop("a", "State") == "ready"
    assert modeld.prop("b", "State") == "unloaded"
    bad = sb.busctl(
        "set-property",
        "org.modeld1",
        "/org/modeld1",
        "org.modeld1.Manager",
        "Version",
        "s",
        "9",
        check=False,
    )
    assert bad.returncode != 0 and "read-only" in bad.stderr


def test_a_reload_puts_a_runtime_max_loaded_back_to_the_configured_value(
    modeld: Modeld,
) -> None:
    """MaxLoaded written at runtime lasts until the next reload (documented in README)."""
    modeld.sandbox.busctl(
        "set-property", "org.modeld1", "/org/modeld1", "org.modeld1.Manager", "MaxLoaded", "u", "1"
    )
    assert modeld.manager_prop("MaxLoaded") == 1

    async def reload() -> list[Any]:
        async with connect(modeld.sandbox.bus_address) as bus:
            recorder = await SignalRecorder(bus).start()
            reply = await call(bus, "Reload")
            assert reply.error_name is None, reply.body
            await recorder.wait_for(
                lambda: any("MaxLoaded" in body[1] for _p, m, body in recorder.signals), 10
            )
            return [
                body[1]["MaxLoaded"].value
                for path, member, body in recorder.signals
                if path == "/org/modeld1"
                and member == "PropertiesChanged"
                and "MaxLoaded" in body[1]
            ]

    assert asyncio.run(reload()) == [2]  # announced, so caching clients see it
    assert modeld.manager_prop("MaxLoaded") == 2


def test_sighup_and_reload_pick_up_new_models_and_refuse_invalid_config(
    modeld: Modeld,
) -> None:
    sb = modeld.sandbox
    modeld.load("a")
    (modeld.models_dir / "d.toml").write_text(reference_model())
    os.kill(modeld_host_pid(sb), signal.SIGHUP)
    deadline = time.monotonic() + 10
    while "d" not in {row[0] for row in modeld.call("ListModels")[0]}:
        assert time.monotonic() < deadline, "SIGHUP did not reload"
        time.sleep(0.05)
    assert modeld.load("d") == ["/org/modeld1/model/d"]

    (modeld.models_dir / "e.toml").write_text('backend = "reference"\nmemory_max = "lots"\n')

    async def reload() -> tuple[str | None, str]:
        async with connect(sb.bus_address) as bus:
            reply = await call(bus, "Reload")
            return reply.error_name, reply.body[0] if reply.body else ""

    error_name, message = asyncio.run(reload())
    assert error_name == "org.modeld1.Error.InvalidConfig"
    assert f"{modeld.models_dir}/e.toml: memory_max: expected a size" in message
    assert "e" not in {row[0] for row in modeld.call("ListModels")[0]}
    assert modeld.prop("a", "State") == "ready"  # the running configuration is kept
    assert sb.show("modeld.service", "ActiveState") == "active"

    (modeld.models_dir / "e.toml").unlink()
    (modeld.models_dir / "d.toml").unlink()
    modeld.call("Reload")
    assert "d" not in {row[0] for row in modeld.call("ListModels")[0]}
    assert not [u for u in modeld.scopes() if "-d-" in u]  # removed models are unloaded


def test_invalid_config_at_start_fails_the_unit_naming_the_key(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    deployment = Modeld(sandbox, tmp_path, daemon="max_loaded = -3\n", models=dict(MODELS))
    deployment.install()
    try:
        sandbox.systemctl("start", "modeld.service", check=False)
        sandbox.wait_unit("modeld.service", "ActiveState", "failed", timeout=20)
        assert sandbox.show("modeld.service", "ExecMainStatus") == "78"
        assert "daemon.max_loaded" in sandbox.journal(unit="modeld.service")
    finally:
        deployment.stop()
        sandbox.remove_units(["modeld.service", "modeld.socket", "modeld.slice"])


def test_a_blocked_event_loop_gets_modeld_killed_by_the_watchdog(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    deployment = deploy(
        sandbox,
        tmp_path,
        MODELS,
        dropin="WatchdogSec=2\nEnvironment=MODELD_TEST_BLOCK_ON_SIGUSR2=1\nRestart=no\n",
    )
    try:
        time.sleep(2.5)  # several watchdog periods: the pings from the loop keep it alive
        assert sandbox.show("modeld.service", "ActiveState") == "active"
        os.kill(modeld_host_pid(sandbox), signal.SIGUSR2)
        sandbox.wait_unit("modeld.service", "Result", "watchdog", timeout=15)
    finally:
        deployment.stop()
        sandbox.remove_units(["modeld.service", "modeld.socket", "modeld.slice"])


def test_stopping_modeld_stops_its_backends(modeld: Modeld) -> None:
    modeld.load("a")
    modeld.load("b")
    assert len(modeld.scopes()) == 2
    modeld.sandbox.systemctl("stop", "modeld.service")
    assert modeld.scopes() == []
    assert modeld.backend_processes() == []
    assert modeld.backend_sockets() == []
    assert "unloaded (shutdown)" in modeld.sandbox.journal(unit="modeld.service")


def test_backends_survive_a_restart_of_modeld_and_are_re_adopted(modeld: Modeld) -> None:
    sb = modeld.sandbox
    modeld.load("a")
    unit, pid = modeld.prop("a", "Unit"), modeld.prop("a", "MainPID")
    before = len(sb.journal(unit="modeld.service"))
    sb.systemctl("restart", "modeld.service")
    assert modeld.prop("a", "State") == "ready"
    assert (modeld.prop("a", "Unit"), modeld.prop("a", "MainPID")) == (unit, pid)
    assert modeld.prop("a", "LoadCount") == 1
    assert modeld.scopes() == [unit]
    journal = sb.journal(unit="modeld.service")[before:]
    assert "restarting: backends keep running" in journal
    assert f"re-adopted {unit}" in journal
    assert "unloaded (shutdown)" not in journal
    modeld.unload("a")  # an adopted backend is stopped like any other
    assert modeld.scopes() == []
    assert modeld.backend_processes() == []


def test_a_killed_modeld_re_adopts_its_backends(modeld: Modeld) -> None:
    sb = modeld.sandbox
    modeld.load("a")
    unit, pid = modeld.prop("a", "Unit"), modeld.prop("a", "MainPID")
    sb.systemctl("kill", "--signal=SIGKILL", "modeld.service")
    sb.wait_unit("modeld.service", "NRestarts", "1", timeout=20)  # Restart=on-failure
    sb.wait_unit("modeld.service", "ActiveState", "active", timeout=20)
    assert (modeld.prop("a", "State"), modeld.prop("a", "MainPID")) == ("ready", pid)
    assert modeld.prop("a", "Unit") == unit
    modeld.unload("a")
    modeld.load("a")
    assert modeld.prop("a", "Unit") != unit  # generations continue past adopted scopes


def test_scopes_of_models_no_longer_configured_are_stopped_at_start(modeld: Modeld) -> None:
    sb = modeld.sandbox
    modeld.load("c")
    unit = modeld.prop("c", "Unit")
    before = len(sb.journal(unit="modeld.service"))
    (modeld.models_dir / "c.toml").unlink()
    sb.systemctl("kill", "--signal=SIGKILL", "modeld.service")
    sb.wait_unit("modeld.service", "NRestarts", "1", timeout=20)
    sb.wait_unit("modeld.service", "ActiveState", "active", timeout=20)
    assert unit not in modeld.scopes()
    assert modeld.backend_processes() == []
    assert (
        f"stopping {unit} left behind by an earlier modeld"
        in sb.journal(unit="modeld.service")[before:]
    )


def test_an_adopted_backend_that_dies_is_reported_honestly(modeld: Modeld) -> None:
    sb = modeld.sandbox
    modeld.load("a")
    sb.systemctl("restart", "modeld.service")
    unit = modeld.prop("a", "Unit")
    sb.exec("kill", "-9", str(modeld.prop("a", "MainPID")))
    modeld.wait_state("a", {"failed"})
    assert "status unknown: it was started by an earlier modeld" in modeld.prop("a", "LastError")
    assert unit not in modeld.scopes()
    assert modeld.backend_processes() == []


def test_without_socket_activation_modeld_binds_its_own_socket(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    """Started by hand (a plain transient service here): no LISTEN_FDS, same API socket."""
    import sys

    from sandbox.deploy import REPO

    deployment = Modeld(sandbox, tmp_path, models={"a": reference_model()})
    deployment.write_config()
    sandbox.systemctl("stop", "modeld.socket", "modeld.service", check=False)
    try:
        sandbox.exec(
            "systemd-run",
            "--unit=modeld-standalone",
            "--property=Type=notify",
            f"--setenv=PYTHONPATH={REPO / 'service'}",
            sys.executable,
            "-m",
            "modeld",
            "--config",
            str(tmp_path / "modeld.toml"),
        )
        assert sandbox.show("modeld-standalone.service", "ActiveState") == "active"
        status, body = deployment.http_get("/healthz")
        assert status == 200 and body["status"] == "ok"
        assert deployment.load("a") == ["/org/modeld1/model/a"]
    finally:
        sandbox.systemctl("stop", "modeld-standalone.service", check=False)
    assert deployment.scopes() == []


def test_on_debians_own_python_packages_backends_run_as_their_user(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    """modeld on /usr/bin/python3 with Debian's python3-* packages (as the .deb installs it),
    and a model whose backend runs as another user."""
    models = {"u": reference_model(extra='user = "nobody"\n')}
    deployment = Modeld(sandbox, tmp_path, models=models, python="/usr/bin/python3")
    deployment.install()
    try:
        deployment.start()
        assert deployment.load("u") == ["/org/modeld1/model/u"]
        pid = deployment.prop("u", "MainPID")
        assert sandbox.exec("ps", "-o", "uid=", "-p", str(pid)).stdout.strip() == "65534"
        assert "/usr/bin/python3 -m modeld.reference_backend" in " ".join(
            deployment.backend_processes()
        )
        status, body = deployment.http_post(
            "/v1/completions", {"model": "u", "prompt": "The sea", "max_tokens": 4}
        )
        assert status == 200 and body["usage"]["completion_tokens"] == 4
        status, content_type, text = deployment.http_text("/metrics")  # prometheus_client 0.16
        assert status == 200 and content_type.startswith("text/plain; version=0.0.4")
        assert 'modeld_loads_total{model="u",result="loaded"} 1.0' in text
        deployment.unload("u")
        assert deployment.scopes() == [] and deployment.backend_processes() == []
    finally:
        deployment.stop()
        sandbox.remove_units(["modeld.service", "modeld.socket", "modeld.slice"])
