"""What the scheduler may do to models: the only way it acts on their owners.

The scheduler decides (with :mod:`modeld.core.eviction`) and then asks; it never changes a
model's state itself. Each model's owner, the only writer of that state, decides whether an
eviction is still valid when it handles it: a model with requests in flight, open leases or
a pin refuses an eviction that is not forced, and the refusal comes back to the scheduler,
which decides again. No snapshot of another's state ever gates a mutation.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Protocol


class EvictionRefused(Exception):
    """The owner refused an eviction: its model is in use or pinned (the message says which)."""


class SchedulerEffects(Protocol):
    """The scheduler's effects; a recording fake stands in for them in tests."""

    def evict(self, name: str, reason: str, force: bool) -> Awaitable[None]:
        """Ask ``name``'s owner to unload it for ``reason`` (an unload reason of the API).

        Resolves once the model is unloaded (at once when it holds no backend); raises
        :class:`EvictionRefused` when the owner refuses. ``force`` interrupts requests and
        leases (never a pin).
        """
        ...

    def start_load(
        self, name: str, gpu: str, after: Awaitable[object] | None, force: bool
    ) -> Awaitable[Awaitable[None]]:
        """Ask ``name``'s owner to load it on ``gpu`` ("" for none) once ``after`` is done.

        Resolves when the owner has accepted (the model is loading, or already loaded and
        joined), with an awaitable of the load's completion; raises InCooldown when its last
        load failed and its cooldown runs, unless ``force``.
        """
        ...

    def report_gpu_memory(self, name: str, used: int) -> None:
        """Tell ``name``'s owner the GPU memory its backend was measured to use."""
        ...
