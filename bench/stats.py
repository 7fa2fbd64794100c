"""Robust statistics for the benchmarks, and the one shape every reported figure has.

A figure is the median of repeated, interleaved samples with its spread (interquartile
range, min and max), compared with a baseline: either measured in the same run (then the
samples are usually paired round by round, and the comparison is the median of the paired
differences and of the paired ratios), or a target from the issue (then the ratio is to the
target and says so).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

Z_TWO_SIDED_95 = 1.959964
Z_POWER_80 = 0.841621
MEDIAN_EFFICIENCY = 1.2533
"""The standard error of a median is about this many times that of a mean (normal data)."""
MAD_TO_SIGMA = 1.4826


def percentile(values: Sequence[float], fraction: float) -> float:
    """Linear interpolation between order statistics (numpy's default)."""
    if not values:
        raise ValueError("no samples")
    ordered = sorted(values)
    position = fraction * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summary(values: Sequence[float], digits: int = 3) -> dict[str, float]:
    """n, median, p25, p75, p99, min and max of ``values``."""
    return {
        "n": len(values),
        "median": round(statistics.median(values), digits),
        "p25": round(percentile(values, 0.25), digits),
        "p75": round(percentile(values, 0.75), digits),
        "p99": round(percentile(values, 0.99), digits),
        "min": round(min(values), digits),
        "max": round(max(values), digits),
    }


def robust_sigma(values: Sequence[float]) -> float:
    """The standard deviation estimated from the median absolute deviation (outliers,
    which these machines produce, barely move it)."""
    middle = statistics.median(values)
    return MAD_TO_SIGMA * statistics.median(abs(v - middle) for v in values)


def rounds_to_resolve(diffs: Sequence[float], delta: float) -> int:
    """Rounds of paired samples needed to tell a true difference of ``delta`` from none
    with the median of the paired differences: a two-sided 5 % test with 80 % power,
    n = ((z_0.975 + z_0.8) * 1.2533 * sigma / delta)^2, sigma estimated robustly from
    ``diffs`` (same unit as ``delta``)."""
    sigma = robust_sigma(diffs)
    n = ((Z_TWO_SIDED_95 + Z_POWER_80) * MEDIAN_EFFICIENCY * sigma / delta) ** 2
    return max(2, math.ceil(n))


def figure(
    benchmark: str,
    name: str,
    unit: str,
    values: Sequence[float],
    *,
    baseline: Sequence[float] | None = None,
    baseline_name: str = "",
    paired: bool = True,
    target: float | None = None,
    target_text: str = "",
    lower_is_better: bool = True,
    digits: int = 3,
) -> dict[str, Any]:
    """One reported figure: ``values`` summarised, against a measured ``baseline`` (paired
    round by round when ``paired`` and the lengths agree) or, without one, against
    ``target`` (``ratio`` is then value / target). ``target_text`` states the target."""
    row: dict[str, Any] = {
        "benchmark": benchmark,
        "name": name,
        "unit": unit,
        "value": summary(values, digits),
        "lower_is_better": lower_is_better,
        "target": target,
        "target_text": target_text,
    }
    if baseline is not None:
        row["baseline"] = {"name": baseline_name, **summary(baseline, digits)}
        if paired and len(baseline) == len(values):
            diffs = [v - b for v, b in zip(values, baseline, strict=True)]
            row["diff"] = summary(diffs, digits)
            if all(b > 0 for b in baseline):
                ratios = [v / b for v, b in zip(values, baseline, strict=True)]
                row["ratio"] = round(statistics.median(ratios), 4)
                row["ratio_kind"] = "median of paired ratios"
        elif statistics.median(baseline) > 0:
            row["ratio"] = round(statistics.median(values) / statistics.median(baseline), 4)
            row["ratio_kind"] = "ratio of medians"
    elif target:
        row["baseline"] = {"name": "target", "value": target}
        row["ratio"] = round(statistics.median(values) / target, 4)
        row["ratio_kind"] = "median / target"
    return row


def ms(values: Sequence[float]) -> list[float]:
    """Seconds to milliseconds."""
    return [v * 1000 for v in values]
