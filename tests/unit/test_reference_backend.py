"""The reference backend as modeld runs it: a real process started via run.sh, real gRPC.

Every test starts its own backend on a unix socket in tmp_path and talks to it with the
generated stubs from modeld.rpc.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from modeld.rpc import backend_pb2 as pb
from modeld.rpc import backend_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parents[2]
SERVICE = ROOT / "service"

RUN_SH = SERVICE / "modeld" / "data" / "backends" / "reference" / "run.sh"
DEMO = SERVICE / "modeld" / "data" / "demo.txt"
MIB = 1 << 20
START_TIMEOUT = 15.0
RPC_TIMEOUT = 10.0


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``predicate`` every few ms until true; fail the test after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.005)


@dataclass
class Backend:
    """A running reference backend process and a stub connected to it."""

    proc: subprocess.Popen[bytes]
    addr: str
    log_path: Path
    channel: grpc.Channel
    stub: Any

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def load(self, *options: str, path: Path | str = DEMO, **kwargs: Any) -> Any:
        request = pb.ModelOptions(ModelFile=str(path), Options=list(options))
        return self.stub.LoadModel(request, timeout=kwargs.get("timeout", RPC_TIMEOUT))

    def status(self, timeout: float = RPC_TIMEOUT) -> Any:
        return self.stub.Status(pb.HealthMessage(), timeout=timeout)

    def predict(self, prompt: str, **fields: Any) -> Any:
        return self.stub.Predict(pb.PredictOptions(Prompt=prompt, **fields), timeout=RPC_TIMEOUT)

    def wait_exit(self, timeout: float = 10.0) -> int:
        return self.proc.wait(timeout=timeout)


def _spawn(addr: str, log_path: Path, *extra: str) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    # MODELD_TEST_BACKEND_PYTHON runs the backend on another interpreter (e.g. the distro's
    # /usr/bin/python3 with python3-grpcio) to check wire compatibility across runtimes.
    env["MODELD_PYTHON"] = os.environ.get("MODELD_TEST_BACKEND_PYTHON") or sys.executable
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SERVICE), env.get("PYTHONPATH")) if p)
    with log_path.open("wb") as log:
        return subprocess.Popen(
            [str(RUN_SH), "--addr", addr, *extra],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
        )


def _socket_target(addr: str) -> tuple[socket.AddressFamily, Any]:
    if addr.startswith("unix:"):
        return socket.AF_UNIX, addr[len("unix:") :]
    host, _, port = addr.rpartition(":")
    return socket.AF_INET, (host, int(port))


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Callable[..., Backend]]:
    """Start backends; all are SIGKILLed and reaped at the end of the test."""
    started: list[Backend] = []

    def _start(addr: str | None = None, *extra: str) -> Backend:
        n = len(started)
        if addr is None:
            sock = tmp_path / f"b{n}.sock"
            assert len(str(sock)) < 100, "unix socket path too long"
            addr = f"unix:{sock}"
        log_path = tmp_path / f"b{n}.log"
        proc = _spawn(addr, log_path, *extra)
        channel = grpc.insecure_channel(addr)
        backend = Backend(proc, addr, log_path, channel, pb_grpc.BackendStub(channel))
        started.append(backend)
        # Connect by hand first: a gRPC connect attempt that comes too early backs off ~1 s.
        family, target = _socket_target(addr)

        def _listening() -> bool:
            if proc.poll() is not None:
                pytest.fail(f"backend exited with {proc.returncode}:\n{backend.log()}")
            with socket.socket(family) as s:
                return s.connect_ex(target) == 0

        wait_until(_listening, START_TIMEOUT, f"a listener on {addr}")
        grpc.channel_ready_future(channel).result(timeout=START_TIMEOUT)
        return backend

    yield _start
    for backend in started:
        backend.channel.close()
        if backend.proc.poll() is None:
            backend.proc.kill()
        backend.proc.wait(timeout=10)


@pytest.fixture
def backend(start: Callable[..., Backend]) -> Backend:
    return start()


@pytest.fixture
def loaded(backend: Backend) -> Backend:
    result = backend.load()
    assert result.success, result.message
    return backend


# -- basics --------------------------------------------------------------------


def test_health_and_startup_log(backend: Backend) -> None:
    reply = backend.stub.Health(pb.HealthMessage(), timeout=RPC_TIMEOUT)
    assert reply.message == b"OK"
    assert f"listening on {backend.addr}" in backend.log()
    assert Path(backend.addr[len("unix:") :]).is_socket()


def test_tcp_address(start: Callable[..., Backend]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    backend = start(f"127.0.0.1:{port}")
    assert backend.stub.Health(pb.HealthMessage(), timeout=RPC_TIMEOUT).message == b"OK"


def test_unusable_address_exits_2(tmp_path: Path) -> None:
    log_path = tmp_path / "bad.log"
    proc = _spawn(f"unix:{tmp_path}/no/such/dir/x.sock", log_path)
    assert proc.wait(timeout=START_TIMEOUT) == 2
    assert "cannot listen" in log_path.read_text()


def test_status_before_and_after_load(backend: Backend) -> None:
    before = backend.status()
    assert before.state == pb.StatusResponse.UNINITIALIZED
    assert before.memory.total > 1 * MIB
    assert before.memory.breakdown["model_ngrams"] == 0

    result = backend.load()
    assert result.success, result.message
    assert "loaded" in result.message

    after = backend.status()
    assert after.state == pb.StatusResponse.READY
    assert after.memory.breakdown["rss"] == after.memory.total
    assert after.memory.breakdown["model_ngrams"] > 10_000
    assert f"loaded {DEMO}" in backend.log()


def test_load_missing_file_fails_clearly(backend: Backend, tmp_path: Path) -> None:
    missing = tmp_path / "nope.txt"
    result = backend.load(path=missing)
    assert not result.success
    assert str(missing) in result.message
    assert "does not exist" in result.message
    assert backend.status().state == pb.StatusResponse.UNINITIALIZED


def test_load_non_utf8_file_fails(backend: Backend, tmp_path: Path) -> None:
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"caf\xe9 au lait\xff\xfe")
    result = backend.load(path=bad)
    assert not result.success
    assert "not UTF-8" in result.message


def test_predict_without_model_is_failed_precondition(backend: Backend) -> None:
    with pytest.raises(grpc.RpcError) as err:
        backend.predict("The sea")
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION


# -- generation ------------------------------------------------------------------


def test_predict_greedy_is_deterministic_and_respects_tokens(loaded: Backend) -> None:
    first = loaded.predict("The keeper climbed", Tokens=12, Temperature=0.0)
    second = loaded.predict("The keeper climbed", Tokens=12, Temperature=0.0)
    assert first.message == second.message
    assert first.tokens == 12
    assert first.prompt_tokens == 3
    text = first.message.decode("utf-8")
    assert text.startswith(" ")
    words = [w for w in text.split() if w.isalpha()]
    assert words, text
    demo_words = set(DEMO.read_text(encoding="utf-8").split())
    assert all(w in demo_words or w.lower() in demo_words for w in words), text

    default = loaded.predict("The keeper climbed")
    assert default.tokens == 32


def test_predict_seeded_sampling(loaded: Backend) -> None:
    def run(seed: int) -> bytes:
        reply = loaded.predict("The sea", Tokens=30, Temperature=1.0, Seed=seed)
        return bytes(reply.message)

    assert run(11) == run(11)
    assert len({run(seed) for seed in (1, 2, 3, 4)}) > 1
    greedy = loaded.predict("The sea", Tokens=30).message
    assert greedy != run(11)


def test_top_k_1_is_greedy(loaded: Backend) -> None:
    greedy = loaded.predict("Fog", Tokens=20).message
    topk1 = loaded.predict("Fog", Tokens=20, Temperature=1.5, TopK=1, Seed=5).message
    assert topk1 == greedy


def test_predict_stream_matches_predict(loaded: Backend) -> None:
    request = pb.PredictOptions(Prompt="On stormy days", Tokens=25)
    whole = loaded.stub.Predict(request, timeout=RPC_TIMEOUT)
    parts = list(loaded.stub.PredictStream(request, timeout=RPC_TIMEOUT))
    assert len(parts) == 25
    assert all(p.message for p in parts)
    assert b"".join(p.message for p in parts) == whole.message


def test_chat_messages_get_an_answer_in_a_new_turn(loaded: Backend) -> None:
    """With UseTokenizerTemplate the reply to chat messages is the assistant's turn: it
    follows the conversation's last words but starts afresh, not as a word continued."""
    messages = [
        pb.Message(role="system", content="You answer briefly."),
        pb.Message(role="user", content="Tell me about the sea"),
    ]
    chat = pb.PredictOptions(Messages=messages, UseTokenizerTemplate=True, Tokens=12)
    reply = loaded.stub.Predict(chat, timeout=RPC_TIMEOUT)
    continued = loaded.predict("You answer briefly.\nTell me about the sea", Tokens=12)
    assert reply.tokens == 12 and reply.prompt_tokens == continued.prompt_tokens
    assert reply.message.decode() == continued.message.decode().lstrip()
    assert not reply.message.startswith(b" ")
    streamed = b"".join(r.message for r in loaded.stub.PredictStream(chat, timeout=RPC_TIMEOUT))
    assert streamed == reply.message


def test_stop_prompts_cut_output(loaded: Backend) -> None:
    full = loaded.predict("The lens", Tokens=30).message.decode()
    stop = full.split()[4]
    cut = full[: full.index(stop)]
    request = pb.PredictOptions(Prompt="The lens", Tokens=30, StopPrompts=[stop])
    reply = loaded.stub.Predict(request, timeout=RPC_TIMEOUT)
    assert reply.message.decode() == cut
    assert reply.tokens < 30
    streamed = b"".join(r.message for r in loaded.stub.PredictStream(request, timeout=RPC_TIMEOUT))
    assert streamed.decode() == cut


def test_reload_replaces_model(loaded: Backend, tmp_path: Path) -> None:
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("alpha beta gamma delta. " * 3, encoding="utf-8")
    result = loaded.load(path=tiny)
    assert result.success, result.message
    reply = loaded.predict("alpha", Tokens=4)
    assert reply.message == b" beta gamma delta."


# -- embeddings and tokens -----------------------------------------------------------


def test_embedding_deterministic_normalised_and_distinct(loaded: Backend) -> None:
    def embed(**fields: Any) -> list[float]:
        result = loaded.stub.Embedding(pb.PredictOptions(**fields), timeout=RPC_TIMEOUT)
        return list(result.embeddings)

    a1 = embed(Prompt="the light on the headland")
    a2 = embed(Prompt="the light on the headland")
    b = embed(Prompt="a storm at sea")
    assert a1 == a2
    assert len(a1) == 64
    assert math.isclose(math.sqrt(sum(x * x for x in a1)), 1.0, rel_tol=1e-5)
    assert math.isclose(math.sqrt(sum(x * x for x in b)), 1.0, rel_tol=1e-5)
    assert a1 != b
    assert embed(Embeddings="the light on the headland") == a1


def test_tokenize_string(loaded: Backend) -> None:
    def tokenize(text: str) -> Any:
        return loaded.stub.TokenizeString(pb.PredictOptions(Prompt=text), timeout=RPC_TIMEOUT)

    result = tokenize("sea light, sea zorblax")
    assert result.length == 5 == len(result.tokens)
    sea, light, comma, sea2, unknown = result.tokens
    assert sea == sea2
    assert len({sea, light, comma, unknown}) == 4
    assert unknown > max(sea, light, comma)
    assert list(tokenize("zorblax").tokens) == [unknown]


# -- Free --------------------------------------------------------------------------


def test_free_drops_the_model(loaded: Backend) -> None:
    result = loaded.stub.Free(pb.HealthMessage(), timeout=RPC_TIMEOUT)
    assert result.success
    assert loaded.status().state == pb.StatusResponse.UNINITIALIZED
    with pytest.raises(grpc.RpcError) as err:
        loaded.predict("The sea")
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert loaded.load().success


# -- signals -------------------------------------------------------------------------


def test_sigterm_exits_zero_and_removes_socket(backend: Backend) -> None:
    backend.proc.send_signal(signal.SIGTERM)
    assert backend.wait_exit() == 0
    assert not Path(backend.addr[len("unix:") :]).exists()


# -- knobs ---------------------------------------------------------------------------


def test_unknown_knob_is_rejected(backend: Backend) -> None:
    result = backend.load("bogus_knob=1")
    assert not result.success
    assert "bogus_knob" in result.message
    bad_value = backend.load("load_delay=soon")
    assert not bad_value.success
    assert "load_delay" in bad_value.message
    assert backend.status().state == pb.StatusResponse.UNINITIALIZED


def test_knob_fail_load(backend: Backend) -> None:
    result = backend.load("fail_load=disk on fire")
    assert not result.success
    assert result.message == "disk on fire"
    assert "disk on fire" in backend.log()
    assert backend.status().state == pb.StatusResponse.UNINITIALIZED


def test_knob_load_delay(backend: Backend) -> None:
    started = time.monotonic()
    assert backend.load("load_delay=0.3").success
    assert time.monotonic() - started >= 0.3


def test_knob_crash_on_load(backend: Backend) -> None:
    with pytest.raises(grpc.RpcError) as err:
        backend.load("crash_on_load=7")
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert backend.wait_exit() == 7
    assert "crashing" in backend.log()


def test_knob_crash_after(backend: Backend) -> None:
    started = time.monotonic()
    assert backend.load("crash_after=0.3").success
    assert backend.wait_exit() == 3
    assert time.monotonic() - started >= 0.3
    assert "crashing as asked" in backend.log()


def test_knob_predict_delay_does_not_block_health(backend: Backend) -> None:
    assert backend.load("predict_delay=1.0").success
    started = time.monotonic()
    future = backend.stub.Predict.future(
        pb.PredictOptions(Prompt="The sea", Tokens=5), timeout=RPC_TIMEOUT
    )
    wait_until(lambda: backend.status().state == pb.StatusResponse.BUSY, 5, "BUSY")
    health_started = time.monotonic()
    assert backend.stub.Health(pb.HealthMessage(), timeout=RPC_TIMEOUT).message == b"OK"
    assert time.monotonic() - health_started < 0.5
    assert not future.done()
    assert future.result().tokens == 5
    assert time.monotonic() - started >= 1.0
    assert backend.status().state == pb.StatusResponse.READY


def test_knob_hang_on_load(backend: Backend) -> None:
    with pytest.raises(grpc.RpcError) as err:
        backend.load("hang_on_load=1", timeout=0.5)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert backend.stub.Health(pb.HealthMessage(), timeout=RPC_TIMEOUT).message == b"OK"
    assert backend.proc.poll() is None


def test_knob_hang_after(backend: Backend) -> None:
    assert backend.load("hang_after=0.2").success
    assert backend.stub.Health(pb.HealthMessage(), timeout=RPC_TIMEOUT).message == b"OK"
    wait_until(lambda: _health_times_out(backend), 5, "Health to hang")
    with pytest.raises(grpc.RpcError) as err:
        backend.status(timeout=0.3)  # every RPC hangs, not only Health
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert backend.proc.poll() is None
    assert "hanging an RPC as asked" in backend.log()


def _health_times_out(backend: Backend) -> bool:
    try:
        backend.stub.Health(pb.HealthMessage(), timeout=0.1)
    except grpc.RpcError as e:
        return bool(e.code() == grpc.StatusCode.DEADLINE_EXCEEDED)
    return False


def test_knob_ignore_sigterm(backend: Backend) -> None:
    assert backend.load("ignore_sigterm=1").success
    backend.proc.send_signal(signal.SIGTERM)
    wait_until(lambda: "ignoring SIGTERM" in backend.log(), 5, "the SIGTERM log line")
    assert backend.proc.poll() is None
    assert backend.stub.Health(pb.HealthMessage(), timeout=RPC_TIMEOUT).message == b"OK"
    backend.proc.send_signal(signal.SIGKILL)
    assert backend.wait_exit() == -signal.SIGKILL


def test_knob_alloc_mb_raises_rss_and_free_releases_it(backend: Backend) -> None:
    assert backend.load().success
    base = backend.status().memory.total
    assert backend.load("alloc_mb=64").success
    status = backend.status()
    assert status.memory.breakdown["alloc"] == 64 * MIB
    assert status.memory.total - base >= 56 * MIB
    assert backend.stub.Free(pb.HealthMessage(), timeout=RPC_TIMEOUT).success
    assert backend.status().memory.total < status.memory.total - 32 * MIB


# -- misbehaviour on purpose (fuzzing modeld) ------------------------------------------------


def test_startup_knob_health_hang_and_error(start: Callable[..., Backend]) -> None:
    hung = start(None, "--knob", "health=hang")
    with pytest.raises(grpc.RpcError) as err:
        hung.stub.Health(pb.HealthMessage(), timeout=0.5)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    failing = start(None, "--knob=health=error")
    with pytest.raises(grpc.RpcError) as err:
        failing.stub.Health(pb.HealthMessage(), timeout=RPC_TIMEOUT)
    assert err.value.code() == grpc.StatusCode.INTERNAL
    assert "unhealthy as asked" in (err.value.details() or "")
    assert failing.load().success  # the rest works: only Health is sick


def test_a_bad_startup_knob_exits_2(tmp_path: Path) -> None:
    proc = _spawn(f"unix:{tmp_path}/x.sock", tmp_path / "log", "--knob", "health=maybe")
    assert proc.wait(timeout=START_TIMEOUT) == 2
    assert "'health'" in (tmp_path / "log").read_text()


def test_knob_health_after_load(backend: Backend) -> None:
    assert backend.load("health=error").success
    with pytest.raises(grpc.RpcError) as err:
        backend.stub.Health(pb.HealthMessage(), timeout=RPC_TIMEOUT)
    assert err.value.code() == grpc.StatusCode.INTERNAL
    assert backend.load().success
    assert backend.stub.Health(pb.HealthMessage(), timeout=RPC_TIMEOUT).message == b"OK"


def test_knob_garbage(backend: Backend) -> None:
    assert backend.load("garbage=1").success
    reply = backend.predict("The sea", Tokens=3)
    with pytest.raises(UnicodeDecodeError):
        reply.message.decode("utf-8")
    assert reply.tokens < 0
    stream = list(
        backend.stub.PredictStream(pb.PredictOptions(Prompt="The sea", Tokens=2), timeout=5)
    )
    assert stream[0].message == b"\xc3"
    embedding = backend.stub.Embedding(pb.PredictOptions(Embeddings="x"), timeout=5).embeddings
    assert math.isnan(embedding[0]) and math.isinf(embedding[1])
    assert backend.stub.TokenizeString(pb.PredictOptions(Prompt="a b"), timeout=5).length < 0
    assert backend.status().state == 99


def test_knob_escape_leaves_a_grandchild_in_another_session(backend: Backend) -> None:
    assert backend.load("escape=1").success
    line = next(ln for ln in backend.log().splitlines() if "escaped: grandchild" in ln)
    pid = int(line.split("grandchild ")[1].split()[0])
    try:
        assert os.getsid(pid) != os.getsid(backend.proc.pid)
        backend.proc.send_signal(signal.SIGTERM)
        assert backend.wait_exit() == 0
        os.kill(pid, signal.SIGTERM)  # blocked, as in the backend's threads
        time.sleep(0.2)  # a SIGTERM that worked would have ended it by now
        os.kill(pid, 0)  # still there: only a SIGKILL (of its cgroup) ends it
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def test_knob_flood_mbps(backend: Backend) -> None:
    assert backend.load("flood_mbps=4").success
    before = backend.log_path.stat().st_size
    started = time.monotonic()
    wait_until(lambda: backend.log_path.stat().st_size - before > 2_000_000, 10, "2 MB of log")
    assert time.monotonic() - started >= 0.3  # paced, not as fast as it can
    assert backend.stub.Health(pb.HealthMessage(), timeout=RPC_TIMEOUT).message == b"OK"
