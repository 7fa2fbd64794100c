"""What machine a benchmark run was made on: cores, memory, kernel, systemd, cgroup layout,
the interpreter, the load around the run and the checkout's commit."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SYSTEMD = "/lib/systemd/systemd"


def _output(*argv: str) -> str:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def memory_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    return 0


def cgroup_layout() -> str:
    """``v2`` (unified), ``v1-hybrid`` (v1 controllers plus a unified hierarchy) or ``v1``."""
    fs = _output("stat", "-fc", "%T", "/sys/fs/cgroup")
    if fs == "cgroup2fs":
        return "v2"
    if Path("/sys/fs/cgroup/unified").is_dir():
        return "v1-hybrid"
    return "v1"


def systemd_version() -> str:
    first = _output(SYSTEMD, "--version").splitlines()
    return first[0] if first else "unknown"


def git_commit() -> dict[str, Any]:
    commit = _output("git", "-C", str(REPO), "rev-parse", "HEAD")
    dirty = bool(_output("git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"))
    return {"commit": commit or "unknown", "dirty": dirty}


def describe() -> dict[str, Any]:
    """The machine as it is now (call at the start of a run; see :func:`load_average`)."""
    return {
        "cpus": os.cpu_count(),
        "cpu_model": cpu_model(),
        "memory_gib": round(memory_bytes() / 1024**3, 1),
        "kernel": platform.release(),
        "systemd": systemd_version(),
        "cgroups": cgroup_layout(),
        "os": _os_name(),
        "python": platform.python_version(),
        "load_average_at_start": load_average(),
        **git_commit(),
    }


def load_average() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def _os_name() -> str:
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip('"')
    except OSError:
        pass
    return platform.system()
