"""modeld with a real engine: the llama-cpp backend on a ~300 MB GGUF model made here.

Boots the project's systemd sandbox, runs modeld in it from the repository's units with one
llama-cpp model (tests/ggufgen's ``large`` preset, ``MMap = false`` so loading reads the
weights into the backend's own memory), then runs this file again *inside* the sandbox as
the driver, which measures, interleaved in the same run:

- **load**: modeld's ``Load(wait)`` (then ``Unload``) against the same backend started raw
  (``run.sh`` exec'ed by the driver, until its first successful Health + LoadModel with
  the same ModelOptions);
- **tokens per second** of a greedy completion of a fixed length, streamed and whole:
  through modeld's front door (``POST /v1/completions``), by gRPC straight to the backend
  modeld started (``PredictStream`` / ``Predict``), and with llama-cpp-python in the
  driver's own process on the same file with the same settings (the physical limit).

Usage: python bench/llama.py [--rounds N] [--load-rounds N] [--tokens N] [--json FILE]
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
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "service"))
sys.path.insert(0, str(REPO / "bench"))

MODEL = "bench-llama"
CONTEXT = 512
OPTIONS: dict[str, object] = {"MMap": False, "ContextSize": CONTEXT}
PROMPT = "The lighthouse keeper wrote"
RAW_SOCKET_DIR = Path("/run/modeld-bench")


# ---------------------------------------------------------------------------- driver


async def _raw_load(round_no: int, gguf: str) -> float:
    """Seconds from exec of the backend until its LoadModel returned (then stop it)."""
    from modeld.rpc.client import BackendClient, build_model_options
    from modeld.supervisor.backend_run import until_listening
    from modeld.system.inotify import DirectoryWatch

    run_sh = REPO / "service" / "modeld" / "data" / "backends" / "llama-cpp" / "run.sh"
    socket = RAW_SOCKET_DIR / f"raw-{round_no}.sock"
    env = dict(os.environ, MODELD_PYTHON=sys.executable)
    with DirectoryWatch(RAW_SOCKET_DIR) as watch:
        start = time.perf_counter()
        proc = await asyncio.create_subprocess_exec(
            str(run_sh), "--addr", f"unix:{socket}", env=env, stderr=subprocess.DEVNULL
        )
        await watch.wait_for(socket.name)
        await until_listening(socket)
        client = BackendClient(f"unix:{socket}")
        try:
            await client.health()
            await client.load_model(build_model_options(gguf, OPTIONS))
            elapsed = time.perf_counter() - start
        finally:
            await client.close()
    proc.terminate()
    await proc.wait()
    with contextlib.suppress(FileNotFoundError):
        socket.unlink()
    return elapsed


async def _modeld_load(bus: Any) -> float:
    from manager_calls import call_manager, manager_message

    start = time.perf_counter()
    reply = await bus.call(manager_message("Load", MODEL, wait=True))
    elapsed = time.perf_counter() - start
    if reply.error_name:
        raise RuntimeError(f"Load failed: {reply.body}")
    await call_manager(bus, "Unload", MODEL, wait=True)
    return elapsed


async def measure_loads(rounds: int, gguf: str) -> dict[str, list[float]]:
    from dbus_next.aio.message_bus import MessageBus
    from dbus_next.constants import BusType

    RAW_SOCKET_DIR.mkdir(parents=True, exist_ok=True)
    bus = await MessageBus(bus_type=BusType.SYSTEM).connect()
    times: dict[str, list[float]] = {"modeld": [], "raw": []}
    for round_no in range(-1, rounds):  # round -1 warms the page cache and is not counted
        pair = [("modeld", _modeld_load(bus)), ("raw", _raw_load(round_no + 1, gguf))]
        if round_no % 2:
            pair.reverse()
        for kind, run in pair:
            elapsed = await run
            if round_no >= 0:
                times[kind].append(elapsed)
    bus.disconnect()
    return times


def _in_process(gguf: str) -> Any:
    import llama_cpp

    return llama_cpp.Llama(
        model_path=gguf, n_ctx=CONTEXT, use_mmap=False, verbose=False, n_gpu_layers=0
    )


async def measure_tokens(rounds: int, tokens: int, gguf: str) -> dict[str, list[float]]:
    """Tokens per second of each way, interleaved round by round."""
    import grpc.aio
    from dbus_next.aio.message_bus import MessageBus
    from dbus_next.constants import BusType
    from front_door import Http, stream_tokens
    from manager_calls import call_manager

    from modeld.rpc import backend_pb2, backend_pb2_grpc

    bus = await MessageBus(bus_type=BusType.SYSTEM).connect()
    await call_manager(bus, "Load", MODEL, wait=True)
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": tokens, "temperature": 0}
    whole_body = json.dumps(body).encode()
    stream_body = json.dumps({**body, "stream": True}).encode()
    http = await Http.connect()
    from modeld.naming import backend_socket

    channel = grpc.aio.insecure_channel(f"unix:{backend_socket(Path('/run/modeld'), MODEL)}")
    stub = backend_pb2_grpc.BackendStub(channel)
    options = backend_pb2.PredictOptions(Prompt=PROMPT, Tokens=tokens, Temperature=0)
    llm = _in_process(gguf)

    async def front_door_stream() -> int:
        return await stream_tokens(stream_body)

    async def front_door_whole() -> int:
        status, answer = await http.post("/v1/completions", whole_body)
        assert status == 200, answer
        return int(json.loads(answer)["usage"]["completion_tokens"])

    async def grpc_stream() -> int:
        return sum([reply.tokens async for reply in stub.PredictStream(options)])

    async def grpc_whole() -> int:
        return int((await stub.Predict(options)).tokens)

    def in_process_stream() -> int:
        chunks = llm.create_completion(PROMPT, max_tokens=tokens, temperature=0, stream=True)
        return sum(1 for chunk in chunks if chunk["choices"][0]["text"])

    def in_process_whole() -> int:
        result = llm.create_completion(PROMPT, max_tokens=tokens, temperature=0)
        return int(result["usage"]["completion_tokens"])

    ways: dict[str, Callable[[], Awaitable[int]] | Callable[[], int]] = {
        "front_door_stream": front_door_stream,
        "grpc_stream": grpc_stream,
        "in_process_stream": in_process_stream,
        "front_door_whole": front_door_whole,
        "grpc_whole": grpc_whole,
        "in_process_whole": in_process_whole,
    }
    rates: dict[str, list[float]] = {way: [] for way in ways}
    order = list(ways)
    for round_no in range(-1, rounds):
        rotated = order[round_no % len(order) :] + order[: round_no % len(order)]
        for way in rotated:
            start = time.perf_counter()
            result = ways[way]()
            count = await result if asyncio.iscoroutine(result) else result
            elapsed = time.perf_counter() - start
            if count != tokens:
                raise RuntimeError(f"{way}: {count} tokens, asked {tokens}")
            if round_no >= 0:
                rates[way].append(count / elapsed)
    llm.close()
    http.close()
    await channel.close()
    bus.disconnect()
    return rates


async def drive(load_rounds: int, rounds: int, tokens: int, gguf: str) -> dict[str, Any]:
    loads = await measure_loads(load_rounds, gguf)
    rates = await measure_tokens(rounds, tokens, gguf)
    return {"loads": loads, "rates": rates}


# ---------------------------------------------------------------------- orchestrator


def report(driver: dict[str, Any], gguf: Path, tokens: int) -> dict[str, Any]:
    loads, rates = driver["loads"], driver["rates"]
    load_ms = {kind: round(statistics.median(v) * 1000, 1) for kind, v in loads.items()}
    paired = [m - r for m, r in zip(loads["modeld"], loads["raw"], strict=True)]
    rate = {way: round(statistics.median(v), 2) for way, v in rates.items()}
    spread = {way: [round(min(v), 2), round(max(v), 2)] for way, v in rates.items()}

    def ratio(way: str, baseline: str) -> float:
        pairs = [a / b for a, b in zip(rates[way], rates[baseline], strict=True)]
        return round(statistics.median(pairs), 3)

    return {
        "model": {"file_mb": round(gguf.stat().st_size / 1e6, 1), "context": CONTEXT},
        "load": {
            "rounds": len(loads["modeld"]),
            "median_ms": load_ms,
            "modeld_minus_raw_median_ms": round(statistics.median(paired) * 1000, 1),
            "modeld_over_raw": round(load_ms["modeld"] / load_ms["raw"], 3),
            "samples_ms": {k: [round(x * 1000, 1) for x in v] for k, v in loads.items()},
        },
        "tokens_per_s": {
            "tokens": tokens,
            "rounds": len(rates["grpc_stream"]),
            "median": rate,
            "min_max": spread,
            "samples": {way: [round(x, 2) for x in v] for way, v in rates.items()},
            "ratio_to_in_process": {
                "front_door_stream": ratio("front_door_stream", "in_process_stream"),
                "grpc_stream": ratio("grpc_stream", "in_process_stream"),
                "front_door_whole": ratio("front_door_whole", "in_process_whole"),
                "grpc_whole": ratio("grpc_whole", "in_process_whole"),
            },
        },
    }


def run(rounds: int, load_rounds: int, tokens: int, *, preset: str = "large") -> dict[str, Any]:
    """Boot a sandbox, write the GGUF model of ``preset``, deploy modeld with it and run the
    driver inside; the result with its samples."""

    from ggufgen import write_model
    from sandbox.deploy import deploy, llama_model
    from sandboxed import bench_sandbox, run_driver

    with bench_sandbox() as (sandbox, tmp):
        gguf = write_model(Path(tmp) / f"{preset}.gguf", preset=preset, seed=1)
        model = llama_model(gguf, memory_max="1G", **OPTIONS)
        modeld = deploy(sandbox, Path(tmp) / "config", {MODEL: model})
        output = run_driver(
            sandbox,
            __file__,
            f"--driver={gguf}",
            f"--rounds={rounds}",
            f"--load-rounds={load_rounds}",
            f"--tokens={tokens}",
            timeout=1200,
        )
        modeld.stop()
        result = report(output, gguf, tokens)
    result["model"]["preset"] = preset
    return result


def figures(result: dict[str, Any]) -> list[dict[str, Any]]:
    """A real engine: Load(wait) against the same backend started raw; tokens per second
    through the front door and by gRPC against llama-cpp-python in the driver's process."""
    from stats import figure

    load, rates = result["load"], result["tokens_per_s"]["samples"]
    size = f"{result['model']['file_mb']} MB GGUF"
    rows = [
        figure(
            "llama",
            f"Load(wait), llama-cpp backend, {size}",
            "ms",
            load["samples_ms"]["modeld"],
            baseline=load["samples_ms"]["raw"],
            baseline_name="physical limit: run.sh exec until Health + LoadModel",
        )
    ]
    for way, name in (
        ("front_door_stream", "streamed, front door"),
        ("grpc_stream", "streamed, gRPC to the backend"),
        ("front_door_whole", "whole, front door"),
        ("grpc_whole", "whole, gRPC to the backend"),
    ):
        baseline = way.replace("front_door", "in_process").replace("grpc", "in_process")
        rows.append(
            figure(
                "llama",
                f"tokens per second, {name}",
                "tokens/s",
                rates[way],
                baseline=rates[baseline],
                baseline_name="llama-cpp-python in the driver's process (the limit)",
                lower_is_better=False,
                digits=1,
            )
        )
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="rounds of token-rate runs")
    parser.add_argument("--load-rounds", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--preset", default="large", help="tests/ggufgen preset (large, tiny)")
    parser.add_argument("--json", type=Path, help="also write the result here")
    parser.add_argument("--driver", metavar="GGUF", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.driver:
        result = asyncio.run(drive(args.load_rounds, args.rounds, args.tokens, args.driver))
        print(json.dumps(result))
        return 0

    result = run(args.rounds, args.load_rounds, args.tokens, preset=args.preset)
    from report import emit

    emit(result, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
