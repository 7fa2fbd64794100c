"""grpc.aio against modeld's Http2Channel, calling the same reference backend, interleaved.

Starts its own reference backend on a unix socket (no sandbox, no root) and measures, in
the same run, the client's side only:

- **streamed tokens**: one ``PredictStream`` of ``--tokens`` tokens per round, alternating
  grpc.aio and Http2Channel; tokens/s and this process's CPU time per message;
- **unary calls**: ``Predict`` of 4 tokens, alternating; latency p50 and CPU time per call.

Both clients check they got the same text. The machine is shared and noisy: read the
ratios, not the absolute times. Runs in ~10 s.

Usage: python bench/http2_client.py [--rounds N] [--tokens N] [--calls N]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "service"))

import grpc.aio  # noqa: E402

from modeld.rpc import backend_pb2 as pb  # noqa: E402
from modeld.rpc import backend_pb2_grpc as pb_grpc  # noqa: E402
from modeld.rpc.http2 import Http2Channel  # noqa: E402

DEMO = REPO / "service" / "modeld" / "data" / "demo.txt"
STREAM = "/backend.Backend/PredictStream"
PREDICT = "/backend.Backend/Predict"


def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Clients:
    """The two clients of one backend, each with a streamed and a unary call."""

    def __init__(self, address: str, tokens: int) -> None:
        self.stream_request = pb.PredictOptions(Prompt="The sea", Tokens=tokens, TopP=1.0)
        self.unary_request = pb.PredictOptions(Prompt="The sea", Tokens=4, TopP=1.0)
        self.aio = grpc.aio.insecure_channel(address)
        self.stub = pb_grpc.BackendStub(self.aio)
        self.h2 = Http2Channel(address)

    async def aio_stream(self) -> bytes:
        parts = []
        call = self.stub.PredictStream(self.stream_request)
        while (reply := await call.read()) is not grpc.aio.EOF:
            parts.append(reply.message)
        return b"".join(parts)

    async def h2_stream(self) -> bytes:
        parts = []
        stream = await self.h2.server_stream(STREAM, self.stream_request.SerializeToString())
        try:
            while batch := await stream.read_batch():
                parts += [pb.Reply.FromString(m).message for m in batch]
        finally:
            stream.cancel()
        return b"".join(parts)

    async def aio_unary(self) -> bytes:
        return bytes((await self.stub.Predict(self.unary_request)).message)

    async def h2_unary(self) -> bytes:
        request = self.unary_request.SerializeToString()
        return bytes(pb.Reply.FromString(await self.h2.unary(PREDICT, request)).message)

    async def close(self) -> None:
        await self.h2.close()
        await self.aio.close()


async def timed(call: Callable[[], Awaitable[bytes]]) -> tuple[bytes, float, float]:
    """(result, wall seconds, CPU seconds) of one call."""
    wall, used = time.perf_counter(), cpu()
    result = await call()
    return result, time.perf_counter() - wall, cpu() - used


async def bench_streams(clients: Clients, rounds: int, tokens: int) -> None:
    kinds = {"grpc.aio": clients.aio_stream, "Http2Channel": clients.h2_stream}
    expected = await clients.aio_stream()
    samples: dict[str, list[tuple[float, float]]] = {kind: [] for kind in kinds}
    for k in range(rounds):
        for kind in list(kinds)[:: 1 if k % 2 else -1]:
            text, wall, used = await timed(kinds[kind])
            assert text == expected, f"{kind} got other text"
            samples[kind].append((tokens / wall, used / tokens * 1e6))
    print(f"PredictStream, {tokens} tokens x {rounds} rounds (medians)")
    rate = {kind: statistics.median(s[0] for s in v) for kind, v in samples.items()}
    per_msg = {kind: statistics.median(s[1] for s in v) for kind, v in samples.items()}
    for kind in kinds:
        print(f"  {kind:13s} {rate[kind]:9.0f} tok/s   client CPU {per_msg[kind]:6.1f} µs/message")
    print(
        f"  Http2Channel / grpc.aio: tok/s x{rate['Http2Channel'] / rate['grpc.aio']:.2f}, "
        f"CPU per message x{per_msg['Http2Channel'] / per_msg['grpc.aio']:.2f}"
    )


async def bench_unary(clients: Clients, calls: int) -> None:
    kinds = {"grpc.aio": clients.aio_unary, "Http2Channel": clients.h2_unary}
    expected = await clients.aio_unary()
    for _ in range(20):
        for call in kinds.values():
            await call()
    latency: dict[str, list[float]] = {kind: [] for kind in kinds}
    used: dict[str, float] = dict.fromkeys(kinds, 0.0)
    for k in range(calls):
        for kind in list(kinds)[:: 1 if k % 2 else -1]:
            text, wall, cpu_time = await timed(kinds[kind])
            assert text == expected, f"{kind} got other text"
            latency[kind].append(wall)
            used[kind] += cpu_time
    print(f"Predict (4 tokens) x {calls} calls each, interleaved")
    p50 = {kind: statistics.median(v) * 1e6 for kind, v in latency.items()}
    per_call = {kind: used[kind] / calls * 1e6 for kind in kinds}
    for kind in kinds:
        print(f"  {kind:13s} p50 {p50[kind]:6.0f} µs   client CPU {per_call[kind]:5.0f} µs/call")
    print(
        f"  Http2Channel / grpc.aio: p50 x{p50['Http2Channel'] / p50['grpc.aio']:.2f}, "
        f"CPU per call x{per_call['Http2Channel'] / per_call['grpc.aio']:.2f}"
    )


async def bench(address: str, args: argparse.Namespace) -> None:
    clients = Clients(address, args.tokens)
    try:
        load = pb.ModelOptions(Model="demo.txt", ModelFile=str(DEMO))
        assert (await clients.stub.LoadModel(load)).success
        await bench_streams(clients, args.rounds, args.tokens)
        await bench_unary(clients, args.calls)
    finally:
        await clients.close()


def start_backend(address: str) -> subprocess.Popen[str]:
    backend = subprocess.Popen(
        [sys.executable, "-m", "modeld.reference_backend", "--addr", address],
        env={**os.environ, "PYTHONPATH": str(REPO / "service")},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert backend.stderr is not None
    for line in backend.stderr:
        if "listening on" in line:
            return backend
    raise SystemExit(f"the reference backend exited with {backend.wait()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=8, help="streams per client")
    parser.add_argument("--tokens", type=int, default=2000, help="tokens per stream")
    parser.add_argument("--calls", type=int, default=500, help="unary calls per client")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="h2bench-") as tmp:
        address = f"unix:{tmp}/backend.sock"
        backend = start_backend(address)
        try:
            asyncio.run(bench(address, args))
        finally:
            backend.kill()
            backend.wait()
            assert backend.stderr is not None
            backend.stderr.close()


if __name__ == "__main__":
    main()
