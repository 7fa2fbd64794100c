"""Tests of the test harness itself: the systemd sandbox (tests/sandbox/) and its fixtures."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from dbus_next import BusType, Variant
from dbus_next.aio import MessageBus
from sandbox import SCRIPT, Sandbox, SandboxError, booted_sandbox

pytestmark = pytest.mark.systemd

SD = "org.freedesktop.systemd1"
SD_PATH = "/org/freedesktop/systemd1"
PY = sys.executable  # the venv's python: the repo is visible (read-only) inside

# stdlib-only Type=notify service: socket-activated (LISTEN_FDS) or not; pings the
# watchdog for $PING_FOR seconds (default: forever), answers "ping" with "pong <pid>"
NOTIFY_SERVICE = r"""
import os, socket, threading, time

def notify(msg):
    addr = os.environ["NOTIFY_SOCKET"]
    addr = "\0" + addr[1:] if addr.startswith("@") else addr
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.sendto(msg.encode(), addr)

def watchdog():
    usec = int(os.environ.get("WATCHDOG_USEC", "0"))
    until = time.monotonic() + float(os.environ.get("PING_FOR", "inf"))
    while usec and time.monotonic() < until:
        notify("WATCHDOG=1")
        time.sleep(usec / 4e6)
    print("no more watchdog pings", flush=True)

listeners = []
if os.environ.get("LISTEN_PID") == str(os.getpid()):
    listeners = [socket.socket(fileno=3 + i) for i in range(int(os.environ["LISTEN_FDS"]))]
threading.Thread(target=watchdog, daemon=True).start()
notify("READY=1")
print(f"ready, {len(listeners)} listening socket(s)", flush=True)
while not listeners:
    time.sleep(3600)
while True:
    conn, _ = listeners[0].accept()
    with conn, conn.makefile("rw") as f:
        if f.readline().strip() == "ping":
            f.write(f"pong {os.getpid()}\n")
"""

# dbus-next service owning a bus name given in argv[1], with a method Ping() -> "pong"
NAME_OWNER = r"""
import asyncio, sys
from dbus_next import BusType
from dbus_next.aio import MessageBus
from dbus_next.service import ServiceInterface, method

class Test(ServiceInterface):
    @method()
    def Ping(self) -> "s":
        return "pong"

async def main(name):
    bus = await MessageBus(bus_type=BusType.SYSTEM).connect()
    bus.export("/" + name.replace(".", "/"), Test(name))
    await bus.request_name(name)
    print("owning", name, flush=True)
    await bus.wait_for_disconnect()

asyncio.run(main(sys.argv[1]))
"""

POLICY = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-BUS Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <policy user="root"><allow own="{name}"/></policy>
  <policy context="default"><allow send_destination="{name}"/></policy>
</busconfig>
"""


def uniq(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def scripts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("sbx-scripts")  # under /tmp: shared with the sandbox
    (d / "notify_service.py").write_text(NOTIFY_SERVICE)
    (d / "name_owner.py").write_text(NAME_OWNER)
    return d


def name_owner_unit(scripts: Path, bus_name: str) -> str:
    return f"""[Service]
Type=dbus
BusName={bus_name}
ExecStart={PY} {scripts / "name_owner.py"} {bus_name}
TimeoutStartSec=10
"""


def test_boots_and_systemd_runs(sandbox: Sandbox) -> None:
    assert sandbox.systemctl("is-system-running").stdout.strip() == "running"
    assert sandbox.show("harness.target", "ActiveState") == "active"
    assert Path(f"/proc/{sandbox.systemd_pid}/comm").read_text().strip() == "systemd"
    assert sandbox.exec("cat", "/proc/1/comm").stdout.strip() == "systemd"
    assert 0 < sandbox.boot_ms < 10_000, sandbox.boot_breakdown
    print(f"BOOT_MS={sandbox.boot_ms} ({sandbox.boot_breakdown})")


def test_host_is_protected(sandbox: Sandbox, tmp_path: Path) -> None:
    for cmd in (
        "touch /etc/modeld-sandbox-probe",
        "echo 1 > /proc/sys/net/unix/max_dgram_qlen",
        "echo 1 > /sys/kernel/mm/ksm/run",
    ):
        r = sandbox.exec("sh", "-c", cmd, check=False)
        assert r.returncode != 0, f"{cmd!r} succeeded inside the sandbox"
    assert not Path("/etc/modeld-sandbox-probe").exists()
    # /tmp is shared and writable; /var is a throw-away overlay
    sandbox.exec("sh", "-c", f"echo hi > {tmp_path}/from-inside; echo x > /var/modeld-probe")
    assert (tmp_path / "from-inside").read_text() == "hi\n"
    assert not Path("/var/modeld-probe").exists()
    # the namespace's /dev is private: no console, no kmsg
    devs = sandbox.exec("ls", "/dev").stdout.split()
    assert "kmsg" not in devs and "console" not in devs
    # systemd's cgroups live below the dedicated ones: init.scope of PID 1 as seen from the host
    memory_line = next(
        line
        for line in Path(f"/proc/{sandbox.systemd_pid}/cgroup").read_text().splitlines()
        if line.split(":")[1] in ("memory", "")
    )
    assert memory_line.endswith(f"/modeld-test-{sandbox.name}/init.scope"), memory_line


def test_busctl_from_host_reaches_systemd(sandbox: Sandbox) -> None:
    r = sandbox.busctl("get-property", SD, SD_PATH, f"{SD}.Manager", "Virtualization")
    assert r.stdout.strip() == 's "container-other"'
    assert SD in sandbox.busctl("list", "--acquired").stdout


def test_venv_python_runs_inside(sandbox: Sandbox) -> None:
    r = sandbox.exec(PY, "-c", "import dbus_next, os, sys; print(os.getpid(), sys.prefix)")
    pid, prefix = r.stdout.split()
    assert int(pid) > 1 and prefix == sys.prefix


def test_socket_activated_notify_service(sandbox_units: Sandbox, scripts: Path) -> None:
    sb, unit = sandbox_units, uniq("pt-notify")
    sb.install_unit(f"{unit}.socket", f"[Socket]\nListenStream=/run/{unit}/s.sock\n", reload=False)
    sb.install_unit(
        f"{unit}.service",
        f"""[Unit]
Requires={unit}.socket
After={unit}.socket
[Service]
Type=notify
ExecStart={PY} {scripts / "notify_service.py"}
WatchdogSec=5
TimeoutStopSec=2
""",
    )
    sb.systemctl("start", f"{unit}.socket")
    assert sb.show(f"{unit}.service", "ActiveState") == "inactive"
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(sb.run_dir / unit / "s.sock"))  # from the host
        s.sendall(b"ping\n")
        reply = s.makefile().readline()
    assert reply.startswith("pong ")
    assert sb.show(f"{unit}.service", "ActiveState") == "active"
    assert sb.show(f"{unit}.service", "MainPID") == reply.split()[1]
    assert "ready, 1 listening socket(s)" in sb.journal(unit=f"{unit}.service")


def test_watchdog_kills_service_that_stops_pinging(sandbox_units: Sandbox, scripts: Path) -> None:
    sb, unit = sandbox_units, uniq("pt-watchdog") + ".service"
    sb.install_unit(
        unit,
        f"""[Service]
Type=notify
Environment=PING_FOR=0.5
ExecStart={PY} {scripts / "notify_service.py"}
WatchdogSec=1
TimeoutStopSec=2
""",
    )
    sb.systemctl("start", unit)  # returns once READY=1 arrived
    assert sb.show(unit, "ActiveState") == "active"
    sb.wait_unit(unit, "Result", "watchdog", timeout=5)
    assert sb.show(unit, "ActiveState") == "failed"
    assert "Watchdog timeout" in sb.journal(unit=unit)


def test_dbus_name_needs_policy_added_at_runtime(sandbox_units: Sandbox, scripts: Path) -> None:
    sb, bus_name = sandbox_units, f"org.modeldtest.R{uuid.uuid4().hex[:8]}"
    unit = uniq("pt-owner") + ".service"
    sb.install_unit(unit, name_owner_unit(scripts, bus_name))
    # the distro system.conf denies owning unknown names
    assert sb.systemctl("start", unit, check=False).returncode != 0
    assert f'not allowed to own the service "{bus_name}"' in sb.journal(unit=unit)
    sb.add_dbus_policy(f"{bus_name}.conf", POLICY.format(name=bus_name))
    sb.systemctl("restart", unit)
    assert bus_name in sb.busctl("list", "--acquired").stdout


def test_dbus_policy_files_at_boot_and_clean_stop(scripts: Path, tmp_path: Path) -> None:
    """DBUS_POLICY_FILES lets a unit own org.modeldtest1, DBUS_SERVICE_DIRS makes it
    bus-activatable; stopping the sandbox leaves nothing behind."""
    policy = tmp_path / "org.modeldtest1.conf"
    policy.write_text(POLICY.format(name="org.modeldtest1"))
    services = tmp_path / "services"
    services.mkdir()
    (services / "org.modeldtest1.service").write_text(
        "[D-BUS Service]\nName=org.modeldtest1\nExec=/bin/false\nUser=root\n"
        "SystemdService=owner.service\n"
    )
    with booted_sandbox(dbus_policy_files=[policy], dbus_service_dirs=[services]) as sb:
        sb.install_unit("owner.service", name_owner_unit(scripts, "org.modeldtest1"))
        assert "org.modeldtest1" in sb.busctl("list", "--activatable").stdout
        # the call activates owner.service through systemd, then reaches it
        r = sb.busctl("call", "org.modeldtest1", "/org/modeldtest1", "org.modeldtest1", "Ping")
        assert r.stdout.strip() == 's "pong"'
        assert sb.show("owner.service", "ActiveState") == "active"
        assert "org.modeldtest1" in sb.busctl("list", "--acquired").stdout
        cgroups, base = sb.cgroups, sb.base
        assert all(cg.is_dir() for cg in cgroups) and base.is_dir()
    assert sb.leftovers() == [] and not base.exists()
    assert not any(cg.exists() for cg in cgroups)
    assert sb.stop_ms is not None
    found = subprocess.run(
        ["find", "/sys/fs/cgroup", "-name", f"modeld-test-{sb.name}"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    assert found == ""
    assert f" {base}" not in Path("/proc/self/mountinfo").read_text()


def test_transient_scope_memory_max_from_host(sandbox: Sandbox) -> None:
    child = sandbox.popen("sh", "-c", "echo $$; exec sleep 30", stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        ns_pid = int(child.stdout.readline())
        scope = uniq("pt-scope") + ".scope"
        cg = asyncio.run(asyncio.wait_for(start_scope(sandbox, scope, ns_pid), 15))
        assert sandbox.show(scope, "MemoryMax") == str(50 << 20)
        assert sandbox.memory_max(cg) == 52428800
        memcg = sandbox.memcg_path(cg)
        assert memcg.is_relative_to(sandbox.memcg_dir)
        if sandbox.cgroup_mode == "v1-hybrid":
            assert (memcg / "memory.limit_in_bytes").read_text() == "52428800\n"
        host_pids = (memcg / "cgroup.procs").read_text().split()
        assert [sandbox.ns_pid(int(p)) for p in host_pids] == [ns_pid]
        sandbox.systemctl("stop", scope)
        assert child.wait(timeout=5) != 0  # sleep got SIGTERM from the scope's stop
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        assert child.stdout is not None
        child.stdout.close()


async def start_scope(sb: Sandbox, scope: str, pid: int) -> str:
    """StartTransientUnit from the host over the sandbox's bus; returns the ControlGroup."""
    bus = await MessageBus(bus_address=sb.bus_address, bus_type=BusType.SYSTEM).connect()
    try:
        mgr = bus.get_proxy_object(SD, SD_PATH, await bus.introspect(SD, SD_PATH))
        manager = mgr.get_interface(f"{SD}.Manager")
        await manager.call_subscribe()
        loop = asyncio.get_running_loop()
        jobs: dict[str, asyncio.Future[str]] = {}

        def job_removed(_id: int, job: str, _unit: str, result: str) -> None:
            fut = jobs.setdefault(job, loop.create_future())
            if not fut.done():
                fut.set_result(result)

        manager.on_job_removed(job_removed)
        props = [
            ["Description", Variant("s", "sandbox self-test scope")],
            ["PIDs", Variant("au", [pid])],
            ["MemoryAccounting", Variant("b", True)],
            ["MemoryMax", Variant("t", 50 << 20)],
        ]
        job = await manager.call_start_transient_unit(scope, "fail", props, [])
        assert await jobs.setdefault(job, loop.create_future()) == "done"
        path = await manager.call_get_unit(scope)
        unit = bus.get_proxy_object(SD, path, await bus.introspect(SD, path))
        return str(await unit.get_interface(f"{SD}.Scope").get_control_group())
    finally:
        bus.disconnect()
        await bus.wait_for_disconnect()
        bus._stream.close()  # dbus-next 0.2.3 never closes its socket (ResourceWarning)
        bus._sock.close()


def pid_gone(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(errors="replace")
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def test_namespace_dies_with_the_runner() -> None:
    """PDEATHSIG tie: SIGKILL of the runner kills the namespace at once; cleanup still works."""
    sb = Sandbox.boot()
    assert sb._proc is not None
    os.kill(sb._proc.pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while not pid_gone(sb.systemd_pid):
        assert time.monotonic() < deadline, "PID 1 outlived its runner"
        time.sleep(0.02)
    with pytest.raises(SandboxError, match="exit status -9"):
        sb.stop()  # cleans up, then reports the runner's death
    assert sb.leftovers() == []
    assert subprocess.run([str(SCRIPT), "gc"], check=False).returncode == 0
