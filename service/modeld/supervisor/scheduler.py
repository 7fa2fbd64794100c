"""The scheduler: one actor that admits loads and relieves memory pressure.

Its inbox takes load requests, the owners' status changes, pressure events, the results of
the evictions it asked for and its own timers, one message at a time. Its view of the
models is what their owners published (:class:`StatusChange` events, in the order they were
committed), never a read of an owner's state. It decides with the pure functions of
:mod:`modeld.core` and acts only through :class:`SchedulerEffects`.

An eviction is a request, not an order: the owner refuses it when its model has requests
in flight, open leases or a pin (unless forced), and the scheduler then decides again. So
a request that begins on a model in the same instant the scheduler picks it as a victim is
never cut off, whatever the timing.

Admission of a load (concurrent loads of one model join one admission):

1. decide over the view; a refusal fails the callers with InsufficientResources;
2. busy victims: wait, deciding again on every status change that could matter, until the
   patience (``eviction_retries * eviction_retry_interval``) runs out: Busy;
3. otherwise ask for the evictions and reserve the target's place; once all are done, start
   the load (after the GPU shows the freed memory back); if one was refused, decide again.

While an admission's evictions run, its target counts as loading and its victims as gone
for every other decision, so two loads can never both take the last slot.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from modeld.config import DaemonConfig, ModelConfig
from modeld.core.effects import SchedulerEffects
from modeld.core.eviction import (
    Decision,
    GpuView,
    Limits,
    ModelView,
    decide_load,
    pick_pressure_victim,
)
from modeld.core.pressure import Hysteresis, stall_percent
from modeld.core.states import ModelState
from modeld.errors import Busy, InsufficientResources, LoadFailed, ModeldError, NoSuchModel
from modeld.naming import shown
from modeld.supervisor.cooldown import cooldown_refusal
from modeld.supervisor.mailbox import serve
from modeld.supervisor.measurements import GpuReading, Measurements
from modeld.supervisor.status import ModelStatus, StatusChange
from modeld.system.pressure import PressureReading
from modeld.units import UINT64_MAX

log = logging.getLogger(__name__)

GPU_RECOVERY_SHARE = 0.75
"""After evictions, wait until NVML shows at least this share of the victims' GPU memory
free again (drivers report freed VRAM late)."""
PRESSURE_WINDOW = 2.0
"""Seconds over which the stall share is measured after each eviction for pressure."""

Reply = asyncio.Future[Awaitable[None]]
DecideFunction = Callable[[str, list[ModelView], list[GpuView], Limits], Decision]


@dataclass(frozen=True, slots=True)
class SchedulerPolicy:
    """The daemon settings the scheduler decides with."""

    max_loaded: int = 0
    memory_budget: int = UINT64_MAX
    force_eviction_when_busy: bool = False
    patience: float = 30.0
    """How long a load waits for busy victims before it fails with Busy."""

    @classmethod
    def from_daemon(cls, daemon: DaemonConfig, *, max_loaded: int | None = None) -> SchedulerPolicy:
        return cls(
            max_loaded=daemon.max_loaded if max_loaded is None else max_loaded,
            memory_budget=daemon.memory_budget,
            force_eviction_when_busy=daemon.force_eviction_when_busy,
            patience=daemon.eviction_retries * daemon.eviction_retry_interval,
        )


@dataclass
class _Model:
    config: ModelConfig
    status: ModelStatus


@dataclass(eq=False)
class _Admission:
    """A load being admitted: decided, waiting for busy models, or evicting."""

    target: str
    force: bool
    deadline: float
    replies: list[Reply]
    victims: dict[str, str] = field(default_factory=dict)
    """Evictions asked for and not yet settled: name -> reason."""
    refused: bool = False
    waiting_for: tuple[str, ...] = ()
    gpu: str = ""
    gpu_wanted_free: float = 0.0
    """Free memory to wait for on ``gpu`` before starting (0: no wait)."""
    timer: asyncio.TimerHandle | None = None


@dataclass(eq=False)
class _Relief:
    """A memory pressure relief episode."""

    event_at: float
    victim: str = ""
    refused: set[str] = field(default_factory=set)


@dataclass
class _LoadRequest:
    name: str
    force: bool
    reply: Reply


@dataclass
class _Status:
    change: StatusChange


@dataclass
class _Track:
    config: ModelConfig
    status: ModelStatus | None


@dataclass
class _Forget:
    name: str


@dataclass
class _SetPolicy:
    policy: SchedulerPolicy


@dataclass
class _EvictionSettled:
    name: str
    admission: _Admission | None
    """None: an eviction for memory pressure."""
    error: BaseException | None


@dataclass
class _Deadline:
    admission: _Admission


@dataclass
class _Accepted:
    name: str


@dataclass
class _Pressure:
    at: float


@dataclass
class _PressureWindowEnded:
    before: PressureReading
    started: float


@dataclass
class _Barrier:
    done: asyncio.Future[None]


@dataclass
class _Reconsider:
    """The scheduler's own reservations changed: waiting admissions decide again."""


_Message = (
    _LoadRequest
    | _Status
    | _Track
    | _Forget
    | _SetPolicy
    | _EvictionSettled
    | _Deadline
    | _Accepted
    | _Pressure
    | _PressureWindowEnded
    | _Barrier
    | _Reconsider
)


def _relevant(change: StatusChange) -> bool:
    before, after = change.before, change.after
    return (before.state, before.in_flight, before.pinned) != (
        after.state,
        after.in_flight,
        after.pinned,
    )


class Scheduler:
    """Admits loads and relieves memory pressure; see the module docstring."""

    def __init__(
        self,
        effects: SchedulerEffects,
        measurements: Measurements,
        policy: SchedulerPolicy,
        *,
        read_pressure: Callable[[], PressureReading | None] | None = None,
        hysteresis: Hysteresis | None = None,
        pressure_window: float = PRESSURE_WINDOW,
        decide: DecideFunction = decide_load,
    ) -> None:
        self._effects = effects
        self._measure = measurements
        self._policy = policy
        self._read_pressure = read_pressure
        self.hysteresis = hysteresis or Hysteresis()
        self._pressure_window = pressure_window
        self._decide = decide
        self._models: dict[str, _Model] = {}
        self._admissions: dict[str, _Admission] = {}
        self._starting: collections.Counter[str] = collections.Counter()
        self._relief: _Relief | None = None
        self._reconsider_posted = False
        self._inbox: asyncio.Queue[_Message] = asyncio.Queue()
        self._task = asyncio.create_task(
            serve(self._inbox, self._handle, self._release, "scheduler"), name="scheduler"
        )

    # ----------------------------------------------------------------- thin clients

    def load(self, name: str, *, force: bool = False) -> Reply:
        """Admit a load of ``name``; resolves with its completion once it is under way.

        ``force`` lets it evict busy models; without it (and without
        ``force_eviction_when_busy``) it waits for them, then fails with Busy.
        """
        reply: Reply = asyncio.get_running_loop().create_future()
        self._inbox.put_nowait(_LoadRequest(name, force, reply))
        return reply

    def status_changed(self, change: StatusChange) -> None:
        """An owner committed a change (delivered in commit order)."""
        self._inbox.put_nowait(_Status(change))

    def track(self, config: ModelConfig, status: ModelStatus | None = None) -> None:
        """Schedule ``config``'s model (new, with its owner's first ``status``) or update
        its configuration (``status`` None)."""
        self._inbox.put_nowait(_Track(config, status))

    def forget(self, name: str) -> None:
        """The model is no longer configured: pending loads of it fail."""
        self._inbox.put_nowait(_Forget(name))

    def set_policy(self, policy: SchedulerPolicy) -> None:
        self._inbox.put_nowait(_SetPolicy(policy))

    def pressure(self) -> None:
        """Memory pressure crossed the high mark (a PSI trigger fired)."""
        self._inbox.put_nowait(_Pressure(time.monotonic()))

    async def flush(self) -> None:
        """Return once every message already posted, or due from callbacks already
        scheduled (settled evictions, accepted loads), has been handled."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().call_soon(self._inbox.put_nowait, _Barrier(done))
        await done

    async def close(self) -> None:
        """Stop; loads still being admitted fail."""
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        for admission in list(self._admissions.values()):
            self._fail(admission, LoadFailed(f"{admission.target}: modeld is stopping"))
        while not self._inbox.empty():
            message = self._inbox.get_nowait()
            if isinstance(message, _LoadRequest) and not message.reply.done():
                message.reply.set_exception(LoadFailed(f"{message.name}: modeld is stopping"))

    # --------------------------------------------------------------------- the actor

    def _post(self, message: _Message) -> None:
        self._inbox.put_nowait(message)

    def _release(self, message: _Message, err: Exception) -> None:
        """After an internal error nobody waits forever: fail what the message concerned."""
        error = LoadFailed(f"internal error in modeld's scheduler ({err}); see its journal")
        if isinstance(message, _LoadRequest):
            admission = self._admissions.get(message.name)
            if admission is not None:
                self._fail(admission, error)
            elif not message.reply.done():
                message.reply.set_exception(error)
        elif isinstance(message, _EvictionSettled | _Deadline) and message.admission is not None:
            self._fail(message.admission, error)

    async def _handle(self, message: _Message) -> None:
        match message:
            case _LoadRequest():
                await self._on_load_request(message)
            case _Status(change=change):
                await self._on_status(change)
            case _EvictionSettled():
                await self._on_eviction_settled(message)
            case _Deadline(admission=admission):
                if self._admissions.get(admission.target) is admission and not admission.victims:
                    await self._advance(admission)
            case _Accepted(name=name):
                self._starting[name] -= 1
                if self._starting[name] <= 0:
                    del self._starting[name]
                self._reconsider()
            case _Track(config=config, status=status):
                model = self._models.get(config.name)
                if model is None:
                    self._models[config.name] = _Model(config, status or ModelStatus())
                else:
                    model.config = config
            case _Forget(name=name):
                self._models.pop(name, None)
                pending = self._admissions.get(name)
                if pending is not None:
                    self._fail(pending, NoSuchModel(f"model {name!r} was removed"))
            case _SetPolicy(policy=policy):
                self._policy = policy
                await self._advance_waiting()
            case _Pressure(at=at):
                self._on_pressure(at)
            case _PressureWindowEnded():
                self._on_pressure_window_ended(message)
            case _Barrier(done=done):
                done.set_result(None)
            case _Reconsider():
                self._reconsider_posted = False
                await self._advance_waiting()

    # ------------------------------------------------------------------- admission

    async def _on_load_request(self, message: _LoadRequest) -> None:
        if message.name not in self._models:
            message.reply.set_exception(NoSuchModel(f"no model named {shown(message.name)}"))
            return
        admission = self._admissions.get(message.name)
        if admission is not None:
            admission.replies.append(message.reply)
            if message.force and not admission.force:
                admission.force = True
                if not admission.victims:
                    await self._advance(admission)
            return
        admission = _Admission(
            target=message.name,
            force=message.force,
            deadline=time.monotonic() + self._policy.patience,
            replies=[message.reply],
        )
        self._admissions[message.name] = admission
        await self._advance(admission)

    async def _advance(self, admission: _Admission) -> None:
        """Decide for ``admission`` (which has no eviction outstanding) and act on it."""
        target = self._models.get(admission.target)
        if target is None:
            self._fail(admission, NoSuchModel(f"model {admission.target!r} was removed"))
            return
        holds = target.status.state.occupies_slot or admission.target in self._starting
        if not holds and not admission.force:
            status = target.status
            refusal = cooldown_refusal(
                admission.target, status.retry_after_us, status.last_error, time.time_ns() // 1000
            )
            if refusal is not None:  # at once, before anything is evicted for it
                self._fail(admission, refusal)
                return
        if holds and admission.target not in self._going():
            self._launch(admission, target.status.gpu, None)  # joins: nothing to decide
            return
        reading = await self._gpu_reading() if target.config.gpu_memory > 0 else None
        limits = Limits(
            max_loaded=self._policy.max_loaded,
            memory_budget=self._policy.memory_budget,
            force_busy=self._forced(admission),
        )
        views = self._views(reading)
        gpus = list(reading.devices) if reading else []
        decision = self._decide(admission.target, views, gpus, limits)
        if decision.refusal is not None:
            self._fail(admission, InsufficientResources(decision.refusal))
        elif decision.wait_for:
            self._wait(admission, decision.wait_for)
        elif decision.evict:
            self._evict_for(admission, decision, views, reading)
        else:
            self._launch(admission, decision.gpu, None)

    def _forced(self, admission: _Admission) -> bool:
        return admission.force or self._policy.force_eviction_when_busy

    def _wait(self, admission: _Admission, busy: tuple[str, ...]) -> None:
        remaining = admission.deadline - time.monotonic()
        if remaining <= 0:
            self._fail(
                admission,
                Busy(
                    f"{admission.target} needs {', '.join(busy)} evicted but"
                    f" {'it is' if len(busy) == 1 else 'they are'} still busy after"
                    f" {self._policy.patience:g}s; retry later or load with force"
                ),
            )
            return
        if busy != admission.waiting_for:
            log.info("load of %s waits for busy %s", admission.target, ", ".join(busy))
            admission.waiting_for = busy
        if admission.timer is None:
            admission.timer = asyncio.get_running_loop().call_later(
                remaining, self._post, _Deadline(admission)
            )

    def _evict_for(
        self,
        admission: _Admission,
        decision: Decision,
        views: list[ModelView],
        reading: GpuReading | None,
    ) -> None:
        admission.waiting_for = ()
        admission.gpu = decision.gpu
        admission.gpu_wanted_free = 0.0
        if reading is not None and decision.gpu:
            by_name = {v.name: v for v in views}
            freed = sum(
                by_name[e.name].gpu_used
                for e in decision.evict
                if by_name[e.name].gpu == decision.gpu
            )
            if freed:
                before = next(g.free for g in reading.devices if g.uuid == decision.gpu)
                admission.gpu_wanted_free = before + freed * GPU_RECOVERY_SHARE
        for eviction in decision.evict:
            log.info(
                "evicting %s (%s) to load %s", eviction.name, eviction.reason, admission.target
            )
            admission.victims[eviction.name] = eviction.reason
            self._send_eviction(eviction.name, eviction.reason, self._forced(admission), admission)

    def _send_eviction(
        self, name: str, reason: str, force: bool, admission: _Admission | None
    ) -> None:
        future = asyncio.ensure_future(self._effects.evict(name, reason, force))

        def settled(done: asyncio.Future[None]) -> None:
            error = asyncio.CancelledError() if done.cancelled() else done.exception()
            self._post(_EvictionSettled(name, admission, error))

        future.add_done_callback(settled)

    async def _on_eviction_settled(self, message: _EvictionSettled) -> None:
        admission = message.admission
        if admission is None:
            self._on_pressure_eviction_settled(message)
            return
        admission.victims.pop(message.name, None)
        self._reconsider()
        if message.error is not None:
            admission.refused = True
            log.info(
                "eviction of %s for %s refused (%s); deciding again",
                message.name,
                admission.target,
                message.error,
            )
        if admission.victims or self._admissions.get(admission.target) is not admission:
            return
        if admission.refused:
            admission.refused = False
            await self._advance(admission)
            return
        after = None
        if admission.gpu_wanted_free:
            after = asyncio.ensure_future(
                self._measure.wait_gpu_free(admission.gpu, admission.gpu_wanted_free)
            )
        self._launch(admission, admission.gpu, after)

    def _launch(self, admission: _Admission, gpu: str, after: Awaitable[object] | None) -> None:
        self._finish(admission)
        name = admission.target
        self._starting[name] += 1
        accepted = asyncio.ensure_future(
            self._effects.start_load(name, gpu, after, admission.force)
        )

        def on_accepted(done: asyncio.Future[Awaitable[None]]) -> None:
            self._post(_Accepted(name))
            for reply in admission.replies:
                if reply.done():
                    continue
                if done.cancelled():
                    reply.cancel()
                elif (error := done.exception()) is not None:
                    reply.set_exception(error)
                else:
                    reply.set_result(done.result())

        accepted.add_done_callback(on_accepted)

    def _reconsider(self) -> None:
        if not self._reconsider_posted and any(a.waiting_for for a in self._admissions.values()):
            self._reconsider_posted = True
            self._post(_Reconsider())

    def _finish(self, admission: _Admission) -> None:
        if self._admissions.get(admission.target) is admission:
            del self._admissions[admission.target]
            self._reconsider()
        if admission.timer is not None:
            admission.timer.cancel()
            admission.timer = None

    def _fail(self, admission: _Admission, error: ModeldError) -> None:
        self._finish(admission)
        for reply in admission.replies:
            if not reply.done():
                reply.set_exception(error)

    async def _advance_waiting(self) -> None:
        """Decide again for every admission waiting for busy models."""
        for admission in list(self._admissions.values()):
            if admission.waiting_for and not admission.victims:
                await self._advance(admission)

    # ------------------------------------------------------------------------ view

    def _going(self) -> set[str]:
        """Models whose slots evictions under way free for a load that needs one.

        The victims of an admission whose target already holds a slot free nothing for
        anyone: its target looked as if it were going when it evicted them (the victim of
        another admission, whose owner then refused), so counting them as going would count
        that slot twice, and the cap would not hold.
        """
        going = {
            name
            for a in self._admissions.values()
            if not self._holds_slot(a.target)
            for name in a.victims
        }
        if self._relief is not None and self._relief.victim:
            going.add(self._relief.victim)
        return going

    def _holds_slot(self, name: str) -> bool:
        model = self._models.get(name)
        return model is not None and model.status.state.occupies_slot

    def _views(self, reading: GpuReading | None, *, measure: bool = True) -> list[ModelView]:
        """The decision's input: the published states, with the effects of the scheduler's
        own requests in progress (victims being evicted are gone, targets whose evictions
        run or whose load was asked for count as loading)."""
        going = self._going()
        reserved = {a.target for a in self._admissions.values() if a.victims}
        reserved.update(self._starting)
        views = []
        for name, model in self._models.items():
            status, config = model.status, model.config
            state = status.state
            if name in going and state.occupies_slot:
                state = ModelState.UNLOADING
            elif name in reserved and not state.occupies_slot:
                state = ModelState.LOADING
            memory = 0
            if measure and status.control_group and status.state.occupies_slot:
                memory = self._measure.memory_current(status.control_group)
            views.append(
                ModelView(
                    name=name,
                    state=state,
                    last_used_us=status.last_used_us,
                    in_flight=status.in_flight,
                    pinned=status.pinned,
                    groups=frozenset(config.concurrency_groups),
                    memory_max=config.memory_max,
                    memory_peak=status.memory_peak,
                    memory_current=memory,
                    gpu_memory=config.gpu_memory,
                    gpu=status.gpu,
                    gpu_used=reading.used_by(name, status.gpu) if reading else 0,
                )
            )
        return views

    async def _gpu_reading(self) -> GpuReading:
        """Read NVML and tell each owner what its backend holds on its device."""
        groups = {
            name: m.status.control_group
            for name, m in self._models.items()
            if m.status.control_group
        }
        reading = await self._measure.gpu(groups)
        for name, model in self._models.items():
            if model.status.gpu:
                self._effects.report_gpu_memory(name, reading.used_by(name, model.status.gpu))
        return reading

    async def _on_status(self, change: StatusChange) -> None:
        model = self._models.get(change.model)
        if model is None:
            return
        model.status = change.after
        became_serving = change.after.state.serving and not change.before.state.serving
        if became_serving and change.after.gpu and self._measure.gpu_available:
            await self._gpu_reading()
        if _relevant(change):
            await self._advance_waiting()

    # -------------------------------------------------------------- memory pressure

    def _on_pressure(self, at: float) -> None:
        if self._relief is not None:
            return
        self.hysteresis.start()
        self._relief = _Relief(event_at=at)
        self._relieve()

    def _relieve(self) -> None:
        relief = self._relief
        assert relief is not None
        candidates = [v for v in self._views(None, measure=False) if v.name not in relief.refused]
        victim = pick_pressure_victim(candidates)
        if victim is None:
            log.warning("memory pressure, but no idle unpinned model to unload")
            self._relief = None
            return
        log.warning(
            "memory pressure: unloading %s (%.1f ms after the pressure event)",
            victim,
            (time.monotonic() - relief.event_at) * 1000,
        )
        relief.victim = victim
        self._send_eviction(victim, "pressure", False, None)

    def _on_pressure_eviction_settled(self, message: _EvictionSettled) -> None:
        relief = self._relief
        if relief is None:
            return
        relief.victim = ""
        if message.error is not None:
            log.info("memory pressure: %s stays (%s)", message.name, message.error)
            relief.refused.add(message.name)
            self._relieve()
            return
        relief.refused.clear()
        before = self._read_pressure() if self._read_pressure is not None else None
        if before is None:
            self._relief = None
            return
        asyncio.get_running_loop().call_later(
            self._pressure_window,
            self._post,
            _PressureWindowEnded(before, time.monotonic()),
        )

    def _on_pressure_window_ended(self, message: _PressureWindowEnded) -> None:
        relief = self._relief
        after = self._read_pressure() if self._read_pressure is not None else None
        if relief is None or after is None:
            self._relief = None
            return
        elapsed_us = (time.monotonic() - message.started) * 1_000_000
        share = stall_percent(message.before.some_total_us, after.some_total_us, elapsed_us)
        if not self.hysteresis.should_continue(share):
            log.info("memory pressure relieved (%.1f %% stall)", share)
            self._relief = None
            return
        relief.event_at = time.monotonic()
        self._relieve()
