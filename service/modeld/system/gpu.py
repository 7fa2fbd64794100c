"""GPU state through NVML (pynvml from nvidia-ml-py): devices, memory, utilisation, processes.

``open_gpu_probe()`` returns a probe that never raises. Without an NVIDIA driver (no
``libnvidia-ml.so.1``, driver not loaded, any other init failure) it is a ``NullProbe``: GPU
features are off, said once in the log, and snapshots are empty. NVML calls are blocking C calls;
they run in a worker thread, one at a time, never on the event loop.

Memory figures come from ``nvmlDeviceGetMemoryInfo`` v2, where ``used`` excludes the driver's
reserved memory (``total = reserved + used + free``). Drivers older than R515 lack v2; then v1
figures are used, whose ``used`` includes the reserved memory.

``attribute_gpu_memory`` turns NVML's per-process figures (host PIDs) into per-model figures:
the GPU memory held by the PIDs of each model's scope (``modeld.system.cgroup.pids_in_cgroup``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Literal, Protocol

__all__ = [
    "GpuDevice",
    "GpuProbe",
    "GpuProcess",
    "GpuState",
    "NullProbe",
    "NvmlProbe",
    "attribute_gpu_memory",
    "open_gpu_probe",
]

_log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class GpuDevice:
    """One GPU as NVML reports it. Memory in bytes (v2 figures; v1 on old drivers)."""

    index: int
    uuid: str
    name: str
    total: int
    free: int
    used: int
    utilization: int | None
    """GPU utilisation in percent over the driver's last sample period; None if unsupported."""
    memory_utilization: int | None
    """Memory-controller utilisation in percent; None if unsupported."""


@dataclass(frozen=True, slots=True)
class GpuProcess:
    """A process holding memory on a GPU. ``pid`` is in the host PID namespace; ``used`` is None
    when NVML cannot tell (NVML_VALUE_NOT_AVAILABLE)."""

    pid: int
    device_uuid: str
    used: int | None


@dataclass(frozen=True, slots=True)
class GpuState:
    """A point-in-time view of all GPUs. Empty (no devices) when GPU features are off."""

    devices: tuple[GpuDevice, ...] = ()
    processes: tuple[GpuProcess, ...] = ()
    driver: str = ""

    def device(self, uuid: str) -> GpuDevice | None:
        """The device with this UUID, or None."""
        for device in self.devices:
            if device.uuid == uuid:
                return device
        return None


class GpuProbe(Protocol):
    """Where modeld gets GPU state from."""

    available: bool
    """False when GPU features are off (no usable NVML) or the probe is closed."""

    async def snapshot(self) -> GpuState:
        """The current state of all GPUs. Never raises; an unusable probe gives an empty state."""
        ...

    async def close(self) -> None:
        """Release NVML. Later snapshots are empty."""
        ...


class NullProbe:
    """The probe when GPU features are off: every snapshot is empty. ``reason`` says why."""

    def __init__(self, reason: str = "not configured") -> None:
        self.available = False
        self.reason = reason

    async def snapshot(self) -> GpuState:
        """An empty state."""
        return GpuState()

    async def close(self) -> None:
        """Nothing to release."""


async def open_gpu_probe(*, log: logging.Logger | None = None) -> GpuProbe:
    """Initialise NVML (in a worker thread) and return a probe for it.

    If NVML cannot be used, returns a ``NullProbe`` and logs exactly one line saying that GPU
    features are off and why: INFO when there is no NVIDIA driver library (a host without
    NVIDIA GPUs), WARNING when the library is there but fails.
    """
    log = log or _log
    try:
        import pynvml
    except ImportError as e:  # a broken install: nvidia-ml-py is a dependency
        return _off(log, logging.WARNING, f"the pynvml module (nvidia-ml-py) is missing: {e}")
    try:
        await asyncio.to_thread(pynvml.nvmlInit)
    except pynvml.NVMLError_LibraryNotFound:
        return _off(log, logging.INFO, "no NVIDIA driver library (libnvidia-ml.so.1 not found)")
    except pynvml.NVMLError_DriverNotLoaded as e:
        return _off(log, logging.WARNING, f"the NVIDIA kernel driver is not loaded ({e})")
    except Exception as e:
        return _off(log, logging.WARNING, f"NVML failed to initialise: {_describe(e)}")
    probe = NvmlProbe(pynvml, log=log)
    driver, count = await asyncio.to_thread(probe.summary)
    log.info("GPU features on: NVIDIA driver %s, %s GPU(s)", driver or "unknown", count)
    return probe


def _off(log: logging.Logger, level: int, reason: str) -> NullProbe:
    log.log(level, "GPU features are off: %s", reason)
    return NullProbe(reason)


def _describe(error: BaseException) -> str:
    text = str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _text(value: str | bytes) -> str:
    """pynvml < 11.515 returns bytes for names, UUIDs and versions; later ones str."""
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


_ProcessApi = Literal["v3", "v2", "none"]


class NvmlProbe:
    """A probe over an initialised pynvml module (see ``open_gpu_probe``).

    Devices that fail (GPU lost, or any NVML error) are left out of snapshots, with one warning
    per device until it reports again. Capabilities an old driver lacks (v2 memory info, the
    ``_v3`` process queries) are detected on first use and not retried.
    """

    def __init__(self, nvml: ModuleType, *, log: logging.Logger | None = None) -> None:
        self.available = True
        self._nvml = nvml
        self._log = log or _log
        self._lock = threading.Lock()
        self._closed = False
        self._memory_v2 = getattr(nvml, "nvmlMemory_v2", None) is not None
        self._process_api: _ProcessApi = "v3"
        self._driver = ""
        self._uuid_by_index: dict[int, str] = {}
        self._failing: set[str] = set()
        self._system_error: str | None = None
        # Exceptions meaning "this driver lacks that call or struct version".
        self._version_fallback = _classes(
            nvml, "NVMLError_FunctionNotFound", "NVMLError_ArgumentVersionMismatch"
        )
        self._missing_call = _classes(
            nvml, "NVMLLibraryMismatchError", "NVMLError_FunctionNotFound"
        )
        self._device_errors = _classes(nvml, "NVMLError", "NVMLLibraryMismatchError")

    async def snapshot(self) -> GpuState:
        """Query all GPUs in a worker thread. Never raises."""
        try:
            return await asyncio.to_thread(self._snapshot)
        except Exception:  # a bug or an unexpected pynvml exception: keep the daemon running
            self._log.exception("reading GPU state failed")
            return GpuState(driver=self._driver)

    async def close(self) -> None:
        """Shut NVML down (once). Later snapshots are empty."""
        await asyncio.to_thread(self._close)

    def summary(self) -> tuple[str, int | None]:
        """The driver version and device count (None if NVML cannot tell). Blocking."""
        with self._lock:
            nvml = self._nvml
            try:
                self._driver = _text(nvml.nvmlSystemGetDriverVersion())
            except Exception as e:
                self._log.debug("nvmlSystemGetDriverVersion failed: %s", _describe(e))
            try:
                count: int | None = int(nvml.nvmlDeviceGetCount())
            except Exception as e:
                self._log.debug("nvmlDeviceGetCount failed: %s", _describe(e))
                count = None
            return self._driver, count

    # -- in the worker thread ------------------------------------------------------------

    def _close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self.available = False
            try:
                self._nvml.nvmlShutdown()
            except Exception as e:
                self._log.debug("nvmlShutdown failed: %s", _describe(e))

    def _snapshot(self) -> GpuState:
        with self._lock:
            if self._closed:
                return GpuState()
            nvml = self._nvml
            with contextlib.suppress(nvml.NVMLError):  # else keep the last known version
                self._driver = _text(nvml.nvmlSystemGetDriverVersion())
            try:
                count = int(nvml.nvmlDeviceGetCount())
            except nvml.NVMLError as e:
                if self._system_error != str(e):
                    self._log.warning("cannot read GPU state: %s", _describe(e))
                    self._system_error = str(e)
                return GpuState(driver=self._driver)
            self._system_error = None
            devices: list[GpuDevice] = []
            processes: dict[tuple[int, str], int | None] = {}
            for index in range(count):
                try:
                    device, found = self._read_device(index)
                except self._device_errors as e:
                    self._device_failed(index, e)
                    continue
                self._device_ok(device)
                devices.append(device)
                for pid, used in found:
                    key = (pid, device.uuid)
                    processes[key] = _merge_used(processes[key], used) if key in processes else used
            return GpuState(
                devices=tuple(devices),
                processes=tuple(
                    GpuProcess(pid=pid, device_uuid=uuid, used=used)
                    for (pid, uuid), used in processes.items()
                ),
                driver=self._driver,
            )

    def _read_device(self, index: int) -> tuple[GpuDevice, list[tuple[int, int | None]]]:
        nvml = self._nvml
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        uuid = _text(nvml.nvmlDeviceGetUUID(handle))
        self._uuid_by_index[index] = uuid
        name = _text(nvml.nvmlDeviceGetName(handle))
        total, free, used = self._memory(handle)
        utilization, memory_utilization = self._utilization(handle)
        found = self._processes(handle, "Compute") + self._processes(handle, "Graphics")
        device = GpuDevice(
            index=index,
            uuid=uuid,
            name=name,
            total=total,
            free=free,
            used=used,
            utilization=utilization,
            memory_utilization=memory_utilization,
        )
        return device, found

    def _memory(self, handle: Any) -> tuple[int, int, int]:
        nvml = self._nvml
        if self._memory_v2:
            try:
                memory = nvml.nvmlDeviceGetMemoryInfo(handle, version=nvml.nvmlMemory_v2)
            except self._version_fallback as e:
                self._memory_v2 = False
                self._log.info(
                    "NVML has no v2 memory info (%s); GPU memory 'used' includes the driver's "
                    "reserved memory",
                    e,
                )
            else:
                return int(memory.total), int(memory.free), int(memory.used)
        memory = nvml.nvmlDeviceGetMemoryInfo(handle)
        return int(memory.total), int(memory.free), int(memory.used)

    def _utilization(self, handle: Any) -> tuple[int | None, int | None]:
        nvml = self._nvml
        try:
            rates = nvml.nvmlDeviceGetUtilizationRates(handle)
        except nvml.NVMLError_NotSupported:
            return None, None
        return int(rates.gpu), int(rates.memory)

    def _processes(
        self, handle: Any, kind: Literal["Compute", "Graphics"]
    ) -> list[tuple[int, int | None]]:
        """(pid, used) of the compute or graphics processes; [] where NVML cannot list them."""
        nvml = self._nvml
        while self._process_api != "none":
            name = f"nvmlDeviceGet{kind}RunningProcesses"
            if self._process_api == "v2":
                name += "_v2"
            try:
                infos = getattr(nvml, name)(handle)
            except self._missing_call as e:
                self._process_api = "v2" if self._process_api == "v3" else "none"
                self._log.info(
                    "NVML process query %s unavailable (%s); using %s",
                    name,
                    type(e).__name__,
                    "the _v2 query" if self._process_api == "v2" else "no per-process figures",
                )
                continue
            except nvml.NVMLError_NotSupported:
                return []
            return [(int(info.pid), _optional_int(info.usedGpuMemory)) for info in infos]
        return []

    def _device_failed(self, index: int, error: BaseException) -> None:
        uuid = self._uuid_by_index.get(index)
        key = uuid or f"index {index}"
        if key in self._failing:
            return
        self._failing.add(key)
        label = f"{uuid} (index {index})" if uuid else f"index {index}"
        self._log.warning("GPU %s is left out of GPU state: %s", label, _describe(error))

    def _device_ok(self, device: GpuDevice) -> None:
        for key in (device.uuid, f"index {device.index}"):
            if key in self._failing:
                self._failing.discard(key)
                self._log.info("GPU %s (index %d) reports again", device.uuid, device.index)


def _classes(module: ModuleType, *names: str) -> tuple[type[BaseException], ...]:
    """The exception classes of ``module`` with these names that exist (pynvml varies)."""
    found = (getattr(module, name, None) for name in names)
    return tuple(cls for cls in found if isinstance(cls, type) and issubclass(cls, BaseException))


def _optional_int(value: Any) -> int | None:
    return None if value is None else int(value)


def _merge_used(a: int | None, b: int | None) -> int | None:
    """One process listed twice on a device (compute and graphics): the larger known figure."""
    if a is None:
        return b
    if b is None:
        return a
    return max(a, b)


def attribute_gpu_memory(
    processes: Iterable[GpuProcess], pids_by_model: Mapping[str, Collection[int]]
) -> dict[str, dict[str, int]]:
    """Per model, per device UUID: the GPU memory held by that model's PIDs (None counts as 0).

    Every model in ``pids_by_model`` appears in the result; a device appears for a model when
    one of its PIDs is on it, even if NVML cannot tell the amount. A PID listed under several
    models counts for the first.
    """
    owner: dict[int, str] = {}
    for model, pids in pids_by_model.items():
        for pid in pids:
            owner.setdefault(pid, model)
    result: dict[str, dict[str, int]] = {model: {} for model in pids_by_model}
    for process in processes:
        holder = owner.get(process.pid)
        if holder is None:
            continue
        per_device = result[holder]
        per_device[process.device_uuid] = per_device.get(process.device_uuid, 0) + (
            process.used or 0
        )
    return result
