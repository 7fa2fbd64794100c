"""Memory pressure relief, the pure part: when to start, when to go on, when to stop."""

from __future__ import annotations


class Hysteresis:
    """Decides whether to keep relieving memory pressure.

    ``high`` (percent of ``some`` stall time) starts relief: a trigger set to
    ``stall_us(window_us)`` fires at that level and the scheduler calls ``start()``. Relief
    goes on while the measured stall share stays at or above ``low`` and stops below it;
    afterwards ``should_continue`` is False until the next ``start()``.
    """

    def __init__(self, *, high: float = 10.0, low: float = 5.0) -> None:
        if not 0.0 <= low <= high <= 100.0:
            raise ValueError(f"need 0 <= low <= high <= 100, got low={low} high={high}")
        self.high = high
        self.low = low
        self._relieving = False

    @property
    def relieving(self) -> bool:
        return self._relieving

    def stall_us(self, window_us: int) -> int:
        """The trigger stall threshold for ``window_us`` that corresponds to ``high``."""
        return max(1, round(window_us * self.high / 100.0))

    def start(self) -> None:
        """A trigger fired: relieving from now on."""
        self._relieving = True

    def should_continue(self, stall_percent: float) -> bool:
        """True while relieving and ``stall_percent >= low``; the first share below ``low``
        ends relief."""
        if self._relieving and stall_percent < self.low:
            self._relieving = False
        return self._relieving


def stall_percent(before_total_us: int, after_total_us: int, elapsed_us: float) -> float:
    """The share of ``elapsed_us`` spent stalled, from two readings of a PSI ``total``."""
    if elapsed_us <= 0:
        return 0.0
    return 100.0 * max(0, after_total_us - before_total_us) / elapsed_us
