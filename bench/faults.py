"""Faults: how fast modeld sees a backend die, and how long it takes to come back itself.

Boots the project's systemd sandbox, runs modeld in it from the repository's units, then
runs this file again *inside* the sandbox as the driver:

1. **crash detection**: ``kill -9`` of a ready backend's main process until modeld's
   ``ModelUnloaded`` signal (reason ``crashed``), against the physical limit measured on
   the same kill: the driver's own ``pidfd`` of that process becoming readable (the
   kernel's exit notification);
2. **re-adoption** with 0, 1, 16 and 64 backends running: ``systemctl restart modeld`` and
   ``kill -9`` of modeld (``Restart=on-failure`` brings it back after ``RestartSec=1s``),
   each until ``org.modeld1`` has an owner again, which modeld takes only once it has
   re-adopted every backend (then ``LoadedCount`` is checked). The baseline is the same
   with no backend running (modeld's own stop and start), measured first.

(The third fault figure, memory pressure to first eviction, is ``bench/eviction.py``'s.)

Usage: python bench/faults.py [--crash-rounds N] [--levels 1,16,64] [--rounds N] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
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
CRASH_MODEL = "crash"
NO_START_LIMIT = "[Unit]\nStartLimitIntervalSec=0\n"
"""The rounds restart modeld more often than systemd's default start limit (5 in 10 s)."""
BUS = ("org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus")


def model(i: int) -> str:
    return f"m{i:02d}"


# ---------------------------------------------------------------------------- driver


def _message(
    destination: str, path: str, interface: str, member: str, signature: str = "", *body: Any
) -> Any:
    from dbus_next.message import Message

    return Message(
        destination=destination,
        path=path,
        interface=interface,
        member=member,
        signature=signature,
        body=list(body),
    )


async def _call(bus: Any, *args: Any) -> Any:
    reply = await bus.call(_message(*args))
    if reply.error_name:
        raise RuntimeError(f"{args[3]}: {reply.error_name} {reply.body}")
    return reply.body


async def _property(bus: Any, path: str, interface: str, name: str) -> Any:
    body = await _call(
        bus, "org.modeld1", path, "org.freedesktop.DBus.Properties", "Get", "ss", interface, name
    )
    return body[0].value


class Signals:
    """Futures for the next D-Bus signal matching a member (and a first argument)."""

    def __init__(self, bus: Any) -> None:
        self._waiting: list[tuple[str, str, asyncio.Future[tuple[float, list[Any]]]]] = []
        bus.add_message_handler(self._on_message)

    def _on_message(self, message: Any) -> None:
        now = time.perf_counter()
        for entry in list(self._waiting):
            member, first, future = entry
            body = message.body or []
            if message.member == member and body and body[0] == first and not future.done():
                future.set_result((now, body))
                self._waiting.remove(entry)

    def next(self, member: str, first: str) -> asyncio.Future[tuple[float, list[Any]]]:
        future: asyncio.Future[tuple[float, list[Any]]] = asyncio.get_running_loop().create_future()
        self._waiting.append((member, first, future))
        return future


async def _pidfd_exit(pid: int) -> float:
    """Wait until process ``pid`` has exited (its pidfd readable); when, perf_counter."""
    loop = asyncio.get_running_loop()
    fd = os.pidfd_open(pid)
    done: asyncio.Future[float] = loop.create_future()
    loop.add_reader(fd, lambda: done.done() or done.set_result(time.perf_counter()))
    try:
        return await done
    finally:
        loop.remove_reader(fd)
        os.close(fd)


async def crashes(bus: Any, signals: Signals, rounds: int) -> dict[str, list[float]]:
    from manager_calls import call_manager

    manager = ("org.modeld1", "/org/modeld1", "org.modeld1.Manager")
    path = (await _call(bus, *manager, "GetModel", "s", CRASH_MODEL))[0]
    times: dict[str, list[float]] = {"modeld": [], "pidfd": []}
    for round_no in range(-1, rounds):
        await call_manager(bus, "Load", CRASH_MODEL, wait=True)
        pid = int(await _property(bus, path, "org.modeld1.Model", "MainPID"))
        unloaded = signals.next("ModelUnloaded", CRASH_MODEL)
        exited = asyncio.ensure_future(_pidfd_exit(pid))
        await asyncio.sleep(0)  # the pidfd is open and watched before the kill
        start = time.perf_counter()
        os.kill(pid, signal.SIGKILL)
        seen, body = await asyncio.wait_for(unloaded, 30)
        gone = await exited
        if body[2] != "crashed":
            raise RuntimeError(f"ModelUnloaded reason {body[2]!r}, expected 'crashed'")
        if round_no >= 0:
            times["modeld"].append(seen - start)
            times["pidfd"].append(gone - start)
    return times


def _modeld_pid() -> int:
    out = subprocess.run(
        ["systemctl", "show", "-p", "MainPID", "--value", "modeld.service"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return int(out.strip())


async def readoption(bus: Any, signals: Signals, how: str) -> float:
    """Seconds from ``systemctl restart`` / ``kill -9`` of modeld until it owns its name."""
    owned = signals.next("NameOwnerChanged", "org.modeld1")
    start = time.perf_counter()
    if how == "restart":
        proc = await asyncio.create_subprocess_exec(
            "systemctl", "restart", "--no-block", "modeld.service"
        )
        await proc.wait()
    else:
        os.kill(_modeld_pid(), signal.SIGKILL)
    while True:  # NameOwnerChanged(name, old, new): first lost, then the new owner
        seen, body = await asyncio.wait_for(owned, 60)
        if body[2]:
            return seen - start
        owned = signals.next("NameOwnerChanged", "org.modeld1")


async def drive(crash_rounds: int, levels: Sequence[int], rounds: int) -> dict[str, Any]:
    from dbus_next.aio.message_bus import MessageBus
    from dbus_next.constants import BusType
    from manager_calls import call_manager

    bus = await MessageBus(bus_type=BusType.SYSTEM).connect()
    signals = Signals(bus)
    for rule in (
        "type='signal',interface='org.modeld1.Manager',member='ModelUnloaded'",
        "type='signal',sender='org.freedesktop.DBus',member='NameOwnerChanged',arg0='org.modeld1'",
    ):
        await _call(bus, *BUS, "AddMatch", "s", rule)
    result: dict[str, Any] = {"crash": await crashes(bus, signals, crash_rounds)}

    gate = asyncio.Semaphore(4)

    async def load(name: str) -> None:
        async with gate:
            await call_manager(bus, "Load", name, wait=True)

    kinds = ("restart", "kill")
    readopt: dict[str, dict[str, list[float]]] = {}
    loaded = 0
    for level in (0, *levels):
        await asyncio.gather(*(load(model(i)) for i in range(loaded, level)))
        loaded = level
        samples: dict[str, list[float]] = {how: [] for how in kinds}
        for round_no in range(rounds):
            for how in kinds if round_no % 2 == 0 else kinds[::-1]:
                samples[how].append(await readoption(bus, signals, how))
                count = await _property(bus, "/org/modeld1", "org.modeld1.Manager", "LoadedCount")
                if count != level:
                    raise RuntimeError(f"after {how} with {level} loaded: LoadedCount {count}")
        readopt[str(level)] = samples
    result["readoption"] = readopt
    bus.disconnect()
    return result


# ---------------------------------------------------------------------- orchestrator


def run(crash_rounds: int, levels: Sequence[int] = DEFAULT_LEVELS, rounds: int = 4) -> Any:
    """Boot a sandbox, deploy modeld with max(levels) models and one to crash; the driver's
    samples in ms."""

    from sandbox.deploy import deploy, reference_model
    from sandboxed import bench_sandbox, run_driver

    count = max(levels)
    models = {model(i): reference_model(memory_max="128M") for i in range(count)}
    models[CRASH_MODEL] = reference_model()
    with bench_sandbox() as (sandbox, tmp):
        modeld = deploy(sandbox, Path(tmp), models, dropin=NO_START_LIMIT)
        output = run_driver(
            sandbox,
            __file__,
            "--driver",
            f"--crash-rounds={crash_rounds}",
            f"--levels={','.join(str(n) for n in levels)}",
            f"--rounds={rounds}",
            timeout=120 + crash_rounds * 5 + count * 5 + (len(levels) + 1) * rounds * 30,
        )
        modeld.stop()
    driver = output

    def ms(values: list[float]) -> list[float]:
        return [round(v * 1000, 3) for v in values]

    return {
        "crash_rounds": crash_rounds,
        "levels": list(levels),
        "rounds": rounds,
        "crash_ms": {k: ms(v) for k, v in driver["crash"].items()},
        "readoption_ms": {
            level: {how: ms(v) for how, v in by_how.items()}
            for level, by_how in driver["readoption"].items()
        },
    }


def figures(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Crash detection against the kernel's exit notification; re-adoption of N backends
    against modeld's stop and start with none."""
    from stats import figure

    crash = result["crash_ms"]
    rows = [
        figure(
            "faults",
            "kill -9 of a backend to ModelUnloaded (crashed)",
            "ms",
            crash["modeld"],
            baseline=crash["pidfd"],
            baseline_name="the same kill to the driver's pidfd of the process (kernel)",
        )
    ]
    readopt = result["readoption_ms"]
    labels = {"restart": "systemctl restart modeld", "kill": "kill -9 of modeld (RestartSec=1s)"}
    for level, by_how in readopt.items():
        if level == "0":
            continue
        for how, values in by_how.items():
            rows.append(
                figure(
                    "faults",
                    f"{labels[how]}, {level} backends, until re-adopted (owns org.modeld1)",
                    "ms",
                    values,
                    baseline=readopt["0"][how],
                    baseline_name="the same with no backend running",
                    paired=False,
                )
            )
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--crash-rounds", type=int, default=20)
    parser.add_argument("--levels", default=",".join(str(n) for n in DEFAULT_LEVELS))
    parser.add_argument("--rounds", type=int, default=4, help="re-adoption rounds per level")
    parser.add_argument("--json", type=Path, help="also write the result here")
    parser.add_argument("--driver", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    levels = [int(n) for n in args.levels.split(",")]
    if args.driver:
        print(json.dumps(asyncio.run(drive(args.crash_rounds, levels, args.rounds))))
        return 0
    result = run(args.crash_rounds, levels, args.rounds)
    from report import emit

    emit(result, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
