"""modeld's own CPU time per load + unload cycle of the reference backend.

Boots the project's systemd sandbox, runs modeld in it from the repository's units, then
runs this file again *inside* the sandbox as the driver. The driver reads modeld's MainPID
(``systemctl show -p MainPID modeld.service``) and, around each batch of cycles, its user +
system CPU time from ``/proc/<pid>/stat`` (the process and all its threads, not its
children; also the main thread's alone). A cycle is D-Bus ``Load(name, {wait: true})`` then
``Unload(name, {})`` of the demo model from an already-connected client. Warm-up cycles come
first and are not counted, nor is modeld's start-up (reported apart).

CPU time depends far less than wall time on what else the machine runs, but a busy machine
still inflates it (cold caches): the figure is the median over the batches, and trees are
compared in the same conditions (one right after the other, or both at once).

Usage: python bench/cpu_per_cycle.py [--batches B] [--cycles N] [--warmup W] [--json FILE]
       [--py-spy FILE] [--dropin LINES]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "bench"))

MODEL = "bench"
SYSTEMD_PID = 1
"""The sandbox's systemd, in the driver's PID namespace: its CPU per cycle is the baseline."""
SETTLE = 0.2
"""Seconds of quiet after each batch, counted in it (idle modeld uses ~0 CPU)."""


def cpu_seconds(pid: int, *, main_thread: bool = False) -> float:
    """User + system CPU time of ``pid`` from /proc/<pid>/stat: all its threads, ended ones
    too; or only its main thread (the event loop; the others are gRPC's)."""
    stat = Path(f"/proc/{pid}/task/{pid}/stat" if main_thread else f"/proc/{pid}/stat").read_text()
    fields = stat.rsplit(")", 1)[1].split()
    utime, stime = int(fields[11]), int(fields[12])
    return (utime + stime) / os.sysconf("SC_CLK_TCK")


def rss_kib(pid: int) -> int:
    """Resident set size of ``pid`` (VmRSS), KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def main_pid() -> int:
    out = subprocess.run(
        ["systemctl", "show", "-p", "MainPID", "--value", "modeld.service"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    pid = int(out.strip())
    if pid <= 0:
        raise RuntimeError("modeld.service has no MainPID")
    return pid


# ---------------------------------------------------------------------------- driver


def _start_py_spy(pid: int, output: Path) -> subprocess.Popen[bytes]:
    """py-spy (from this interpreter's venv) sampling modeld until SIGINT, without pausing it."""
    py_spy = Path(sys.executable).parent / "py-spy"
    argv = [str(py_spy), "record", "--pid", str(pid), "--nonblocking", "--rate", "1000"]
    argv += ["--format", "raw", "--output", str(output)]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def drive(
    batches: int, cycles: int, warmup: int, py_spy: Path | None = None
) -> dict[str, object]:
    from dbus_next.aio.message_bus import MessageBus
    from dbus_next.constants import BusType
    from manager_calls import call_manager

    bus = await MessageBus(bus_type=BusType.SYSTEM).connect()

    async def manager(member: str, wait: bool) -> None:
        await call_manager(bus, member, MODEL, wait=wait)

    calls: dict[str, list[float]] = {"Load": [], "Unload": []}

    async def cycle() -> None:
        for member in calls:
            start = time.perf_counter()
            await manager(member, member == "Load")
            calls[member].append(time.perf_counter() - start)

    pid = main_pid()
    startup_ms = cpu_seconds(pid) * 1000
    footprint = {"rss_kib": [rss_kib(pid)], "fds": [open_fds(pid)], "cycles": [0]}
    for _ in range(warmup):
        await cycle()
    for samples in calls.values():
        samples.clear()
    profiler = _start_py_spy(pid, py_spy) if py_spy else None
    if profiler:
        await asyncio.sleep(1.0)  # py-spy attaches
    cpu_ms: list[float] = []
    main_ms: list[float] = []
    wall_ms: list[float] = []
    systemd_ms: list[float] = []
    for batch in range(batches):
        await asyncio.sleep(SETTLE)  # modeld finishes what follows the last Unload reply
        cpu0, main0 = cpu_seconds(pid), cpu_seconds(pid, main_thread=True)
        systemd0 = cpu_seconds(SYSTEMD_PID)
        wall0 = time.perf_counter()
        for _ in range(cycles):
            await cycle()
        wall1 = time.perf_counter()
        await asyncio.sleep(SETTLE)
        cpu_ms.append((cpu_seconds(pid) - cpu0) * 1000 / cycles)
        main_ms.append((cpu_seconds(pid, main_thread=True) - main0) * 1000 / cycles)
        systemd_ms.append((cpu_seconds(SYSTEMD_PID) - systemd0) * 1000 / cycles)
        wall_ms.append((wall1 - wall0) * 1000 / cycles)
        footprint["rss_kib"].append(rss_kib(pid))
        footprint["fds"].append(open_fds(pid))
        footprint["cycles"].append(warmup + (batch + 1) * cycles)
    if profiler:
        profiler.send_signal(signal.SIGINT)
        profiler.wait()
    before = cpu_seconds(pid)
    await asyncio.sleep(SETTLE * 10)
    idle_ms = (cpu_seconds(pid) - before) * 1000 / 10
    bus.disconnect()
    return {
        "cpu_ms": cpu_ms,
        "main_thread_ms": main_ms,
        "wall_ms": wall_ms,
        "systemd_ms": systemd_ms,
        "footprint": footprint,
        "call_ms": {member: statistics.median(v) * 1000 for member, v in calls.items()},
        "idle_cpu_ms_per_settle": idle_ms,
        "startup_cpu_ms": startup_ms,
    }


# ---------------------------------------------------------------------- orchestrator


def run(
    batches: int, cycles: int, warmup: int, *, dropin: str = "", py_spy: Path | None = None
) -> dict[str, Any]:
    """Boot a sandbox, deploy modeld, drive the cycles inside; the result with per-batch
    samples (CPU per cycle, systemd's CPU per cycle, RSS and open fds after each batch)."""
    from sandbox.deploy import deploy, reference_model
    from sandboxed import bench_sandbox, run_driver

    with bench_sandbox() as (sandbox, tmp):
        modeld = deploy(
            sandbox,
            Path(tmp),
            {MODEL: reference_model(memory_max="256M")},
            dropin=dropin.replace("\\n", "\n") + "\n" if dropin else "",
        )
        output = run_driver(
            sandbox,
            __file__,
            "--driver",
            f"--batches={batches}",
            f"--cycles={cycles}",
            f"--warmup={warmup}",
            *([f"--py-spy={py_spy.resolve()}"] if py_spy else []),
            timeout=120 + batches * cycles * 3,
        )
        modeld.stop()
    driver = output
    cpu = [round(v, 2) for v in driver["cpu_ms"]]
    wall = [round(v, 1) for v in driver["wall_ms"]]
    return {
        "batches": batches,
        "cycles_per_batch": cycles,
        "warmup_cycles": warmup,
        "cpu_ms_per_cycle_median": round(statistics.median(cpu), 2),
        "cpu_ms_per_cycle_batches": cpu,
        "main_thread_cpu_ms_per_cycle_median": round(
            statistics.median(driver["main_thread_ms"]), 2
        ),
        "systemd_cpu_ms_per_cycle_batches": [round(v, 2) for v in driver["systemd_ms"]],
        "idle_cpu_ms_per_settle": round(driver["idle_cpu_ms_per_settle"], 2),
        "startup_cpu_ms": round(driver["startup_cpu_ms"]),
        "wall_ms_per_cycle_median": round(statistics.median(wall), 1),
        "wall_ms_per_cycle_batches": wall,
        "call_wall_ms_median": {k: round(v, 1) for k, v in driver["call_ms"].items()},
        "footprint": driver["footprint"],
    }


def figures(result: dict[str, Any]) -> list[dict[str, Any]]:
    """modeld's CPU per cycle against systemd's for the same cycles; RSS and fds after all
    cycles against after the warm-up (no growth: ratio 1)."""
    from stats import figure

    footprint = result["footprint"]
    cycles = footprint["cycles"][-1]
    return [
        figure(
            "footprint",
            "modeld CPU time per load + unload cycle",
            "ms",
            result["cpu_ms_per_cycle_batches"],
            baseline=result["systemd_cpu_ms_per_cycle_batches"],
            baseline_name="systemd's (PID 1) CPU time for the same cycles",
        ),
        figure(
            "footprint",
            f"modeld RSS after {cycles} load/unload cycles",
            "MiB",
            [footprint["rss_kib"][-1] / 1024],
            baseline=[footprint["rss_kib"][1] / 1024],
            baseline_name="after the first batch",
            target=50.0,
            target_text="no growth; <= 50 MB",
        ),
        figure(
            "footprint",
            f"modeld open fds after {cycles} load/unload cycles",
            "fds",
            [float(footprint["fds"][-1])],
            baseline=[float(footprint["fds"][1])],
            baseline_name="after the first batch",
            target_text="no growth",
        ),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=5)
    parser.add_argument("--cycles", type=int, default=40, help="cycles per batch")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the result here")
    parser.add_argument("--driver", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument(
        "--dropin",
        default="",
        help="extra [Service] lines for modeld.service (e.g. Environment= for a profiler)",
    )
    parser.add_argument(
        "--py-spy",
        type=Path,
        help="profile modeld during the batches with py-spy (pip install py-spy) into this"
        " file (collapsed stacks); its CPU figures are then not comparable",
    )
    args = parser.parse_args()
    if args.driver:
        result = asyncio.run(drive(args.batches, args.cycles, args.warmup, args.py_spy))
        print(json.dumps(result))
        return 0

    result = run(args.batches, args.cycles, args.warmup, dropin=args.dropin, py_spy=args.py_spy)
    from report import emit

    emit(result, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
