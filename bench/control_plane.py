"""The control plane with many models loaded, and modeld's idle footprint.

Boots the project's systemd sandbox, runs modeld in it from the repository's units with
64 reference-backend models, then runs this file again *inside* the sandbox as the driver:

1. **idle, nothing loaded**: modeld's RSS and CPU (all threads, ``schedstat``) over a window;
2. **control plane** with 1, 16 and 64 models loaded: the latency of ``ListModels``, a
   property read (``Get State``), all of a model's properties (``GetAll``),
   ``GetManagedObjects`` and ``Load`` of an already-loaded model, interleaved round by
   round with the baseline, a D-Bus ``Peer.Ping`` of modeld (the bus round trip and
   modeld's loop, no work of modeld's own); p50 and p99 of each;
3. **idle with 64 loaded**: RSS and CPU over the same window.

Usage: python bench/control_plane.py [--levels 1,16,64] [--calls N] [--idle S] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "service"))
sys.path.insert(0, str(REPO / "bench"))

DEFAULT_LEVELS = (1, 16, 64)
CALLS = ("Ping", "ListModels", "Get State", "GetAll", "GetManagedObjects", "Load (loaded)")
MANAGER = "/org/modeld1"


def model(i: int) -> str:
    return f"m{i:02d}"


# ---------------------------------------------------------------------------- driver


def _message(kind: str, model_path: str) -> Any:
    from dbus_next.message import Message
    from dbus_next.signature import Variant

    def call(path: str, interface: str, member: str, signature: str = "", *body: Any) -> Any:
        return Message(
            destination="org.modeld1",
            path=path,
            interface=interface,
            member=member,
            signature=signature,
            body=list(body),
        )

    properties = "org.freedesktop.DBus.Properties"
    return {
        "Ping": lambda: call(MANAGER, "org.freedesktop.DBus.Peer", "Ping"),
        "ListModels": lambda: call(MANAGER, "org.modeld1.Manager", "ListModels"),
        "Get State": lambda: call(
            model_path, properties, "Get", "ss", "org.modeld1.Model", "State"
        ),
        "GetAll": lambda: call(model_path, properties, "GetAll", "s", "org.modeld1.Model"),
        "GetManagedObjects": lambda: call(
            MANAGER, "org.freedesktop.DBus.ObjectManager", "GetManagedObjects"
        ),
        "Load (loaded)": lambda: call(
            MANAGER,
            "org.modeld1.Manager",
            "Load",
            "sa{sv}",
            model(0),
            {"wait": Variant("b", True)},
        ),
    }[kind]()


async def idle(pid: int, seconds: float) -> dict[str, list[float]]:
    """modeld's RSS (MiB) and CPU (% of one core) in each second of a quiet window."""
    from cpu_per_cycle import rss_kib
    from front_door import cpu_ns

    rss: list[float] = []
    cpu: list[float] = []
    step = min(1.0, seconds)
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        wall0, cpu0 = time.perf_counter(), cpu_ns(pid)
        await asyncio.sleep(step)
        cpu.append((cpu_ns(pid) - cpu0) / 1e9 / (time.perf_counter() - wall0) * 100)
        rss.append(rss_kib(pid) / 1024)
    return {"rss_mib": rss, "cpu_percent": cpu}


async def drive(levels: Sequence[int], calls: int, idle_s: float) -> dict[str, Any]:
    from cpu_per_cycle import main_pid
    from dbus_next.aio.message_bus import MessageBus
    from dbus_next.constants import BusType
    from dbus_next.message import Message
    from manager_calls import call_manager

    pid = main_pid()
    bus = await MessageBus(bus_type=BusType.SYSTEM).connect()
    result: dict[str, Any] = {"idle": {"0": await idle(pid, idle_s)}, "latency_ms": {}}
    reply = await bus.call(_message("Ping", ""))
    if reply.error_name:
        raise RuntimeError(f"Ping: {reply.body}")
    path_reply = await bus.call(
        Message(
            destination="org.modeld1",
            path=MANAGER,
            interface="org.modeld1.Manager",
            member="GetModel",
            signature="s",
            body=[model(0)],
        )
    )
    model_path = path_reply.body[0]
    loaded = 0
    gate = asyncio.Semaphore(4)

    async def load(name: str) -> None:
        async with gate:
            await call_manager(bus, "Load", name, wait=True)

    for level in levels:
        await asyncio.gather(*(load(model(i)) for i in range(loaded, level)))
        loaded = level
        samples: dict[str, list[float]] = {kind: [] for kind in CALLS}
        for round_no in range(-10, calls):  # 10 warm-up rounds
            shift = round_no % len(CALLS)
            for kind in CALLS[shift:] + CALLS[:shift]:
                message = _message(kind, model_path)
                start = time.perf_counter()
                reply = await bus.call(message)
                elapsed = time.perf_counter() - start
                if reply.error_name:
                    raise RuntimeError(f"{kind}: {reply.error_name} {reply.body}")
                if round_no >= 0:
                    samples[kind].append(round(elapsed * 1000, 4))
        result["latency_ms"][str(level)] = samples
    result["idle"][str(loaded)] = await idle(pid, idle_s)
    bus.disconnect()
    return result


# ---------------------------------------------------------------------- orchestrator


def run(levels: Sequence[int] = DEFAULT_LEVELS, calls: int = 500, idle_s: float = 60.0) -> Any:
    """Boot a sandbox, deploy modeld with max(levels) models, run the driver inside."""

    from sandbox.deploy import deploy, reference_model
    from sandboxed import bench_sandbox, run_driver

    count = max(levels)
    models = {model(i): reference_model(memory_max="128M") for i in range(count)}
    with bench_sandbox() as (sandbox, tmp):
        modeld = deploy(sandbox, Path(tmp), models)
        output = run_driver(
            sandbox,
            __file__,
            "--driver",
            f"--levels={','.join(str(n) for n in levels)}",
            f"--calls={calls}",
            f"--idle={idle_s}",
            timeout=180 + 2 * idle_s + count * 5 + len(levels) * calls * 0.2,
        )
        modeld.stop()
    result: dict[str, Any] = output
    result.update(levels=list(levels), calls=calls, idle_s=idle_s)
    return result


def figures(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Each call's latency against Ping at each level; the idle footprint with N loaded
    against nothing loaded."""
    from stats import figure

    rows = []
    for level, samples in result["latency_ms"].items():
        for kind in CALLS[1:]:
            rows.append(
                figure(
                    "control_plane",
                    f"{kind}, {level} loaded",
                    "ms",
                    samples[kind],
                    baseline=samples["Ping"],
                    baseline_name="Peer.Ping of modeld, interleaved",
                    target_text="p99 <= 5 ms at 64 loaded",
                    digits=4,
                )
            )
    idle = result["idle"]
    top = max(idle, key=int)
    rows.append(
        figure(
            "footprint",
            f"modeld RSS at idle, {top} models loaded",
            "MiB",
            idle[top]["rss_mib"],
            baseline=idle["0"]["rss_mib"],
            baseline_name="RSS at idle with none loaded",
            paired=False,
            target_text="<= 50 MB",
        )
    )
    rows.append(
        figure(
            "footprint",
            f"modeld CPU at idle, {top} models loaded (% of a core, per second)",
            "%",
            idle[top]["cpu_percent"],
            baseline=idle["0"]["cpu_percent"],
            baseline_name="CPU at idle with none loaded",
            paired=False,
            target_text="<= 0.5 %",
            digits=4,
        )
    )
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--levels", default=",".join(str(n) for n in DEFAULT_LEVELS))
    parser.add_argument("--calls", type=int, default=500, help="calls of each kind per level")
    parser.add_argument("--idle", type=float, default=60.0, help="seconds of each idle window")
    parser.add_argument("--json", type=Path, help="also write the result here")
    parser.add_argument("--driver", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    levels = [int(n) for n in args.levels.split(",")]
    if args.driver:
        print(json.dumps(asyncio.run(drive(levels, args.calls, args.idle))))
        return 0
    result = run(levels, args.calls, args.idle)
    from report import emit

    emit(result, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
