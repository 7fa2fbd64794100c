"""Memory pressure (PSI): reading pressure files and kernel-driven pressure triggers.

A PSI trigger is one file descriptor per trigger: the kernel wakes it (``EPOLLPRI``) when tasks
stalled on memory for ``stall_us`` within ``window_us``, at most once per window, and reports
``EPOLLERR`` once the cgroup is removed. Without CAP_SYS_RESOURCE the kernel (>= 6.5) only
accepts windows that are multiples of 2 s, and it evaluates such triggers in its 2 s averaging
worker: expect an event up to about 2 s after the stall threshold is crossed.

Two kernel details shape this module:

* The trigger string must be written NUL-terminated: the kernel overwrites the last byte
  written with ``\\0``, so ``"some 150000 2000000"`` without it becomes a 200 ms window.
* Unprivileged triggers can fire spuriously once or twice after creation: the kernel starts
  their window from a stale total (``group->total[PSI_POLL]`` instead of ``[PSI_AVGS]``; seen
  on 6.18, fix proposed upstream as "psi: Fix avg trigger being fired unexpectedly"), so the
  first stall of any size after creation looks like the whole stall history since boot.
  Every event is therefore checked against the file's own ``total``: it counts only if at
  least ``stall_us`` of stall accrued since the previous event (or since creation).
* The PSI poll function always reports ``EPOLLIN | EPOLLOUT``, so ``loop.add_reader(fd)`` would
  spin. The fd goes into an inner epoll registered for ``EPOLLPRI`` and the loop watches that
  epoll instead. Polling the trigger also consumes its event: the loop's readiness check of
  the inner epoll already takes it, so the inner ``poll(0)`` then usually returns nothing.
  Readiness of the inner epoll is itself the event.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import select
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from modeld.system.cgroup import CGROUP_ROOT, is_unified

log = logging.getLogger(__name__)

UNPRIVILEGED_WINDOW_US = 2_000_000
"""Without CAP_SYS_RESOURCE trigger windows must be multiples of this."""


@dataclass(frozen=True, slots=True)
class PressureReading:
    """One reading of a PSI file (percentages of wall time over the last 10 s)."""

    some_avg10: float
    full_avg10: float
    some_total_us: int
    full_total_us: int = 0


def parse_pressure(text: str) -> PressureReading | None:
    """Parse the text of a PSI file; None unless it has a well-formed ``some`` line.

    A missing ``full`` line (system-wide CPU pressure on older kernels) reads as 0.
    """
    lines: dict[str, dict[str, str]] = {}
    for line in text.splitlines():
        kind, _, rest = line.partition(" ")
        fields = dict(field.partition("=")[::2] for field in rest.split())
        lines[kind] = fields
    try:
        some = lines["some"]
        full = lines.get("full", {})
        return PressureReading(
            some_avg10=float(some["avg10"]),
            full_avg10=float(full.get("avg10", "0")),
            some_total_us=int(some["total"]),
            full_total_us=int(full.get("total", "0")),
        )
    except (KeyError, ValueError):
        return None


def read_pressure(path: Path) -> PressureReading | None:
    """Read and parse a PSI file; None when it is missing, unreadable or malformed."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError):
        return None
    return parse_pressure(text)


def pressure_file(
    control_group: str,
    *,
    cgroup_root: Path = CGROUP_ROOT,
    proc_file: Path = Path("/proc/pressure/memory"),
) -> Path | None:
    """The memory PSI file to watch for ``control_group`` (e.g. ``/modeld.slice``).

    cgroup v2 (:func:`~modeld.system.cgroup.is_unified`): the cgroup's ``memory.pressure``.
    Hybrid hosts: PSI is accounted on the v2 hierarchy whatever hierarchy the memory controller
    is on, so ``cgroup_root/unified/<control_group>/memory.pressure`` is used when it exists.
    Otherwise the system-wide ``proc_file``; None when there is no PSI at all (feature off).
    """
    relative = control_group.strip("/")
    if is_unified(cgroup_root):
        candidate = cgroup_root / relative / "memory.pressure"
    else:
        candidate = cgroup_root / "unified" / relative / "memory.pressure"
    if candidate.exists():
        return candidate
    if proc_file.exists():
        return proc_file
    return None


class PriReader:
    """Calls ``callback(events)`` on the running loop when ``fd`` reports ``mask``.

    ``fd`` sits in an inner epoll registered for ``mask`` (``EPOLLERR``/``EPOLLHUP`` are always
    reported) and the loop watches the inner epoll, so descriptors that are always readable
    (PSI triggers) do not wake the loop. ``events`` is what the inner epoll returned, 0 when
    the loop's readiness check already consumed a one-shot event (PSI does that). The
    callback must clear level-triggered conditions (read an eventfd...) or ``close()``.
    Does not own ``fd``.
    """

    def __init__(
        self, fd: int, callback: Callable[[int], None], *, mask: int = select.EPOLLPRI
    ) -> None:
        self._callback = callback
        self._epoll: select.epoll | None = select.epoll()
        try:
            self._epoll.register(fd, mask)
            self._loop = asyncio.get_running_loop()
            self._loop.add_reader(self._epoll.fileno(), self._on_ready)
        except BaseException:
            self._epoll.close()
            self._epoll = None
            raise

    def _on_ready(self) -> None:
        if self._epoll is None:
            return
        events = 0
        for _fd, mask in self._epoll.poll(0):
            events |= mask
        self._callback(events)

    @property
    def closed(self) -> bool:
        return self._epoll is None

    def close(self) -> None:
        """Stop watching (idempotent)."""
        if self._epoll is not None:
            with contextlib.suppress(RuntimeError):  # loop already closed
                self._loop.remove_reader(self._epoll.fileno())
            self._epoll.close()
            self._epoll = None


def _round_up_window(window_us: int) -> int:
    return -(-window_us // UNPRIVILEGED_WINDOW_US) * UNPRIVILEGED_WINDOW_US


class PressureTrigger:
    """A PSI trigger on ``path``: calls ``on_pressure()`` (on the event loop) each time the
    kernel reports that some tasks stalled on memory for ``stall_us`` within ``window_us``.

    Registered with EPOLLPRI through a nested epoll (see the module docstring); must be
    created on the running loop. Raises OSError if the trigger cannot be registered. A window
    refused with EINVAL/EPERM that is not a multiple of 2 s is retried once rounded up to the
    next multiple (stall scaled proportionally); ``stall_us`` and ``window_us`` hold the
    values in effect. Kernel events not backed by ``stall_us`` of stall growth since the
    previous event (see the module docstring) are dropped and counted in ``ignored_events``.
    When the cgroup goes away the trigger closes itself and calls ``on_gone()``.
    """

    def __init__(
        self,
        path: Path,
        *,
        stall_us: int,
        window_us: int,
        on_pressure: Callable[[], None],
        on_gone: Callable[[], None] | None = None,
    ) -> None:
        self.path = path
        self.stall_us = stall_us
        self.window_us = window_us
        self._on_pressure = on_pressure
        self._on_gone = on_gone
        self.ignored_events = 0
        """Kernel events dropped because the stall total did not grow by ``stall_us``."""
        self._last_total = self._stall_total()
        self._fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            self._register()
            self._reader: PriReader | None = PriReader(self._fd, self._on_events)
        except BaseException:
            os.close(self._fd)
            self._fd = -1
            raise

    def _write(self, stall_us: int, window_us: int) -> None:
        os.write(self._fd, f"some {stall_us} {window_us}\0".encode())

    def _register(self) -> None:
        try:
            self._write(self.stall_us, self.window_us)
        except OSError as err:
            refused = err.errno in (errno.EINVAL, errno.EPERM)
            if not refused or self.window_us % UNPRIVILEGED_WINDOW_US == 0:
                raise
            window = _round_up_window(self.window_us)
            stall = min(window, self.stall_us * window // self.window_us)
            log.debug(
                "%s refused a %d us window (%s); using %d us",
                self.path,
                self.window_us,
                err,
                window,
            )
            self._write(stall, window)
            self.stall_us, self.window_us = stall, window

    def _on_events(self, events: int) -> None:
        if events & (select.EPOLLERR | select.EPOLLHUP):
            self.close()
            if self._on_gone is not None:
                self._on_gone()
            return
        total, previous = self._stall_total(), self._last_total
        self._last_total = total
        if total is not None and previous is not None and total - previous < self.stall_us:
            self.ignored_events += 1
            log.debug("%s: ignoring an event after %d us of stall", self.path, total - previous)
            return
        self._on_pressure()

    def _stall_total(self) -> int | None:
        reading = read_pressure(self.path)
        if reading is None:
            return None
        return reading.some_total_us

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def close(self) -> None:
        """Unregister the trigger (idempotent)."""
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
