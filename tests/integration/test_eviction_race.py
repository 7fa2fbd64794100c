"""Hammer the race of "evicted mid-request" with real systemd, D-Bus and backends.

Each round: A is loaded; then, in the same instant, a slow completion request on A (HTTP)
and a Load of B (D-Bus) under max_loaded = 1. Without force, A must never be unloaded while
its request runs (checked on the bus: A's last announced InFlight is 0 whenever A's
ModelUnloaded arrives; both come from modeld in order) and every request must complete.
With force, B's load wins and a cut-off request gets an honest error (or, if it had not
started yet, loads A again by evicting the now idle B).

MODELD_RACE_ROUNDS sets the number of rounds without force (default 200).
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from busclient import SignalRecorder, call, connect
from dbus_next.signature import Variant
from sandbox import Sandbox
from sandbox.deploy import Modeld, deploy, reference_model

pytestmark = pytest.mark.systemd

ROUNDS = int(os.environ.get("MODELD_RACE_ROUNDS", "200"))
FORCED_ROUNDS = 20
A_PATH = "/org/modeld1/model/a"


@pytest.fixture(scope="module")
def modeld(sandbox: Sandbox, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Modeld]:
    deployment = deploy(
        sandbox,
        tmp_path_factory.mktemp("modeld-race"),
        {"a": reference_model(options=("predict_delay=0.1",)), "b": reference_model()},
        daemon="max_loaded = 1\n",
    )
    yield deployment
    deployment.stop()
    sandbox.remove_units(["modeld.service", "modeld.socket", "modeld.slice"])


async def complete(socket_path: Path, model: str) -> tuple[int, Any]:
    reader, writer = await asyncio.open_unix_connection(str(socket_path))
    payload = json.dumps({"model": model, "prompt": "The sea", "max_tokens": 3}).encode()
    writer.write(
        b"POST /v1/completions HTTP/1.0\r\nHost: modeld\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(payload)}\r\n\r\n".encode()
        + payload
    )
    data = await reader.read()
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


async def load(bus: Any, name: str, *, force: bool = False) -> None:
    options = {"wait": Variant("b", True), "force": Variant("b", force)}
    reply = await call(bus, "Load", "sa{sv}", [name, options])
    assert reply.error_name is None, f"Load {name}: {reply.error_name}: {reply.body}"


def a_unloaded_while_in_flight(recorder: SignalRecorder) -> list[tuple[str, int]]:
    """(reason, InFlight) of every ModelUnloaded of A announced while A had work."""
    in_flight, found = 0, []
    for path, member, body in recorder.signals:
        if path == A_PATH and member == "PropertiesChanged" and "InFlight" in body[1]:
            in_flight = body[1]["InFlight"].value
        elif member == "ModelUnloaded" and body[0] == "a" and in_flight:
            found.append((body[2], in_flight))
    return found


async def rounds(modeld: Modeld, count: int, *, force: bool) -> tuple[list[int], SignalRecorder]:
    async with connect(modeld.sandbox.bus_address) as bus:
        recorder = await SignalRecorder(bus).start()
        statuses = []
        for _ in range(count):
            await load(bus, "a", force=True)
            (status, body), _ = await asyncio.wait_for(
                asyncio.gather(complete(modeld.api_socket, "a"), load(bus, "b", force=force)),
                60,
            )
            if status != 200:
                assert "error" in body, body
            statuses.append(status)
        return statuses, recorder


def test_without_force_a_model_is_never_evicted_in_the_middle_of_a_request(
    modeld: Modeld,
) -> None:
    statuses, recorder = asyncio.run(rounds(modeld, ROUNDS, force=False))
    assert statuses == [200] * ROUNDS  # every request completed
    assert a_unloaded_while_in_flight(recorder) == []
    assert recorder.unloaded("a").count("lru") == ROUNDS  # b took a's place every round
    assert modeld.scopes() and len(modeld.scopes()) == 1


def test_with_force_the_load_wins_and_cut_off_requests_fail_honestly(modeld: Modeld) -> None:
    statuses, recorder = asyncio.run(rounds(modeld, FORCED_ROUNDS, force=True))
    assert set(statuses) <= {200, 502, 503}
    assert recorder.unloaded("a").count("lru") >= FORCED_ROUNDS  # b's load always won
    assert len(modeld.scopes()) == 1  # and the cap held, with nothing left behind
