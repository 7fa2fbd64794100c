"""modeld.system.gpu through the real pynvml against the fake libnvidia-ml.so.1 (tests/fakenvml).

Each NVML scenario runs in a child process that loaded the fake through LD_LIBRARY_PATH (read
only at process start), so the test process itself never loads an NVML library, and "library
not found" is real. The child opens a probe and answers "snapshot"/"close" commands on stdin
with one JSON line each; between commands the test rewrites the fake's state file.
"""

from __future__ import annotations

import ctypes.util
import json
import os
import select
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the fakenvml package

from fakenvml import (
    DRIVER_NOT_LOADED,
    NOT_SUPPORTED,
    FakeFailure,
    FakeGpu,
    FakeProcess,
    build_fake_nvml,
    fake_nvml_env,
    write_state,
)

from modeld.system.gpu import GpuDevice, GpuProcess, GpuState, attribute_gpu_memory

SERVICE = Path(__file__).resolve().parents[2] / "service"
MiB = 1 << 20
GiB = 1 << 30
TIMEOUT = 15.0

# Runs in the child. Spies on the pynvml functions the probe calls: how often, and whether
# any ran on the event loop's (main) thread.
CHILD = r"""
import asyncio, collections, dataclasses, functools, json, logging, os, sys, threading
import pynvml

if os.environ.get("HIDE_REAL_NVML"):  # only on hosts that have a real libnvidia-ml.so.1
    real_cdll = pynvml.CDLL
    def no_nvml(name, *args, **kwargs):
        if "nvidia-ml" in str(name):
            raise OSError(f"{name}: hidden by the test")
        return real_cdll(name, *args, **kwargs)
    pynvml.CDLL = no_nvml

calls = collections.Counter()
on_main_thread = set()

def spy(name):
    real = getattr(pynvml, name)
    @functools.wraps(real)
    def wrapper(*args, **kwargs):
        calls[name + ("(version)" if "version" in kwargs else "")] += 1
        if threading.current_thread() is threading.main_thread():
            on_main_thread.add(name)
        return real(*args, **kwargs)
    setattr(pynvml, name, wrapper)

for name in ["nvmlInit", "nvmlShutdown", "nvmlSystemGetDriverVersion", "nvmlDeviceGetCount",
             "nvmlDeviceGetHandleByIndex", "nvmlDeviceGetUUID", "nvmlDeviceGetName",
             "nvmlDeviceGetMemoryInfo", "nvmlDeviceGetUtilizationRates",
             "nvmlDeviceGetComputeRunningProcesses", "nvmlDeviceGetComputeRunningProcesses_v2",
             "nvmlDeviceGetGraphicsRunningProcesses", "nvmlDeviceGetGraphicsRunningProcesses_v2"]:
    spy(name)

from modeld.system.gpu import open_gpu_probe

class Collect(logging.Handler):
    def __init__(self):
        super().__init__()
        self.records = []
    def emit(self, record):
        self.records.append({"level": record.levelname, "message": record.getMessage()})

async def main():
    log = logging.getLogger("gpu-test")
    log.setLevel(logging.DEBUG)
    log.propagate = False
    collect = Collect()
    log.addHandler(collect)
    probe = await open_gpu_probe(log=log)

    def report(**fields):
        fields.update(available=probe.available, logs=collect.records, calls=dict(calls),
                      on_main_thread=sorted(on_main_thread))
        print(json.dumps(fields), flush=True)
        collect.records = []

    report()
    for line in sys.stdin:
        command = line.strip()
        if command == "snapshot":
            report(state=dataclasses.asdict(await probe.snapshot()))
        elif command == "close":
            await probe.close()
            await probe.close()
            report(state=dataclasses.asdict(await probe.snapshot()))
            return

asyncio.run(main())
"""


@dataclass(frozen=True)
class FakeLibraries:
    current: Path
    old_driver: Path


@pytest.fixture(scope="session")
def fake_nvml(tmp_path_factory: pytest.TempPathFactory) -> FakeLibraries:
    root = tmp_path_factory.mktemp("fakenvml")
    return FakeLibraries(
        current=build_fake_nvml(root / "current"),
        old_driver=build_fake_nvml(root / "old", old_driver=True),
    )


class Child:
    """A child process running a probe; see CHILD."""

    def __init__(self, library: Path | None, state: Path | None, stderr: Path) -> None:
        env = fake_nvml_env(library, state)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SERVICE), env.get("PYTHONPATH")]))
        if library is None and ctypes.util.find_library("nvidia-ml"):
            env["HIDE_REAL_NVML"] = "1"
        self._stderr = stderr
        stderr_fd = os.open(stderr, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            self._process = subprocess.Popen(
                [sys.executable, "-W", "error", "-c", CHILD],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=stderr_fd,
                env=env,
            )
        finally:
            os.close(stderr_fd)
        self._buffer = b""
        self.opened = self._read()

    def snapshot(self) -> dict[str, Any]:
        return self._command("snapshot")

    def close(self) -> dict[str, Any]:
        return self._command("close")

    def kill(self) -> None:
        if self._process.poll() is None:
            self._process.kill()
        self._process.wait(TIMEOUT)
        for stream in (self._process.stdin, self._process.stdout):
            if stream is not None:
                stream.close()

    def _command(self, command: str) -> dict[str, Any]:
        assert self._process.stdin is not None
        self._process.stdin.write(command.encode() + b"\n")
        self._process.stdin.flush()
        return self._read()

    def _read(self) -> dict[str, Any]:
        assert self._process.stdout is not None
        fd = self._process.stdout.fileno()
        while b"\n" not in self._buffer:
            ready, _, _ = select.select([fd], [], [], TIMEOUT)
            chunk = os.read(fd, 65536) if ready else b""
            if not chunk:
                pytest.fail(f"the probe child gave no answer:\n{self._stderr.read_text()}")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        result: dict[str, Any] = json.loads(line)
        return result


@pytest.fixture
def child(tmp_path: Path) -> Iterator[Any]:
    """Starts probe children (library, state file); kills them after the test."""
    children: list[Child] = []

    def start(library: Path | None, state: Path | None) -> Child:
        children.append(Child(library, state, tmp_path / f"child-{len(children)}.stderr"))
        return children[-1]

    yield start
    for c in children:
        c.kill()


def as_state(data: dict[str, Any]) -> GpuState:
    return GpuState(
        devices=tuple(GpuDevice(**d) for d in data["devices"]),
        processes=tuple(GpuProcess(**p) for p in data["processes"]),
        driver=data["driver"],
    )


def processes(state: GpuState) -> set[tuple[int, str, int | None]]:
    return {(p.pid, p.device_uuid, p.used) for p in state.processes}


def warnings(report: dict[str, Any]) -> list[str]:
    return [r["message"] for r in report["logs"] if r["level"] in ("WARNING", "ERROR")]


A100 = FakeGpu(
    uuid="GPU-a100-0000",
    name="NVIDIA A100-SXM4-80GB",
    total=80 * GiB,
    reserved=512 * MiB,
    other=100 * MiB,
    util=37,
    memutil=12,
)
T4 = FakeGpu(uuid="GPU-t4-0001", name="Tesla T4", total=16 * GiB, reserved=256 * MiB, util=5)
PROCS = [
    FakeProcess(gpu=0, pid=1001, used=10 * GiB),
    FakeProcess(gpu=0, pid=1001, used=None, kind="graphics"),  # the same process, twice
    FakeProcess(gpu=1, pid=1002, used=2 * GiB),
    FakeProcess(gpu=1, pid=1003, used=None, kind="graphics"),
]


def test_two_gpus_report_memory_utilisation_and_processes(
    fake_nvml: FakeLibraries, child: Any, tmp_path: Path
) -> None:
    state_file = tmp_path / "gpu.state"
    write_state(state_file, driver="550.54.15", gpus=[A100, T4], procs=PROCS)
    probe = child(fake_nvml.current, state_file)
    assert probe.opened["available"] is True
    assert [r["message"] for r in probe.opened["logs"]] == [
        "GPU features on: NVIDIA driver 550.54.15, 2 GPU(s)"
    ]

    report = probe.snapshot()
    state = as_state(report["state"])
    assert state.driver == "550.54.15"
    a100_used = 100 * MiB + 10 * GiB  # v2: other + processes, without reserved
    assert state.devices == (
        GpuDevice(
            index=0,
            uuid="GPU-a100-0000",
            name="NVIDIA A100-SXM4-80GB",
            total=80 * GiB,
            free=80 * GiB - 512 * MiB - a100_used,
            used=a100_used,
            utilization=37,
            memory_utilization=12,
        ),
        GpuDevice(
            index=1,
            uuid="GPU-t4-0001",
            name="Tesla T4",
            total=16 * GiB,
            free=16 * GiB - 256 * MiB - 2 * GiB,
            used=2 * GiB,
            utilization=5,
            memory_utilization=0,
        ),
    )
    assert processes(state) == {
        (1001, "GPU-a100-0000", 10 * GiB),
        (1002, "GPU-t4-0001", 2 * GiB),
        (1003, "GPU-t4-0001", None),
    }
    assert len(state.processes) == 3, "pid 1001 (compute and graphics) must be listed once"
    t4 = state.device("GPU-t4-0001")
    assert t4 is not None and t4.name == "Tesla T4"
    assert state.device("GPU-missing") is None
    assert warnings(report) == []
    assert report["on_main_thread"] == [], "NVML calls ran on the event loop's thread"
    assert report["calls"]["nvmlDeviceGetMemoryInfo(version)"] == 2

    closed = probe.close()
    assert closed["calls"]["nvmlShutdown"] == 1, "close() twice must shut NVML down once"
    assert closed["available"] is False
    assert closed["state"] == {"devices": [], "processes": [], "driver": ""}


def test_a_state_change_is_seen_by_the_next_snapshot(
    fake_nvml: FakeLibraries, child: Any, tmp_path: Path
) -> None:
    state_file = tmp_path / "gpu.state"
    write_state(state_file, gpus=[A100, T4], procs=PROCS)
    probe = child(fake_nvml.current, state_file)
    before = as_state(probe.snapshot()["state"])
    assert before.device("GPU-a100-0000") is not None

    busier = replace(A100, util=99, other=0)
    write_state(
        state_file,
        driver="555.42.02",
        gpus=[busier, T4],
        procs=[FakeProcess(gpu=0, pid=2001, used=30 * GiB)],
    )
    after = as_state(probe.snapshot()["state"])
    assert after.driver == "555.42.02"
    a100 = after.device("GPU-a100-0000")
    assert a100 is not None
    assert (a100.used, a100.free, a100.utilization) == (30 * GiB, 50 * GiB - 512 * MiB, 99)
    t4 = after.device("GPU-t4-0001")
    assert t4 is not None and t4.used == 0
    assert processes(after) == {(2001, "GPU-a100-0000", 30 * GiB)}


def test_an_old_driver_falls_back_to_v1_memory_and_v2_process_queries(
    fake_nvml: FakeLibraries, child: Any, tmp_path: Path
) -> None:
    state_file = tmp_path / "gpu.state"
    write_state(state_file, gpus=[A100, T4], procs=PROCS)
    probe = child(fake_nvml.old_driver, state_file)
    probe.snapshot()
    report = probe.snapshot()
    state = as_state(report["state"])

    a100 = state.device("GPU-a100-0000")
    assert a100 is not None
    v1_used = 512 * MiB + 100 * MiB + 10 * GiB  # v1: "used" includes the reserved memory
    assert (a100.total, a100.used, a100.free) == (80 * GiB, v1_used, 80 * GiB - v1_used)
    t4 = state.device("GPU-t4-0001")
    assert t4 is not None and t4.used == 256 * MiB + 2 * GiB
    assert processes(state) == {
        (1001, "GPU-a100-0000", 10 * GiB),
        (1002, "GPU-t4-0001", 2 * GiB),
        (1003, "GPU-t4-0001", None),
    }
    assert warnings(report) == []
    calls = report["calls"]
    # Each missing capability was tried once, then remembered (2 snapshots x 2 GPUs).
    assert calls["nvmlDeviceGetMemoryInfo(version)"] == 1
    assert calls["nvmlDeviceGetMemoryInfo"] == 4
    assert calls["nvmlDeviceGetComputeRunningProcesses"] == 1
    assert calls["nvmlDeviceGetComputeRunningProcesses_v2"] == 4
    assert calls["nvmlDeviceGetGraphicsRunningProcesses_v2"] == 4
    assert "nvmlDeviceGetGraphicsRunningProcesses" not in calls


def test_without_the_nvml_library_gpu_features_are_off(child: Any, tmp_path: Path) -> None:
    state_file = tmp_path / "gpu.state"
    write_state(state_file, gpus=[A100])
    probe = child(None, state_file)  # no LD_LIBRARY_PATH: pynvml's dlopen finds nothing
    assert probe.opened["available"] is False
    [line] = probe.opened["logs"]
    assert line["level"] == "INFO"
    assert "GPU features are off" in line["message"]
    assert "libnvidia-ml.so.1 not found" in line["message"]
    report = probe.snapshot()
    assert report["state"] == {"devices": [], "processes": [], "driver": ""}
    assert report["logs"] == []
    assert "nvmlShutdown" not in probe.close()["calls"]


@pytest.mark.parametrize("init_error", [DRIVER_NOT_LOADED, None], ids=["init_error", "no-state"])
def test_without_the_kernel_driver_gpu_features_are_off(
    fake_nvml: FakeLibraries, child: Any, tmp_path: Path, init_error: int | None
) -> None:
    state_file = None
    if init_error is not None:
        state_file = tmp_path / "gpu.state"
        write_state(state_file, gpus=[A100], init_error=init_error)
    probe = child(fake_nvml.current, state_file)  # no state file: the fake's driver is "unloaded"
    assert probe.opened["available"] is False
    [line] = probe.opened["logs"]
    assert line["level"] == "WARNING"
    assert line["message"].startswith("GPU features are off")
    assert "driver is not loaded" in line["message"]
    assert "Driver Not Loaded" in line["message"]
    report = probe.snapshot()
    assert report["state"]["devices"] == []
    assert report["logs"] == []


def test_a_lost_gpu_is_left_out_with_one_warning(
    fake_nvml: FakeLibraries, child: Any, tmp_path: Path
) -> None:
    state_file = tmp_path / "gpu.state"
    write_state(state_file, gpus=[A100, T4], procs=PROCS)
    probe = child(fake_nvml.current, state_file)
    assert len(probe.snapshot()["state"]["devices"]) == 2

    t4_procs = [FakeProcess(gpu="GPU-t4-0001", pid=1002, used=3 * GiB)]
    write_state(state_file, gpus=[T4], procs=t4_procs)  # the A100 fell off the bus
    reports = [probe.snapshot() for _ in range(3)]
    for report in reports:
        state = as_state(report["state"])
        assert [(d.index, d.uuid) for d in state.devices] == [(1, "GPU-t4-0001")]
        assert processes(state) == {(1002, "GPU-t4-0001", 3 * GiB)}
    lost = [w for r in reports for w in warnings(r)]
    assert len(lost) == 1, lost
    assert "GPU-a100-0000" in lost[0] and "GPU is lost" in lost[0]

    write_state(state_file, gpus=[A100, T4], procs=PROCS)  # it came back
    report = probe.snapshot()
    assert [d["uuid"] for d in report["state"]["devices"]] == ["GPU-a100-0000", "GPU-t4-0001"]
    assert any("reports again" in r["message"] for r in report["logs"])


def test_an_error_on_one_device_leaves_only_that_device_out(
    fake_nvml: FakeLibraries, child: Any, tmp_path: Path
) -> None:
    state_file = tmp_path / "gpu.state"
    fail = FakeFailure(fn="nvmlDeviceGetMemoryInfo", gpu=0, code=999)  # also matches ..._v2
    write_state(state_file, gpus=[A100, T4], procs=PROCS, fails=[fail])
    probe = child(fake_nvml.current, state_file)
    first, second = probe.snapshot(), probe.snapshot()
    for report in (first, second):
        assert [d["uuid"] for d in report["state"]["devices"]] == ["GPU-t4-0001"]
    assert len(warnings(first)) == 1 and "GPU-a100-0000" in warnings(first)[0]
    assert warnings(second) == []


def test_utilisation_not_supported_is_none(
    fake_nvml: FakeLibraries, child: Any, tmp_path: Path
) -> None:
    state_file = tmp_path / "gpu.state"
    fail = FakeFailure(fn="nvmlDeviceGetUtilizationRates", gpu=1, code=NOT_SUPPORTED)
    write_state(state_file, gpus=[A100, T4], procs=PROCS, fails=[fail])
    probe = child(fake_nvml.current, state_file)
    report = probe.snapshot()
    state = as_state(report["state"])
    a100, t4 = state.device("GPU-a100-0000"), state.device("GPU-t4-0001")
    assert a100 is not None and t4 is not None
    assert (a100.utilization, a100.memory_utilization) == (37, 12)
    assert (t4.utilization, t4.memory_utilization) == (None, None)
    assert (t4.used, t4.total) == (2 * GiB, 16 * GiB)
    assert len(state.processes) == 3
    assert warnings(report) == []


# -- pure helpers ---------------------------------------------------------------------------


def test_attribute_gpu_memory_sums_each_models_pids_per_device() -> None:
    found = [
        GpuProcess(pid=10, device_uuid="GPU-a", used=4 * GiB),
        GpuProcess(pid=11, device_uuid="GPU-a", used=1 * GiB),
        GpuProcess(pid=11, device_uuid="GPU-b", used=2 * GiB),
        GpuProcess(pid=20, device_uuid="GPU-b", used=None),
        GpuProcess(pid=99, device_uuid="GPU-a", used=8 * GiB),  # no model's
    ]
    result = attribute_gpu_memory(found, {"llama": [10, 11], "whisper": {20}, "idle": ()})
    assert result == {
        "llama": {"GPU-a": 5 * GiB, "GPU-b": 2 * GiB},
        "whisper": {"GPU-b": 0},
        "idle": {},
    }
