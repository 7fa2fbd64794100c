"""Failure cooldown with real systemd, D-Bus and HTTP: a model whose load failed is refused
at once (D-Bus LoadFailed naming when to retry, HTTP 503 with Retry-After) until its
cooldown is over; ``force`` tries again and doubles it."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator

import pytest
from sandbox import Sandbox
from sandbox.deploy import Modeld, deploy, reference_model

pytestmark = pytest.mark.systemd


@pytest.fixture(scope="module")
def modeld(sandbox: Sandbox, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Modeld]:
    deployment = deploy(
        sandbox,
        tmp_path_factory.mktemp("modeld-cooldown"),
        {"broken": reference_model(options=("fail_load=the weights are corrupt",))},
    )
    yield deployment
    deployment.stop()
    sandbox.remove_units(["modeld.service", "modeld.socket", "modeld.slice"])


def post(modeld: Modeld, body: dict[str, object]) -> tuple[int, dict[str, str], dict[str, object]]:
    """POST /v1/completions; (status, headers, JSON body)."""
    payload = json.dumps(body).encode()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(60)
        sock.connect(str(modeld.api_socket))
        sock.sendall(
            b"POST /v1/completions HTTP/1.0\r\nHost: modeld\r\n"
            + f"Content-Length: {len(payload)}\r\n\r\n".encode()
            + payload
        )
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, raw = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, json.loads(raw)


def test_a_failed_load_is_refused_at_once_until_its_cooldown_is_over(modeld: Modeld) -> None:
    failed = modeld.load("broken", check=False)
    assert failed.returncode != 0 and "the weights are corrupt" in failed.stderr
    retry_after = modeld.prop("broken", "RetryAfter")
    assert retry_after / 1e6 - time.time() == pytest.approx(10, abs=3)

    again = modeld.load("broken", check=False)
    assert again.returncode != 0
    assert "LoadFailed" in again.stderr or "last load failed" in again.stderr
    assert "may be loaded again in" in again.stderr and "or now with force" in again.stderr
    assert modeld.prop("broken", "LoadCount") == 0

    status, headers, body = post(modeld, {"model": "broken", "prompt": "The sea"})
    assert status == 503
    assert 1 <= int(headers["Retry-After"]) <= 10
    assert "last load failed" in str(body["error"])
    assert modeld.scopes() == []  # nothing was started for either

    forced = modeld.call(
        "Load", "sa{sv}", "broken", "2", "wait", "b", "true", "force", "b", "true", check=False
    )
    assert forced.returncode != 0 and "the weights are corrupt" in forced.stderr
    assert (modeld.prop("broken", "RetryAfter") - retry_after) / 1e6 == pytest.approx(10, abs=3)
