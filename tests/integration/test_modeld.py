"""modeld as a real unit in a real systemd: activation, Load/Unload, scopes, failures.

One deployment serves the whole module; every test uses its own models so they do not
depend on each other's leftovers, and every test checks that nothing is left behind.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from busclient import SignalRecorder, call, connect
from sandbox import Sandbox
from sandbox.deploy import Modeld, deploy, reference_model

pytestmark = pytest.mark.systemd

MODELS = {
    "demo": reference_model(memory_max="200M"),
    "twice": reference_model(options=("load_delay=1",)),
    "crash": reference_model(options=("crash_after=0.5",)),
    "oom": reference_model(memory_max="96M", options=("alloc_mb=400",)),
    "broken": reference_model(options=("fail_load=corrupt weights in layer 7",)),
    "hang": reference_model(options=("hang_on_load=1",)),
    "my model": reference_model(),
    "ünï-cödé": reference_model(),
    "leased": reference_model(),
    "orphan": 'backend = "nope"\n',
    "phoenix": reference_model(options=("crash_after=0.5",), extra='restart = "on-failure"\n'),
}


@pytest.fixture(scope="module")
def modeld(sandbox: Sandbox, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Modeld]:
    config_dir = tmp_path_factory.mktemp("modeld-it")
    deployment = deploy(sandbox, config_dir, MODELS, daemon='load_stall_timeout = "2s"\n')
    yield deployment
    deployment.stop()
    sandbox.remove_units(["modeld.service", "modeld.socket", "modeld.slice"])


def assert_nothing_left(modeld: Modeld, name: str) -> None:
    """No scope, no backend process and no socket remain for ``name``."""
    assert modeld.leftovers(name) == []


def test_socket_activation_started_modeld_as_notify_service(modeld: Modeld) -> None:
    sb = modeld.sandbox
    assert sb.show("modeld.service", "ActiveState") == "active"
    assert sb.show("modeld.service", "Type") == "notify"
    assert sb.show("modeld.service", "TriggeredBy") == "modeld.socket"
    assert "models loaded" in sb.show("modeld.service", "StatusText")
    status, body = modeld.http_get("/v1/models")
    assert status == 200
    assert {m["id"] for m in body["data"]} == set(MODELS)
    assert all(m["state"] in {"unloaded", "ready", "failed"} for m in body["data"])


def test_activation_from_a_cold_socket(modeld: Modeld) -> None:
    sb = modeld.sandbox
    sb.systemctl("stop", "modeld.service")
    assert sb.show("modeld.service", "ActiveState") == "inactive"
    assert sb.show("modeld.socket", "ActiveState") == "active"
    status, body = modeld.http_get("/healthz")
    assert status == 200 and body["status"] == "ok"
    assert sb.show("modeld.service", "ActiveState") == "active"


def test_load_creates_a_scope_with_the_memory_limit_holding_the_backend(modeld: Modeld) -> None:
    sb = modeld.sandbox
    assert modeld.load("demo") == ["/org/modeld1/model/demo"]
    assert modeld.prop("demo", "State") == "ready"
    unit = modeld.prop("demo", "Unit")
    assert unit.startswith("modeld-backend-demo-") and unit.endswith(".scope")
    assert sb.show(unit, "ActiveState") == "active"
    assert sb.show(unit, "Slice") == "modeld.slice"
    control_group = modeld.prop("demo", "ControlGroup")
    assert control_group == f"/modeld.slice/{unit}"
    assert sb.memory_max(control_group) == 200 * 1024 * 1024
    assert modeld.prop("demo", "MemoryMax") == 200 * 1024 * 1024
    assert modeld.prop("demo", "MemoryCurrent") > 1024 * 1024
    pid = modeld.prop("demo", "MainPID")
    assert pid in modeld.unit_pids(unit)
    assert modeld.prop("demo", "Endpoint") == "unix:/run/modeld/backends/demo/backend.sock"
    assert "demo" in modeld.backend_sockets()
    assert modeld.prop("demo", "LoadCount") == 1
    assert "listening on unix:/run/modeld/backends/demo/backend.sock" in sb.journal(
        identifier="demo"
    )

    modeld.unload("demo")
    assert modeld.prop("demo", "State") == "unloaded"
    assert modeld.prop("demo", "Unit") == ""
    assert sb.show(unit, "LoadState") == "not-found"
    assert_nothing_left(modeld, "demo")
    modeld.unload("demo")  # unloading an unloaded model succeeds


def test_concurrent_loads_start_one_backend(modeld: Modeld) -> None:
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        replies = list(pool.map(lambda _: modeld.load("twice"), range(4)))
    assert replies == [["/org/modeld1/model/twice"]] * 4
    assert modeld.prop("twice", "LoadCount") == 1
    assert modeld.sandbox.journal(identifier="twice").count("listening on") == 1
    assert len([u for u in modeld.scopes() if "twice" in u]) == 1
    modeld.unload("twice")
    assert_nothing_left(modeld, "twice")


def _load_and_record(
    modeld: Modeld, name: str, wait_for_signal: bool = True
) -> tuple[str, list[str], list[str]]:
    """Load ``name`` over D-Bus; returns (error name or "", unload reasons, states seen)."""

    async def scenario() -> tuple[str, list[str], list[str]]:
        async with connect(modeld.sandbox.bus_address) as bus:
            recorder = await SignalRecorder(bus).start()
            path = f"/org/modeld1/model/{name}"
            reply = await call(bus, "Load", "sa{sv}", [name, {"wait": _variant(True)}])
            if wait_for_signal:
                await recorder.wait_for(lambda: recorder.unloaded(name))
            return reply.error_name or "", recorder.unloaded(name), recorder.states(path)

    return asyncio.run(scenario())


def _variant(value: bool) -> object:
    from dbus_next.signature import Variant

    return Variant("b", value)


def test_a_backend_that_crashes_is_noticed_and_cleaned_up(modeld: Modeld) -> None:
    error, reasons, states = _load_and_record(modeld, "crash")
    assert error == ""  # the load succeeded; the crash comes half a second later
    assert reasons == ["crashed"]
    assert states[-2:] == ["ready", "failed"]
    assert modeld.prop("crash", "State") == "failed"
    last_error = modeld.prop("crash", "LastError")
    assert last_error.startswith("backend exited with status 3")
    assert "crashing as asked" in last_error
    assert_nothing_left(modeld, "crash")


def test_a_backend_over_its_memory_limit_is_reported_as_oom(modeld: Modeld) -> None:
    error, reasons, _states = _load_and_record(modeld, "oom")
    assert error == "org.modeld1.Error.LoadFailed"
    assert reasons == ["oom"]
    assert modeld.prop("oom", "State") == "failed"
    last_error = modeld.prop("oom", "LastError")
    assert "killed by SIGKILL after exceeding its memory limit (96.0 MiB)" in last_error
    assert_nothing_left(modeld, "oom")


def test_a_failing_load_model_is_reported_with_the_backends_words(modeld: Modeld) -> None:
    error, reasons, _states = _load_and_record(modeld, "broken")
    assert error == "org.modeld1.Error.LoadFailed"
    assert reasons == ["failed"]
    proc = modeld.load("broken", check=False)
    assert proc.returncode != 0
    assert "corrupt weights in layer 7" in proc.stderr
    assert modeld.prop("broken", "State") == "failed"
    assert "backend refused LoadModel: corrupt weights in layer 7" in modeld.prop(
        "broken", "LastError"
    )
    assert_nothing_left(modeld, "broken")
    assert modeld.prop("broken", "LoadCount") == 0


def test_a_stalled_load_fails_after_the_stall_timeout(modeld: Modeld) -> None:
    proc = modeld.load("hang", check=False)
    assert proc.returncode != 0
    assert "no progress for 2s while in LoadModel" in proc.stderr
    assert modeld.prop("hang", "State") == "failed"
    assert_nothing_left(modeld, "hang")


def test_a_model_whose_backend_is_not_installed_is_refused_up_front(modeld: Modeld) -> None:
    async def load() -> tuple[str | None, str]:
        async with connect(modeld.sandbox.bus_address) as bus:
            reply = await call(bus, "Load", "sa{sv}", ["orphan", {"wait": _variant(True)}])
            return reply.error_name, reply.body[0]

    error, message = asyncio.run(load())
    assert error == "org.modeld1.Error.NoSuchBackend"
    assert "model orphan uses backend 'nope', which is not installed in" in message
    assert modeld.prop("orphan", "State") == "unloaded"
    assert modeld.scopes() == []


def test_unknown_and_odd_names_get_clean_errors(modeld: Modeld) -> None:
    for name in ("nope", "a/b", "..", "../demo", "", "demo "):
        proc = modeld.load(name, check=False)
        assert proc.returncode != 0
        assert "no model named" in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr
    proc = modeld.call("GetModel", "s", "a/b", check=False)
    assert "no model named 'a/b' is configured" in proc.stderr
    proc = modeld.call("Load", "sa{sv}", "demo", "1", "wait", "s", "yes", check=False)
    assert "option 'wait' must be a boolean" in proc.stderr
    assert modeld.prop("demo", "State") == "unloaded"  # a refused call changes nothing


@pytest.mark.parametrize(
    ("name", "path", "unit_part"),
    [
        ("my model", "/org/modeld1/model/my_20model", "my\\x20model"),
        ("ünï-cödé", "/org/modeld1/model/_c3_bcn_c3_af_2dc_c3_b6d_c3_a9", "\\xc3\\xbcn"),
    ],
)
def test_names_with_spaces_and_unicode_are_escaped(
    modeld: Modeld, name: str, path: str, unit_part: str
) -> None:
    assert modeld.load(name) == [path]
    assert modeld.prop(name, "Name") == name
    unit = modeld.prop(name, "Unit")
    assert unit_part in unit
    assert modeld.sandbox.show(unit, "ActiveState") == "active"
    assert modeld.sandbox.show(unit, "Description").startswith(f"modeld backend for model {name}")
    modeld.unload(name)
    assert_nothing_left(modeld, name)


def test_list_models_and_object_manager(modeld: Modeld) -> None:
    listed = modeld.call("ListModels")[0]
    assert {row[0] for row in listed} == set(MODELS)
    assert {row[0]: row[2] for row in listed}["orphan"] == "nope"
    assert all(row[2] == "reference" for row in listed if row[0] != "orphan")
    objects = modeld.call("GetManagedObjects", interface="org.freedesktop.DBus.ObjectManager")[0]
    assert "/org/modeld1/model/my_20model" in objects
    assert objects["/org/modeld1/model/demo"]["org.modeld1.Model"]["Name"]["data"] == "demo"


def test_acquire_keeps_the_model_busy_until_the_lease_is_closed(modeld: Modeld) -> None:
    async def scenario() -> tuple[str, str, str]:
        async with connect(modeld.sandbox.bus_address) as bus:
            reply = await call(bus, "Acquire", "sa{sv}", ["leased", {}])
            assert reply.error_name is None, reply.body
            endpoint, fd_index = reply.body
            lease_fd = reply.unix_fds[fd_index]
            busy = modeld.prop("leased", "State")
            in_flight = modeld.prop("leased", "InFlight")
            assert in_flight == 1
            os.close(lease_fd)
            ready = await asyncio.to_thread(modeld.wait_state, "leased", {"ready"})
            return endpoint, busy, ready

    endpoint, busy, ready = asyncio.run(scenario())
    assert endpoint == "unix:/run/modeld/backends/leased/backend.sock"
    assert (busy, ready) == ("busy", "ready")
    modeld.unload("leased")
    assert_nothing_left(modeld, "leased")


def test_modeldctl_shows_progress_against_the_real_daemon(modeld: Modeld) -> None:
    import subprocess
    import sys

    env = modeld.sandbox.env()
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2] / "service")
    proc = subprocess.run(
        [sys.executable, "-m", "modeld.cli.main", "load", "demo"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "demo: loading"
    assert lines[-1].startswith("demo: ready (pid ")
    listed = subprocess.run(
        [sys.executable, "-m", "modeld.cli.main", "--json", "list"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=True,
    )
    assert '"state": "ready"' in listed.stdout
    modeld.unload("demo")
    assert_nothing_left(modeld, "demo")


def test_restart_on_failure_loads_a_crashed_model_again(modeld: Modeld) -> None:
    async def scenario() -> list[str]:
        async with connect(modeld.sandbox.bus_address) as bus:
            recorder = await SignalRecorder(bus).start()
            reply = await call(bus, "Load", "sa{sv}", ["phoenix", {"wait": _variant(True)}])
            assert reply.error_name is None, reply.body
            # crash after 0.5 s, restart after 1 s, crash again: two crashes, two loads
            await recorder.wait_for(lambda: len(recorder.unloaded("phoenix")) >= 2)
            return recorder.unloaded("phoenix")

    assert asyncio.run(scenario())[:2] == ["crashed", "crashed"]
    assert modeld.prop("phoenix", "LoadCount") >= 2
    assert "restarting in 1 s (restart=on-failure)" in modeld.sandbox.journal(unit="modeld.service")
    modeld.unload("phoenix")  # cancels the next restart
    assert modeld.prop("phoenix", "State") == "unloaded"
    assert_nothing_left(modeld, "phoenix")


def test_only_root_may_change_state_but_everyone_may_read(modeld: Modeld) -> None:
    nobody = ("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "busctl")
    sb = modeld.sandbox
    denied = sb.exec(
        *nobody,
        "call",
        "org.modeld1",
        "/org/modeld1",
        "org.modeld1.Manager",
        "Load",
        "sa{sv}",
        "demo",
        "0",
        check=False,
    )
    assert denied.returncode != 0
    assert "uid 65534 may not change modeld's state" in denied.stderr
    write = sb.exec(
        *nobody,
        "set-property",
        "org.modeld1",
        "/org/modeld1",
        "org.modeld1.Manager",
        "MaxLoaded",
        "u",
        "3",
        check=False,
    )
    assert write.returncode != 0 and "may not change" in write.stderr
    assert modeld.manager_prop("MaxLoaded") == 0
    read = sb.exec(
        *nobody,
        "get-property",
        "org.modeld1",
        "/org/modeld1/model/demo",
        "org.modeld1.Model",
        "State",
    )
    assert read.stdout.strip() == 's "unloaded"'
    assert modeld.prop("demo", "State") == "unloaded"
