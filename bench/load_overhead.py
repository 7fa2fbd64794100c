"""modeld's own cost per load, against raw starts of the same backend in the same run.

Boots the project's systemd sandbox, runs modeld in it from the repository's units, then
runs this file again *inside* the sandbox as the driver. The driver alternates three ways
of getting the reference backend from nothing to "Health answered and LoadModel done":

- ``modeld``: D-Bus ``Load(name, {wait: true})`` from an already-connected client;
- ``scope``: the way ``systemd-run --scope`` does it: ``systemd-run --scope --slice=modeld.slice
  -p MemoryMax=...`` (scope first, then exec), the client waits for the socket (inotify) and
  calls Health and LoadModel;
- ``bare``: the backend started directly, no scope, same client steps.

The figure that matters is the median of the paired differences modeld - scope: what modeld
adds on top of starting the backend in a scope. Machines here are noisy, so the three are
interleaved and rotated, and only medians and paired differences are reported.

With ``--max-rounds``, the driver goes on past ``--rounds`` until the paired differences
modeld - scope resolve a ``--resolve-ms`` difference (``stats.rounds_to_resolve``: their
robust spread says how many rounds that takes), or until ``--budget`` seconds.

Usage: python bench/load_overhead.py [--rounds N] [--max-rounds M] [--resolve-ms MS]
       [--budget S] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "service"))
sys.path.insert(0, str(REPO / "bench"))

PHASES: dict[str, list[float]] = {}
MODEL = "bench"
MEMORY_MAX = 256 * 1024 * 1024
RAW_SOCKET_DIR = Path("/run/modeld-bench")


# ---------------------------------------------------------------------------- driver


async def _ready(
    kind: str,
    address: str,
    socket: Path,
    watch: object,
    start: float,
    options: Sequence[str] = (),
) -> None:
    """Client side of a raw start: socket appears, then Health, then LoadModel (with the
    reference backend's knobs ``options``, e.g. ``load_delay=0.5``)."""
    from modeld.rpc.client import BackendClient, build_model_options
    from modeld.supervisor.backend_run import until_listening

    demo = REPO / "service" / "modeld" / "data" / "demo.txt"
    t0 = start
    await watch.wait_for(socket.name)  # type: ignore[attr-defined]
    await until_listening(socket)  # as modeld does: no 100 ms gRPC backoff after bind()
    t1 = time.perf_counter()
    client = BackendClient(address)
    try:
        await client.health()
        t2 = time.perf_counter()
        await client.load_model(build_model_options(str(demo), _knobs(options)))
        t3 = time.perf_counter()
    finally:
        await client.close()
    PHASES.setdefault(f"{kind} socket", []).append(t1 - t0)
    PHASES.setdefault(f"{kind} health", []).append(t2 - t1)
    PHASES.setdefault(f"{kind} load", []).append(t3 - t2)


def _knobs(options: Sequence[str]) -> dict[str, object]:
    return {"Options": list(options)} if options else {}


async def _raw_start(
    round_no: int, *, scoped: bool, options: Sequence[str] = ()
) -> tuple[float, Callable[[], Awaitable[None]]]:
    """Start the reference backend raw (in a scope like ``systemd-run --scope``, or bare)
    until Health and LoadModel answered; the time taken and how to stop it."""
    from modeld.system.inotify import DirectoryWatch

    run_sh = REPO / "service" / "modeld" / "data" / "backends" / "reference" / "run.sh"
    socket = RAW_SOCKET_DIR / f"raw-{round_no}.sock"
    address = f"unix:{socket}"
    unit = f"bench-raw-{os.getpid()}-{round_no}.scope"
    argv = [str(run_sh), "--addr", address]
    if scoped:
        argv = [
            "systemd-run",
            "--scope",
            "--quiet",
            f"--unit={unit}",
            "--slice=modeld.slice",
            f"--property=MemoryMax={MEMORY_MAX}",
            *argv,
        ]
    env = dict(os.environ, MODELD_PYTHON=sys.executable)
    with DirectoryWatch(RAW_SOCKET_DIR) as watch:
        start = time.perf_counter()
        proc = await asyncio.create_subprocess_exec(
            *argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        await _ready("scope" if scoped else "bare", address, socket, watch, start, options)
        elapsed = time.perf_counter() - start

    async def cleanup() -> None:
        if scoped:
            stop = await asyncio.create_subprocess_exec("systemctl", "stop", unit)
            await stop.wait()
        else:
            proc.terminate()
        await proc.wait()
        with contextlib.suppress(FileNotFoundError):
            socket.unlink()

    return elapsed, cleanup


async def _modeld_load(bus: object) -> tuple[float, Callable[[], Awaitable[None]]]:
    from manager_calls import call_manager, manager_message

    start = time.perf_counter()
    reply = await bus.call(manager_message("Load", MODEL, wait=True))  # type: ignore[attr-defined]
    elapsed = time.perf_counter() - start
    if reply.error_name:
        raise RuntimeError(f"Load failed: {reply.body}")

    async def cleanup() -> None:
        await call_manager(bus, "Unload", MODEL, wait=False)

    return elapsed, cleanup


async def drive(rounds: int, max_rounds: int, resolve_ms: float, budget_s: float) -> dict[str, Any]:
    """Rounds of the three kinds, rotated. After ``rounds`` rounds, go on until the paired
    differences modeld - scope say a ``resolve_ms`` difference is resolved (see
    stats.rounds_to_resolve), up to ``max_rounds`` rounds or ``budget_s`` seconds."""
    from dbus_next.aio.message_bus import MessageBus
    from dbus_next.constants import BusType
    from stats import rounds_to_resolve

    RAW_SOCKET_DIR.mkdir(parents=True, exist_ok=True)
    bus = await MessageBus(bus_type=BusType.SYSTEM).connect()
    kinds: dict[str, Callable[[int], Awaitable[tuple[float, Callable[[], Awaitable[None]]]]]] = {
        "modeld": lambda _n: _modeld_load(bus),
        "scope": lambda n: _raw_start(n, scoped=True),
        "bare": lambda n: _raw_start(n, scoped=False),
    }
    order = list(kinds)
    times: dict[str, list[float]] = {kind: [] for kind in kinds}
    deadline = time.monotonic() + budget_s
    needed: list[int] = []
    round_no = -1  # round -1 warms caches and is not counted
    while True:
        done = len(times["modeld"])
        if done >= rounds:
            diffs = [(m - s) * 1000 for m, s in zip(times["modeld"], times["scope"], strict=True)]
            needed.append(rounds_to_resolve(diffs, resolve_ms))
            if done >= min(max(needed[-1], rounds), max_rounds) or time.monotonic() > deadline:
                break
        rotated = order[round_no % 3 :] + order[: round_no % 3]
        for kind in rotated:
            elapsed, cleanup = await kinds[kind](round_no + 1000 * len(times[kind]))
            await cleanup()
            await asyncio.sleep(0.05)
            if round_no >= 0:
                times[kind].append(elapsed)
        round_no += 1
    bus.disconnect()
    return {"times": times, "needed": needed[-1], "budget_left_s": deadline - time.monotonic()}


def report(times: dict[str, list[float]]) -> dict[str, object]:
    def ms(value: float) -> float:
        return round(value * 1000, 2)

    pairs_scope = [m - s for m, s in zip(times["modeld"], times["scope"], strict=True)]
    pairs_bare = [m - b for m, b in zip(times["modeld"], times["bare"], strict=True)]
    return {
        "rounds": len(times["modeld"]),
        "median_ms": {kind: ms(statistics.median(v)) for kind, v in times.items()},
        "modeld_minus_scope_median_ms": ms(statistics.median(pairs_scope)),
        "modeld_minus_bare_median_ms": ms(statistics.median(pairs_bare)),
        "samples_ms": {kind: [ms(v) for v in values] for kind, values in times.items()},
    }


def figures(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The report's rows: Load(wait) against the physical limit and against a raw scope."""
    from stats import figure

    samples = result["samples_ms"]
    return [
        figure(
            "load",
            "Load(wait) vs the physical limit",
            "ms",
            samples["modeld"],
            baseline=samples["bare"],
            baseline_name="physical limit: bare exec until Health + LoadModel",
        ),
        figure(
            "load",
            "Load(wait) vs a raw scope",
            "ms",
            samples["modeld"],
            baseline=samples["scope"],
            baseline_name="raw scope: systemd-run --scope, same slice and limit",
            target_text="modeld - scope <= +10 ms",
        ),
        figure(
            "load",
            "raw scope start vs the physical limit (systemd's share)",
            "ms",
            samples["scope"],
            baseline=samples["bare"],
            baseline_name="physical limit: bare exec",
        ),
    ]


# ---------------------------------------------------------------------- orchestrator


def _phase_medians(lines: list[str]) -> dict[str, float]:
    """Medians of the per-phase timings in modeld's "loaded in" log lines."""
    spans: dict[str, list[float]] = {}
    for line in lines:
        for part in line.split("(", 1)[1].rstrip(")").split(", "):
            phase, _, value = part.rpartition(" ")
            spans.setdefault(phase, []).append(float(value))
    return {phase: round(statistics.median(v), 1) for phase, v in spans.items()}


def run(
    rounds: int,
    *,
    max_rounds: int | None = None,
    resolve_ms: float = 5.0,
    budget_s: float = 1e9,
) -> dict[str, Any]:
    """Boot a sandbox, deploy modeld, run the driver inside; the result (with samples).

    ``rounds`` are always run; with ``max_rounds`` above it, rounds go on until a
    ``resolve_ms`` difference modeld - scope is resolved (or ``budget_s`` has passed)."""

    from sandbox.deploy import deploy, reference_model
    from sandboxed import bench_sandbox, run_driver

    max_rounds = max(rounds, max_rounds or rounds)
    with bench_sandbox() as (sandbox, tmp):
        modeld = deploy(sandbox, Path(tmp), {MODEL: reference_model(memory_max="256M")})
        output = run_driver(
            sandbox,
            __file__,
            "--driver",
            f"--rounds={rounds}",
            f"--max-rounds={max_rounds}",
            f"--resolve-ms={resolve_ms}",
            f"--budget={budget_s}",
            timeout=60 + min(max_rounds * 10, budget_s * 2),
        )
        phase_log = [
            line
            for line in sandbox.journal(unit="modeld.service").splitlines()
            if ": loaded in " in line
        ]
        modeld.stop()
    driver = output
    result: dict[str, Any] = report(driver["times"])
    result["raw_phase_medians_ms"] = {k: round(v * 1000, 1) for k, v in driver["phases"].items()}
    internal = [float(line.split(" loaded in ")[1].split()[0]) for line in phase_log[1:]]
    result["modeld_internal_load_median_ms"] = statistics.median(internal) if internal else None
    result["modeld_phase_medians_ms"] = _phase_medians(phase_log[1:])
    result["modeld_load_phases"] = phase_log[-3:]
    result["resolution"] = {
        "difference_ms": resolve_ms,
        "min_rounds": rounds,
        "max_rounds": max_rounds,
        "rounds_needed": driver["needed"],
        "rounds_run": result["rounds"],
        "resolved": result["rounds"] >= driver["needed"],
        "sigma_paired_ms": _sigma(result["samples_ms"]),
    }
    return result


def _sigma(samples: dict[str, list[float]]) -> float:
    from stats import robust_sigma

    diffs = [m - s for m, s in zip(samples["modeld"], samples["scope"], strict=True)]
    return round(robust_sigma(diffs), 2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument(
        "--max-rounds",
        type=int,
        default=0,
        help="go on past --rounds until a --resolve-ms difference is resolved, up to this",
    )
    parser.add_argument("--resolve-ms", type=float, default=5.0)
    parser.add_argument("--budget", type=float, default=1e9, help="seconds (with --max-rounds)")
    parser.add_argument("--json", type=Path, help="also write the result here")
    parser.add_argument("--driver", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.driver:
        driven = asyncio.run(
            drive(args.rounds, max(args.rounds, args.max_rounds), args.resolve_ms, args.budget)
        )
        driven["phases"] = {k: statistics.median(v) for k, v in PHASES.items()}
        print(json.dumps(driven))
        return 0
    result = run(
        args.rounds, max_rounds=args.max_rounds, resolve_ms=args.resolve_ms, budget_s=args.budget
    )
    from report import emit

    emit(result, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
