"""The OS adapters that can run without systemd: gate, pidfd, inotify, cgroup files, records."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from modeld.core.states import ALLOWED_TRANSITIONS, ModelState, check_transition
from modeld.supervisor.environment import backend_environment
from modeld.supervisor.records import BackendRecord, RecordStore
from modeld.supervisor.spawn import GATE_EXIT_STATUS, ExitStatus, GatedProcess
from modeld.system.cgroup import CgroupLayout, cpu_ticks, pids_in_cgroup, process_cgroup
from modeld.system.inotify import DirectoryWatch


async def _spawn(tmp_path: Path, script: str) -> tuple[GatedProcess, asyncio.Future[ExitStatus]]:
    exited: asyncio.Future[ExitStatus] = asyncio.get_running_loop().create_future()
    log = os.open(tmp_path / "out.log", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        process = GatedProcess(
            ["/bin/sh", "-c", script],
            env={"PATH": "/usr/bin:/bin"},
            cwd=str(tmp_path),
            output_fd=log,
            credentials=None,
            on_exit=exited.set_result,
        )
    finally:
        os.close(log)
    return process, exited


def test_the_gate_holds_the_backend_until_opened(tmp_path: Path) -> None:
    marker = tmp_path / "ran"

    async def scenario() -> ExitStatus:
        process, exited = await _spawn(tmp_path, f"touch {marker}; exit 5")
        await asyncio.sleep(0.2)
        assert not marker.exists(), "the backend ran before the gate opened"
        assert not exited.done()
        process.open_gate()
        return await asyncio.wait_for(exited, 10)

    status = asyncio.run(scenario())
    assert marker.exists()
    assert status == ExitStatus(code=5, signal=None)


def test_a_gate_that_closes_unopened_never_runs_the_backend(tmp_path: Path) -> None:
    marker = tmp_path / "ran"

    async def scenario() -> ExitStatus:
        process, exited = await _spawn(tmp_path, f"touch {marker}")
        process._close_gate()  # modeld failed to create the scope
        return await asyncio.wait_for(exited, 10)

    assert asyncio.run(scenario()).code == GATE_EXIT_STATUS
    assert not marker.exists()


def test_exit_by_signal_is_seen_through_the_pidfd(tmp_path: Path) -> None:
    async def scenario() -> ExitStatus:
        process, exited = await _spawn(tmp_path, "sleep 30")
        process.open_gate()
        await asyncio.sleep(0.1)
        process.kill()
        return await asyncio.wait_for(exited, 10)

    status = asyncio.run(scenario())
    assert status.signal == signal.SIGKILL
    assert status.describe() == "killed by SIGKILL"
    assert ExitStatus(code=None, signal=None).describe().startswith("exited (status unknown")


def test_backends_never_inherit_systemd_variables() -> None:
    inherited = {
        "NOTIFY_SOCKET": "/run/systemd/notify",
        "LISTEN_FDS": "1",
        "LISTEN_PID": "1",
        "LISTEN_FDNAMES": "api",
        "WATCHDOG_USEC": "30000000",
        "WATCHDOG_PID": "1",
        "PYTHONPATH": "/opt/x",
        "INVOCATION_ID": "0123",
        "JOURNAL_STREAM": "8:1234",
        "SECRET_TOKEN": "nope",
        "TZ": "Europe/Paris",
    }
    env = backend_environment("demo", inherited)
    assert not {k for k in env if k.startswith(("NOTIFY_", "LISTEN_", "WATCHDOG_"))}
    assert not {"SECRET_TOKEN", "PYTHONPATH", "INVOCATION_ID", "JOURNAL_STREAM"} & set(env)
    assert env["TZ"] == "Europe/Paris"
    assert env["MODELD_PYTHON"] == sys.executable
    assert env["PATH"].split(":")[0] == os.path.dirname(sys.executable)
    assert env["MODELD_MODEL"] == "demo"


def test_directory_watch_resolves_on_creation_and_for_existing_entries(tmp_path: Path) -> None:
    async def scenario() -> None:
        with DirectoryWatch(tmp_path) as watch:
            waiter = asyncio.ensure_future(watch.wait_for("a.sock"))
            await asyncio.sleep(0.05)
            assert not waiter.done()
            (tmp_path / "other").touch()
            await asyncio.sleep(0.05)
            assert not waiter.done()
            (tmp_path / "a.sock").touch()
            await asyncio.wait_for(waiter, 5)
            await asyncio.wait_for(watch.wait_for("other"), 1)

    asyncio.run(scenario())


def test_cgroup_readers_on_v2_and_v1_fixture_trees(tmp_path: Path) -> None:
    v2 = tmp_path / "v2"
    scope = v2 / "modeld.slice" / "modeld-backend-a-1.scope"
    scope.mkdir(parents=True)
    (v2 / "cgroup.controllers").write_text("cpu memory pids\n")
    (scope / "memory.current").write_text("12345\n")
    (scope / "memory.events").write_text("low 0\nhigh 3\nmax 7\noom 1\noom_kill 1\n")
    layout = CgroupLayout.detect(v2)
    assert layout.unified
    assert layout.memory_current("/modeld.slice/modeld-backend-a-1.scope") == 12345
    assert layout.in_oom("/modeld.slice/modeld-backend-a-1.scope")
    (scope / "memory.events").write_text("low 0\nhigh 3\nmax 7\noom 0\noom_kill 0\n")
    assert not layout.in_oom("/modeld.slice/modeld-backend-a-1.scope")

    v1 = tmp_path / "v1"
    scope = v1 / "memory" / "modeld.slice" / "s.scope"
    scope.mkdir(parents=True)
    (scope / "memory.usage_in_bytes").write_text("999\n")
    (scope / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 1\noom_kill 0\n")
    layout = CgroupLayout.detect(v1)
    assert not layout.unified
    assert layout.memory_current("/modeld.slice/s.scope") == 999
    assert layout.in_oom("/modeld.slice/s.scope")
    assert layout.memory_current("/gone.scope") is None
    assert not layout.in_oom("/gone.scope")


def _write_procs(directory: Path, *pids: int) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "cgroup.procs").write_text("".join(f"{pid}\n" for pid in pids))


SCOPE = "/modeld.slice/modeld-llama.scope"


def test_pids_in_cgroup_on_a_unified_tree(tmp_path: Path) -> None:
    (tmp_path / "cgroup.controllers").write_text("cpu memory pids\n")
    _write_procs(tmp_path / "modeld.slice" / "modeld-llama.scope", 101, 102)
    _write_procs(tmp_path / "modeld.slice" / "modeld-llama.scope" / "worker", 103)
    _write_procs(tmp_path / "modeld.slice" / "modeld-other.scope", 201)
    _write_procs(tmp_path / "unified" / "modeld.slice" / "modeld-llama.scope", 999)  # not v2's
    assert pids_in_cgroup(SCOPE, root=tmp_path) == {101, 102, 103}
    assert pids_in_cgroup("/modeld.slice/modeld-gone.scope", root=tmp_path) == set()


def test_pids_in_cgroup_on_a_hybrid_tree(tmp_path: Path) -> None:
    _write_procs(tmp_path / "unified" / "modeld.slice" / "modeld-llama.scope", 101, 102)
    _write_procs(tmp_path / "memory" / "modeld.slice" / "modeld-llama.scope", 101, 102)
    _write_procs(tmp_path / "memory" / "modeld.slice" / "modeld-mem.scope", 301)
    _write_procs(tmp_path / "systemd" / "modeld.slice" / "modeld-sd.scope", 401, 402)
    assert pids_in_cgroup(SCOPE, root=tmp_path) == {101, 102}
    assert pids_in_cgroup("/modeld.slice/modeld-mem.scope", root=tmp_path) == {301}
    assert pids_in_cgroup("/modeld.slice/modeld-sd.scope", root=tmp_path) == {401, 402}
    assert pids_in_cgroup("/modeld.slice/modeld-gone.scope", root=tmp_path) == set()


def test_pids_in_cgroup_finds_this_process_in_its_own_cgroup() -> None:
    paths = dict(
        line.split(":", 2)[1:] for line in Path("/proc/self/cgroup").read_text().splitlines()
    )
    own = paths.get("") or paths["name=systemd"]  # the unified path, else name=systemd's
    assert os.getpid() in pids_in_cgroup(own)


def test_a_process_cgroup_is_where_the_cgroup_tree_has_it() -> None:
    own = process_cgroup(os.getpid())
    assert own is not None and own.startswith("/")
    assert os.getpid() in pids_in_cgroup(own)
    child = subprocess.Popen([sys.executable, "-c", ""])
    child.wait()
    assert process_cgroup(child.pid) is None


def test_cpu_ticks_add_up_the_processes_and_skip_ended_ones() -> None:
    child = subprocess.Popen([sys.executable, "-c", ""])
    child.wait()
    own = cpu_ticks([os.getpid()])
    assert own > 0  # pytest's start-up alone takes many clock ticks
    assert cpu_ticks([child.pid]) == 0
    assert cpu_ticks([os.getpid(), child.pid]) >= own


def test_records_round_trip_and_bad_files_are_dropped(tmp_path: Path) -> None:
    store = RecordStore(tmp_path / "state")
    record = BackendRecord(
        "my model",
        "modeld-backend-my\\x20model-3.scope",
        3,
        42,
        "/run/modeld/backends/my_20model.sock",
        1,
        2,
    )
    store.save(record)
    (tmp_path / "state" / "junk.json").write_text("{not json")
    assert store.load_all() == {record.unit: record}
    assert not (tmp_path / "state" / "junk.json").exists()
    assert json.loads((tmp_path / "state" / f"{record.unit}.json").read_text())["pid"] == 42
    store.remove(record.unit)
    assert store.load_all() == {}


def test_state_machine_allows_only_the_documented_transitions() -> None:
    check_transition(ModelState.UNLOADED, ModelState.LOADING)
    check_transition(ModelState.BUSY, ModelState.READY)
    with pytest.raises(ValueError, match="unloaded -> ready"):
        check_transition(ModelState.UNLOADED, ModelState.READY)
    with pytest.raises(ValueError):
        check_transition(ModelState.UNLOADING, ModelState.LOADING)
    assert set(ALLOWED_TRANSITIONS) == set(ModelState)


def test_socket_activation_takes_the_inherited_fds_only_for_its_own_pid(tmp_path: Path) -> None:
    import socket

    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(tmp_path / "api.sock"))
    listener.listen()
    code = (
        "import os; from modeld.system.activation import take_listen_sockets as t;"
        "s = t(); print(len(s), s[0].family.name if s else '-',"
        " [k for k in os.environ if k.startswith('LISTEN_')])"
    )
    script = f"os.dup2({listener.fileno()}, 3); os.set_inheritable(3, True)"
    runner = (
        f"import os, sys; {script};"
        "os.environ['LISTEN_FDS'] = '1'; os.environ['LISTEN_FDNAMES'] = 'api';"
        f"os.environ['LISTEN_PID'] = sys.argv[1] if len(sys.argv) > 1 else str(os.getpid());"
        f"os.execv(sys.executable, [sys.executable, '-c', {code!r}])"
    )
    own = subprocess.run(
        [sys.executable, "-c", runner],
        capture_output=True,
        text=True,
        pass_fds=(listener.fileno(),),
        check=True,
    )
    other = subprocess.run(
        [sys.executable, "-c", runner, "1"],
        capture_output=True,
        text=True,
        pass_fds=(listener.fileno(),),
        check=True,
    )
    listener.close()
    assert own.stdout.split() == ["1", "AF_UNIX", "[]"]
    assert other.stdout.split() == ["0", "-", "[]"]
