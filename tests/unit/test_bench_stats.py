"""bench/stats.py: the statistics every benchmark figure is reported with."""

from __future__ import annotations

import math
import statistics
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from stats import figure, percentile, robust_sigma, rounds_to_resolve, summary

samples = st.lists(
    st.floats(min_value=0.001, max_value=1e4, allow_nan=False), min_size=1, max_size=60
)


def test_percentile_interpolates_between_order_statistics() -> None:
    assert percentile([4.0, 1.0, 3.0, 2.0], 0.25) == pytest.approx(1.75)
    assert percentile([4.0, 1.0, 3.0, 2.0], 0.5) == pytest.approx(2.5)
    assert percentile([7.0], 0.99) == 7.0
    with pytest.raises(ValueError):
        percentile([], 0.5)


@given(samples)
def test_summary_orders_its_quantiles(values: list[float]) -> None:
    s = summary(values, digits=6)
    assert s["n"] == len(values)
    assert s["min"] <= s["p25"] <= s["median"] <= s["p75"] <= s["p99"] <= s["max"]
    assert s["median"] == pytest.approx(statistics.median(values), abs=1e-6)


def test_rounds_to_resolve_follows_the_spread() -> None:
    diffs = [-10.0, 0.0, 10.0] * 5  # median 0, MAD 10: sigma 14.8 ms
    assert robust_sigma(diffs) == pytest.approx(14.826)
    expected = math.ceil(((1.959964 + 0.841621) * 1.2533 * 14.826 / 5.0) ** 2)
    assert rounds_to_resolve(diffs, 5.0) == expected
    assert rounds_to_resolve(diffs, 10.0) < expected
    assert rounds_to_resolve([3.0] * 10, 5.0) == 2  # no spread: the floor


@given(samples, st.floats(min_value=1.1, max_value=10))
def test_wider_spread_never_needs_fewer_rounds(values: list[float], factor: float) -> None:
    wider = [v * factor for v in values]
    assert rounds_to_resolve(wider, 5.0) >= rounds_to_resolve(values, 5.0)


def test_figure_pairs_rounds_with_a_measured_baseline() -> None:
    row = figure("load", "x", "ms", [110.0, 120.0, 130.0], baseline=[100.0, 100.0, 100.0])
    assert row["diff"]["median"] == 20.0
    assert row["ratio"] == pytest.approx(1.2)
    assert row["ratio_kind"] == "median of paired ratios"
    assert row["baseline"]["median"] == 100.0


def test_figure_without_pairs_compares_medians_and_without_baseline_the_target() -> None:
    unpaired = figure("f", "x", "MiB", [60.0, 62.0], baseline=[50.0], paired=False)
    assert "diff" not in unpaired
    assert unpaired["ratio"] == pytest.approx(1.22)
    targeted = figure("f", "x", "ms", [0.5, 0.7], target=1.0)
    assert targeted["ratio"] == pytest.approx(0.6)
    assert targeted["baseline"] == {"name": "target", "value": 1.0}
    assert "ratio" not in figure("f", "x", "%", [0.2], baseline=[0.0], paired=False)
