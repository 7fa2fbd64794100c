"""What the HTTP front door costs over calling the same backend's gRPC directly.

Boots the project's systemd sandbox, runs modeld in it from the repository's units with one
reference-backend model (``parallel = 4``), then runs this file again *inside* the sandbox
as the driver, which measures, in the same run:

- **latency** of a short non-streamed completion (4 tokens): modeld's ``POST
  /v1/completions`` (a minimal keep-alive HTTP/1.1 client on the unix socket) against the
  same ``Predict`` sent straight to the backend's socket, interleaved, by grpcio (what an
  application calling the backend directly would use) and by modeld's own HTTP/2 client
  (what modeld itself uses: the difference is then the HTTP side and the routing); p50 and
  p99 of each and of the paired differences;
- **modeld's CPU time per request**: the on-CPU time of all modeld's threads
  (``/proc/<pid>/task/*/schedstat``) over a block of requests, minus its idle rate;
- **streamed tokens per second**: a long ``stream: true`` completion through modeld against
  ``PredictStream`` on the backend (by grpcio and by modeld's client), interleaved; and
  modeld's CPU time per streamed token;
- **64 concurrent clients** on the ``parallel = 4`` model, each sending requests on its own
  connection: statuses and throughput.

Usage: python bench/front_door.py [--rounds N] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "service"))

MODEL = "bench"
API = Path("/run/modeld/api.sock")
BACKEND = f"unix:/run/modeld/backends/{MODEL}/backend.sock"
PROMPT = "The sea"
SHORT_TOKENS = 4


# ---------------------------------------------------------------------------- driver


class Http:
    """A minimal HTTP/1.1 keep-alive client on a unix socket (little cost of its own)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer

    @classmethod
    async def connect(cls) -> Http:
        return cls(*await asyncio.open_unix_connection(str(API)))

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        self._writer.write(
            f"POST {path} HTTP/1.1\r\nHost: m\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        status = int((await self._reader.readline()).split()[1])
        length = 0
        while (line := await self._reader.readline()) != b"\r\n":
            name, _, value = line.partition(b":")
            if name.lower() == b"content-length":
                length = int(value)
        return status, await self._reader.readexactly(length)

    def close(self) -> None:
        self._writer.close()


async def stream_tokens(body: bytes) -> int:
    """One streamed completion over its own HTTP/1.0 connection; its ``data:`` events."""
    reader, writer = await asyncio.open_unix_connection(str(API))
    writer.write(
        f"POST /v1/completions HTTP/1.0\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body
    )
    count = 0
    async for line in reader:
        if line.startswith(b'data: {"id"'):
            count += 1
    writer.close()
    return count - 1  # the closing chunk carries no token


def cpu_ns(pid: int) -> int:
    """On-CPU time of every thread of ``pid``, in ns."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


async def drive(
    rounds: int, pid: int, stream_len: int, stream_rounds: int, clients: int
) -> dict[str, Any]:
    import grpc.aio

    from modeld.rpc import backend_pb2, backend_pb2_grpc
    from modeld.rpc.client import BackendClient

    short = json.dumps(
        {"model": MODEL, "prompt": PROMPT, "max_tokens": SHORT_TOKENS, "temperature": 0}
    ).encode()
    http = await Http.connect()
    status, _ = await http.post("/v1/completions", short)  # loads the model
    assert status == 200, status
    channel = grpc.aio.insecure_channel(BACKEND)
    stub = backend_pb2_grpc.BackendStub(channel)
    lean = BackendClient(BACKEND)
    options = backend_pb2.PredictOptions(
        Prompt=PROMPT, Tokens=SHORT_TOKENS, Temperature=0, TopP=1.0
    )

    async def via_modeld() -> None:
        code, _ = await http.post("/v1/completions", short)
        assert code == 200, code

    async def direct() -> None:
        reply = await stub.Predict(options)
        assert reply.tokens == SHORT_TOKENS

    async def direct_lean() -> None:
        reply = await lean.predict(options)
        assert reply.tokens == SHORT_TOKENS

    async def timed(call: Callable[[], Awaitable[None]]) -> float:
        start = time.perf_counter()
        await call()
        return time.perf_counter() - start

    calls: list[tuple[str, Callable[[], Awaitable[None]]]] = [
        ("modeld", via_modeld),
        ("direct", direct),
        ("direct_lean", direct_lean),
    ]
    for _ in range(50):
        for _kind, call in calls:
            await call()
    latency: dict[str, list[float]] = {kind: [] for kind, _ in calls}
    for i in range(rounds):
        for kind, call in calls[i % 3 :] + calls[: i % 3]:
            latency[kind].append(await timed(call))

    idle_start, idle_cpu = time.perf_counter(), cpu_ns(pid)
    await asyncio.sleep(2.0)
    idle_rate = (cpu_ns(pid) - idle_cpu) / (time.perf_counter() - idle_start)

    def busy_cpu(start: float, cpu: int) -> float:
        elapsed = time.perf_counter() - start
        return (cpu_ns(pid) - cpu - idle_rate * elapsed) / 1e6

    start, cpu = time.perf_counter(), cpu_ns(pid)
    for _ in range(rounds):
        await via_modeld()
    cpu_per_request_ms = busy_cpu(start, cpu) / rounds

    long = json.dumps(
        {"model": MODEL, "prompt": PROMPT, "max_tokens": stream_len, "stream": True}
    ).encode()
    stream_options = backend_pb2.PredictOptions(Prompt=PROMPT, Tokens=stream_len, TopP=1.0)

    async def stream_direct() -> int:
        return sum([1 async for _ in stub.PredictStream(stream_options)])

    async def stream_direct_lean() -> int:
        stream = await lean.predict_stream(stream_options)
        count = 0
        while replies := await stream.read_batch():
            count += len(replies)
        return count

    streams: list[tuple[str, Callable[[], Awaitable[int]]]] = [
        ("modeld", lambda: stream_tokens(long)),
        ("direct", stream_direct),
        ("direct_lean", stream_direct_lean),
    ]
    rates: dict[str, list[float]] = {kind: [] for kind, _ in streams}
    stream_cpu_ms = 0.0
    streamed = 0
    for i in range(stream_rounds):
        for kind, call in streams[i % 3 :] + streams[: i % 3]:
            start, cpu = time.perf_counter(), cpu_ns(pid)
            tokens = await call()
            elapsed = time.perf_counter() - start
            if kind == "modeld":
                stream_cpu_ms += busy_cpu(start, cpu)
                streamed += tokens
            assert tokens == stream_len, (kind, tokens)
            rates[kind].append(tokens / elapsed)

    async def client(results: list[int]) -> None:
        connection = await Http.connect()
        try:
            for _ in range(10):
                code, _ = await connection.post("/v1/completions", short)
                results.append(code)
        finally:
            connection.close()

    statuses: list[int] = []
    start = time.perf_counter()
    await asyncio.gather(*(client(statuses) for _ in range(clients)))
    concurrent_elapsed = time.perf_counter() - start
    http.close()
    await channel.close()
    await lean.close()

    def ms(value: float) -> float:
        return round(value * 1000, 3)

    diffs = [m - d for m, d in zip(latency["modeld"], latency["direct"], strict=True)]
    lean_diffs = [m - d for m, d in zip(latency["modeld"], latency["direct_lean"], strict=True)]
    return {
        "rounds": rounds,
        "short_completion": {
            kind: {"p50_ms": ms(statistics.median(v)), "p99_ms": ms(percentile(v, 0.99))}
            for kind, v in latency.items()
        },
        "overhead_paired_p50_ms": ms(statistics.median(diffs)),
        "overhead_paired_p99_ms": ms(percentile(diffs, 0.99)),
        "overhead_over_lean_paired_p50_ms": ms(statistics.median(lean_diffs)),
        "overhead_p99_minus_p99_ms": ms(
            percentile(latency["modeld"], 0.99) - percentile(latency["direct"], 0.99)
        ),
        "modeld_cpu_per_request_ms": round(cpu_per_request_ms, 3),
        "modeld_idle_cpu_ms_per_s": round(idle_rate / 1e6, 3),
        "stream_tokens": stream_len,
        "stream_rounds": stream_rounds,
        "stream_tokens_per_s": {k: round(statistics.median(v)) for k, v in rates.items()},
        "stream_rate_ratio": round(
            statistics.median(rates["modeld"]) / statistics.median(rates["direct"]), 3
        ),
        "stream_rate_ratio_lean": round(
            statistics.median(rates["modeld"]) / statistics.median(rates["direct_lean"]), 3
        ),
        "modeld_cpu_per_streamed_token_ms": round(stream_cpu_ms / streamed, 4),
        "concurrent": {
            "clients": clients,
            "requests": len(statuses),
            "statuses": {str(s): statuses.count(s) for s in sorted(set(statuses))},
            "requests_per_s": round(len(statuses) / concurrent_elapsed, 1),
        },
        "samples_ms": {kind: [ms(v) for v in values] for kind, values in latency.items()},
        "stream_rates": {kind: [round(v, 1) for v in values] for kind, values in rates.items()},
    }


# ---------------------------------------------------------------------- orchestrator


def run(rounds: int, stream_tokens: int, stream_rounds: int, clients: int) -> dict[str, Any]:
    """Boot a sandbox, deploy modeld with one ``parallel = 4`` model, run the driver
    inside; its result, with the latency samples and the stream rates."""

    from sandbox.deploy import deploy, reference_model
    from sandboxed import bench_sandbox, run_driver

    with bench_sandbox() as (sandbox, tmp):
        model = reference_model(extra="parallel = 4\nmax_queue = 64\n")
        modeld = deploy(sandbox, Path(tmp), {MODEL: model})
        pid = sandbox.show("modeld.service", "MainPID")
        output = run_driver(
            sandbox,
            __file__,
            f"--driver={pid}",
            f"--rounds={rounds}",
            f"--stream-tokens={stream_tokens}",
            f"--stream-rounds={stream_rounds}",
            f"--clients={clients}",
            timeout=600,
        )
        modeld.stop()
    result: dict[str, Any] = output
    return result


def figures(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Latency and stream rate through the front door against the backend's own gRPC;
    modeld's CPU per request and per streamed token against the targets."""
    from stats import figure

    latency, rates = result["samples_ms"], result["stream_rates"]
    concurrent = result["concurrent"]
    return [
        figure(
            "front_door",
            f"{SHORT_TOKENS}-token completion, POST /v1/completions",
            "ms",
            latency["modeld"],
            baseline=latency["direct"],
            baseline_name="the same Predict by gRPC (grpcio) straight to the backend",
            target_text="overhead p50 <= 0.5 ms",
        ),
        figure(
            "front_door",
            f"{SHORT_TOKENS}-token completion, POST /v1/completions (against modeld's own client)",
            "ms",
            latency["modeld"],
            baseline=latency["direct_lean"],
            baseline_name="the same Predict by modeld's HTTP/2 client straight to the backend",
            target_text="(what the HTTP side and the routing cost)",
        ),
        figure(
            "front_door",
            f"streamed tokens per second ({result['stream_tokens']} tokens)",
            "tokens/s",
            rates["modeld"],
            baseline=rates["direct"],
            baseline_name="PredictStream by gRPC (grpcio) straight to the backend",
            target_text="ratio >= 0.95",
            lower_is_better=False,
            digits=1,
        ),
        figure(
            "front_door",
            f"streamed tokens per second ({result['stream_tokens']} tokens, against modeld's"
            " own client)",
            "tokens/s",
            rates["modeld"],
            baseline=rates["direct_lean"],
            baseline_name="PredictStream by modeld's HTTP/2 client straight to the backend",
            target_text="(what the HTTP side costs)",
            lower_is_better=False,
            digits=1,
        ),
        figure(
            "front_door",
            "modeld CPU time per request (all threads, idle rate subtracted)",
            "ms",
            [result["modeld_cpu_per_request_ms"]],
            target=1.0,
            target_text="<= 1 ms",
        ),
        figure(
            "front_door",
            "modeld CPU time per streamed token",
            "ms",
            [result["modeld_cpu_per_streamed_token_ms"]],
            target=0.1,
            target_text="<= 0.1 ms",
            digits=4,
        ),
        figure(
            "front_door",
            f"{concurrent['clients']} clients x 10 requests, parallel = 4: requests/s",
            "requests/s",
            [concurrent["requests_per_s"]],
            target_text=f"no errors (statuses: {concurrent['statuses']})",
            lower_is_better=False,
            digits=1,
        ),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=600)
    parser.add_argument("--stream-tokens", type=int, default=10000)
    parser.add_argument("--stream-rounds", type=int, default=15)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--json", type=Path, help="also write the result here")
    parser.add_argument("--driver", type=int, metavar="PID", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.driver:
        result = asyncio.run(
            drive(args.rounds, args.driver, args.stream_tokens, args.stream_rounds, args.clients)
        )
        print(json.dumps(result))
        return 0

    result = run(args.rounds, args.stream_tokens, args.stream_rounds, args.clients)
    from report import emit

    emit(result, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
