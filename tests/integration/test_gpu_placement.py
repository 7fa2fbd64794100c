"""GPU placement and VRAM-fit eviction through the real pynvml, with modeld running as a
unit and a fake libnvidia-ml.so.1 (built by the tests) as its driver library."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from busclient import SignalRecorder, connect
from fakenvml import FakeGpu, FakeProcess, build_fake_nvml, write_state
from sandbox import Sandbox
from sandbox.deploy import Modeld, deploy, reference_model

pytestmark = pytest.mark.systemd

GiB = 1024**3
G0, G1 = "GPU-00000000-0000-0000-0000-00000000a000", "GPU-00000000-0000-0000-0000-00000000b111"
MODELS = {
    "small": reference_model(extra='gpu_memory = "4G"\n'),
    "first": reference_model(extra='gpu_memory = "5G"\n'),
    "second": reference_model(extra='gpu_memory = "5G"\n'),
    "giant": reference_model(extra='gpu_memory = "40G"\n'),
    "cpu": reference_model(),
}


@pytest.fixture(scope="module")
def libraries(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("fakenvml")
    return {
        "current": build_fake_nvml(base / "current").parent,
        "old": build_fake_nvml(base / "old", old_driver=True).parent,
    }


def start(sandbox: Sandbox, tmp_path: Path, library: Path | None, state: Path) -> Modeld:
    env = f"Environment=FAKE_NVML_STATE={state}\n"
    if library is not None:
        env += f"Environment=LD_LIBRARY_PATH={library}\n"
    return deploy(sandbox, tmp_path / "config", MODELS, dropin=env)


@pytest.fixture
def cleanup(sandbox: Sandbox) -> Iterator[None]:
    yield
    sandbox.systemctl("stop", "modeld.service", "modeld.socket", check=False)
    sandbox.remove_units(["modeld.service", "modeld.socket", "modeld.slice"])


def backend_env(modeld: Modeld, name: str) -> dict[str, str]:
    pid = modeld.prop(name, "MainPID")
    raw = modeld.sandbox.exec("cat", f"/proc/{pid}/environ").stdout
    return dict(item.split("=", 1) for item in raw.split("\0") if "=" in item)


@pytest.mark.usefixtures("cleanup")
@pytest.mark.parametrize("driver", ["current", "old"])
def test_a_model_is_placed_on_the_gpu_with_most_free_memory(
    sandbox: Sandbox, tmp_path: Path, libraries: dict[str, Path], driver: str
) -> None:
    state = tmp_path / "nvml.state"
    write_state(
        state,
        gpus=[FakeGpu(G0, total=8 * GiB, other=6 * GiB), FakeGpu(G1, total=8 * GiB, other=2 * GiB)],
    )
    before = len(sandbox.journal(unit="modeld.service"))
    modeld = start(sandbox, tmp_path, libraries[driver], state)
    journal = sandbox.journal(unit="modeld.service")[before:]
    assert "GPU features on: NVIDIA driver 550.54.15, 2 GPU(s)" in journal
    modeld.load("small")
    assert modeld.prop("small", "Gpu") == G1
    assert backend_env(modeld, "small")["CUDA_VISIBLE_DEVICES"] == G1
    modeld.load("cpu")
    assert "CUDA_VISIBLE_DEVICES" not in backend_env(modeld, "cpu")
    assert modeld.prop("cpu", "Gpu") == ""

    pid = modeld.prop("small", "MainPID")
    write_state(
        state,
        gpus=[
            FakeGpu(G0, total=8 * GiB, other=6 * GiB),
            FakeGpu(G1, total=16 * GiB, other=2 * GiB),
        ],
        procs=[FakeProcess(gpu=1, pid=pid, used=3 * GiB)],
    )
    modeld.load("first")  # an admission that needs the GPU reads NVML again
    assert modeld.prop("first", "Gpu") == G1  # 11 GiB free there, 2 GiB on the other
    assert modeld.prop("small", "State") == "ready"  # it fitted: nothing was evicted
    assert modeld.prop("small", "GpuMemory") == 3 * GiB  # attributed through its cgroup


@pytest.mark.usefixtures("cleanup")
def test_vram_fit_evicts_and_waits_for_the_memory_to_come_back(
    sandbox: Sandbox, tmp_path: Path, libraries: dict[str, Path]
) -> None:
    state = tmp_path / "nvml.state"
    gpus = [FakeGpu(G0, total=8 * GiB, other=0)]
    write_state(state, gpus=gpus)
    modeld = start(sandbox, tmp_path, libraries["current"], state)
    modeld.load("first")
    first_pid = modeld.prop("first", "MainPID")
    write_state(state, gpus=gpus, procs=[FakeProcess(gpu=0, pid=first_pid, used=5 * GiB)])
    freed_at: list[float] = []

    def driver_frees_memory_late() -> None:
        modeld.wait_state("first", {"unloaded"})
        time.sleep(0.8)  # the driver reports the freed VRAM late
        freed_at.append(time.monotonic())
        write_state(state, gpus=gpus)

    releaser = threading.Thread(target=driver_frees_memory_late)
    releaser.start()

    async def scenario() -> list[str]:
        async with connect(sandbox.bus_address) as bus:
            recorder = await SignalRecorder(bus).start()
            await asyncio.to_thread(modeld.load, "second")
            return recorder.unloaded("first")

    reasons = asyncio.run(scenario())
    loaded_at = time.monotonic()
    releaser.join()
    assert reasons == ["gpu-memory"]
    assert modeld.prop("second", "State") == "ready"
    assert modeld.prop("second", "Gpu") == G0
    assert freed_at and loaded_at >= freed_at[0]  # it started only once the VRAM was back
    assert (
        "not back after"
        not in sandbox.journal(unit="modeld.service").split("model second: unloaded -> loading")[-1]
    )


@pytest.mark.usefixtures("cleanup")
def test_a_model_bigger_than_any_gpu_is_refused_with_the_numbers(
    sandbox: Sandbox, tmp_path: Path, libraries: dict[str, Path]
) -> None:
    state = tmp_path / "nvml.state"
    write_state(state, gpus=[FakeGpu(G0, total=16 * GiB)])
    modeld = start(sandbox, tmp_path, libraries["current"], state)
    proc = modeld.load("giant", check=False)
    assert "giant needs 40.0 GiB of GPU memory but the largest GPU has 16.0 GiB" in proc.stderr


@pytest.mark.usefixtures("cleanup")
def test_without_a_driver_gpu_features_are_off_and_gpu_models_are_refused(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    state = tmp_path / "nvml.state"
    write_state(state, gpus=[FakeGpu(G0)])
    before = len(sandbox.journal(unit="modeld.service"))
    modeld = start(sandbox, tmp_path, None, state)
    journal = sandbox.journal(unit="modeld.service")[before:]
    assert journal.count("GPU features are off") == 1
    assert "libnvidia-ml.so.1 not found" in journal
    proc = modeld.load("small", check=False)
    assert "small needs 4.0 GiB of GPU memory but no GPU is available" in proc.stderr
    assert modeld.load("cpu") == ["/org/modeld1/model/cpu"]  # CPU models are unaffected
