"""What the scheduler measures before it decides: cgroup memory and NVML's GPU figures.

Measurements are readings of the kernel and the driver, never of another task's state. NVML
calls run in a worker thread (the probe's job); cgroup files are small in-kernel files.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from modeld.core.eviction import GpuView
from modeld.system.cgroup import CgroupLayout, pids_in_cgroup
from modeld.system.gpu import GpuProbe, attribute_gpu_memory

log = logging.getLogger(__name__)

GPU_RECOVERY_TIMEOUT = 5.0
_GPU_RECOVERY_POLL = 0.05


@dataclass(frozen=True, slots=True)
class GpuReading:
    """The devices and what each model's backend holds on each device (bytes)."""

    devices: tuple[GpuView, ...]
    usage: Mapping[str, Mapping[str, int]] = field(default_factory=dict)

    def used_by(self, model: str, device: str) -> int:
        return self.usage.get(model, {}).get(device, 0)


class Measurements(Protocol):
    """The readings the scheduler's decisions need."""

    @property
    def gpu_available(self) -> bool: ...

    def memory_current(self, control_group: str) -> int:
        """Memory the cgroup uses now (0 when unknown)."""
        ...

    async def gpu(self, control_groups: Mapping[str, str]) -> GpuReading:
        """NVML's devices and the GPU memory of each model (by its backend's cgroup)."""
        ...

    async def wait_gpu_free(self, device: str, wanted_free: float) -> None:
        """Return once ``device`` shows ``wanted_free`` bytes free, or after a bound."""
        ...


class HostMeasurements:
    """Measurements of this host: cgroup files and an NVML probe."""

    def __init__(self, cgroups: CgroupLayout, probe: GpuProbe) -> None:
        self._cgroups = cgroups
        self._probe = probe

    @property
    def gpu_available(self) -> bool:
        return self._probe.available

    def memory_current(self, control_group: str) -> int:
        return self._cgroups.memory_current(control_group) or 0

    async def gpu(self, control_groups: Mapping[str, str]) -> GpuReading:
        if not self._probe.available:
            return GpuReading(devices=())
        state = await self._probe.snapshot()
        pids = {model: pids_in_cgroup(group) for model, group in control_groups.items() if group}
        usage = attribute_gpu_memory(state.processes, pids)
        devices = tuple(GpuView(d.uuid, d.total, d.free) for d in state.devices)
        return GpuReading(devices=devices, usage=usage)

    async def wait_gpu_free(self, device: str, wanted_free: float) -> None:
        """Drivers report freed VRAM late and NVML has no event for it: read every 50 ms,
        for at most GPU_RECOVERY_TIMEOUT, then go on anyway (with a warning)."""
        deadline = time.monotonic() + GPU_RECOVERY_TIMEOUT
        while time.monotonic() < deadline:
            state = await self._probe.snapshot()
            gpu = state.device(device)
            if gpu is None or gpu.free >= wanted_free:
                return
            await asyncio.sleep(_GPU_RECOVERY_POLL)
        log.warning(
            "GPU %s: freed memory not back after %gs; loading anyway", device, GPU_RECOVERY_TIMEOUT
        )
