"""The gRPC servicer of the reference backend: model state and one method per RPC.

Methods follow grpcio's sync API (``request, context`` in, response out; streaming
methods are generators). Errors the caller should see are raised as :class:`RpcAbort`
and turned into gRPC statuses; anything unexpected is logged and becomes INTERNAL.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import grpc

from modeld.backend_kit.log import log
from modeld.backend_kit.memory import MIB, release_memory
from modeld.backend_kit.options import model_path
from modeld.backend_kit.rpc import RpcAbort, streaming, unary
from modeld.backend_kit.server import ProcessControl, identity
from modeld.backend_kit.status import status_reply
from modeld.reference_backend.knobs import KnobError, Knobs, parse_knobs
from modeld.reference_backend.memory import allocate_touched
from modeld.reference_backend.ngram import NgramModel, SamplingParams, embed, tokenize
from modeld.rpc import backend_pb2 as pb

DEFAULT_TOKENS = 32
CRASH_AFTER_EXIT_CODE = 3


@dataclass
class Loaded:
    """A loaded model and what belongs to it."""

    model: NgramModel
    path: str
    knobs: Knobs
    ballast: bytearray | None


def _forever(reason: str) -> NoReturn:
    log(reason)
    while True:
        threading.Event().wait()


def _die(message: str, code: int) -> NoReturn:
    log(message)
    os._exit(code)


def _read_model_text(path: str) -> str:
    """Read a model file; raises ValueError with a message fit for Result.message."""
    if not path:
        raise ValueError("no model file given (set ModelOptions.ModelFile or Model)")
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValueError(f"model file {path} does not exist") from None
    except IsADirectoryError:
        raise ValueError(f"model file {path} is a directory, not a text file") from None
    except OSError as e:
        raise ValueError(f"cannot read model file {path}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise ValueError(
            f"model file {path} is not UTF-8 text ({e.reason} at byte {e.start})"
        ) from None


GARBAGE_TEXT = b"\xff\xfe garbage \xc3\x28 \xed\xa0\x80 \xf8\x88\x80\x80\x80"
"""Invalid UTF-8 of several kinds: bad start bytes, a broken sequence, a surrogate, 5 bytes."""
FLOOD_LINE = b"flood " + b"x" * 1017 + b"\n"


_ESCAPE_SCRIPT = """
import os, signal, sys, time
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
pid = os.fork()
if pid:
    print(pid, flush=True)
    os._exit(0)
null = os.open(os.devnull, os.O_RDWR)
for fd in (0, 1):
    os.dup2(null, fd)
while True:
    time.sleep(3600)
"""


def _escape() -> None:
    """Start a child in a new session (setsid) that forks again and exits: the grandchild,
    SIGTERM blocked, is nobody's child of ours and outlives the backend unless SIGKILLed.
    (Started with fork + exec: a bare fork of this multi-threaded gRPC process is unsafe.)"""
    child = subprocess.Popen(
        [sys.executable, "-c", _ESCAPE_SCRIPT, "modeld.reference_backend escapee"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        start_new_session=True,
    )
    assert child.stdout is not None
    pid = child.stdout.readline().decode().strip()
    child.stdout.close()
    child.wait()
    log(f"escaped: grandchild {pid} left the session (setsid, double fork)")


def _flood(mbps: float) -> None:
    """Write ``mbps`` MB of log lines per second to stderr, until the process ends."""
    chunk = FLOOD_LINE * 64
    interval = len(chunk) / (mbps * 1_000_000)
    next_write = time.monotonic()
    while True:
        try:
            os.write(sys.stderr.fileno(), chunk)
        except OSError:
            return
        next_write += interval
        time.sleep(max(0.0, next_write - time.monotonic()))


def _describe(knobs: Knobs) -> str:
    set_knobs = [f"{k}={v}" for k, v in vars(knobs).items() if v not in (None, False, 0, 0.0, "ok")]
    return ", ".join(set_knobs) if set_knobs else "none"


class ReferenceBackend:
    """State of the reference backend and its RPC methods (LocalAI ``backend.Backend``)."""

    def __init__(self, control: ProcessControl, startup: Knobs | None = None) -> None:
        self._control = control
        self._health = startup.health if startup else "ok"
        self._flooding = False
        if startup and startup.flood_mbps:
            self._start_flood(startup.flood_mbps)
        self._lock = threading.Lock()  # guards the fields below
        self._load_lock = threading.Lock()  # one LoadModel at a time
        self._loaded: Loaded | None = None
        self._busy = 0
        self._crash_timer: threading.Timer | None = None
        self._hang_at: float | None = None

    # -- helpers -----------------------------------------------------------------

    def _enter(self) -> None:
        """Start of every RPC: block forever once ``hang_after`` has passed."""
        hang_at = self._hang_at
        if hang_at is not None and time.monotonic() >= hang_at:
            _forever("hanging an RPC as asked (hang_after)")

    def _require_model(self) -> Loaded:
        loaded = self._loaded
        if loaded is None:
            raise RpcAbort(grpc.StatusCode.FAILED_PRECONDITION, "no model loaded")
        return loaded

    @contextmanager
    def _busy_scope(self, loaded: Loaded) -> Iterator[None]:
        """Count a running request (Status says BUSY) and apply ``predict_delay``."""
        with self._lock:
            self._busy += 1
        try:
            if loaded.knobs.predict_delay > 0:
                time.sleep(loaded.knobs.predict_delay)
            yield
        finally:
            with self._lock:
                self._busy -= 1

    @staticmethod
    def _sampling(request: Any) -> SamplingParams:
        return SamplingParams(
            max_tokens=request.Tokens if request.Tokens > 0 else DEFAULT_TOKENS,
            temperature=max(0.0, float(request.Temperature)),
            top_k=max(0, request.TopK),
            seed=request.Seed if request.Seed > 0 else None,
            stop=tuple(request.StopPrompts),
        )

    @staticmethod
    def _prompt(request: Any) -> tuple[str, bool]:
        """The prompt and whether the answer is a new chat turn.

        Prompt if set; else the chat messages' contents joined by newlines. With
        ``UseTokenizerTemplate`` (the backend applies the chat template) the answer is the
        assistant's turn, which starts afresh instead of continuing the last word.
        """
        if request.Prompt:
            return str(request.Prompt), False
        text = "\n".join(m.content for m in request.Messages if m.content)
        return text, bool(request.UseTokenizerTemplate)

    def _set_model(self, loaded: Loaded | None) -> None:
        """Replace the model and its timers (crash_after, hang_after)."""
        with self._lock:
            self._loaded = loaded
            if self._crash_timer is not None:
                self._crash_timer.cancel()
                self._crash_timer = None
            self._hang_at = None
            if loaded is None:
                return
            knobs = loaded.knobs
            if knobs.crash_after is not None:
                timer = threading.Timer(
                    knobs.crash_after, _die, ("crashing as asked", CRASH_AFTER_EXIT_CODE)
                )
                timer.daemon = True
                timer.start()
                self._crash_timer = timer
            if knobs.hang_after is not None:
                self._hang_at = time.monotonic() + knobs.hang_after

    def _start_flood(self, mbps: float) -> None:
        if not self._flooding:
            self._flooding = True
            log(f"flooding the log with {mbps:g} MB/s as asked (flood_mbps)")
            threading.Thread(target=_flood, args=(mbps,), daemon=True, name="flood").start()

    def _garbage(self) -> bool:
        loaded = self._loaded
        return loaded is not None and loaded.knobs.garbage

    # -- RPCs --------------------------------------------------------------------

    @unary
    def Health(self, request: Any, context: Any) -> Any:
        """Liveness: Reply(message=b"OK") (the ``health`` knob: hangs, or fails)."""
        self._enter()
        if self._health == "hang":
            _forever("hanging Health as asked (health=hang)")
        if self._health == "error":
            raise RpcAbort(grpc.StatusCode.INTERNAL, "unhealthy as asked (health=error)")
        return pb.Reply(message=b"OK")

    @unary
    def LoadModel(self, request: Any, context: Any) -> Any:
        """Train the n-gram model on the model file, after applying the test knobs."""
        self._enter()
        try:
            knobs = parse_knobs(request.Options)
        except KnobError as e:
            log(f"LoadModel refused: {e}")
            return pb.Result(success=False, message=str(e))
        self._control.ignore_sigterm = knobs.ignore_sigterm
        self._health = knobs.health
        if knobs.escape:
            _escape()
        if knobs.flood_mbps:
            self._start_flood(knobs.flood_mbps)
        if knobs.report_identity:
            log(f"identity: {json.dumps(identity(self._control.inherited_fds))}")
        path = model_path(request)
        log(f"loading {path or '(no file)'} (knobs: {_describe(knobs)})")
        with self._load_lock:
            started = time.monotonic()
            if knobs.load_delay > 0:
                time.sleep(knobs.load_delay)
            if knobs.crash_on_load is not None:
                _die(
                    f"crashing in LoadModel as asked (exit {knobs.crash_on_load})",
                    knobs.crash_on_load,
                )
            if knobs.hang_on_load:
                _forever("hanging in LoadModel as asked")
            if knobs.fail_load is not None:
                log(f"LoadModel failing as asked: {knobs.fail_load}")
                return pb.Result(success=False, message=knobs.fail_load)
            try:
                model = NgramModel.from_text(_read_model_text(path))
            except ValueError as e:
                message = str(e) if "model file" in str(e) else f"model file {path}: {e}"
                log(f"LoadModel failed: {message}")
                return pb.Result(success=False, message=message)
            ballast = allocate_touched(knobs.alloc_mb) if knobs.alloc_mb else None
            self._set_model(Loaded(model, path, knobs, ballast))
            elapsed = time.monotonic() - started
        summary = (
            f"{model.n_tokens} tokens, vocabulary {model.vocab_size}, "
            f"{model.n_trigram_contexts} trigram contexts"
        )
        log(
            f"loaded {path}: {summary} in {elapsed:.3f}s"
            + (f", holding {knobs.alloc_mb} MiB as asked" if ballast is not None else "")
        )
        return pb.Result(success=True, message=f"loaded {path}: {summary}")

    @unary
    def Predict(self, request: Any, context: Any) -> Any:
        """Generate a continuation of the prompt in one Reply."""
        self._enter()
        loaded = self._require_model()
        prompt, new_turn = self._prompt(request)
        with self._busy_scope(loaded):
            started = time.monotonic()
            n_prompt = len(tokenize(prompt))
            prompt_done = time.monotonic()
            text, n_tokens = loaded.model.generate_text(
                prompt, self._sampling(request), new_turn=new_turn
            )
            done = time.monotonic()
        if loaded.knobs.garbage:
            return pb.Reply(message=GARBAGE_TEXT, tokens=-7, prompt_tokens=-1)
        return pb.Reply(
            message=text.encode("utf-8"),
            tokens=n_tokens,
            prompt_tokens=n_prompt,
            timing_prompt_processing=(prompt_done - started) * 1000.0,
            timing_token_generation=(done - prompt_done) * 1000.0,
        )

    @streaming
    def PredictStream(self, request: Any, context: Any) -> Iterator[Any]:
        """Generate a continuation of the prompt, one Reply per token.

        With stop strings, text that may begin a stop string is held back, so a Reply can
        then carry several tokens (``Reply.tokens``) and no part of a stop string is sent.
        """
        self._enter()
        loaded = self._require_model()
        prompt, new_turn = self._prompt(request)
        n_prompt = len(tokenize(prompt))
        with self._busy_scope(loaded):
            sampling = self._sampling(request)
            for chunk in loaded.model.generate(prompt, sampling, new_turn=new_turn):
                self._enter()
                if not context.is_active():
                    return
                if loaded.knobs.garbage:  # a character split across replies, then junk
                    yield pb.Reply(message=b"\xc3", tokens=-1)
                    yield pb.Reply(message=GARBAGE_TEXT, tokens=2**31 - 1)
                    continue
                yield pb.Reply(
                    message=chunk.text.encode("utf-8"),
                    tokens=chunk.tokens,
                    prompt_tokens=n_prompt,
                )

    @unary
    def Embedding(self, request: Any, context: Any) -> Any:
        """Deterministic unit-length embedding of Prompt (or of Embeddings if Prompt is empty)."""
        self._enter()
        loaded = self._require_model()
        text = request.Prompt or request.Embeddings
        with self._busy_scope(loaded):
            vector = embed(text)
        if loaded.knobs.garbage:
            vector = [math.nan, math.inf, -math.inf, *vector[3:]]
        return pb.EmbeddingResult(embeddings=vector)

    @unary
    def TokenizeString(self, request: Any, context: Any) -> Any:
        """Token ids of Prompt in the model's vocabulary (unknown words: stable ids past it)."""
        self._enter()
        model = self._require_model().model
        ids = [model.token_id(t) for t in tokenize(request.Prompt)]
        if self._garbage():
            return pb.TokenizationResponse(length=-5, tokens=[-1, 2**31 - 1])
        return pb.TokenizationResponse(length=len(ids), tokens=ids)

    @unary
    def Status(self, request: Any, context: Any) -> Any:
        """READY / BUSY / UNINITIALIZED and memory use (RSS, model tables, ballast)."""
        self._enter()
        with self._lock:
            loaded, busy = self._loaded, self._busy
        breakdown = {
            "model_ngrams": loaded.model.approx_bytes if loaded else 0,
            "alloc": len(loaded.ballast) if loaded and loaded.ballast else 0,
        }
        if loaded is not None and loaded.knobs.garbage:
            return pb.StatusResponse(state=99, memory=pb.MemoryUsageData(total=2**64 - 1))
        return status_reply(loaded=loaded is not None, busy=busy, breakdown=breakdown)

    @unary
    def Free(self, request: Any, context: Any) -> Any:
        """Drop the model (and any ballast) and give the memory back as far as possible."""
        self._enter()
        had = self._loaded
        self._set_model(None)
        if had is None:
            return pb.Result(success=True, message="no model loaded")
        path, alloc = had.path, len(had.ballast) if had.ballast else 0
        del had
        release_memory()
        log(f"freed {path}" + (f" and {alloc // MIB} MiB" if alloc else ""))
        return pb.Result(success=True, message=f"freed {path}")
