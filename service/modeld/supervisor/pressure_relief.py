"""Memory pressure relief: a PSI trigger on modeld.slice wakes modeld, which unloads idle
models, least recently used first, until the pressure falls.

Hysteresis: the kernel trigger fires at ``high`` percent of stall time within its window;
after each eviction the stall rate is measured over one window (from the PSI ``total``
counter, not the lagging 10 s average) and relief goes on only while it stays at or above
``low``. Busy and pinned models are never unloaded for pressure.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from modeld.core.eviction import ModelView, pick_pressure_victim
from modeld.supervisor.owner import ModelOwner
from modeld.system.pressure import Hysteresis, PressureReading, PressureTrigger, read_pressure

log = logging.getLogger(__name__)

WINDOW_US = 2_000_000
"""The PSI window: 2 s is the shortest one allowed without CAP_SYS_RESOURCE."""


class PressureRelief:
    """Owns the trigger and runs one relief episode at a time."""

    def __init__(
        self,
        path: Path,
        owners: Mapping[str, ModelOwner],
        *,
        hysteresis: Hysteresis | None = None,
        on_event: Callable[[], None] | None = None,
    ) -> None:
        self.path = path
        self._owners = owners
        self._hysteresis = hysteresis or Hysteresis()
        self._on_event = on_event
        self._episode: asyncio.Task[None] | None = None
        self.trigger = PressureTrigger(
            path,
            stall_us=self._hysteresis.stall_us(WINDOW_US),
            window_us=WINDOW_US,
            on_pressure=self._on_pressure,
            on_gone=lambda: log.warning("%s is gone: pressure relief is off", path),
        )
        log.info(
            "memory pressure relief on %s (trigger: %d ms of stall per %d s)",
            path,
            self.trigger.stall_us // 1000,
            self.trigger.window_us // 1_000_000,
        )

    def _on_pressure(self) -> None:
        if self._on_event is not None:
            self._on_event()
        if self._episode is None or self._episode.done():
            self._episode = asyncio.create_task(self._relieve(time.monotonic()), name="pressure")

    def _views(self) -> list[ModelView]:
        return [
            ModelView(
                name=o.name,
                state=o.status.state,
                last_used_us=o.status.last_used_us,
                in_flight=o.status.in_flight,
                pinned=o.status.pinned,
            )
            for o in self._owners.values()
        ]

    async def _relieve(self, event_at: float) -> None:
        self._hysteresis.start()
        while True:
            victim = pick_pressure_victim(self._views())
            if victim is None:
                log.warning("memory pressure, but no idle unpinned model to unload")
                return
            log.warning(
                "memory pressure: unloading %s (%.1f ms after the pressure event)",
                victim,
                (time.monotonic() - event_at) * 1000,
            )
            await (await self._owners[victim].request_unload("pressure"))
            rate = await self._stall_rate(WINDOW_US / 1_000_000)
            if rate is None or not self._hysteresis.should_continue(rate):
                log.info("memory pressure relieved")
                return
            event_at = time.monotonic()

    async def _stall_rate(self, seconds: float) -> PressureReading | None:
        """The stall share over the next ``seconds``, as a reading's ``some_avg10``."""
        before, started = read_pressure(self.path), time.monotonic()
        await asyncio.sleep(seconds)
        after = read_pressure(self.path)
        if before is None or after is None:
            return None
        elapsed_us = (time.monotonic() - started) * 1_000_000
        percent = 100.0 * (after.some_total_us - before.some_total_us) / elapsed_us
        return dataclasses.replace(after, some_avg10=percent)

    def close(self) -> None:
        self.trigger.close()
        if self._episode is not None:
            self._episode.cancel()
