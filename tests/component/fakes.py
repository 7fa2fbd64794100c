"""Recording fakes for the supervisor's tier of tests: no sandbox, no sleeps.

- :class:`RecordingEffects` stands in for the owners behind the scheduler: it records every
  effect and lets the test settle each eviction (done or refused) when it chooses.
- :class:`FakeMeasurements` gives the scheduler fixed memory and GPU figures.
- :class:`FakeSystemd` stands in for systemd behind the owners, keeping its ordering
  guarantees (a start or stop returns once done); the backend processes are real.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Awaitable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modeld.config import ModelConfig, default_daemon_config, load_model_config
from modeld.core.effects import EvictionRefused
from modeld.core.eviction import GpuView
from modeld.supervisor.measurements import GpuReading
from modeld.system.systemd import ScopeSpec

GiB = 1024**3


def model_config(tmp: Path, name: str, text: str = "") -> ModelConfig:
    """A model configured by ``text`` (TOML) on a reference backend."""
    daemon = default_daemon_config(host_memory=16 * GiB)
    path = tmp / f"{name}.toml"
    path.write_text('backend = "reference"\n' + text)
    return load_model_config(path, daemon, host_memory=16 * GiB)


@dataclass
class Effect:
    kind: str
    name: str
    reason: str = ""
    force: bool = False
    gpu: str = ""
    after: Awaitable[object] | None = None
    used: int = 0


class RecordingEffects:
    """The scheduler's effects, recorded; evictions stay pending until the test settles them."""

    def __init__(self) -> None:
        self.effects: list[Effect] = []
        self.pending: dict[str, asyncio.Future[None]] = {}
        self.completions: dict[str, asyncio.Future[None]] = {}
        self._recorded = asyncio.Event()

    def kinds(self, kind: str) -> list[Effect]:
        return [e for e in self.effects if e.kind == kind]

    def evict(self, name: str, reason: str, force: bool) -> asyncio.Future[None]:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.pending[name] = future
        self._record(Effect("evict", name, reason=reason, force=force))
        return future

    def start_load(
        self, name: str, gpu: str, after: Awaitable[object] | None, force: bool
    ) -> asyncio.Future[asyncio.Future[None]]:
        loop = asyncio.get_running_loop()
        completion = self.completions.setdefault(name, loop.create_future())
        accepted: asyncio.Future[asyncio.Future[None]] = loop.create_future()
        accepted.set_result(completion)
        self._record(Effect("start_load", name, gpu=gpu, after=after, force=force))
        return accepted

    def report_gpu_memory(self, name: str, used: int) -> None:
        self._record(Effect("report_gpu_memory", name, used=used))

    def _record(self, effect: Effect) -> None:
        self.effects.append(effect)
        self._recorded.set()

    def settle(self, name: str, refusal: str | None = None) -> None:
        """The owner of ``name`` finished the eviction, or refused it."""
        future = self.pending.pop(name)
        if refusal is None:
            future.set_result(None)
        else:
            future.set_exception(EvictionRefused(f"{name} {refusal}"))

    async def wait_for(self, kind: str, count: int = 1) -> list[Effect]:
        """Wait (on the recording event, no timer) until ``count`` effects of ``kind``."""
        while len(self.kinds(kind)) < count:
            self._recorded.clear()
            await asyncio.wait_for(self._recorded.wait(), 10)
        return self.kinds(kind)


@dataclass
class FakeMeasurements:
    memory: dict[str, int] = field(default_factory=dict)
    """memory.current by control group."""
    devices: tuple[GpuView, ...] = ()
    usage: dict[str, dict[str, int]] = field(default_factory=dict)
    gpu_waits: list[tuple[str, float]] = field(default_factory=list)

    @property
    def gpu_available(self) -> bool:
        return bool(self.devices)

    def memory_current(self, control_group: str) -> int:
        return self.memory.get(control_group, 0)

    async def gpu(self, control_groups: Mapping[str, str]) -> GpuReading:
        return GpuReading(self.devices, self.usage)

    async def wait_gpu_free(self, device: str, wanted_free: float) -> None:
        self.gpu_waits.append((device, wanted_free))


class FakeSystemd:
    """systemd's manager for backends, without systemd: scopes are records of pids.

    Stopping a scope sends SIGTERM to its process (SIGKILL with ``kill_unit``), as
    systemd would; every call is recorded in ``calls``.
    """

    def __init__(self) -> None:
        self.scopes: dict[str, int] = {}
        self.specs: dict[str, ScopeSpec] = {}
        self.calls: list[tuple[str, str]] = []

    async def start_scope(self, spec: ScopeSpec, pid: int) -> None:
        self.calls.append(("start_scope", spec.unit))
        self.scopes[spec.unit] = pid
        self.specs[spec.unit] = spec

    async def stop_unit(self, unit: str) -> None:
        self.calls.append(("stop_unit", unit))
        pid = self.scopes.pop(unit, None)
        if pid is not None:
            _signal(pid, signal.SIGTERM)

    async def kill_unit(self, unit: str, signal_number: int) -> None:
        self.calls.append(("kill_unit", unit))
        pid = self.scopes.get(unit)
        if pid is not None:
            _signal(pid, signal_number)

    async def ref_unit(self, unit: str) -> None:
        self.calls.append(("ref_unit", unit))

    async def unref_unit(self, unit: str) -> None:
        self.calls.append(("unref_unit", unit))

    async def unit_pids(self, unit: str) -> list[int]:
        pid = self.scopes.get(unit)
        return [pid] if pid is not None else []

    async def unit_property(self, unit: str, interface: str, name: str) -> Any:
        if name == "Result":
            return "success"
        return None

    async def list_units(self, patterns: Sequence[str]) -> list[tuple[str, str]]:
        return [(unit, "active") for unit in self.scopes]

    async def set_memory_max(self, unit: str, memory_max: int) -> None:
        self.calls.append(("set_memory_max", unit))


def _signal(pid: int, number: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, number)
