"""Admission of loads: snapshot, decide (pure), then hand the plan to the owners.

Admissions are serialised: the decision sees a snapshot, and the plan it returns (evictions,
then the load) is handed to the owners before the next admission takes its snapshot, so two
concurrent loads can never both fit into the last slot. A plan that needs busy models gone
is retried whenever any model's state changes (no polling), until
``eviction_retries * eviction_retry_interval`` has passed; then the load fails with Busy.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence

from modeld.core.eviction import Decision, GpuView, Limits, ModelView, decide_load
from modeld.errors import Busy, InsufficientResources
from modeld.supervisor.owner import ModelOwner
from modeld.system.cgroup import CgroupLayout, pids_in_cgroup
from modeld.system.gpu import GpuProbe, GpuState, attribute_gpu_memory

log = logging.getLogger(__name__)

DecideFunction = Callable[[str, Sequence[ModelView], Sequence[GpuView], Limits], Decision]
GPU_RECOVERY_TIMEOUT = 5.0
GPU_RECOVERY_SHARE = 0.75
"""After evictions, wait until NVML shows at least this share of the victims' GPU memory
free again (drivers report freed VRAM late), for at most GPU_RECOVERY_TIMEOUT."""
_GPU_RECOVERY_POLL = 0.05


class Admission:
    """Decides and starts loads for the supervisor."""

    def __init__(
        self,
        owners: Mapping[str, ModelOwner],
        cgroups: CgroupLayout,
        gpu: GpuProbe,
        decide: DecideFunction = decide_load,
    ) -> None:
        self._owners = owners
        self._cgroups = cgroups
        self._gpu = gpu
        self._decide = decide
        self._lock = asyncio.Lock()
        self._changed = asyncio.Event()

    def state_changed(self) -> None:
        """Some model changed state or in-flight count: waiting admissions decide again."""
        self._changed.set()

    async def gpu_snapshot(self) -> tuple[GpuState, dict[str, dict[str, int]]] | None:
        """NVML's view and each model's GPU memory per device, which is also reported to
        the owners (None: no GPU)."""
        if not self._gpu.available:
            return None
        state = await self._gpu.snapshot()
        usage = self._attribute(state)
        for owner in self._owners.values():
            owner.report_gpu_memory(usage.get(owner.name, {}).get(owner.status.gpu, 0))
        return state, usage

    def _attribute(self, state: GpuState) -> dict[str, dict[str, int]]:
        pids = {
            o.name: pids_in_cgroup(o.status.control_group)
            for o in self._owners.values()
            if o.status.control_group
        }
        return attribute_gpu_memory(state.processes, pids)

    async def _snapshot(self, target: ModelOwner) -> tuple[list[ModelView], list[GpuView]]:
        gpu = await self.gpu_snapshot() if target.config.gpu_memory > 0 else None
        state, usage = gpu if gpu is not None else (None, {})
        views = []
        for owner in self._owners.values():
            status, config = owner.status, owner.config
            holds = status.state.occupies_slot
            memory = self._cgroups.memory_current(status.control_group) if holds else None
            views.append(
                ModelView(
                    name=owner.name,
                    state=status.state,
                    last_used_us=status.last_used_us,
                    in_flight=status.in_flight,
                    pinned=status.pinned,
                    groups=frozenset(config.concurrency_groups),
                    memory_max=config.memory_max,
                    memory_current=memory or 0,
                    gpu_memory=config.gpu_memory,
                    gpu=status.gpu,
                    gpu_used=usage.get(owner.name, {}).get(status.gpu, 0),
                )
            )
        gpus = [GpuView(d.uuid, d.total, d.free) for d in state.devices] if state else []
        return views, gpus

    async def admit(
        self, target: ModelOwner, limits: Limits, patience: float
    ) -> asyncio.Future[None]:
        """Admit a load of ``target``: returns its completion future once it is under way."""
        deadline = time.monotonic() + patience
        while True:
            self._changed.clear()
            async with self._lock:
                views, gpus = await self._snapshot(target)
                decision = self._decide(target.name, views, gpus, limits)
                if decision.refusal is not None:
                    raise InsufficientResources(decision.refusal)
                if decision.admitted:
                    return await self._start(target, decision, views, gpus)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise Busy(
                    f"{target.name} needs {', '.join(decision.wait_for)} evicted but"
                    f" {'it is' if len(decision.wait_for) == 1 else 'they are'} still busy"
                    f" after {patience:g}s; retry later or load with force"
                )
            log.info("load of %s waits for busy %s", target.name, ", ".join(decision.wait_for))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)

    async def _start(
        self, target: ModelOwner, decision: Decision, views: list[ModelView], gpus: list[GpuView]
    ) -> asyncio.Future[None]:
        evictions = []
        for eviction in decision.evict:
            log.info("evicting %s (%s) to load %s", eviction.name, eviction.reason, target.name)
            victim = self._owners[eviction.name]
            evictions.append(await victim.request_unload(eviction.reason, force=True))
        after: list[Awaitable[object]] = list(evictions)
        by_name = {v.name: v for v in views}
        freed = sum(
            by_name[e.name].gpu_used for e in decision.evict if by_name[e.name].gpu == decision.gpu
        )
        if freed:
            before = next(g.free for g in gpus if g.uuid == decision.gpu)
            after = [
                self._recover_gpu(evictions, decision.gpu, before + freed * GPU_RECOVERY_SHARE)
            ]
        return await target.request_load(after=after, gpu=decision.gpu)

    async def _recover_gpu(
        self, evictions: Sequence[Awaitable[object]], device: str, wanted_free: float
    ) -> None:
        """After the evictions, wait (bounded) until NVML shows the freed memory back.

        NVML has no event for this, so it is read every 50 ms, at most for 5 s.
        """
        await asyncio.gather(*evictions, return_exceptions=True)
        deadline = time.monotonic() + GPU_RECOVERY_TIMEOUT
        while time.monotonic() < deadline:
            state = await self._gpu.snapshot()
            gpu = state.device(device)
            if gpu is None or gpu.free >= wanted_free:
                return
            await asyncio.sleep(_GPU_RECOVERY_POLL)
        log.warning(
            "GPU %s: freed memory not back after %gs; loading anyway", device, GPU_RECOVERY_TIMEOUT
        )
