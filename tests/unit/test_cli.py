"""modeldctl against a fake org.modeld1 on a private dbus-daemon.

The fake (a test double of the daemon's D-Bus API only) runs on its own event loop in a
thread of the test process; modeldctl runs as a subprocess, like a user would run it.
"""

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from dbus_next.aio.message_bus import MessageBus
from dbus_next.constants import PropertyAccess, RequestNameReply
from dbus_next.errors import DBusError
from dbus_next.service import ServiceInterface, dbus_property, method, signal

from modeld.bus.api import MANAGER_PROPERTIES, MODEL_PROPERTIES
from modeld.naming import MANAGER_PATH, model_object_path

SERVICE_DIR = Path(__file__).resolve().parents[2] / "service"
DBUS_DAEMON = shutil.which("dbus-daemon")
MiB = 1024 * 1024
GiB = 1024 * MiB

pytestmark = pytest.mark.skipif(DBUS_DAEMON is None, reason="dbus-daemon is not installed")


def dbus_types(**types: str) -> Callable[[Any], Any]:
    """Give a function the D-Bus signature annotations dbus-next reads.

    Equivalent to writing ``def Load(self, name: 's') -> 'o'`` but without string
    annotations that linters take for (undefined) forward references.
    """

    def decorate(fn: Any) -> Any:
        fn.__annotations__ = {"return" if k == "return_" else k: v for k, v in types.items()}
        return fn

    return decorate


# -- the fake daemon -----------------------------------------------------------------------

EMPTY: dict[str, Any] = {"s": "", "u": 0, "t": 0, "b": False, "as": []}
"""A property's value before the fake sets one, by signature."""

# A load script: steps of (delay in seconds | "gate" | "leave", property changes).
# The first step runs inside Load, before its reply; the rest run in the background.
Script = list[tuple[float | str, dict[str, Any]]]


class FakeModel(ServiceInterface):
    def __init__(self, fake: "FakeModeld", name: str, backend: str, **values: Any) -> None:
        super().__init__("org.modeld1.Model")
        self.fake = fake
        self.path = model_object_path(name)
        self.values: dict[str, Any] = {
            prop: EMPTY[signature] for prop, signature in MODEL_PROPERTIES.items()
        }
        self.values.update(Name=name, Backend=backend, State="unloaded", MemoryMax=4 * GiB)
        self.values.update(values)
        self.script: Script = [
            (0, {"State": "loading", "LastError": ""}),
            (0.05, {"State": "ready", "MainPID": 4242, "MemoryCurrent": 312 * MiB}),
        ]
        self.gate = asyncio.Event()
        self.set_pinned_calls: list[bool] = []

    def change(self, changes: dict[str, Any]) -> None:
        self.values.update(changes)
        self.emit_properties_changed(changes)

    async def run_script(self, steps: Script) -> None:
        for delay, changes in steps:
            if delay == "gate":
                await self.gate.wait()
            elif delay == "leave":  # modeld goes away (after the CLI got the state)
                await asyncio.sleep(0.2)
                await self.fake.bus.release_name("org.modeld1")
                continue
            else:
                assert isinstance(delay, float | int)
                await asyncio.sleep(delay)
            self.change(changes)

    @method()
    @dbus_types(options="a{sv}")
    def Load(self, options):
        self.fake.start_load(self, options)

    @method()
    @dbus_types(options="a{sv}")
    def Unload(self, options):
        self.change({"State": "unloaded", "MainPID": 0, "MemoryCurrent": 0})

    @method()
    @dbus_types(pinned="b")
    def SetPinned(self, pinned):
        self.set_pinned_calls.append(pinned)
        self.change({"Pinned": pinned})


def _model_property(prop: str, signature: str) -> Any:
    def getter(self: FakeModel) -> Any:
        return self.values[prop]

    getter.__name__ = prop
    getter.__annotations__ = {"return": signature}
    return dbus_property(access=PropertyAccess.READ)(getter)


for _prop, _signature in MODEL_PROPERTIES.items():
    setattr(FakeModel, _prop, _model_property(_prop, _signature))


class FakeManager(ServiceInterface):
    def __init__(self, fake: "FakeModeld") -> None:
        super().__init__("org.modeld1.Manager")
        self.fake = fake

    # Methods that can fail are async: dbus-next logs a traceback for a DBusError
    # raised from a synchronous method (after sending the error reply correctly).
    def _model(self, name: str) -> FakeModel:
        try:
            return self.fake.models[name]
        except KeyError:
            raise DBusError("org.modeld1.Error.NoSuchModel", f"no such model: {name}") from None

    @method()
    @dbus_types(name="s", options="a{sv}", return_="o")
    async def Load(self, name, options):
        model = self._model(name)
        self.fake.start_load(model, options)
        return model.path

    @method()
    @dbus_types(name="s", options="a{sv}")
    async def Unload(self, name, options):
        model = self._model(name)
        self.fake.unload_calls.append((name, {k: v.value for k, v in options.items()}))
        model.change({"State": "unloaded", "MainPID": 0, "MemoryCurrent": 0})
        self.ModelUnloaded(name, model.path, "requested")

    @method()
    @dbus_types(return_="a(ssso)")
    def ListModels(self):
        return [
            [m.values["Name"], m.values["State"], m.values["Backend"], m.path]
            for m in self.fake.models.values()
        ]

    @method()
    @dbus_types(name="s", return_="o")
    async def GetModel(self, name):
        return self._model(name).path

    @method()
    def Reload(self):
        self.fake.reload_calls += 1

    @signal()
    @dbus_types(return_="so")
    def ModelLoaded(self, name, path):
        return [name, path]

    @signal()
    @dbus_types(return_="sos")
    def ModelUnloaded(self, name, path, reason):
        return [name, path, reason]


MANAGER_VALUES: dict[str, Callable[["FakeModeld"], Any]] = {
    "Version": lambda fake: "0.1.0-fake",
    "LoadedCount": lambda fake: sum(m.values["State"] != "unloaded" for m in fake.models.values()),
    "MaxLoaded": lambda fake: 4,
    "MemoryBudget": lambda fake: 16 * GiB,
    "MemoryUsed": lambda fake: sum(m.values["MemoryCurrent"] for m in fake.models.values()),
}


def _manager_property(prop: str, signature: str) -> Any:
    def getter(self: FakeManager) -> Any:
        return MANAGER_VALUES[prop](self.fake)

    getter.__name__ = prop
    getter.__annotations__ = {"return": signature}
    return dbus_property(access=PropertyAccess.READ)(getter)


for _prop, _signature in MANAGER_PROPERTIES.items():
    setattr(FakeManager, _prop, _manager_property(_prop, _signature))


class FakeModeld:
    """org.modeld1 on its own event loop thread."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.bus: MessageBus
        self.models: dict[str, FakeModel] = {}
        self.load_calls: list[tuple[str, dict[str, Any]]] = []
        self.unload_calls: list[tuple[str, dict[str, Any]]] = []
        self.reload_calls = 0
        self._tasks: set[asyncio.Task[None]] = set()

    def run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    def call(self, fn: Callable[[], Any]) -> Any:
        async def wrapper() -> Any:
            return fn()

        return self.run(wrapper())

    def start(self) -> None:
        self.thread.start()
        self.run(self._setup())

    async def _setup(self) -> None:
        now_usec = int(time.time() * 1_000_000)
        self.add("demo", "llama-cpp")
        self.add(
            "tiny",
            "reference",
            State="ready",
            MainPID=77,
            MemoryCurrent=100 * MiB,
            MemoryMax=512 * MiB,
            MemoryPeak=150 * MiB,
            LastUsed=now_usec - 12_000_000,
            Pinned=True,
            Endpoint="unix:/run/modeld/backends/tiny.sock",
            LoadCount=1,
        )
        broken = self.add(
            "broken",
            "vllm",
            State="failed",
            LastError="backend exited with status 1 before it was ready: "
            "CUDA error: out of memory (tried to allocate 20.00 GiB)",
        )
        broken.script = [
            (0, {"State": "loading", "LastError": ""}),
            (0.05, {"State": "failed", "LastError": "CUDA error: out of memory, again"}),
        ]
        self.add("vanish", "reference").script = [
            (0, {"State": "loading"}),
            (0.05, {"State": "unloading"}),
            (0.05, {"State": "unloaded"}),
        ]
        self.add("ghost", "reference").script = [(0, {"State": "loading"}), ("leave", {})]
        self.bus = await MessageBus(bus_address=self.address).connect()
        self.manager = FakeManager(self)
        self.bus.export(MANAGER_PATH, self.manager)
        for model in self.models.values():
            self.bus.export(model.path, model)
        reply = await self.bus.request_name("org.modeld1")
        assert reply == RequestNameReply.PRIMARY_OWNER

    def add(self, name: str, backend: str, **values: Any) -> FakeModel:
        model = FakeModel(self, name, backend, **values)
        self.models[name] = model
        return model

    def start_load(self, model: FakeModel, options: dict[str, Any]) -> None:
        self.load_calls.append((model.values["Name"], {k: v.value for k, v in options.items()}))
        if model.values["State"] in ("ready", "busy"):
            return
        (_, first), *rest = model.script
        model.change(first)
        task = self.loop.create_task(model.run_script(rest))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def open_gate(self, name: str) -> None:
        self.loop.call_soon_threadsafe(self.models[name].gate.set)

    def stop(self) -> None:
        async def shutdown() -> None:
            for task in list(self._tasks):
                task.cancel()
            self.bus.disconnect()
            await self.bus.wait_for_disconnect()
            # dbus-next only shuts the socket down; close it to keep pytest's
            # ResourceWarning check quiet.
            self.bus._stream.close()
            self.bus._sock.close()

        self.run(shutdown())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


# -- fixtures -----------------------------------------------------------------------------


@pytest.fixture
def fake(bus_address: str) -> Iterator[FakeModeld]:
    service = FakeModeld(bus_address)
    service.start()
    try:
        yield service
    finally:
        service.stop()


def cli_env(session: str | None = None, system: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DBUS_")}
    env["PYTHONPATH"] = str(SERVICE_DIR)
    if session is not None:
        env["DBUS_SESSION_BUS_ADDRESS"] = session
    if system is not None:
        env["DBUS_SYSTEM_BUS_ADDRESS"] = system
    return env


def modeldctl(
    *args: str, address: str | None = None, env: dict[str, str] | None = None, timeout: float = 20
) -> subprocess.CompletedProcess[str]:
    """Run modeldctl; ``address`` is the session bus, used with --user."""
    return subprocess.run(
        [sys.executable, "-m", "modeld.cli.main", *args],
        env=env if env is not None else cli_env(session=address),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def column_starts(header: str, names: list[str]) -> list[int]:
    return [header.index(name) for name in names]


# -- list / status --------------------------------------------------------------------------


def test_list_table(fake: FakeModeld) -> None:
    result = modeldctl("--user", "list", address=fake.address)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    header = lines[0]
    cols = ["NAME", "STATE", "BACKEND", "MEMORY", "PEAK", "PINNED", "LAST USED", "LAST ERROR"]
    starts = column_starts(header, cols)
    assert starts == sorted(starts) and starts[0] == 0
    rows = {line.split()[0]: line for line in lines[1:]}
    assert set(rows) == {"demo", "tiny", "broken", "vanish", "ghost"}
    tiny = rows["tiny"]
    # Aligned: each cell starts where its header does.
    assert tiny[starts[1] :].startswith("ready ")
    assert tiny[starts[2] :].startswith("reference ")
    assert tiny[starts[3] :].startswith("100M/512M ")
    assert tiny[starts[4] :].startswith("150M ")
    assert tiny[starts[5] :].startswith("yes ")
    assert re.match(r"1[2-9]s ago", tiny[starts[6] :])
    assert rows["demo"][starts[3] :].startswith("-/4G ")
    assert rows["demo"][starts[4] :].startswith("- ")  # no peak learned yet
    assert rows["demo"][starts[6] :].strip() == "-"
    broken = rows["broken"]
    assert broken[starts[7] :].startswith("backend exited with status 1")
    assert broken.endswith("...")
    assert "20.00 GiB" not in broken  # truncated in the table
    assert tiny.rstrip() == tiny and not tiny[starts[7] :].strip()  # no error for ready ones


def test_list_json(fake: FakeModeld) -> None:
    result = modeldctl("--json", "--user", "list", address=fake.address)
    assert result.returncode == 0, result.stderr
    models = {m["name"]: m for m in json.loads(result.stdout)["models"]}
    assert list(models) == ["demo", "tiny", "broken", "vanish", "ghost"]
    tiny = models["tiny"]
    assert tiny["state"] == "ready"
    assert tiny["backend"] == "reference"
    assert tiny["memory_current"] == 100 * MiB
    assert tiny["memory_max"] == 512 * MiB
    assert tiny["memory_peak"] == 150 * MiB
    assert tiny["main_pid"] == 77
    assert tiny["pinned"] is True
    assert tiny["in_flight"] == 0
    assert tiny["concurrency_groups"] == []
    assert tiny["path"] == model_object_path("tiny")
    assert time.time() - tiny["last_used_usec"] / 1e6 == pytest.approx(12, abs=5)
    assert models["broken"]["last_error"].endswith("(tried to allocate 20.00 GiB)")
    assert set(tiny) == {
        *("name", "backend", "state", "unit", "control_group", "main_pid", "endpoint"),
        *("memory_current", "memory_max", "memory_peak", "gpu_memory", "gpu", "last_used_usec"),
        "in_flight",
        *("pinned", "concurrency_groups", "last_error", "load_count", "retry_after_usec"),
        "path",
    }


def test_json_flag_after_command(fake: FakeModeld) -> None:
    result = modeldctl("list", "--json", "--user", address=fake.address)
    assert result.returncode == 0, result.stderr
    assert len(json.loads(result.stdout)["models"]) == 5


def test_status(fake: FakeModeld) -> None:
    result = modeldctl("--user", "status", address=fake.address)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "Version:  0.1.0-fake" in out
    assert "Loaded:   2 of 4" in out  # tiny (ready) and broken (failed)
    assert "Memory:   100M of 16G budget" in out
    table = out[out.index("NAME") :].splitlines()
    assert [line.split()[0] for line in table[1:]] == ["tiny", "broken"]
    assert "unix:/run/modeld/backends/tiny.sock" in table[1]
    peak = table[0].index("PEAK")
    assert table[1][peak:].startswith("150M ")


def test_status_json(fake: FakeModeld) -> None:
    result = modeldctl("--user", "--json", "status", address=fake.address)
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    assert status["version"] == "0.1.0-fake"
    assert status["loaded_count"] == 2
    assert status["max_loaded"] == 4
    assert status["memory_budget"] == 16 * GiB
    assert status["memory_used"] == 100 * MiB
    assert [m["name"] for m in status["models"]] == ["tiny", "broken"]


def test_system_bus_is_the_default(fake: FakeModeld, tmp_path: Path) -> None:
    env = cli_env(session=f"unix:path={tmp_path}/no-session-bus", system=fake.address)
    result = modeldctl("list", env=env)
    assert result.returncode == 0, result.stderr
    assert "tiny" in result.stdout


# -- load ---------------------------------------------------------------------------------


def test_load_shows_progress_as_it_happens(fake: FakeModeld) -> None:
    fake.models["demo"].script = [
        (0, {"State": "loading"}),
        ("gate", {"State": "ready", "MainPID": 4242, "MemoryCurrent": 312 * MiB}),
    ]
    proc = subprocess.Popen(
        [sys.executable, "-m", "modeld.cli.main", "--user", "load", "demo"],
        env=cli_env(session=fake.address),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        # The model stays loading until the gate opens: this line must arrive before.
        assert proc.stdout.readline() == "demo: loading\n"
        assert proc.poll() is None
        fake.open_gate("demo")
        out, err = proc.communicate(timeout=10)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 0, err
    assert re.fullmatch(r"demo: ready \(pid 4242, \d+ ms\)\n", out)
    assert fake.load_calls == [("demo", {})]  # no "wait": progress comes from signals


def test_load_timed_steps(fake: FakeModeld) -> None:
    result = modeldctl("--user", "load", "demo", address=fake.address)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "demo: loading"
    assert re.fullmatch(r"demo: ready \(pid 4242, \d+ ms\)", lines[1])
    assert len(lines) == 2


def test_load_already_ready(fake: FakeModeld) -> None:
    result = modeldctl("--user", "load", "tiny", address=fake.address, timeout=5)
    assert result.returncode == 0, result.stderr
    assert re.fullmatch(r"tiny: ready \(pid 77, \d+ ms\)\n", result.stdout)


def test_load_json(fake: FakeModeld) -> None:
    result = modeldctl("--user", "--json", "load", "demo", "--force", address=fake.address)
    assert result.returncode == 0, result.stderr
    model = json.loads(result.stdout)  # exactly one JSON document, no progress lines
    assert model["name"] == "demo"
    assert model["state"] == "ready"
    assert model["main_pid"] == 4242
    assert model["memory_current"] == 312 * MiB
    assert fake.load_calls == [("demo", {"force": True})]


def test_load_failure(fake: FakeModeld) -> None:
    result = modeldctl("--user", "load", "broken", address=fake.address)
    assert result.returncode == 1
    # The stale LastError from before this load is not mistaken for its outcome.
    assert result.stdout.splitlines() == ["broken: loading", "broken: failed"]
    assert result.stderr == "modeldctl: broken failed to load: CUDA error: out of memory, again\n"


def test_load_failure_json(fake: FakeModeld) -> None:
    result = modeldctl("--user", "--json", "load", "broken", address=fake.address)
    assert result.returncode == 1
    out = json.loads(result.stdout)
    assert out["error"]["name"] == "org.modeld1.Error.LoadFailed"
    assert "CUDA error: out of memory, again" in out["error"]["message"]
    assert out["model"]["state"] == "failed"
    assert out["model"]["last_error"] == "CUDA error: out of memory, again"


def test_load_unloaded_while_loading(fake: FakeModeld) -> None:
    result = modeldctl("--user", "load", "vanish", address=fake.address)
    assert result.returncode == 1
    assert result.stdout.splitlines() == [
        "vanish: loading",
        "vanish: unloading",
        "vanish: unloaded",
    ]
    assert result.stderr == "modeldctl: vanish was unloaded while loading\n"


def test_load_daemon_leaves_the_bus(fake: FakeModeld) -> None:
    result = modeldctl("--user", "load", "ghost", address=fake.address, timeout=10)
    assert result.returncode == 1
    assert result.stdout == "ghost: loading\n"
    assert result.stderr == "modeldctl: modeld left the session bus\n"


def test_load_no_wait(fake: FakeModeld) -> None:
    fake.models["demo"].script = [(0, {"State": "loading"}), ("gate", {"State": "ready"})]
    result = modeldctl("--user", "load", "demo", "--no-wait", address=fake.address, timeout=5)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"demo: load requested ({model_object_path('demo')})\n"
    assert fake.load_calls == [("demo", {})]
    assert fake.models["demo"].values["State"] == "loading"


@pytest.mark.parametrize("command", [["load", "nope"], ["unload", "nope"], ["pin", "nope"]])
def test_unknown_model(fake: FakeModeld, command: list[str]) -> None:
    result = modeldctl("--user", *command, address=fake.address)
    assert result.returncode == 1
    assert result.stderr == "modeldctl: no such model: nope\n"
    assert result.stdout == ""
    result = modeldctl("--user", "--json", *command, address=fake.address)
    assert result.returncode == 1
    assert json.loads(result.stdout) == {
        "error": {"name": "org.modeld1.Error.NoSuchModel", "message": "no such model: nope"}
    }


# -- unload / pin / reload ----------------------------------------------------------------


def test_unload(fake: FakeModeld) -> None:
    result = modeldctl("--user", "unload", "tiny", "--force", address=fake.address)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "tiny: unloaded\n"
    assert fake.unload_calls == [("tiny", {"force": True})]
    assert fake.models["tiny"].values["State"] == "unloaded"


def test_pin_unpin(fake: FakeModeld) -> None:
    result = modeldctl("--user", "pin", "demo", address=fake.address)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "demo: pinned\n"
    assert fake.models["demo"].set_pinned_calls == [True]
    result = modeldctl("--user", "--json", "unpin", "demo", address=fake.address)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["pinned"] is False
    assert fake.models["demo"].set_pinned_calls == [True, False]
    assert fake.models["demo"].values["Pinned"] is False


def test_reload(fake: FakeModeld) -> None:
    result = modeldctl("--user", "reload", address=fake.address)
    assert result.returncode == 0, result.stderr
    assert fake.reload_calls == 1


# -- failures to reach modeld, usage errors ---------------------------------------------


def test_daemon_not_running(bus_address: str) -> None:
    result = modeldctl("--user", "list", address=bus_address)
    assert result.returncode == 1
    assert result.stderr.startswith("modeldctl: cannot reach org.modeld1 on the session bus: ")
    assert result.stdout == ""
    result = modeldctl("--user", "--json", "status", address=bus_address)
    assert result.returncode == 1
    error = json.loads(result.stdout)["error"]
    assert error["name"] == "org.freedesktop.DBus.Error.ServiceUnknown"
    assert error["message"].startswith("cannot reach org.modeld1 on the session bus: ")


def test_bus_not_running(tmp_path: Path) -> None:
    env = cli_env(system=f"unix:path={tmp_path}/missing")
    result = modeldctl("status", env=env)
    assert result.returncode == 1
    assert result.stderr == (
        "modeldctl: cannot reach org.modeld1 on the system bus: No such file or directory\n"
    )


@pytest.mark.parametrize(
    "args",
    [[], ["frobnicate"], ["load"], ["logs", "demo", "-n", "many"], ["config"], ["list", "x"]],
)
def test_usage_errors(args: list[str], tmp_path: Path) -> None:
    result = modeldctl(*args, env=cli_env(system=f"unix:path={tmp_path}/missing"))
    assert result.returncode == 2
    assert "usage: modeldctl" in result.stderr


# -- logs ---------------------------------------------------------------------------------


def test_logs_execs_journalctl(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    journalctl = bin_dir / "journalctl"
    journalctl.write_text("#!/bin/sh\necho $$\nprintf '%s\\n' \"$@\"\nexit 3\n")
    journalctl.chmod(0o755)
    env = cli_env()
    env["PATH"] = f"{bin_dir}:{env.get('PATH', '/usr/bin:/bin')}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "modeld.cli.main", "logs", "my model", "-n", "5", "-f"],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    out, _ = proc.communicate(timeout=10)
    pid, *argv = out.splitlines()
    assert int(pid) == proc.pid  # exec'd, not a child
    assert argv == ["MODELD_MODEL=my model", "-o", "short-iso", "--no-pager", "-n", "5", "-f"]
    assert proc.returncode == 3


# -- local commands: backends, config check ----------------------------------------------


def write_config(root: Path, models: dict[str, str]) -> Path:
    backends = root / "backends"
    for name in ("llama-cpp", "cuda12-whisper"):
        (backends / name).mkdir(parents=True)
        (backends / name / "run.sh").write_text("#!/bin/sh\nexit 0\n")
        (backends / name / "run.sh").chmod(0o755)
    (backends / "llama-cpp" / "metadata.json").write_text('{"alias": "llama"}')
    (backends / "whisper").mkdir()
    (backends / "whisper" / "metadata.json").write_text('{"meta_backend_for": "cuda12-whisper"}')
    (backends / "broken").mkdir()  # no run.sh: a discovery problem, not a config error
    models_dir = root / "models"
    models_dir.mkdir()
    for name, backend in models.items():
        (models_dir / f"{name}.toml").write_text(f'backend = "{backend}"\n')
    config = root / "modeld.toml"
    config.write_text('[daemon]\nmodels_dir = "models"\nbackends_dirs = ["backends"]\n')
    return config


def test_config_check_ok(tmp_path: Path) -> None:
    config = write_config(tmp_path, {"chat": "llama", "stt": "whisper", "code": "llama-cpp"})
    result = modeldctl("config", "check", "--config", str(config), env=cli_env())
    assert result.returncode == 0, result.stderr
    assert result.stdout == "configuration OK: 3 models\n"
    assert "broken: skipped: no run.sh" in result.stderr  # reported as a warning


def test_config_check_unresolved_backend(tmp_path: Path) -> None:
    config = write_config(tmp_path, {"chat": "llama", "odd": "nope", "weird": "gone"})
    result = modeldctl("config", "check", "--config", str(config), env=cli_env())
    assert result.returncode == 1
    errors = result.stderr.splitlines()
    assert len(errors) == 2
    assert all(line.startswith("modeldctl: ") for line in errors)
    assert "odd.toml: backend: no backend or alias named 'nope'" in errors[0]
    assert "weird.toml: backend: no backend or alias named 'gone'" in errors[1]
    result = modeldctl("--json", "config", "check", "--config", str(config), env=cli_env())
    assert result.returncode == 1
    out = json.loads(result.stdout)
    assert out["error"]["name"] == "org.modeld1.Error.NoSuchBackend"
    assert len(out["problems"]) == 2


def test_config_check_invalid(tmp_path: Path) -> None:
    config = write_config(tmp_path, {"chat": "llama"})
    (tmp_path / "models" / "chat.toml").write_text('backend = "llama"\nmemory_max = "lots"\n')
    result = modeldctl("config", "check", "--config", str(config), env=cli_env())
    assert result.returncode == 1
    assert result.stderr.startswith(f"modeldctl: {tmp_path / 'models' / 'chat.toml'}: memory_max")
    assert len(result.stderr.splitlines()) == 1
    result = modeldctl("config", "check", "--config", str(tmp_path / "nothere.toml"), env=cli_env())
    assert result.returncode == 1
    assert "nothere.toml" in result.stderr


def test_backends(tmp_path: Path) -> None:
    config = write_config(tmp_path, {"chat": "llama", "stt": "whisper", "code": "llama-cpp"})
    result = modeldctl("backends", "--config", str(config), env=cli_env())
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["NAME", "ALIAS", "META", "FOR", "AVAILABLE", "PATH", "MODELS"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    backends = tmp_path / "backends"
    llama_dir, whisper_dir = str(backends / "llama-cpp"), str(backends / "cuda12-whisper")
    assert rows["llama-cpp"] == ["llama-cpp", "llama", "-", "yes", llama_dir, "chat,", "code"]
    assert rows["whisper"] == ["whisper", "-", "cuda12-whisper", "yes", whisper_dir, "stt"]
    assert rows["cuda12-whisper"][-1] == "-"
    assert "reference" in rows  # the built-in backends directory is searched last
    assert "broken" not in rows

    result = modeldctl("--json", "backends", "--config", str(config), env=cli_env())
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    by_name = {b["name"]: b for b in out["backends"]}
    assert by_name["llama-cpp"]["models"] == ["chat", "code"]
    assert by_name["llama-cpp"]["alias"] == "llama"
    assert by_name["llama-cpp"]["available"] is True
    assert by_name["llama-cpp"]["unavailable"] is None
    assert by_name["whisper"]["meta_backend_for"] == "cuda12-whisper"
    assert by_name["whisper"]["run"] == str(backends / "cuda12-whisper" / "run.sh")
    assert out["backends_dirs"][0] == str(backends)
    assert any("broken" in p for p in out["problems"])
