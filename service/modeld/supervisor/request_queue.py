"""The front of each model: at most ``parallel`` requests reach its backend at once and at
most ``max_queue`` more wait (for the model to load or for a slot); the next is refused.

Only the supervisor's requests use a queue, one event loop, no awaits between the check
and the count: a full queue is decided atomically.
"""

from __future__ import annotations

import asyncio

from modeld.errors import QueueFull

RETRY_AFTER_FULL = 1
"""Seconds a client refused for a full queue is told to wait (HTTP Retry-After)."""


class RequestQueue:
    """The bounded queue and the slots of one model."""

    def __init__(self, model: str, parallel: int, max_queue: int) -> None:
        self.model = model
        self.parallel = parallel
        self.max_queue = max_queue
        self.waiting = 0
        """Requests accepted and not yet holding a slot."""
        self.running = 0
        """Requests holding a slot (sent to the backend)."""
        self._slots = asyncio.Semaphore(parallel)

    def resized(self, parallel: int, max_queue: int) -> bool:
        return (parallel, max_queue) != (self.parallel, self.max_queue)

    def enter(self) -> None:
        """Join the queue, or raise QueueFull when ``max_queue`` requests already wait."""
        if self.waiting >= self.max_queue:
            raise QueueFull(
                f"{self.model}: {self.waiting} requests already wait for it (max_queue"
                f" {self.max_queue}); retry later",
                retry_after=RETRY_AFTER_FULL,
            )
        self.waiting += 1

    async def take_slot(self) -> None:
        """Wait for a slot; from then on the request runs (call ``leave(had_slot=True)``)."""
        await self._slots.acquire()
        self.waiting -= 1
        self.running += 1

    def leave(self, *, had_slot: bool) -> None:
        """The request is done, with or without having had a slot."""
        if had_slot:
            self.running -= 1
            self._slots.release()
        else:
            self.waiting -= 1
