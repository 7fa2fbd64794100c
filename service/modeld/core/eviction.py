"""The eviction engine's decision: what must go before a model may load.

A pure function over a snapshot (states, last use, in-flight requests, pins, groups,
measured memory and GPU memory, configured needs) and limits. It does no I/O, logs
nothing and reads no clock: a decision is only a proposal until the scheduler acts on it,
so it may be asked again and again while busy models drain.

Policies, in this order (LocalAI's semantics where it has them):

1. concurrency groups: every loaded model sharing a group with the target goes;
2. the ``max_loaded`` cap, counting loads in progress: least recently used first;
3. host memory: the target's need must fit in the budget minus what the other backends use
   (measured; a loading backend counts with its need). A model's need is its learned peak
   with a margin when one is known, else its ``memory_max``
   (:func:`modeld.core.footprint.admission_need`);
4. GPU memory: the target's ``gpu_memory`` must fit on one device: the device with the most
   free memory after the evictions already planned; if none fits, the device where the
   fewest models must go, evicting them LRU-first.

A pinned model is never a victim: a load that could only succeed by evicting one is
refused, naming it. A busy (or still loading) victim is not evicted unless forced: the
decision then says which models to wait for. A model larger than the whole budget or every
GPU is refused at once, with the numbers, and nothing is evicted for it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from modeld.core.footprint import admission_need
from modeld.core.states import ModelState
from modeld.units import UINT64_MAX, format_size

UNLIMITED = UINT64_MAX


@dataclass(frozen=True, slots=True)
class ModelView:
    """What the decision may know about one configured model."""

    name: str
    state: ModelState
    last_used_us: int = 0
    in_flight: int = 0
    pinned: bool = False
    groups: frozenset[str] = frozenset()
    memory_max: int = UNLIMITED
    """Configured limit: what the model needs when it loads, unless a peak is known."""
    memory_peak: int = 0
    """Learned peak memory of its earlier backends (0: not known)."""
    memory_current: int = 0
    """Measured use of its running backend."""
    gpu_memory: int = 0
    """Configured GPU memory need."""
    gpu: str = ""
    """UUID of the device its backend runs on, "" for none."""
    gpu_used: int = 0
    """Measured GPU memory of its backend on that device."""

    @property
    def holds_backend(self) -> bool:
        return self.state.occupies_slot

    @property
    def busy(self) -> bool:
        return self.state is not ModelState.READY or self.in_flight > 0

    @property
    def memory_need(self) -> int:
        """What it needs when it loads: its learned peak with a margin, else its limit."""
        return admission_need(self.memory_max, self.memory_peak)

    @property
    def memory_charge(self) -> int:
        """What it counts against the budget: a loading backend counts with its need."""
        if self.state is ModelState.LOADING and self.memory_need != UNLIMITED:
            return max(self.memory_need, self.memory_current)
        return self.memory_current


@dataclass(frozen=True, slots=True)
class GpuView:
    uuid: str
    total: int
    free: int


@dataclass(frozen=True, slots=True)
class Limits:
    max_loaded: int = 0
    """0 means no cap."""
    memory_budget: int = UNLIMITED
    force_busy: bool = False
    """Evict busy and loading models too (a forced load, or force_eviction_when_busy)."""


@dataclass(frozen=True, slots=True)
class Eviction:
    name: str
    reason: str
    """The ModelUnloaded reason: group, lru, memory or gpu-memory."""


@dataclass(frozen=True, slots=True)
class Decision:
    """Evict ``evict`` then load on ``gpu``; or wait for ``wait_for``; or refuse."""

    evict: tuple[Eviction, ...] = ()
    gpu: str = ""
    wait_for: tuple[str, ...] = ()
    refusal: str | None = None

    @property
    def admitted(self) -> bool:
        return self.refusal is None and not self.wait_for


class _Refused(Exception):
    pass


@dataclass
class _Plan:
    """Victims chosen so far; busy victims are only recorded as models to wait for."""

    target: ModelView
    force_busy: bool
    chosen: dict[str, Eviction] = field(default_factory=dict)
    waits: dict[str, None] = field(default_factory=dict)

    def gone(self, model: ModelView) -> bool:
        return model.name in self.chosen or model.name in self.waits

    def take(self, model: ModelView, reason: str) -> None:
        if self.gone(model):
            return
        if model.pinned:
            raise _Refused(
                f"{self.target.name} cannot be loaded without evicting pinned model"
                f" {model.name} ({reason})"
            )
        if model.busy and not self.force_busy:
            self.waits[model.name] = None
        else:
            self.chosen[model.name] = Eviction(model.name, reason)


def _lru(models: Iterable[ModelView]) -> list[ModelView]:
    """Eviction order: idle before busy, then least recently used, then by name."""
    return sorted(models, key=lambda m: (m.busy, m.last_used_us, m.name))


def _sizes(*values: int) -> tuple[str, ...]:
    return tuple(format_size(v) for v in values)


def decide_load(
    target: str,
    models: Sequence[ModelView],
    gpus: Sequence[GpuView],
    limits: Limits,
) -> Decision:
    """Decide what loading ``target`` requires; see the module docstring for the policies."""
    by_name = {m.name: m for m in models}
    wanted = by_name[target]
    if wanted.holds_backend:
        return Decision(gpu=wanted.gpu)
    try:
        _refuse_impossible(wanted, gpus, limits)
        plan = _Plan(wanted, limits.force_busy)
        others = [m for m in models if m.holds_backend and m.name != target]
        _apply_groups(plan, others)
        _apply_cap(plan, others, limits.max_loaded)
        _apply_memory(plan, others, limits.memory_budget)
        device = _apply_gpu(plan, others, gpus)
    except _Refused as refusal:
        return Decision(refusal=str(refusal))
    if plan.waits:
        return Decision(wait_for=tuple(plan.waits))
    return Decision(evict=tuple(plan.chosen.values()), gpu=device)


def _refuse_impossible(model: ModelView, gpus: Sequence[GpuView], limits: Limits) -> None:
    memory = model.memory_need
    if memory != UNLIMITED and memory > limits.memory_budget:
        source = "memory_max" if memory == model.memory_max else "its learned peak + margin"
        need_s, budget = _sizes(memory, limits.memory_budget)
        raise _Refused(
            f"{model.name} needs {need_s} of memory ({source}) but the budget for all"
            f" backends is {budget}"
        )
    if model.gpu_memory > 0:
        if not gpus:
            (need,) = _sizes(model.gpu_memory)
            raise _Refused(f"{model.name} needs {need} of GPU memory but no GPU is available")
        largest = max(g.total for g in gpus)
        if model.gpu_memory > largest:
            need, have = _sizes(model.gpu_memory, largest)
            raise _Refused(
                f"{model.name} needs {need} of GPU memory but the largest GPU has {have}"
            )


def _apply_groups(plan: _Plan, others: Sequence[ModelView]) -> None:
    groups = plan.target.groups
    if groups:
        for model in others:
            if model.groups & groups:
                plan.take(model, "group")


def _apply_cap(plan: _Plan, others: Sequence[ModelView], max_loaded: int) -> None:
    if max_loaded <= 0:
        return
    staying = [m for m in others if not plan.gone(m)]
    excess = len(staying) + 1 - max_loaded
    if excess <= 0:
        return
    candidates = [m for m in _lru(staying) if not m.pinned]
    if len(candidates) < excess:
        pinned = ", ".join(m.name for m in staying if m.pinned)
        raise _Refused(
            f"max_loaded={max_loaded} reached and {plan.target.name} cannot make room:"
            f" the remaining models are pinned ({pinned})"
        )
    for model in candidates[:excess]:
        plan.take(model, "lru")


def _apply_memory(plan: _Plan, others: Sequence[ModelView], budget: int) -> None:
    need = plan.target.memory_need
    if need == UNLIMITED or budget == UNLIMITED:
        return
    staying = [m for m in others if not plan.gone(m)]
    used = sum(m.memory_charge for m in staying)
    for model in _lru(m for m in staying if not m.pinned):
        if budget - used >= need:
            return
        plan.take(model, "memory")
        used -= model.memory_charge
    if budget - used < need:
        pinned_use = sum(m.memory_charge for m in staying if m.pinned)
        need_s, budget_s, pinned_s = _sizes(need, budget, pinned_use)
        raise _Refused(
            f"{plan.target.name} needs {need_s} of memory but only"
            f" {format_size(max(0, budget - used))} of the {budget_s} budget can be freed;"
            f" pinned models use {pinned_s}"
        )


def _apply_gpu(plan: _Plan, others: Sequence[ModelView], gpus: Sequence[GpuView]) -> str:
    need = plan.target.gpu_memory
    if need <= 0:
        return ""

    def planned_free(gpu: GpuView) -> int:
        freed = sum(m.gpu_used for m in others if m.gpu == gpu.uuid and plan.gone(m))
        return gpu.free + freed

    fitting = [g for g in gpus if planned_free(g) >= need]
    if fitting:
        return max(fitting, key=lambda g: (planned_free(g), g.uuid)).uuid

    def reachable(gpu: GpuView) -> int:
        evictable = sum(
            m.gpu_used for m in others if m.gpu == gpu.uuid and not plan.gone(m) and not m.pinned
        )
        return planned_free(gpu) + evictable

    def victims_on(gpu: GpuView) -> list[ModelView]:
        free, chosen = planned_free(gpu), []
        for model in _lru(m for m in others if m.gpu == gpu.uuid and not plan.gone(m)):
            if free >= need:
                break
            if not model.pinned:
                chosen.append(model)
                free += model.gpu_used
        return chosen

    candidates = [g for g in gpus if g.total >= need and reachable(g) >= need]
    if not candidates:
        best = max(gpus, key=lambda g: (reachable(g), g.uuid))
        pinned = ", ".join(
            m.name for m in others if m.gpu == best.uuid and m.pinned and not plan.gone(m)
        )
        need_s, free_s = _sizes(need, reachable(best))
        raise _Refused(
            f"{plan.target.name} needs {need_s} of GPU memory but at most {free_s} can be"
            f" freed on any GPU" + (f"; pinned there: {pinned}" if pinned else "")
        )
    plans = {g.uuid: victims_on(g) for g in candidates}
    device = min(
        candidates,
        key=lambda g: (len(plans[g.uuid]), -sum(m.gpu_used for m in plans[g.uuid]), g.uuid),
    )
    for model in plans[device.uuid]:
        plan.take(model, "gpu-memory")
    return device.uuid


def pick_pressure_victim(models: Sequence[ModelView]) -> str | None:
    """The model to unload when memory is under pressure: the LRU idle, unpinned one."""
    idle = [m for m in models if m.state is ModelState.READY and m.in_flight == 0]
    candidates = [m for m in _lru(idle) if not m.pinned]
    return candidates[0].name if candidates else None
