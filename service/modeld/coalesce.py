"""Work that may wait a little and run once for a burst of reasons to run it."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class Coalescer:
    """Runs ``work`` once, ``delay`` seconds after the first :meth:`soon` of a burst, or at
    once on :meth:`now` (which also settles whatever :meth:`soon` asked for).

    Used for publications that follow every request (D-Bus ``PropertiesChanged`` of a
    model's use, systemd's ``STATUS=``): a burst of requests costs one publication of the
    state at its end instead of one per request.
    """

    def __init__(self, work: Callable[[], None], delay: float) -> None:
        self._work = work
        self._delay = delay
        self._timer: asyncio.TimerHandle | None = None

    @property
    def pending(self) -> bool:
        return self._timer is not None

    def soon(self) -> None:
        """Run the work within ``delay`` seconds (at most once for all calls until then)."""
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self._delay, self.now)

    def now(self) -> None:
        """Run the work now."""
        self.cancel()
        self._work()

    def cancel(self) -> None:
        """Forget a pending run."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
