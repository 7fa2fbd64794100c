"""Failure cooldown: after a failed load, the next load of that model waits.

10 s after the first failure, doubling with each failure in a row up to 5 minutes; a
successful load or a change of the model's configuration starts over. A load in cooldown
fails at once (``force`` skips the wait), so a broken model cannot spin, fill the journal
or churn other models out. Pure: times are µs since the epoch, given by the caller.
"""

from __future__ import annotations

import math
import time

from modeld.errors import InCooldown

COOLDOWN_FIRST = 10.0
COOLDOWN_MAX = 300.0


def cooldown_seconds(failures: int) -> float:
    """The wait after ``failures`` (>= 1) failed loads in a row."""
    return min(COOLDOWN_MAX, COOLDOWN_FIRST * 2.0 ** (failures - 1))


def cooldown_refusal(
    model: str, retry_after_us: int, last_error: str, now_us: int
) -> InCooldown | None:
    """The error a load gets while the cooldown runs (None once it is over)."""
    if retry_after_us <= now_us:
        return None
    seconds = math.ceil((retry_after_us - now_us) / 1_000_000)
    at = time.strftime("%H:%M:%S", time.localtime(retry_after_us / 1_000_000))
    reason = last_error.splitlines()[0] if last_error else "it failed"
    return InCooldown(
        f"{model}: its last load failed ({reason}); it may be loaded again in {seconds}s"
        f" (at {at}), or now with force",
        retry_after=seconds,
    )
