"""The modeld daemon: composition root and lifecycle (start, serve, reload, stop).

Readiness is reported only once everything a client may touch works: the bus name is owned,
every model object is exported and the HTTP socket is served. Preloads (``preload = true``)
start after that, in the background: a slow or failing one never delays READY. Signal
handlers only set events; the main task does the work.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import psutil

from modeld import __version__
from modeld.coalesce import Coalescer
from modeld.config import Config, ConfigError, Layout, load_config, system_layout, user_layout
from modeld.errors import InvalidConfig, ModeldError
from modeld.metrics import Metrics
from modeld.naming import BUS_NAME
from modeld.supervisor.environment import default_backend_user

if TYPE_CHECKING:
    from modeld.bus.service import BusService
    from modeld.supervisor.registry import Supervisor
    from modeld.supervisor.status import StatusChange

log = logging.getLogger("modeld")

EXIT_CONFIG = 78
STATUS_USE_DELAY = 1.0
"""Seconds a STATUS= change from a model's use alone (ready <-> busy) may wait to be sent:
systemd hears of a burst of requests once, not twice per request."""
RESTART_JOBS = frozenset({"restart", "try-restart", "reload-or-restart"})


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="modeld",
        description="Supervise AI model backends.",
        epilog="See modeld(8), modeld.toml(5) and org.modeld1(5).",
    )
    parser.add_argument("--config", type=Path, default=None, help="configuration file")
    parser.add_argument(
        "--user",
        action="store_true",
        help="per-user mode: the session bus, the user's systemd manager and XDG directories",
    )
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning"])
    parser.add_argument("--version", action="version", version=f"modeld {__version__}")
    return parser.parse_args(argv)


class _JournalFormatter(logging.Formatter):
    """``<N>`` syslog priority prefixes; journald adds timestamps itself."""

    _PRIORITY: ClassVar[dict[str, int]] = {
        "DEBUG": 7,
        "INFO": 6,
        "WARNING": 4,
        "ERROR": 3,
        "CRITICAL": 2,
    }

    def format(self, record: logging.LogRecord) -> str:
        return f"<{self._PRIORITY.get(record.levelname, 6)}>{super().format(record)}"


def _setup_logging(level: str) -> None:
    """Under systemd: journald's native protocol (records carry ``MODELD_MODEL=``), with
    stderr as the fallback; otherwise stderr."""
    from modeld.system import journald
    from modeld.system.journal_logging import JournalHandler, stderr_is_journal

    stream = logging.StreamHandler(sys.stderr)
    handler: logging.Handler = stream
    if os.environ.get("JOURNAL_STREAM"):
        stream.setFormatter(_JournalFormatter("%(message)s"))
        if stderr_is_journal() and journald.available():
            handler = JournalHandler(stream)
            handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        stream.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler])
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def layout_for(args: argparse.Namespace) -> Layout:
    """The paths of the system instance, or of this user's (``--user``)."""
    return user_layout() if args.user else system_layout()


def read_config(path: Path | None, layout: Layout | None = None) -> Config:
    return load_config(path, host_memory=psutil.virtual_memory().total, layout=layout)


class Daemon:
    """Owns the long-lived parts and runs the lifecycle."""

    def __init__(self, args: argparse.Namespace, config: Config) -> None:
        from modeld.system.notify import Notifier

        self._args = args
        self._layout = layout_for(args)
        self._config = config
        self._notifier = Notifier()
        self._stop = asyncio.Event()
        self._reload_requested = asyncio.Event()
        self._reload_lock = asyncio.Lock()
        self._stopping = False
        """Set once modeld stops (under the reload lock): no reload may start after it."""
        self._tasks: set[asyncio.Task[None]] = set()
        self._supervisor: Supervisor | None = None
        self._service: BusService | None = None
        self._metrics = Metrics(memory_budget=config.daemon.memory_budget)
        self._status = Coalescer(self._send_status, STATUS_USE_DELAY)

    def _spawn(self, coro: object, name: str) -> None:
        task = asyncio.ensure_future(coro)  # type: ignore[call-overload]
        task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def run(self) -> int:
        from modeld.bus.connection import ModeldMessageBus
        from modeld.http.app import HttpServer
        from modeld.system.activation import bind_unix_socket, take_listen_sockets
        from modeld.system.dbus import BusType, NameFlag, RequestNameReply, connect
        from modeld.system.systemd import Systemd

        started = time.monotonic()
        per_user = self._layout.user
        sockets = take_listen_sockets()
        bus = await connect(ModeldMessageBus, BusType.SESSION if per_user else BusType.SYSTEM)
        systemd = Systemd(bus)
        await systemd.subscribe()
        if per_user:
            user = self._config.daemon.backend_user  # default: this user, the only one allowed
        else:
            user = default_backend_user(self._config.daemon.backend_user or None)
            if user is None:
                log.warning(
                    "backend user 'modeld' does not exist: backends run as modeld's own user"
                )
        from modeld.naming import SLICE
        from modeld.supervisor.footprints import state_directory
        from modeld.supervisor.registry import Supervisor
        from modeld.system.cgroup import CgroupLayout, memory_delegated
        from modeld.system.gpu import open_gpu_probe
        from modeld.system.journal_logging import set_unit_lookup

        manager_cgroup = (await systemd.manager_control_group()).rstrip("/")
        memory = not per_user or memory_delegated(manager_cgroup)
        if not memory:
            log.warning(
                "the memory controller is not delegated to the user manager (cgroup %s):"
                " memory limits (memory_max, memory_high, memory_budget) will not apply"
                " and memory use is not measured",
                manager_cgroup or "/",
            )
        gpu = await open_gpu_probe(log=log)
        supervisor = Supervisor(
            self._config,
            systemd,
            self,
            cgroups=CgroupLayout.detect(memory=memory),
            default_user=user,
            gpu=gpu,
            state_dir=state_directory(self._layout.state_dir),
            slice_cgroup=f"{manager_cgroup}/{SLICE}",
        )
        self._supervisor = supervisor
        set_unit_lookup(supervisor.unit_of)
        await supervisor.start()
        self._metrics.attach(supervisor)
        for problem in supervisor.backends.problems:
            log.warning("backend skipped: %s", problem)
        from modeld.bus.authorization import Authorizer
        from modeld.bus.service import BusService

        service = BusService(
            bus, supervisor, self.reload, authorizer=Authorizer(bus, own_user_only=per_user)
        )
        self._service = service
        service.sync_models()
        reply = await bus.request_name(BUS_NAME, NameFlag.DO_NOT_QUEUE)
        if reply not in (RequestNameReply.PRIMARY_OWNER, RequestNameReply.ALREADY_OWNER):
            log.error(
                "could not own %s on the bus (reply %s); is modeld already running?",
                BUS_NAME,
                reply,
            )
            await supervisor.shutdown()
            return 1
        if not sockets:
            path = self._config.daemon.runtime_dir / "api.sock"
            sockets = [bind_unix_socket(path, 0o600 if per_user else 0o666)]
        http = HttpServer(supervisor, metrics=self._metrics)
        await http.start(sockets)

        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self._stop.set)
        loop.add_signal_handler(signal.SIGINT, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, self._reload_requested.set)
        if os.environ.get("MODELD_TEST_BLOCK_ON_SIGUSR2") == "1":
            loop.add_signal_handler(signal.SIGUSR2, self._block_loop_for_tests)
        interval = self._notifier.watchdog_interval()
        if interval is not None:
            self._spawn(self._notifier.run_watchdog(interval), "watchdog")
        self._spawn(self._reload_on_sighup(), "sighup")

        self._notifier.ready(supervisor.status_line())
        log.info(
            "modeld %s ready in %.0f ms: %d models configured",
            __version__,
            (time.monotonic() - started) * 1000,
            len(self._config.models),
        )
        supervisor.preload()  # after re-adoption and READY: loads run in the background
        await self._stop.wait()
        async with self._reload_lock:  # a reload under way ends first; later ones are refused
            self._stopping = True

        restarting = await systemd.own_job_type() in RESTART_JOBS
        self._status.cancel()
        self._notifier.stopping()
        await http.stop()
        if restarting:
            log.info("restarting: backends keep running and will be re-adopted")
            await supervisor.detach()
        else:
            log.info("stopping: stopping all backends")
            await supervisor.shutdown()
        await gpu.close()
        for task in list(self._tasks):
            task.cancel()
        with contextlib.suppress(Exception):
            await bus.release_name(BUS_NAME)
        bus.disconnect()
        return 0

    def _block_loop_for_tests(self) -> None:
        log.warning("MODELD_TEST_BLOCK_ON_SIGUSR2: blocking the event loop")
        time.sleep(3600)

    async def _reload_on_sighup(self) -> None:
        while True:
            await self._reload_requested.wait()
            self._reload_requested.clear()
            with contextlib.suppress(ModeldError):
                await self.reload()

    async def reload(self) -> None:
        """Re-read the configuration; invalid configuration keeps the running one."""
        async with self._reload_lock:
            if self._stopping:
                raise ModeldError("modeld is stopping: the configuration is not reloaded")
            self._notifier.reloading()
            try:
                config = await asyncio.to_thread(read_config, self._args.config, self._layout)
            except ConfigError as err:
                log.error("reload refused, keeping the running configuration: %s", err)
                self._notifier.ready(f"reload failed: {err}")
                raise InvalidConfig(str(err)) from None
            assert self._supervisor is not None and self._service is not None
            added, removed = await self._supervisor.reload(config)
            previous, self._config = self._config, config
            self._service.sync_models()  # sends the properties the reload changed
            self._metrics.sync_models(config.models)
            self._metrics.memory_budget = config.daemon.memory_budget
            log.info(
                "configuration reloaded: %d models (%d added, %d removed)",
                len(config.models),
                len(added),
                len(removed),
            )
            self._supervisor.preload(previous)
            self._notifier.ready(self._supervisor.status_line())

    # ----------------------------------------------------- OwnerObserver (fan-out)

    def on_status_changed(self, change: StatusChange) -> None:
        self._metrics.on_status_changed(change)
        if self._service is not None:
            self._service.on_status_changed(change)
        if change.state_changed:
            if change.use_only:
                self._status.soon()
            else:
                self._status.now()

    def _send_status(self) -> None:
        if self._supervisor is not None:
            self._notifier.status(self._supervisor.status_line())

    def on_loaded(self, model: str) -> None:
        if self._service is not None:
            self._service.on_loaded(model)

    def on_unloaded(self, model: str, reason: str) -> None:
        log.info("model %s unloaded (%s)", model, reason)
        self._metrics.on_unloaded(model, reason)
        if self._service is not None:
            self._service.on_unloaded(model, reason)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    _setup_logging(args.log_level)
    try:
        config = read_config(args.config, layout_for(args))
    except ConfigError as err:
        log.error("invalid configuration: %s", err)
        return EXIT_CONFIG
    try:
        return asyncio.run(Daemon(args, config).run())
    except KeyboardInterrupt:
        return 130
