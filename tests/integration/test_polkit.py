"""polkit for real: modeld asks the real polkitd about callers switched to another uid.

The sandbox is the module's own (``polkit_sandbox``), with the project's polkit policy and a
rules directory of the test's; each test starts polkitd after writing the rules it needs and
stops it afterwards. There is no logind in the sandbox, so callers are in no session and get
the actions' ``allow_any`` defaults (``auth_admin``, ``auth_admin_keep``), as a system service
running as its own user would.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from sandbox import Sandbox
from sandbox.deploy import Modeld, deploy, reference_model

pytestmark = pytest.mark.systemd

NOBODY = ("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups")

GRANT_USE_OF_ONE_MODEL = """\
// what README.md shows for a speech daemon, for uid 65534 and the model "granted"
polkit.addRule(function(action, subject) {
    if (action.id == "org.modeld1.use" &&
        action.lookup("org.modeld1.model") == "granted" &&
        subject.user == "nobody") {
        return polkit.Result.YES;
    }
});
"""


@pytest.fixture(scope="module")
def modeld(polkit_sandbox: Sandbox, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Modeld]:
    config_dir = tmp_path_factory.mktemp("modeld-polkit")
    models = {"granted": reference_model(), "other": reference_model()}
    deployment = deploy(polkit_sandbox, config_dir, models)
    yield deployment
    deployment.stop()


@pytest.fixture
def polkitd(modeld: Modeld, polkit_rules: Path) -> Iterator[Path]:
    """The rules directory, empty; write rules, then call ``modeld.sandbox.start_polkit()``."""
    for rule in polkit_rules.iterdir():
        rule.unlink()
    yield polkit_rules
    modeld.sandbox.stop_polkit()
    for name in ("granted", "other"):
        pin(modeld, name, False)
        modeld.unload(name)


def pin(modeld: Modeld, name: str, pinned: bool) -> None:
    """SetPinned as root (who needs no polkit)."""
    path = f"/org/modeld1/model/{name}"
    modeld.call("SetPinned", "b", str(pinned).lower(), path=path, interface="org.modeld1.Model")


def as_nobody(
    modeld: Modeld,
    method: str,
    signature: str,
    *args: str,
    model: str | None = None,
    interactive: bool = True,
) -> subprocess.CompletedProcess[str]:
    """busctl call on modeld as uid 65534 (busctl allows interactive authorization by default)."""
    path, interface = "/org/modeld1", "org.modeld1.Manager"
    if model is not None:
        path, interface = f"/org/modeld1/model/{model}", "org.modeld1.Model"
    return modeld.sandbox.exec(
        *NOBODY,
        "busctl",
        "--json=short",
        f"--allow-interactive-authorization={'yes' if interactive else 'no'}",
        "call",
        "org.modeld1",
        path,
        interface,
        method,
        signature,
        *args,
        check=False,
        timeout=60,
    )


LEASE_CLIENT = """
import asyncio, socket, sys
from dbus_next.aio import MessageBus
from dbus_next.constants import BusType
from dbus_next.message import Message

async def main():
    bus = await MessageBus(bus_type=BusType.SYSTEM, negotiate_unix_fd=True).connect()
    reply = await bus.call(Message(
        destination="org.modeld1", path="/org/modeld1", interface="org.modeld1.Manager",
        member="Acquire", signature="sa{sv}", body=[sys.argv[1], {}]))
    assert not reply.error_name, reply.body
    path = reply.body[0].removeprefix("unix:")
    socket.socket(socket.AF_UNIX).connect(path)
    print("connected", path, flush=True)
    sys.stdin.readline()  # holds the lease (its fd) until told to go

asyncio.run(main())
"""
PROBE = """
import socket, sys
try:
    socket.socket(socket.AF_UNIX).connect(sys.argv[1])
except PermissionError:
    sys.exit(13)
"""


def reach_while_leased(modeld: Modeld, name: str) -> str:
    """As nobody: Acquire ``name`` and connect to its backend's socket while holding the
    lease; meanwhile uid 1 (no lease) tries too; after the lease, nobody tries again."""
    sb = modeld.sandbox
    client = sb.popen(
        *NOBODY,
        "/usr/bin/python3",
        "-c",
        LEASE_CLIENT,
        name,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert client.stdout is not None and client.stdin is not None
    line = client.stdout.readline().split()
    if not line or line[0] != "connected":
        client.kill()
        return f"the lease holder could not connect: {client.communicate()[1]}"
    path = line[1]
    other = sb.exec(
        "setpriv",
        "--reuid=1",
        "--regid=1",
        "--clear-groups",
        "/usr/bin/python3",
        "-c",
        PROBE,
        path,
        check=False,
    )
    client.communicate("go\n", timeout=30)
    verdict = "lease holder: connected; others: " + (
        "denied" if other.returncode == 13 else "allowed"
    )
    modeld.wait_state(name, {"ready"})
    after = sb.exec(*NOBODY, "/usr/bin/python3", "-c", PROBE, path, check=False)
    return verdict + ("; after the lease: denied" if after.returncode == 13 else "; after: allowed")


def denied(proc: subprocess.CompletedProcess[str], text: str) -> bool:
    return proc.returncode != 0 and text in proc.stderr


def test_an_unprivileged_caller_is_denied_by_default_and_may_still_read(
    modeld: Modeld, polkitd: Path
) -> None:
    sb = modeld.sandbox
    sb.start_polkit()
    load = as_nobody(modeld, "Load", "sa{sv}", "granted", "1", "wait", "b", "true")
    assert denied(
        load, "Load granted needs org.modeld1.use: uid 65534 is not authorized by polkit"
    ), load
    quiet = as_nobody(modeld, "Load", "sa{sv}", "granted", "0", interactive=False)
    assert denied(quiet, "Load granted needs org.modeld1.use: uid 65534 must authenticate"), quiet
    listed = as_nobody(modeld, "ListModels", "")
    assert listed.returncode == 0, listed.stderr
    assert ["granted", "unloaded"] in [m[:2] for m in json.loads(listed.stdout)["data"][0]]
    state = sb.exec(
        *NOBODY,
        "busctl",
        "get-property",
        "org.modeld1",
        "/org/modeld1/model/granted",
        "org.modeld1.Model",
        "State",
    )
    assert state.stdout.strip() == 's "unloaded"'
    assert modeld.prop("granted", "State") == "unloaded"
    assert "Load granted needs org.modeld1.use: uid 65534" in sb.journal(unit="modeld.service")


def test_a_rule_granting_use_of_a_model_lets_its_uid_load_and_acquire_it_but_not_manage(
    modeld: Modeld, polkitd: Path
) -> None:
    (polkitd / "50-modeld-test.rules").write_text(GRANT_USE_OF_ONE_MODEL)
    modeld.sandbox.start_polkit()
    load = as_nobody(modeld, "Load", "sa{sv}", "granted", "1", "wait", "b", "true")
    assert load.returncode == 0, load.stderr
    assert modeld.prop("granted", "State") == "ready"
    acquire = as_nobody(modeld, "Acquire", "sa{sv}", "granted", "0")
    assert acquire.returncode == 0, acquire.stderr
    endpoint, _fd = json.loads(acquire.stdout)["data"]
    assert endpoint.startswith("unix:")
    assert reach_while_leased(modeld, "granted") == (
        "lease holder: connected; others: denied; after the lease: denied"
    )

    other = as_nobody(modeld, "Load", "sa{sv}", "other", "0")
    assert denied(other, "Load other needs org.modeld1.use: uid 65534 is not authorized"), other
    for proc, what in [
        (as_nobody(modeld, "SetPinned", "b", "true", model="granted"), "SetPinned granted"),
        (as_nobody(modeld, "Load", "sa{sv}", "granted", "1", "force", "b", "true"), "Load granted"),
        (
            as_nobody(modeld, "Unload", "a{sv}", "1", "force", "b", "true", model="granted"),
            "Unload granted",
        ),
        (as_nobody(modeld, "Reload", ""), "Reload"),
    ]:
        assert denied(proc, f"{what} needs org.modeld1.manage: uid 65534 is not authorized"), proc
    write = modeld.sandbox.exec(
        *NOBODY,
        "busctl",
        "set-property",
        "org.modeld1",
        "/org/modeld1",
        "org.modeld1.Manager",
        "MaxLoaded",
        "u",
        "3",
        check=False,
    )
    assert denied(write, "set MaxLoaded needs org.modeld1.manage"), write
    assert modeld.manager_prop("MaxLoaded") == 0
    assert modeld.prop("granted", "Pinned") is False

    pin(modeld, "granted", True)
    pinned = as_nobody(modeld, "Unload", "a{sv}", "0", model="granted")
    assert denied(pinned, "Unload granted (pinned) needs org.modeld1.manage: uid 65534"), pinned
    assert modeld.prop("granted", "State") == "ready"
    pin(modeld, "granted", False)
    unload = as_nobody(modeld, "Unload", "a{sv}", "0", model="granted")
    assert unload.returncode == 0, unload.stderr
    assert modeld.prop("granted", "State") == "unloaded"


def test_root_needs_no_polkit_and_without_polkitd_other_callers_are_refused(
    modeld: Modeld, polkitd: Path
) -> None:
    (polkitd / "50-modeld-test.rules").write_text(GRANT_USE_OF_ONE_MODEL)
    sb = modeld.sandbox
    sb.start_polkit()
    allowed = as_nobody(modeld, "Load", "sa{sv}", "granted", "0")
    assert allowed.returncode == 0, allowed.stderr
    sb.stop_polkit()
    refused = as_nobody(modeld, "Load", "sa{sv}", "granted", "0")
    assert denied(
        refused,
        "Load granted needs org.modeld1.use: uid 65534 is refused because polkit could not be"
        " asked",
    ), refused
    modeld.load("other")  # as root
    assert modeld.prop("other", "State") == "ready"
    pin(modeld, "other", True)
    modeld.unload("other")  # a pinned model: root holds manage too
    assert modeld.prop("other", "State") == "unloaded"
    read = as_nobody(modeld, "GetModel", "s", "other")
    assert read.returncode == 0, read.stderr
