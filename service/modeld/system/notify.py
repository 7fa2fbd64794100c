"""sd_notify: readiness, status, reload, stop and watchdog pings to systemd."""

from __future__ import annotations

import asyncio
import logging
import os
import time

import sdnotify

log = logging.getLogger(__name__)


class Notifier:
    """Talks to $NOTIFY_SOCKET; does nothing when modeld is not run by systemd."""

    def __init__(self) -> None:
        self.enabled = bool(os.environ.get("NOTIFY_SOCKET"))
        self._notifier = sdnotify.SystemdNotifier() if self.enabled else None
        self._last_status = ""

    def _send(self, text: str) -> None:
        if self._notifier is not None:
            # sdnotify encodes as Latin-1; pass UTF-8 bytes through it unchanged so model
            # names outside Latin-1 reach systemd intact.
            self._notifier.notify(text.encode().decode("latin-1"))

    def ready(self, status: str) -> None:
        self._last_status = status
        self._send(f"READY=1\nSTATUS={status}")

    def status(self, status: str) -> None:
        if status != self._last_status:
            self._last_status = status
            self._send(f"STATUS={status}")

    def reloading(self) -> None:
        monotonic_us = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self._send(f"RELOADING=1\nMONOTONIC_USEC={monotonic_us}\nSTATUS=reloading configuration")

    def stopping(self) -> None:
        self._send("STOPPING=1\nSTATUS=stopping backends")

    def watchdog_interval(self) -> float | None:
        """Half of WATCHDOG_USEC when the watchdog is meant for this process, else None."""
        usec = os.environ.get("WATCHDOG_USEC")
        pid = os.environ.get("WATCHDOG_PID")
        if not usec or (pid and pid != str(os.getpid())):
            return None
        return int(usec) / 2_000_000

    async def run_watchdog(self, interval: float) -> None:
        """Ping from the event loop itself: a blocked loop stops the pings and systemd acts."""
        while True:
            self._send("WATCHDOG=1")
            await asyncio.sleep(interval)
