"""Per-user mode: ``modeld --user`` under a user's systemd manager, with no root at all.

A sandbox of its own (the test user, its passwd entry and its user manager change that
sandbox's mount namespace), a test user (uid 4242) whose ``user@4242.service`` runs a
``systemd --user`` with its session bus, the repository's user units installed for it, and
modeld started by its socket. Everything the test does to modeld it does as that user:
``busctl --user``, ``systemctl --user``, ``modeldctl --user``; the HTTP front door is reached
through the user's ``$XDG_RUNTIME_DIR/modeld/api.sock``.
"""

from __future__ import annotations

import json
import os
import stat
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from sandbox import Sandbox, SandboxError, missing_prerequisites
from sandbox.deploy import REPO, Modeld, reference_model
from sandbox.user_session import (
    SYSTEM_UNITS,
    TEST_UID,
    UserSession,
    start_user_session,
    stop_user_session,
    user_units,
)

pytestmark = pytest.mark.systemd

M = 1024 * 1024
UNITS = ("modeld.slice", "modeld.socket", "modeld.service")
MANAGER_CGROUP = f"/user.slice/user-{TEST_UID}.slice/user@{TEST_UID}.service"
NOT_DELEGATED = "the memory controller is not delegated to the user manager"
MODELS = {
    "demo": reference_model(memory_max="256M"),
    "oom": reference_model(memory_max="96M", options=("alloc_mb=400",)),
}


def system_units(sandbox: Sandbox) -> list[str]:
    """modeld's units (socket, service, slice, scopes) in the *system* manager."""
    out = sandbox.systemctl("list-units", "--all", "--plain", "--no-legend", "modeld*").stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _missing_user_session() -> str | None:
    for path, package in (
        (SYSTEM_UNITS / "user@.service", "systemd"),
        (Path("/usr/lib/systemd/user/dbus.socket"), "dbus-user-session"),
    ):
        if not path.exists():
            return f"{path} is missing (Debian package {package})"
    return None


def _unavailable(reason: str) -> None:
    if os.environ.get("MODELD_REQUIRE_SANDBOX") == "1":
        pytest.fail(f"MODELD_REQUIRE_SANDBOX=1 but the sandbox is unusable: {reason}")
    pytest.skip(f"systemd sandbox unavailable: {reason}")


@pytest.fixture(scope="module", params=["memory-delegated", "memory-withheld"])
def session(request: pytest.FixtureRequest) -> Iterator[UserSession]:
    """A sandbox of this module's own with the test user's manager running: once with the
    memory controller delegated to it (cgroup v2's default; emulated on v1), once without
    (v1's default; not reproducible on a v2 host with memory accounting on, so skipped)."""
    delegated = request.param == "memory-delegated"
    reason = missing_prerequisites() or _missing_user_session()
    if reason:
        _unavailable(reason)
    try:
        sandbox = Sandbox.boot()
    except SandboxError as err:
        _unavailable(str(err))
    if not delegated and sandbox.cgroup_mode == "v2":
        sandbox.stop()
        pytest.skip("a v2 sandbox delegates memory to user managers")
    home = Path(tempfile.mkdtemp(prefix="modeld-user-", dir="/tmp"))
    try:
        user = start_user_session(sandbox, home, delegate_v1_memory=delegated)
        assert _memory_delegated(sandbox) == delegated
        try:
            yield user
        finally:
            stop_user_session(user)
    finally:
        sandbox.stop()


@pytest.fixture(scope="module")
def modeld(session: UserSession) -> Iterator[Modeld]:
    """The user's modeld from the repository's user units, activated through its socket.

    Its configuration is the per-user default: ``~/.config/modeld/models.d``. Only
    ExecStart differs from a packaged install: this checkout's interpreter and sources.
    """
    config_dir = session.home / ".config" / "modeld"
    (config_dir / "models.d").mkdir(parents=True)
    for name, text in MODELS.items():
        (config_dir / "models.d" / f"{name}.toml").write_text(text)
    session.chown_home()
    for name, text in user_units(UNITS, REPO).items():
        session.install_unit(name, text)
    session.install_dropin(
        "modeld.service",
        "50-checkout",
        f"[Service]\nExecStart=\nExecStart={sys.executable} -m modeld --user\n"
        f"Environment=PYTHONPATH={REPO / 'service'}\n",
    )
    services = session.home / ".local" / "share" / "dbus-1" / "services"
    services.mkdir(parents=True)
    (services / "org.modeld1.service").write_text(
        (REPO / "systemd" / "user" / "org.modeld1.service").read_text()
    )
    session.chown_home()
    session.daemon_reload()
    session.systemctl("start", "modeld.socket")
    deployment = Modeld(session, config_dir)  # type: ignore[arg-type]
    assert deployment.http_get("/healthz")[0] == 200
    yield deployment
    deployment.stop()


def test_socket_activation_starts_modeld_as_the_user(modeld: Modeld, session: UserSession) -> None:
    assert session.show("modeld.service", "ActiveState") == "active"
    assert session.show("modeld.service", "TriggeredBy") == "modeld.socket"
    pid = session.show("modeld.service", "MainPID")
    owner = session.exec("ps", "-o", "uid=", "-p", pid).stdout.strip()
    assert owner == str(TEST_UID)
    listed = session.busctl("--json=short", "list").stdout
    assert any(entry["name"] == "org.modeld1" for entry in json.loads(listed))
    assert system_units(session.sandbox) == [], "the system manager has no part in it"


def test_a_model_runs_in_a_scope_of_the_user_manager(modeld: Modeld, session: UserSession) -> None:
    modeld.load("demo")
    assert modeld.prop("demo", "State") == "ready"
    unit = modeld.prop("demo", "Unit")
    assert modeld.scopes() == [unit]
    assert session.show(unit, "Slice") == "modeld.slice"
    assert session.show(unit, "MemoryMax") == str(256 * M)
    control_group = session.show(unit, "ControlGroup")
    assert control_group == f"{MANAGER_CGROUP}/modeld.slice/{unit}"
    assert modeld.prop("demo", "ControlGroup") == control_group
    backend = modeld.prop("demo", "MainPID")
    assert session.exec("ps", "-o", "uid=", "-p", str(backend)).stdout.strip() == str(TEST_UID)
    sandbox = session.sandbox
    assert system_units(sandbox) == []

    warnings = sandbox.journal().count(NOT_DELEGATED)
    if _memory_delegated(sandbox):
        assert sandbox.memory_max(control_group) == 256 * M
        assert modeld.prop("demo", "MemoryCurrent") > 0
        assert warnings == 0
    else:
        assert warnings == 1, "modeld should say once that memory limits do not apply"
        assert not sandbox.memcg_path(control_group).exists()
        assert modeld.prop("demo", "MemoryCurrent") == 0

    status, body = modeld.http_post(
        "/v1/completions", {"model": "demo", "prompt": "The sea", "max_tokens": 4}
    )
    assert status == 200
    assert body["choices"][0]["text"]

    modeld.unload("demo")
    assert modeld.prop("demo", "State") == "unloaded"
    assert modeld.leftovers("demo") == []
    assert modeld.scopes() == []


def test_a_backend_over_its_memory_limit_is_oom_killed_only_where_limits_apply(
    modeld: Modeld, session: UserSession
) -> None:
    if not _memory_delegated(session.sandbox):
        # As documented: without the controller, memory_max cannot apply; the model runs.
        assert modeld.load("oom") == ["/org/modeld1/model/oom"]
        assert modeld.prop("oom", "State") == "ready"
        modeld.unload("oom")
        assert modeld.leftovers("oom") == []
        return
    failed = modeld.load("oom", check=False)
    assert failed.returncode != 0
    assert modeld.prop("oom", "State") == "failed"
    last_error = modeld.prop("oom", "LastError")
    assert "killed by SIGKILL after exceeding its memory limit (96.0 MiB)" in last_error
    assert modeld.leftovers("oom") == []


def _memory_delegated(sandbox: Sandbox) -> bool:
    """Whether the test user's manager may set memory limits (see memory_delegated)."""
    if sandbox.cgroup_mode == "v2":
        controllers = sandbox.memcg_path(MANAGER_CGROUP) / "cgroup.controllers"
        return "memory" in controllers.read_text().split()
    directory = sandbox.memcg_path(MANAGER_CGROUP)
    return directory.is_dir() and directory.stat().st_uid == TEST_UID


def test_modeldctl_user_talks_to_the_users_modeld(modeld: Modeld, session: UserSession) -> None:
    cli = (
        "env",
        f"PYTHONPATH={REPO / 'service'}",
        sys.executable,
        "-m",
        "modeld.cli.main",
        "--user",
    )
    from modeld import __version__

    status = json.loads(session.run(*cli, "status", "--json").stdout)
    assert status["version"] == __version__
    assert status["loaded_count"] == 0
    listed = json.loads(session.run(*cli, "list", "--json").stdout)
    assert [m["name"] for m in listed["models"]] == list(MODELS)
    checked = json.loads(session.run(*cli, "config", "check", "--json").stdout)
    assert checked["source"] is None
    assert checked["models"] == list(MODELS)
    without = session.run(*cli[:-1], "status", check=False)
    assert without.returncode == 1, "without --user modeldctl must not find the user's modeld"
    assert "system bus" in without.stderr


def test_other_users_may_not_change_the_users_modeld(modeld: Modeld, session: UserSession) -> None:
    """Root's Load on the user's bus fails: the session bus admits only its user, so
    modeld's own-user check (unit-tested in test_per_user) is the second line."""
    root = session.exec(
        "busctl",
        f"--address=unix:path={session.runtime_dir}/bus",
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
    assert root.returncode != 0
    assert modeld.prop("demo", "State") == "unloaded"


def test_stopping_modeld_leaves_nothing_behind(modeld: Modeld, session: UserSession) -> None:
    modeld.load("demo")
    assert len(modeld.scopes()) == 1
    session.systemctl("stop", "modeld.service")
    assert session.show("modeld.service", "ActiveState") == "inactive"
    assert modeld.scopes() == []
    assert modeld.backend_processes() == []
    assert modeld.http_get("/healthz")[0] == 200, "the socket starts modeld again"
    assert modeld.prop("demo", "State") == "unloaded"


def test_a_dbus_call_starts_the_users_modeld(modeld: Modeld, session: UserSession) -> None:
    """The session bus activates org.modeld1 through the user manager (SystemdService=)."""
    session.systemctl("stop", "modeld.service")
    assert session.show("modeld.service", "ActiveState") == "inactive"
    models = modeld.call("ListModels")[0]
    assert [m[0] for m in models] == list(MODELS)
    assert session.show("modeld.service", "ActiveState") == "active"


def test_modeld_user_binds_its_socket_itself_without_activation(
    modeld: Modeld, session: UserSession
) -> None:
    session.systemctl("stop", "modeld.socket", "modeld.service")
    api = modeld.api_socket
    stale = api.stat().st_ino if api.exists() else None  # the socket unit leaves its file
    session.run(
        "systemd-run",
        "--user",
        "--unit=modeld-by-hand",
        "--property=Type=notify",
        f"--setenv=PYTHONPATH={REPO / 'service'}",
        sys.executable,
        "-m",
        "modeld",
        "--user",
    )
    try:
        assert api.is_socket()
        assert api.stat().st_ino != stale
        assert stat.S_IMODE(api.stat().st_mode) == 0o600
        assert modeld.http_get("/healthz")[0] == 200
        assert [m[0] for m in modeld.call("ListModels")[0]] == list(MODELS)
    finally:
        session.systemctl("stop", "modeld-by-hand.service", check=False)
    assert modeld.scopes() == []
    session.systemctl("start", "modeld.socket")
