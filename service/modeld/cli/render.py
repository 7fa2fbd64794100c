"""Output helpers: aligned tables, human sizes and times, and the JSON shapes.

JSON keys are snake_case and stable; sizes are bytes, times are what the daemon reports
(``last_used_usec``: microseconds since the epoch, 0 = never).
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from modeld.units import UINT64_MAX

# D-Bus property name -> JSON key. Unknown properties fall back to snake_case().
MODEL_KEYS: dict[str, str] = {
    "Name": "name",
    "Backend": "backend",
    "State": "state",
    "Unit": "unit",
    "ControlGroup": "control_group",
    "MainPID": "main_pid",
    "Endpoint": "endpoint",
    "MemoryCurrent": "memory_current",
    "MemoryMax": "memory_max",
    "MemoryPeak": "memory_peak",
    "GpuMemory": "gpu_memory",
    "Gpu": "gpu",
    "LastUsed": "last_used_usec",
    "InFlight": "in_flight",
    "Pinned": "pinned",
    "ConcurrencyGroups": "concurrency_groups",
    "LastError": "last_error",
    "LoadCount": "load_count",
    "RetryAfter": "retry_after_usec",
}

MANAGER_KEYS: dict[str, str] = {
    "Version": "version",
    "LoadedCount": "loaded_count",
    "MaxLoaded": "max_loaded",
    "MemoryBudget": "memory_budget",
    "MemoryUsed": "memory_used",
}

_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])")


def snake_case(name: str) -> str:
    """``MemoryCurrent`` -> ``memory_current``, ``MainPID`` -> ``main_pid``."""
    return _CAMEL.sub("_", name).lower()


def json_props(props: Mapping[str, Any], keys: Mapping[str, str]) -> dict[str, Any]:
    """D-Bus properties -> a JSON object with stable snake_case keys (known keys first)."""
    out: dict[str, Any] = {}
    for prop, key in keys.items():
        if prop in props:
            out[key] = props[prop]
    for prop, value in props.items():
        if prop not in keys:
            out[snake_case(prop)] = value
    return out


def model_json(path: str, props: Mapping[str, Any]) -> dict[str, Any]:
    out = json_props(props, MODEL_KEYS)
    out["path"] = path
    return out


def dump_json(obj: object) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
    sys.stdout.flush()


def table(
    headers: Sequence[str], rows: Iterable[Sequence[str]], *, right: Sequence[str] = ()
) -> str:
    """Columns padded to their widest cell, two spaces apart, no trailing blanks.

    Columns whose header is in ``right`` are right-aligned (numbers).
    """
    grid = [list(headers), *[[_cell(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in grid) for i in range(len(headers))]
    lines = []
    for row in grid:
        cells = []
        for i, cell in enumerate(row):
            if headers[i] in right:
                cells.append(cell.rjust(widths[i]))
            else:
                cells.append(cell.ljust(widths[i]))
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def _cell(value: str) -> str:
    # One physical line per row, whatever a model name or error contains.
    return " ".join(str(value).split()) if value else ""


def human_bytes(size: int) -> str:
    """Binary units like systemd prints them: ``512B``, ``1.5K``, ``312M``, ``4G``."""
    if size < 1024:
        return f"{size}B"
    value = float(size)
    for unit in "KMGTPE":
        value /= 1024
        if value < 1024 or unit == "E":
            shown = round(value, 1) if value < 10 else round(value)
            if shown == int(shown):
                return f"{int(shown)}{unit}"
            return f"{shown:.1f}{unit}"
    raise AssertionError("unreachable")


def size_or_dash(size: int) -> str:
    """A size; ``-`` for 0 (none/unknown), ``inf`` for systemd's infinity."""
    if size >= UINT64_MAX:
        return "inf"
    return human_bytes(size) if size else "-"


def memory_cell(current: int, maximum: int) -> str:
    """``current/max`` (``312M/4G``, ``312M/inf``); ``-`` when nothing is known."""
    if not current and not maximum:
        return "-"
    return f"{size_or_dash(current)}/{size_or_dash(maximum)}"


def relative_time(usec: int) -> str:
    """Microseconds since the epoch -> ``12s ago``; 0 (never) -> ``-``."""
    if not usec:
        return "-"
    seconds = max(0, int(time.time() - usec / 1_000_000))
    if seconds < 60:
        return f"{seconds}s ago"
    if seconds < 3600:
        return f"{seconds // 60}m ago"
    if seconds < 86400:
        return f"{seconds // 3600}h ago"
    return f"{seconds // 86400}d ago"


def truncate(text: str, width: int) -> str:
    text = " ".join(text.split())
    if len(text) <= width:
        return text
    return text[: width - 3].rstrip() + "..."
