"""Readiness policies side by side: modeld's event-driven readiness against re-creations of
the peers' documented polling loops, applied to the same backend in the same run.

The peers' loops are **re-created from their documented policies, not run from their
code** (the policies as read in their sources: see the project's notes on peers). Each
starts the reference backend (``run.sh``, bare, as the peers start backends) whose
``LoadModel`` takes ``load_delay`` seconds (0, 0.5, 3), and stops the clock when the loop
would declare the model ready to serve:

- ``limit``: the physical limit: the socket appears (inotify), listens, Health, LoadModel;
- ``modeld``: D-Bus ``Load(name, {wait: true})`` of a model configured with the same knob;
- ``localai``: LocalAI's loop: a gRPC Health attempt right after the start (10 s per probe),
  then one every 2 s until one answers (at most 20), then a blocking ``LoadModel``;
- ``ollama``: Ollama's loop: the runner loads its model on its own once it is up; the
  scheduler polls its status every 250 ms (200 ms per probe) until it reports the model
  loaded;
- ``llama-swap``: llama-swap's loop: the process loads its model on its own; llama-swap
  waits 250 ms, then checks health (200 only once the model is loaded) every 1 s.

"Loads its model on its own" is played by the driver: it sends LoadModel as soon as the
backend's socket listens, apart from the policy's loop; the policy's probes ask the
backend's ``Status`` (READY once loaded). Every probe opens a new connection. Delays and
policies are interleaved round by round (the policies' order rotated each round).

Usage: python bench/readiness.py [--rounds N] [--delays 0,0.5,3] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
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

RAW_SOCKET_DIR = Path("/run/modeld-bench")
DEMO = REPO / "service" / "modeld" / "data" / "demo.txt"
RUN_SH = REPO / "service" / "modeld" / "data" / "backends" / "reference" / "run.sh"
POLICIES = ("limit", "modeld", "localai", "ollama", "llama-swap")
LABELS = {
    "limit": "physical limit (exec, socket, Health, LoadModel)",
    "modeld": "modeld: Load(wait), event-driven",
    "localai": "LocalAI's policy (re-created): Health every 2 s, then LoadModel",
    "ollama": "Ollama's policy (re-created): status every 250 ms",
    "llama-swap": "llama-swap's policy (re-created): 250 ms, then health every 1 s",
}
DEFAULT_DELAYS = (0.0, 0.5, 3.0)


def model_name(delay: float) -> str:
    return f"delay{round(delay * 1000)}ms"


# ---------------------------------------------------------------------------- driver


async def _probe(address: str, rpc: str, timeout: float) -> Any:
    """One probe on a new connection: the reply, or None if the backend did not answer."""
    import grpc.aio

    from modeld.rpc import backend_pb2, backend_pb2_grpc

    channel = grpc.aio.insecure_channel(address)
    try:
        call = getattr(backend_pb2_grpc.BackendStub(channel), rpc)
        return await call(backend_pb2.HealthMessage(), timeout=timeout)
    except grpc.aio.AioRpcError:
        return None
    finally:
        await channel.close()


async def _loaded(address: str, timeout: float) -> bool:
    from modeld.rpc import backend_pb2

    reply = await _probe(address, "Status", timeout)
    return reply is not None and reply.state == backend_pb2.StatusResponse.READY


async def _localai(address: str, options: Any) -> None:
    from modeld.rpc.client import BackendClient

    for _attempt in range(20):
        if await _probe(address, "Health", 10.0) is not None:
            break
        await asyncio.sleep(2.0)
    else:
        raise RuntimeError("LocalAI's loop: no Health answer in 20 attempts")
    client = BackendClient(address)
    try:
        await client.load_model(options)
    finally:
        await client.close()


async def _ollama(address: str) -> None:
    deadline = time.monotonic() + 300
    while not await _loaded(address, 0.2):
        if time.monotonic() > deadline:
            raise RuntimeError("Ollama's loop: not ready in 5 min")
        await asyncio.sleep(0.25)


async def _llama_swap(address: str) -> None:
    await asyncio.sleep(0.25)
    deadline = time.monotonic() + 120
    while not await _loaded(address, 5.0):
        if time.monotonic() > deadline:
            raise RuntimeError("llama-swap's loop: not healthy in 120 s")
        await asyncio.sleep(1.0)


async def _when_listening(watch: Any, socket: Path) -> None:
    from modeld.supervisor.backend_run import until_listening

    await watch.wait_for(socket.name)
    await until_listening(socket)


async def _self_load(watch: Any, socket: Path, address: str, options: Any) -> None:
    """The backend loading its model at start (what the peers' runners do on their own)."""
    from modeld.rpc.client import BackendClient

    await _when_listening(watch, socket)
    client = BackendClient(address)
    try:
        await client.health()
        await client.load_model(options)
    finally:
        await client.close()


async def _limit(watch: Any, socket: Path, address: str, options: Any) -> None:
    await _self_load(watch, socket, address, options)


async def raw_policy(policy: str, number: int, delay: float) -> float:
    """Seconds from the exec of the backend until ``policy`` declares it ready."""
    from modeld.rpc.client import build_model_options
    from modeld.system.inotify import DirectoryWatch

    socket = RAW_SOCKET_DIR / f"ready-{number}.sock"
    address = f"unix:{socket}"
    options = build_model_options(str(DEMO), {"Options": [f"load_delay={delay}"]})
    env = dict(os.environ, MODELD_PYTHON=sys.executable)
    background: asyncio.Task[None] | None = None
    with DirectoryWatch(RAW_SOCKET_DIR) as watch:
        start = time.perf_counter()
        proc = await asyncio.create_subprocess_exec(
            str(RUN_SH),
            "--addr",
            address,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            if policy == "limit":
                await _limit(watch, socket, address, options)
            elif policy == "localai":
                await _localai(address, options)
            else:
                background = asyncio.create_task(_self_load(watch, socket, address, options))
                await (_ollama if policy == "ollama" else _llama_swap)(address)
            elapsed = time.perf_counter() - start
            if background is not None:
                await asyncio.wait_for(background, 10)
        finally:
            if background is not None and not background.done():
                background.cancel()
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            await proc.wait()
            with contextlib.suppress(FileNotFoundError):
                socket.unlink()
    return elapsed


async def drive(rounds: int, delays: Sequence[float]) -> dict[str, dict[str, list[float]]]:
    """times[delay][policy]: seconds to ready, one per round."""
    from dbus_next.aio.message_bus import MessageBus
    from dbus_next.constants import BusType
    from manager_calls import call_manager

    RAW_SOCKET_DIR.mkdir(parents=True, exist_ok=True)
    bus = await MessageBus(bus_type=BusType.SYSTEM).connect()

    async def modeld(delay: float) -> float:
        name = model_name(delay)
        start = time.perf_counter()
        await call_manager(bus, "Load", name, wait=True)
        elapsed = time.perf_counter() - start
        await call_manager(bus, "Unload", name, wait=False)
        return elapsed

    async def one(policy: str, number: int, delay: float) -> float:
        if policy == "modeld":
            return await modeld(delay)
        return await raw_policy(policy, number, delay)

    times = {str(d): {p: [] for p in POLICIES} for d in delays}
    number = 0
    for round_no in range(-1, rounds):  # round -1 warms caches: limit and modeld, no delay
        shift = round_no % len(POLICIES)
        order = POLICIES[shift:] + POLICIES[:shift] if round_no >= 0 else POLICIES[:2]
        for delay in delays[:1] if round_no < 0 else delays:
            for policy in order:
                number += 1
                elapsed = await one(policy, number, delay)
                await asyncio.sleep(0.05)
                if round_no >= 0:
                    times[str(delay)][policy].append(elapsed)
    bus.disconnect()
    return times


# ---------------------------------------------------------------------- orchestrator


def run(rounds: int, delays: Sequence[float] = DEFAULT_DELAYS) -> dict[str, Any]:
    """Boot a sandbox, deploy modeld with one model per load delay, run the driver inside;
    the samples (ms) by delay and policy."""

    from sandbox.deploy import deploy, reference_model
    from sandboxed import bench_sandbox, run_driver

    models = {model_name(d): reference_model(options=(f"load_delay={d}",)) for d in delays}
    per_round = sum(5 * d + 4 for d in delays)
    with bench_sandbox() as (sandbox, tmp):
        modeld = deploy(sandbox, Path(tmp), models)
        output = run_driver(
            sandbox,
            __file__,
            "--driver",
            f"--rounds={rounds}",
            f"--delays={','.join(str(d) for d in delays)}",
            timeout=120 + (rounds + 1) * per_round * 3,
        )
        modeld.stop()
    times = output
    return {
        "rounds": rounds,
        "delays_s": list(delays),
        "policies": LABELS,
        "samples_ms": {
            delay: {p: [round(v * 1000, 2) for v in values] for p, values in by_policy.items()}
            for delay, by_policy in times.items()
        },
    }


def figures(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Per load time, each policy's time to ready against the physical limit."""
    from stats import figure

    rows = []
    for delay, by_policy in result["samples_ms"].items():
        for policy in POLICIES[1:]:
            rows.append(
                figure(
                    "readiness",
                    f"load {float(delay):g} s: {LABELS[policy]}",
                    "ms",
                    by_policy[policy],
                    baseline=by_policy["limit"],
                    baseline_name="physical limit",
                )
            )
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--delays", default=",".join(str(d) for d in DEFAULT_DELAYS))
    parser.add_argument("--json", type=Path, help="also write the result here")
    parser.add_argument("--driver", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    delays = [float(d) for d in args.delays.split(",")]
    if args.driver:
        print(json.dumps(asyncio.run(drive(args.rounds, delays))))
        return 0
    result = run(args.rounds, delays)
    from report import emit

    emit(result, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
