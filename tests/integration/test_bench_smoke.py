"""The benchmark suite's quick mode, end to end, so its code does not rot.

Runs ``python -m bench --quick`` (every benchmark, a few rounds each, each booting its own
sandbox) into a temporary directory and checks the report's shape: every benchmark ran
and gave figures, every number is finite, what must be positive is, and benchmarks.md
names each plot, which is a real PNG. No time is asserted: these machines are too noisy
for that, and the quick mode's figures mean nothing.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.systemd

REPO = Path(__file__).resolve().parents[2]
BENCHMARKS = (
    "load",
    "readiness",
    "swap",
    "control_plane",
    "cycles",
    "front_door",
    "faults",
    "llama",
)
SECTIONS = ("load", "readiness", "swap", "control_plane", "footprint", "front_door", "faults")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _numbers(value: Any) -> list[float]:
    if isinstance(value, bool):
        return []
    if isinstance(value, int | float):
        return [float(value)]
    if isinstance(value, dict):
        return [n for v in value.values() for n in _numbers(v)]
    if isinstance(value, list):
        return [n for v in value for n in _numbers(v)]
    return []


def test_quick_run_writes_a_complete_report(tmp_path: Path) -> None:
    results, docs = tmp_path / "results", tmp_path / "docs"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", f"--results={results}", f"--docs={docs}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-6000:]
    (result_file,) = results.glob("*-quick.json")
    data = json.loads(result_file.read_text())

    assert data["mode"] == "quick"
    assert data["errors"] == {}
    machine = data["machine"]
    assert machine["cpus"] > 0 and machine["memory_gib"] > 0
    assert machine["kernel"] and machine["systemd"].startswith("systemd")
    assert machine["cgroups"] in ("v1", "v1-hybrid", "v2")
    assert set(data["results"]) == set(BENCHMARKS)
    llama_skipped = "skipped" in data["results"]["llama"]
    assert not (llama_skipped and os.environ.get("MODELD_REQUIRE_LLAMA") == "1")

    figures = data["figures"]
    sections = {f["benchmark"] for f in figures}
    assert set(SECTIONS) <= sections
    assert ("llama" in sections) != llama_skipped
    for fig in figures:
        numbers = _numbers(fig["value"]) + _numbers(fig.get("baseline", {}))
        assert numbers and all(math.isfinite(n) for n in numbers), fig
        assert fig["value"]["n"] >= 1 and fig["value"]["median"] >= 0, fig
        assert fig.get("ratio") is None or fig["ratio"] >= 0, fig
    timed = [f for f in figures if f["unit"] == "ms" and "CPU" not in f["name"]]
    assert timed and all(f["value"]["median"] > 0 for f in timed)
    load = data["results"]["load"]["resolution"]
    assert load["rounds_needed"] >= 2 and load["sigma_paired_ms"] >= 0

    report = (docs / "benchmarks.md").read_text()
    assert "QUICK SMOKE RUN" in report and "## Headlines" in report
    plots = sorted(docs.glob("benchmarks-*.png"))
    assert len(plots) >= len(SECTIONS)
    for plot in plots:
        assert f"]({plot.name})" in report
        assert plot.read_bytes()[:8] == PNG_MAGIC
