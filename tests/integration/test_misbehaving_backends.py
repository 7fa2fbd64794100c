"""Backends that misbehave on purpose, and broken backend directories, against the real
modeld in the sandbox (issue 8, item 3).

Each case ends the same way: a clean error (a D-Bus error with one line of text, or an
OpenAI-shaped HTTP error), modeld keeps serving (another model answers, modeld was not
restarted) and its state matches systemd's (:func:`assert_consistent`: no scope or backend
process without a loaded model, exactly one scope per loaded model).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sandbox import Sandbox
from sandbox.deploy import Modeld, deploy, reference_model

pytestmark = pytest.mark.systemd

REPO = Path(__file__).resolve().parents[2]
REFERENCE_RUN = REPO / "service/modeld/data/backends/reference/run.sh"
LOADED = {"ready", "busy"}


def make_backends(root: Path) -> None:
    """Backend directories, sane and not: wrappers of the reference backend with startup
    knobs, a run.sh nobody may execute, meta backends pointing at each other."""
    for name, knob in (("never-healthy", "health=hang"), ("health-error", "health=error")):
        (root / name).mkdir()
        run = root / name / "run.sh"
        run.write_text(f'#!/bin/sh\nexec {REFERENCE_RUN} --knob {knob} "$@"\n')
        run.chmod(0o755)
    (root / "noexec").mkdir()
    (root / "noexec" / "run.sh").write_text(f'#!/bin/sh\nexec {REFERENCE_RUN} "$@"\n')
    (root / "noexec" / "run.sh").chmod(0o644)
    for name, target in (("loop-a", "loop-b"), ("loop-b", "loop-a")):
        (root / name).mkdir()
        (root / name / "metadata.json").write_text(json.dumps({"meta_backend_for": target}))
    (root / "badmeta").mkdir()
    (root / "badmeta" / "metadata.json").write_text("{not json")


MODELS = {
    "good": reference_model(),
    "never-healthy": 'backend = "never-healthy"\n' + reference_model().split("\n", 1)[1],
    "health-error": 'backend = "health-error"\n' + reference_model().split("\n", 1)[1],
    "garbage": reference_model(options=("garbage",)),
    "stubborn": reference_model(options=("ignore_sigterm",)),
    "escaper": reference_model(options=("escape", "ignore_sigterm")),
    "crasher": reference_model(options=("crash_on_load=9",)),
    "flood": reference_model(options=("flood_mbps=2",)),
    "noexec": 'backend = "noexec"\n',
    "circle": 'backend = "loop-a"\n',
    "badmeta": 'backend = "badmeta"\n',
}


@pytest.fixture(scope="module")
def modeld(sandbox: Sandbox, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Modeld]:
    backends = Path(tempfile.mkdtemp(prefix="modeld-hostile-", dir="/tmp"))
    backends.chmod(0o755)  # the backends' user must reach their run.sh
    make_backends(backends)
    deployment = deploy(
        sandbox,
        tmp_path_factory.mktemp("modeld-hostile"),
        MODELS,
        daemon=(
            f'load_stall_timeout = "3s"\nstop_timeout = "2s"\nbackends_dirs = ["{backends}"]\n'
        ),
    )
    yield deployment
    deployment.stop()
    sandbox.remove_units(["modeld.service", "modeld.socket", "modeld.slice"])
    shutil.rmtree(backends, ignore_errors=True)


@pytest.fixture
def served(modeld: Modeld) -> Iterator[None]:
    """The test must leave modeld running (same process), serving and consistent."""
    before = modeld.main_pid()
    yield
    modeld.assert_serves("good")
    assert modeld.main_pid() == before, "modeld was restarted"
    modeld.assert_consistent()


def load_error(modeld: Modeld, name: str, *, force: bool = True) -> str:
    """Load ``name`` (forced: past an earlier failure's cooldown); its D-Bus error text."""
    args = ("2", "wait", "b", "true", "force", "b", "true") if force else ("1", "wait", "b", "true")
    proc = modeld.call("Load", "sa{sv}", name, *args, check=False)
    assert proc.returncode != 0, f"{name} loaded"
    assert "Traceback" not in proc.stderr and "Internal" not in proc.stderr, proc.stderr
    return str(proc.stderr)


def test_a_backend_that_is_never_healthy_fails_its_load(modeld: Modeld, served: None) -> None:
    error = load_error(modeld, "never-healthy")
    assert "no progress for 3s while waiting for Health" in error
    assert modeld.prop("never-healthy", "State") == "failed"
    assert modeld.leftovers("never-healthy") == []


def test_a_backend_whose_health_fails_is_refused_with_its_words(
    modeld: Modeld, served: None
) -> None:
    error = load_error(modeld, "health-error")
    assert "Health failed: unhealthy as asked (health=error)" in error
    assert modeld.leftovers("health-error") == []


def test_a_backend_that_exits_during_load_model(modeld: Modeld, served: None) -> None:
    error = load_error(modeld, "crasher")
    assert "exited with status 9" in error
    assert modeld.prop("crasher", "State") == "failed"
    assert modeld.leftovers("crasher") == []


def test_garbage_replies_become_clean_answers_or_errors(modeld: Modeld, served: None) -> None:
    modeld.load("garbage")
    status, body = modeld.http_post(
        "/v1/completions", {"model": "garbage", "prompt": "The sea", "max_tokens": 3}
    )
    assert status == 200, body
    assert "\ufffd" in body["choices"][0]["text"]  # invalid UTF-8 replaced, not passed on
    assert all(v >= 0 for v in body["usage"].values()), body["usage"]
    status, raw = stream(modeld, {"model": "garbage", "prompt": "The sea", "max_tokens": 2})
    assert status == 200 and raw.rstrip().endswith("data: [DONE]"), raw
    status, body = modeld.http_post("/v1/embeddings", {"model": "garbage", "input": "x"})
    assert status == 502, body
    assert body["error"]["code"] == "backend_error"
    assert modeld.prop("garbage", "State") in LOADED  # a bad answer is not a dead backend
    modeld.unload("garbage")
    assert modeld.leftovers("garbage") == []


def test_a_backend_that_ignores_sigterm_is_killed(modeld: Modeld, served: None) -> None:
    modeld.load("stubborn")
    modeld.unload("stubborn")
    assert modeld.prop("stubborn", "State") == "unloaded"
    assert modeld.leftovers("stubborn") == []
    assert "ignoring SIGTERM as asked" in modeld.sandbox.journal(identifier="stubborn")


def test_a_grandchild_that_escaped_its_session_is_killed_with_the_scope(
    modeld: Modeld, served: None
) -> None:
    modeld.load("escaper")
    lines = modeld.sandbox.journal(identifier="escaper").splitlines()
    escaped = [line for line in lines if "escaped: grandchild" in line]
    assert escaped, lines[-20:]
    pid = int(escaped[-1].split("grandchild ")[1].split()[0])
    unit = modeld.prop("escaper", "Unit")
    assert pid in modeld.unit_pids(unit)  # setsid and a double fork do not leave a cgroup
    modeld.unload("escaper")
    assert modeld.leftovers("escaper") == []
    alive = modeld.sandbox.exec("kill", "-0", str(pid), check=False)
    assert alive.returncode != 0, f"the escaped grandchild {pid} survived"


def test_a_backend_flooding_its_output_does_not_stop_modeld(modeld: Modeld, served: None) -> None:
    modeld.load("flood")
    for _ in range(5):
        modeld.assert_serves("good")
        assert modeld.prop("flood", "State") in LOADED
    modeld.unload("flood")
    assert modeld.leftovers("flood") == []


@pytest.mark.parametrize(
    ("name", "problem"),
    [("noexec", "noexec"), ("circle", "loop-a"), ("badmeta", "badmeta")],
)
def test_broken_backend_directories_are_refused_up_front(
    modeld: Modeld, served: None, name: str, problem: str
) -> None:
    error = load_error(modeld, name, force=False)
    assert "NoSuchBackend" in error or "not installed" in error, error
    assert problem in error
    assert modeld.prop(name, "State") == "unloaded"
    assert modeld.leftovers(name) == []


def stream(modeld: Modeld, body: dict[str, Any]) -> tuple[int, str]:
    """POST a streamed completion; (status, the raw SSE text)."""
    import socket

    payload = json.dumps({**body, "stream": True}).encode()
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
    return int(head.split()[1]), raw.decode("utf-8", "replace")
