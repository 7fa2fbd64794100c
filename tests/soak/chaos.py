"""A chaos soak of a real modeld in the sandbox (issue 8, item 4).

Concurrent random loads, unloads, pins, reloads and requests through the front door, with
faults injected: ``kill -9`` of backends, memory hogs in backend scopes (OOM kills),
``systemctl restart modeld`` and ``kill -9`` of modeld. Invariants are checked all along:

- from modeld's signals, in the order its owners committed them: a pinned model is never
  evicted, a model with requests or leases in flight is never evicted;
- from ListModels snapshots (one call: one consistent view): the cap and the concurrency
  groups hold;
- at every quiet point (workers paused, everything unloaded) and at the end: no scope,
  backend process or socket without a model, every model's state matches systemd's;
- every request gets an answer or a clean OpenAI-shaped error; a backend error (502) or a
  cut connection only where a fault explains it.

At the end modeld's fd count and RSS must be back within a small bound of a baseline. The
run's numbers come back as a dict (printed as JSON by the test). The random schedule uses a
seeded RNG and short pauses between operations (load generation); assertions wait on events.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from dbus_next import Variant
from dbus_next.aio.message_bus import MessageBus
from dbus_next.constants import MessageType
from dbus_next.message import Message
from sandbox.deploy import Modeld, reference_model

MAX_LOADED = 3
SOAK_MODELS = ("m0", "m1", "m2", "m3", "m4", "m5")
GROUPED = ("m4", "m5")
READOPT_MODELS = tuple(f"m{i}" for i in range(17) if f"m{i}" != "m4")
"""16 models that may all be loaded at once (m4 shares a group with m5)."""
EVICTIONS = {"lru", "group", "memory", "gpu-memory", "pressure", "idle", "busy-timeout"}
LIVE = {"loading", "ready", "busy"}
FD_SLACK = 8
RSS_SLACK = 24 * 1024 * 1024
CALL_TIMEOUT = 120.0
CRASH_NOTICE = 2.0
"""A request begun this soon after its backend was killed may still have been sent to it
(modeld notices a crash in tens of ms; the kill itself takes a moment through nsenter)."""


def soak_models() -> dict[str, str]:
    """The models of the soak: 16 small ones (m4 and m5 share a group) and a memory hog."""
    models = {}
    for name in sorted({*READOPT_MODELS, *SOAK_MODELS}):
        extra = 'concurrency_groups = ["g"]\n' if name in GROUPED else ""
        options = ("predict_delay=0.05",) if name in SOAK_MODELS[:4] else ()
        models[name] = reference_model(memory_max="160M", options=options, extra=extra)
    models["hog"] = hog_model(0)
    return models


def hog_model(generation: int) -> str:
    """A model that allocates past its memory limit while loading (an OOM kill). Each
    generation differs in a comment: a changed file starts its failure cooldown over."""
    return reference_model(memory_max="64M", options=("alloc_mb=256",)) + f"# {generation}\n"


DAEMON = (
    f"max_loaded = {MAX_LOADED}\n"
    'load_stall_timeout = "20s"\nstop_timeout = "3s"\nrequest_timeout = "90s"\n'
    "eviction_retries = 60\n"
)


@dataclass
class Stats:
    operations: Counter[str] = field(default_factory=Counter)
    faults: Counter[str] = field(default_factory=Counter)
    outcomes: Counter[str] = field(default_factory=Counter)
    violations: list[str] = field(default_factory=list)
    leaks: list[str] = field(default_factory=list)
    crash_detection_s: list[float] = field(default_factory=list)
    quiet_checks: int = 0
    snapshots: int = 0
    readopt: dict[str, Any] = field(default_factory=dict)
    resources: dict[str, Any] = field(default_factory=dict)

    def violation(self, text: str) -> None:
        self.violations.append(text)

    def report(self, seconds: float, seed: int) -> dict[str, Any]:
        latencies = sorted(self.crash_detection_s)
        return {
            "seconds": round(seconds, 1),
            "seed": seed,
            "operations": dict(sorted(self.operations.items())),
            "operations_total": sum(self.operations.values()),
            "faults_injected": dict(sorted(self.faults.items())),
            "outcomes": dict(sorted(self.outcomes.items())),
            "invariant_violations": len(self.violations),
            "violations": self.violations[:50],
            "leaks": self.leaks,
            "quiet_point_checks": self.quiet_checks,
            "state_snapshots_checked": self.snapshots,
            "crash_detection_latency_s": {
                "count": len(latencies),
                "median": round(statistics.median(latencies), 4) if latencies else None,
                "max": round(latencies[-1], 4) if latencies else None,
            },
            "readoption_16_backends": self.readopt,
            "modeld_resources": self.resources,
        }


class Chaos:
    """One soak run against ``modeld`` (deployed with :func:`soak_models` and DAEMON)."""

    def __init__(self, modeld: Modeld, seconds: float, seed: int) -> None:
        self.modeld = modeld
        self.sb = modeld.sandbox
        self.seconds = seconds
        self.rng = random.Random(seed)
        self.seed = seed
        self.stats = Stats()
        self.bus: MessageBus | None = None
        self.pinned: dict[str, bool] = {}
        self.in_flight: dict[str, int] = {}
        self.running = asyncio.Event()
        self.stop = asyncio.Event()
        self.busy_ops = 0
        self.idle = asyncio.Event()
        self.modeld_epoch = 0
        """Incremented as modeld's restart or kill starts and again when it is back (odd:
        in progress): a call spanning one may be lost, and is excused."""
        self.windows: dict[int, str] = {}
        """What each odd epoch was: "restart" or "kill"."""
        self.backend_kills: dict[str, float] = {}
        """When each model's backend was last killed (monotonic)."""
        self.crash_waiters: dict[str, asyncio.Future[float]] = {}
        self.owner_changed = asyncio.Event()
        self.hog_generation = 0
        self.resource_epoch = -1
        self.resource_base: dict[str, int] = {}
        """modeld's fds and RSS at the first quiet point of its current process."""

    # ---------------------------------------------------------------- D-Bus plumbing

    async def call(
        self,
        member: str,
        signature: str = "",
        body: list[Any] | None = None,
        *,
        path: str = "/org/modeld1",
        interface: str = "org.modeld1.Manager",
        destination: str = "org.modeld1",
    ) -> Message:
        assert self.bus is not None
        message = Message(
            destination=destination,
            path=path,
            interface=interface,
            member=member,
            signature=signature,
            body=body or [],
        )
        reply = await asyncio.wait_for(self.bus.call(message), CALL_TIMEOUT)
        assert reply is not None
        return reply

    async def subscribe(self) -> None:
        assert self.bus is not None
        self.bus.add_message_handler(self.on_message)
        for rule in (
            "type='signal',sender='org.modeld1'",
            "type='signal',sender='org.freedesktop.DBus',member='NameOwnerChanged',"
            "arg0='org.modeld1'",
        ):
            await self.call(
                "AddMatch",
                "s",
                [rule],
                path="/org/freedesktop/DBus",
                interface="org.freedesktop.DBus",
                destination="org.freedesktop.DBus",
            )

    def on_message(self, msg: Message) -> None:
        if msg.message_type is not MessageType.SIGNAL:
            return
        if msg.member == "NameOwnerChanged":
            if msg.body[2]:
                self.owner_changed.set()
            return
        if (
            msg.member == "PropertiesChanged"
            and msg.path
            and msg.path.startswith("/org/modeld1/model/")
        ):
            name = msg.path.rsplit("/", 1)[1]
            changed = msg.body[1]
            if "Pinned" in changed:
                self.pinned[name] = bool(changed["Pinned"].value)
            if "InFlight" in changed:
                self.in_flight[name] = int(changed["InFlight"].value)
            return
        if msg.member == "ModelUnloaded":
            name, path, reason = msg.body
            key = path.rsplit("/", 1)[1]
            self.stats.outcomes[f"unloaded:{reason}"] += 1
            if reason in EVICTIONS:
                if self.pinned.get(key):
                    self.stats.violation(f"pinned model {name} evicted ({reason})")
                if self.in_flight.get(key, 0) > 0:
                    self.stats.violation(
                        f"{name} evicted ({reason}) with {self.in_flight[key]} in flight"
                    )
            waiter = self.crash_waiters.pop(name, None)
            if waiter is not None and not waiter.done() and reason in ("crashed", "oom"):
                waiter.set_result(time.monotonic())

    async def list_models(self) -> dict[str, str]:
        reply = await self.call("ListModels")
        if reply.message_type is not MessageType.METHOD_RETURN:
            return {}
        return {name: state for name, state, _backend, _path in reply.body[0]}

    async def prop(self, name: str, prop: str) -> Any:
        from modeld.naming import model_object_path

        reply = await self.call(
            "Get",
            "ss",
            ["org.modeld1.Model", prop],
            path=model_object_path(name),
            interface="org.freedesktop.DBus.Properties",
        )
        if reply.message_type is not MessageType.METHOD_RETURN:
            return None
        return reply.body[0].value

    def expect_reply(self, op: str, reply: Message, epoch: int, allowed: set[str]) -> None:
        """Count the outcome; an error outside ``allowed`` is a violation unless modeld was
        restarted meanwhile (the call may then be lost)."""
        if reply.message_type is MessageType.METHOD_RETURN:
            self.stats.outcomes[f"{op}:ok"] += 1
            return
        error = reply.error_name or "?"
        short = error.rsplit(".", 1)[1]
        self.stats.outcomes[f"{op}:{short}"] += 1
        if error in allowed:
            return
        if self.spans_window(epoch) and error.startswith("org.freedesktop.DBus.Error."):
            return
        text = reply.body[0] if reply.body else ""
        self.stats.violation(f"{op}: unexpected {error}: {text}")

    def spans_window(self, epoch: int) -> str:
        """The kind of restart (``kill`` wins) a call begun at ``epoch`` overlapped, or ""."""
        kinds = {self.windows[e] for e in range(epoch, self.modeld_epoch + 1) if e in self.windows}
        return "kill" if "kill" in kinds else kinds.pop() if kinds else ""

    # ------------------------------------------------------------------- operations

    @contextlib.asynccontextmanager
    async def operation(self, kind: str) -> Any:
        await self.running.wait()
        self.busy_ops += 1
        self.idle.clear()
        self.stats.operations[kind] += 1
        try:
            yield
        finally:
            self.busy_ops -= 1
            if self.busy_ops == 0:
                self.idle.set()

    async def op_load(self) -> None:
        name = self.rng.choice(SOAK_MODELS)
        async with self.operation("load"):
            epoch = self.modeld_epoch
            reply = await self.call("Load", "sa{sv}", [name, {"wait": Variant("b", True)}])
            self.expect_reply(
                "load",
                reply,
                epoch,
                {
                    "org.modeld1.Error.Busy",
                    "org.modeld1.Error.InsufficientResources",
                    "org.modeld1.Error.LoadFailed",  # cut by an unload or a kill
                },
            )

    async def op_unload(self) -> None:
        name = self.rng.choice(SOAK_MODELS)
        force = self.rng.random() < 0.3
        async with self.operation("unload"):
            epoch = self.modeld_epoch
            options = {"force": Variant("b", True)} if force else {}
            reply = await self.call("Unload", "sa{sv}", [name, options])
            self.expect_reply("unload", reply, epoch, {"org.modeld1.Error.Busy"})

    async def op_pin(self) -> None:
        from modeld.naming import model_object_path

        name = self.rng.choice(SOAK_MODELS)
        pin = self.rng.random() < 0.4
        async with self.operation("pin" if pin else "unpin"):
            epoch = self.modeld_epoch
            reply = await self.call(
                "SetPinned",
                "b",
                [pin],
                path=model_object_path(name),
                interface="org.modeld1.Model",
            )
            self.expect_reply("pin", reply, epoch, set())

    async def op_reload(self) -> None:
        async with self.operation("reload"):
            epoch = self.modeld_epoch
            self.expect_reply("reload", await self.call("Reload"), epoch, set())

    async def op_kill_backend(self) -> None:
        states = await self.list_models()
        loaded = [n for n in SOAK_MODELS if states.get(n) in ("ready", "busy")]
        if not loaded:
            return
        name = self.rng.choice(loaded)
        async with self.operation("kill_backend"):
            pid = await self.prop(name, "MainPID")
            if not pid:
                return
            waiter: asyncio.Future[float] = asyncio.get_running_loop().create_future()
            self.crash_waiters[name] = waiter
            self.backend_kills[name] = killed = time.monotonic()
            proc = await asyncio.to_thread(self.sb.exec, "kill", "-9", str(pid), check=False)
            if proc.returncode != 0:  # it went away meanwhile (unloaded, evicted)
                self.crash_waiters.pop(name, None)
                return
            self.stats.faults["kill -9 backend"] += 1
            try:
                seen = await asyncio.wait_for(waiter, 30)
                self.stats.crash_detection_s.append(seen - killed)
            except TimeoutError:
                state = await self.prop(name, "State")
                if state in ("ready", "busy") and await self.prop(name, "MainPID") == pid:
                    self.stats.violation(f"kill -9 of {name}'s backend {pid} not noticed")

    async def op_hog(self) -> None:
        async with self.operation("memory_hog"):
            self.hog_generation += 1
            (self.modeld.models_dir / "hog.toml").write_text(hog_model(self.hog_generation))
            epoch = self.modeld_epoch
            self.expect_reply("reload", await self.call("Reload"), epoch, set())
            reply = await self.call("Load", "sa{sv}", ["hog", {"wait": Variant("b", True)}])
            self.stats.faults["memory hog (alloc over memory_max)"] += 1
            if reply.message_type is MessageType.METHOD_RETURN:
                self.stats.violation("the memory hog loaded")
                return
            text = reply.body[0] if reply.body else ""
            if "exceeding its memory limit" in text or "SIGKILL" in text:
                self.stats.outcomes["hog:oom-killed"] += 1
            else:
                self.expect_reply(
                    "hog",
                    reply,
                    epoch,
                    {"org.modeld1.Error.Busy", "org.modeld1.Error.InsufficientResources"},
                )

    async def op_restart_modeld(self, *, kill: bool) -> None:
        async with self.operation("kill -9 modeld" if kill else "restart modeld"):
            self.modeld_epoch += 1
            self.windows[self.modeld_epoch] = "kill" if kill else "restart"
            self.owner_changed.clear()
            if kill:
                self.stats.faults["kill -9 modeld"] += 1
                await asyncio.to_thread(
                    self.sb.systemctl, "kill", "--signal=SIGKILL", "modeld.service"
                )
                await asyncio.wait_for(self.owner_changed.wait(), 60)
            else:
                self.stats.faults["systemctl restart modeld"] += 1
                await asyncio.to_thread(self.sb.systemctl, "restart", "modeld.service")
            self.pinned.clear()  # a new modeld starts from the configuration
            self.in_flight.clear()
            self.modeld_epoch += 1

    async def request(self) -> None:
        name = self.rng.choice(SOAK_MODELS)
        stream = self.rng.random() < 0.3
        body = {"model": name, "prompt": "The sea", "max_tokens": 4, "stream": stream}
        async with self.operation("request"):
            epoch = self.modeld_epoch
            started = time.monotonic()
            try:
                status, payload = await asyncio.wait_for(http_post(self.modeld, body), 180)
            except (OSError, asyncio.IncompleteReadError, ValueError, TimeoutError) as err:
                window = self.spans_window(epoch)
                self.stats.outcomes[f"request:{type(err).__name__}:{window or 'no-fault'}"] += 1
                if window != "kill":
                    self.stats.violation(f"request to {name} got no answer ({window}): {err!r}")
                return
            error = error_shape(payload) if status != 200 else None
            code = f":{error['code']}" if error else ""
            self.stats.outcomes[f"request:{status}{code}"] += 1
            if status == 200:
                if stream and "[DONE]" not in payload and '"error"' not in payload:
                    window = self.spans_window(epoch)
                    self.stats.outcomes[f"request:stream-cut:{window or 'no-fault'}"] += 1
                    if window != "kill":
                        self.stats.violation(
                            f"stream of {name} ended without [DONE] ({window}): {payload!r}"
                        )
                return
            killed = self.backend_kills.get(name, 0.0) >= started - CRASH_NOTICE
            excused = status in (429, 503) or (
                status == 502 and (self.spans_window(epoch) or killed)
            )
            if error is None:
                self.stats.violation(f"request to {name}: {status} not OpenAI-shaped: {payload!r}")
            elif not excused:
                self.stats.violation(f"request to {name}: {status} {payload[:300]!r}")

    # ------------------------------------------------------------------ checkers

    async def watch_snapshots(self) -> None:
        """The cap and the groups hold in every ListModels snapshot."""
        while not self.stop.is_set():
            with contextlib.suppress(Exception):
                states = await self.list_models()
                if states:
                    self.stats.snapshots += 1
                    live = sorted(n for n, s in states.items() if s in LIVE)
                    if len(live) > MAX_LOADED:
                        self.stats.violation(f"cap {MAX_LOADED} exceeded: {live}")
                    if all(states.get(n) in LIVE for n in GROUPED):
                        self.stats.violation(f"group g: both {GROUPED} live")
            await asyncio.sleep(0.25)

    async def quiet_point(self) -> None:
        """Pause the workers, unload everything, check modeld against systemd."""
        self.running.clear()
        if self.busy_ops:
            await asyncio.wait_for(self.idle.wait(), 300)
        for name in [*SOAK_MODELS, "hog"]:
            await self.call("Unload", "sa{sv}", [name, {"force": Variant("b", True)}])
        self.stats.quiet_checks += 1
        problems = await asyncio.to_thread(leftovers, self.modeld)
        self.stats.violations.extend(f"quiet point: {p}" for p in problems)
        if self.resource_epoch != self.modeld_epoch:  # the first quiet point of this modeld
            self.resource_epoch = self.modeld_epoch
            self.resource_base = await asyncio.to_thread(resources, self.modeld)
        self.running.set()

    # ----------------------------------------------------------------------- runs

    async def worker(self, chooser: Any) -> None:
        while not self.stop.is_set():
            await self.running.wait()
            if self.stop.is_set():
                return
            await chooser()
            await asyncio.sleep(self.rng.uniform(0.0, 0.15))

    async def control(self) -> None:
        ops = [
            (self.op_load, 30),
            (self.op_unload, 15),
            (self.op_pin, 12),
            (self.op_kill_backend, 10),
            (self.op_reload, 4),
            (self.op_hog, 3),
        ]
        functions = [op for op, _ in ops]
        weights = [w for _, w in ops]
        await self.rng.choices(functions, weights)[0]()

    async def run_soak(self) -> None:
        self.running.set()
        deadline = time.monotonic() + self.seconds
        faults = [
            (0.25, lambda: self.op_restart_modeld(kill=False)),
            (0.5, lambda: self.op_restart_modeld(kill=True)),
            (0.7, self.op_hog),
        ]
        extra_restarts = max(0, int(self.seconds // 600))  # an hour: six more of each
        for i in range(extra_restarts):
            faults.append(
                ((i + 0.6) / (extra_restarts + 1), lambda: self.op_restart_modeld(kill=True))
            )
            faults.append(
                ((i + 0.3) / (extra_restarts + 1), lambda: self.op_restart_modeld(kill=False))
            )
        faults.sort(key=lambda f: f[0])
        workers = [
            asyncio.create_task(self.worker(self.control)),
            asyncio.create_task(self.worker(self.control)),
            *(asyncio.create_task(self.worker(self.request)) for _ in range(3)),
        ]
        watcher = asyncio.create_task(self.watch_snapshots())
        start = time.monotonic()
        next_quiet = start + max(20.0, self.seconds / 4)
        try:
            while time.monotonic() < deadline:
                await asyncio.sleep(0.5)
                elapsed = (time.monotonic() - start) / self.seconds
                while faults and faults[0][0] <= elapsed:
                    await faults.pop(0)[1]()
                if time.monotonic() >= next_quiet and time.monotonic() + 10 < deadline:
                    await self.quiet_point()
                    next_quiet = time.monotonic() + max(20.0, self.seconds / 4)
                for task in workers:
                    if task.done() and task.exception() is not None:
                        raise task.exception()  # type: ignore[misc]
        finally:
            self.stop.set()
            self.running.set()
            await asyncio.gather(*workers, return_exceptions=True)
            watcher.cancel()
        self.running.set()
        await self.quiet_point()

    async def readoption(self) -> None:
        """16 backends, then a restart and a kill -9 of modeld: how long until all 16 are
        back (same processes), and modeld's own figure (its "ready in" line)."""
        reply = await self.call(
            "Set",
            "ssv",
            ["org.modeld1.Manager", "MaxLoaded", Variant("u", 0)],
            interface="org.freedesktop.DBus.Properties",
        )
        assert reply.message_type is MessageType.METHOD_RETURN, reply.body
        replies = await asyncio.gather(
            *(
                self.call("Load", "sa{sv}", [name, {"wait": Variant("b", True)}])
                for name in READOPT_MODELS
            )
        )
        failed = [r.body for r in replies if r.message_type is not MessageType.METHOD_RETURN]
        assert not failed, failed
        pids = {name: await self.prop(name, "MainPID") for name in READOPT_MODELS}
        results: dict[str, Any] = {"backends": len(pids)}

        for kind in ("restart", "kill -9"):
            before = len(self.sb.journal(unit="modeld.service"))
            self.owner_changed.clear()
            started = time.monotonic()
            if kind == "restart":
                await asyncio.to_thread(self.sb.systemctl, "restart", "modeld.service")
            else:
                await asyncio.to_thread(
                    self.sb.systemctl, "kill", "--signal=SIGKILL", "modeld.service"
                )
            await asyncio.wait_for(self.owner_changed.wait(), 60)
            elapsed = time.monotonic() - started
            states = await self.list_models()
            back = [n for n in READOPT_MODELS if states.get(n) == "ready"]
            same = [n for n in back if await self.prop(n, "MainPID") == pids[n]]
            journal = self.sb.journal(unit="modeld.service")[before:]
            ready_ms = [
                float(line.split(" ready in ")[1].split(" ms")[0])
                for line in journal.splitlines()
                if " ready in " in line
            ]
            results[kind] = {
                "until_on_the_bus_s": round(elapsed, 3),
                "modeld_ready_in_ms": ready_ms[-1] if ready_ms else None,
                "readopted": len(same),
            }
            if len(same) != len(READOPT_MODELS):
                self.stats.violation(f"after {kind}: re-adopted {len(same)} of 16 ({back})")
        results["kill -9"]["includes_restart_sec_s"] = 1.0
        self.stats.readopt = results
        self.stats.faults["systemctl restart modeld"] += 1
        self.stats.faults["kill -9 modeld"] += 1
        self.expect_reply("reload", await self.call("Reload"), 0, set())  # MaxLoaded back to 3
        for name in READOPT_MODELS:
            await self.call("Unload", "sa{sv}", [name, {"force": Variant("b", True)}])
        self.stats.violations.extend(
            f"after re-adoption: {p}" for p in await asyncio.to_thread(leftovers, self.modeld)
        )

    async def main(self) -> dict[str, Any]:
        from busclient import connect

        started = time.monotonic()
        async with connect(self.sb.bus_address) as bus:
            self.bus = bus
            await self.subscribe()
            baseline = await asyncio.to_thread(resources, self.modeld)
            await self.readoption()
            await self.quiet_point()
            first = await asyncio.to_thread(resources, self.modeld)
            epoch = self.modeld_epoch
            await self.run_soak()
            end = await asyncio.to_thread(resources, self.modeld)
            same_process = self.resource_base
            self.stats.resources = {
                "before_readoption": baseline,
                "start_of_soak": first,
                "first_quiet_point_of_last_modeld": same_process,
                "end": end,
                "restarted_during_soak": epoch != self.modeld_epoch,
                "fd_slack": FD_SLACK,
                "rss_slack_bytes": RSS_SLACK,
            }
            self.stats.leaks.extend(resource_leaks(first, end))
            if same_process.get("pid") == end["pid"]:
                self.stats.leaks.extend(
                    f"same process: {leak}" for leak in resource_leaks(same_process, end)
                )
        return self.stats.report(time.monotonic() - started, self.seed)


# ------------------------------------------------------------------------ helpers


async def http_post(modeld: Modeld, body: dict[str, Any]) -> tuple[int, str]:
    """POST /v1/completions over the front door; (status, body text)."""
    payload = json.dumps(body).encode()
    reader, writer = await asyncio.open_unix_connection(str(modeld.api_socket))
    try:
        writer.write(
            b"POST /v1/completions HTTP/1.0\r\nHost: modeld\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(payload)}\r\n\r\n".encode()
            + payload
        )
        await writer.drain()
        data = await reader.read()
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
    head, _, rest = data.partition(b"\r\n\r\n")
    if not head:
        raise ValueError("empty response")
    return int(head.split()[1]), rest.decode("utf-8", "replace")


def error_shape(payload: str) -> dict[str, Any] | None:
    """The error object if ``payload`` is OpenAI's error shape, else None."""
    with contextlib.suppress(ValueError):
        body = json.loads(payload)
        error = body.get("error") if isinstance(body, dict) else None
        if isinstance(error, dict) and {"message", "type", "param", "code"} <= set(error):
            return error
    return None


def leftovers(modeld: Modeld) -> list[str]:
    """With every model unloaded: scopes, backend processes, sockets, and disagreements."""
    problems = []
    try:
        modeld.assert_consistent()
    except AssertionError as err:
        problems.append(f"inconsistent with systemd: {err}")
    problems += [f"scope {s}" for s in modeld.scopes()]
    problems += [f"process {p}" for p in modeld.backend_processes()]
    problems += [f"socket {s}" for s in modeld.backend_sockets()]
    return problems


def resources(modeld: Modeld) -> dict[str, int]:
    """modeld's open fds and RSS (bytes), read in the sandbox."""
    pid = modeld.main_pid()
    fds = modeld.sandbox.exec("ls", f"/proc/{pid}/fd").stdout.split()
    status = modeld.sandbox.exec("cat", f"/proc/{pid}/status").stdout
    rss = next(
        int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmRSS:")
    )
    return {"pid": pid, "fds": len(fds), "rss": rss}


def resource_leaks(first: dict[str, int], end: dict[str, int]) -> list[str]:
    leaks = []
    if end["fds"] > first["fds"] + FD_SLACK:
        leaks.append(f"fds {first['fds']} -> {end['fds']}")
    if end["rss"] > first["rss"] + RSS_SLACK:
        leaks.append(f"rss {first['rss'] >> 20} MiB -> {end['rss'] >> 20} MiB")
    return leaks
