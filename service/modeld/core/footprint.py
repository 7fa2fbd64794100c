"""What a loading model is expected to need: its learned peak with a margin, or its limit.

modeld measures instead of guessing: when a backend that served goes away, its owner
records the peak memory of its scope's cgroup (``MemoryPeak``). Admission then counts the
model with that peak plus a margin (the next run may touch a little more: another prompt,
a longer context) instead of its ``memory_max``, so a model whose limit is generous but
whose real use is small does not block others. The estimate never exceeds ``memory_max``:
the limit still caps the backend, and pressure relief still guards the host.
"""

from __future__ import annotations

from typing import Final

PEAK_MARGIN_PERCENT: Final = 10
"""Added to a learned peak, in percent of it."""
PEAK_SLACK: Final = 16 * 1024 * 1024
"""Added to a learned peak in bytes (for small backends, where 10 % is a few pages)."""


def admission_need(memory_max: int, memory_peak: int) -> int:
    """Memory a model needs when it loads: ``memory_max`` while no peak is known
    (``memory_peak`` 0), else the peak + 10 % + 16 MiB, never more than ``memory_max``.

    With an unlimited ``memory_max`` a learned peak makes the need finite: admission then
    makes room for what the model is known to use.
    """
    if memory_peak <= 0:
        return memory_max
    estimate = memory_peak + memory_peak * PEAK_MARGIN_PERCENT // 100 + PEAK_SLACK
    return min(memory_max, estimate)
