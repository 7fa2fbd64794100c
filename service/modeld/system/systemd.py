"""Client of systemd's manager over D-Bus: transient scopes and their jobs.

Waiting for a job is race-free: the JobRemoved match and ``Subscribe()`` are installed once,
before any job is started, and results that arrive before their waiter (dbus-next may
dispatch the signal in the same read batch as the method reply) are kept in ``_early``.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from modeld.errors import SystemdError
from modeld.naming import bus_path_escape
from modeld.system.dbus import (
    DBUS_INTERFACE,
    DBUS_NAME,
    DBUS_PATH,
    PROPERTIES_INTERFACE,
    DBusError,
    Message,
    MessageBus,
    MessageType,
    Variant,
    call,
    call_no_reply,
)

log = logging.getLogger(__name__)

SYSTEMD = "org.freedesktop.systemd1"
SYSTEMD_PATH = "/org/freedesktop/systemd1"
MANAGER = "org.freedesktop.systemd1.Manager"
JOB_TIMEOUT = 60.0


@dataclass(frozen=True, slots=True)
class ScopeSpec:
    """Resource settings of one backend scope."""

    unit: str
    description: str
    slice: str
    memory_max: int
    memory_high: int | None
    tasks_max: int
    cpu_weight: int | None
    stop_timeout_s: float
    extra_pids: tuple[int, ...] = ()
    """More processes for the scope besides the backend (its log relay)."""


def unit_object_path(unit: str) -> str:
    """systemd's object path of ``unit`` (escaped like sd_bus_path_encode)."""
    return f"{SYSTEMD_PATH}/unit/{bus_path_escape(unit)}"


def scope_properties(spec: ScopeSpec, pid: int) -> list[list[Any]]:
    """The ``a(sv)`` properties of StartTransientUnit for ``spec`` holding ``pid``."""
    props: list[list[Any]] = [
        ["Description", Variant("s", spec.description)],
        ["Slice", Variant("s", spec.slice)],
        ["PIDs", Variant("au", [pid, *spec.extra_pids])],
        ["MemoryAccounting", Variant("b", True)],
        ["MemoryMax", Variant("t", spec.memory_max)],
        ["TasksAccounting", Variant("b", True)],
        ["TasksMax", Variant("t", spec.tasks_max)],
        ["TimeoutStopUSec", Variant("t", int(spec.stop_timeout_s * 1_000_000))],
        ["OOMPolicy", Variant("s", "stop")],
        ["AddRef", Variant("b", True)],
        ["CollectMode", Variant("s", "inactive-or-failed")],
    ]
    if spec.cpu_weight is not None:
        # Only when configured: unset leaves the scope at systemd's default weight.
        props.append(["CPUWeight", Variant("t", spec.cpu_weight)])
    if spec.memory_high is not None:
        props.append(["MemoryHigh", Variant("t", spec.memory_high)])
    return props


class Systemd:
    """Starts, stops and inspects units. One instance per bus connection."""

    def __init__(self, bus: MessageBus) -> None:
        self._bus = bus
        self._early: dict[str, str] = {}
        self._waiters: dict[str, asyncio.Future[str]] = {}

    async def subscribe(self) -> None:
        """Install the JobRemoved match; must run before the first job is started."""
        self._bus.add_message_handler(self._on_message)
        await call(
            self._bus,
            DBUS_NAME,
            DBUS_PATH,
            DBUS_INTERFACE,
            "AddMatch",
            "s",
            [
                f"type='signal',sender='{SYSTEMD}',interface='{MANAGER}',"
                f"member='JobRemoved',path='{SYSTEMD_PATH}'"
            ],
        )
        await self._manager("Subscribe")

    def _on_message(self, msg: Message) -> None:
        if (
            msg.message_type is MessageType.SIGNAL
            and msg.member == "JobRemoved"
            and msg.interface == MANAGER
        ):
            _job_id, job, _unit, result = msg.body
            waiter = self._waiters.pop(job, None)
            if waiter is None:
                self._early[job] = result
                if len(self._early) > 1024:
                    self._early.pop(next(iter(self._early)))
            elif not waiter.done():
                waiter.set_result(result)

    async def _manager(
        self, member: str, signature: str = "", body: list[Any] | None = None
    ) -> list[Any]:
        return await call(self._bus, SYSTEMD, SYSTEMD_PATH, MANAGER, member, signature, body)

    async def _wait_job(self, job: str, what: str) -> str:
        early = self._early.pop(job, None)
        if early is not None:
            return early
        waiter: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._waiters[job] = waiter
        try:
            async with asyncio.timeout(JOB_TIMEOUT):
                return await waiter
        except TimeoutError:
            raise SystemdError(f"systemd did not finish {what} within {JOB_TIMEOUT:.0f}s") from None
        finally:
            self._waiters.pop(job, None)

    async def start_scope(self, spec: ScopeSpec, pid: int) -> None:
        """Create ``spec.unit`` holding ``pid`` and wait until the start job is done."""
        props = scope_properties(spec, pid)
        try:
            (job,) = await self._manager(
                "StartTransientUnit", "ssa(sv)a(sa(sv))", [spec.unit, "fail", props, []]
            )
        except DBusError as err:
            raise SystemdError(f"systemd refused to create {spec.unit}: {err.text}") from None
        result = await self._wait_job(job, f"starting {spec.unit}")
        if result != "done":
            raise SystemdError(f"starting {spec.unit} ended with result '{result}'")

    async def set_memory_max(self, unit: str, memory_max: int) -> None:
        """Set MemoryMax of ``unit`` for this boot (not persisted to /etc)."""
        try:
            await self._manager(
                "SetUnitProperties",
                "sba(sv)",
                [unit, True, [["MemoryMax", Variant("t", memory_max)]]],
            )
        except DBusError as err:
            raise SystemdError(f"cannot set MemoryMax of {unit}: {err.text}") from None

    async def stop_unit(self, unit: str) -> None:
        """Stop ``unit`` (SIGTERM, then SIGKILL after its stop timeout) and wait for it."""
        try:
            (job,) = await self._manager("StopUnit", "ss", [unit, "replace"])
        except DBusError as err:
            if err.type == "org.freedesktop.systemd1.NoSuchUnit":
                return
            raise SystemdError(f"systemd refused to stop {unit}: {err.text}") from None
        await self._wait_job(job, f"stopping {unit}")

    async def kill_unit(self, unit: str, signal: int) -> None:
        try:
            await self._manager("KillUnit", "ssi", [unit, "all", signal])
        except DBusError as err:
            if err.type not in ("org.freedesktop.systemd1.NoSuchUnit",):
                log.debug("KillUnit %s: %s", unit, err.text)

    async def unref_unit(self, unit: str) -> None:
        """Drop the reference taken with AddRef so the unit can be garbage-collected.

        Best effort, without waiting for systemd's reply (a unit already gone has none).
        """
        await call_no_reply(self._bus, SYSTEMD, SYSTEMD_PATH, MANAGER, "UnrefUnit", "s", [unit])

    async def ref_unit(self, unit: str) -> None:
        """Take a reference on ``unit`` (as AddRef does at creation) after a restart."""
        await self._manager("RefUnit", "s", [unit])

    async def unit_pids(self, unit: str) -> list[int]:
        """PIDs of the processes in ``unit``; empty when it is gone."""
        try:
            (processes,) = await self._manager("GetUnitProcesses", "s", [unit])
        except DBusError:
            return []
        return [int(entry[1]) for entry in processes]

    async def own_job_type(self) -> str:
        """The type of the job systemd runs on this process's unit ("restart", "stop"...).

        Empty when there is none or modeld does not run under systemd.
        """
        try:
            (unit_path,) = await self._manager("GetUnitByPID", "u", [os.getpid()])
            (job,) = await call(
                self._bus,
                SYSTEMD,
                unit_path,
                PROPERTIES_INTERFACE,
                "Get",
                "ss",
                ["org.freedesktop.systemd1.Unit", "Job"],
            )
            job_id, job_path = job.value
            if not job_id:
                return ""
            (job_type,) = await call(
                self._bus,
                SYSTEMD,
                job_path,
                PROPERTIES_INTERFACE,
                "Get",
                "ss",
                ["org.freedesktop.systemd1.Job", "JobType"],
            )
        except DBusError:
            return ""
        return str(job_type.value)

    async def manager_control_group(self) -> str:
        """The manager's own cgroup: ``/`` for the system manager (of its cgroup namespace),
        ``/user.slice/user-UID.slice/user@UID.service`` for a user manager; units' cgroups
        (``modeld.slice``'s) lie below it. Empty if systemd does not say."""
        try:
            (value,) = await call(
                self._bus,
                SYSTEMD,
                SYSTEMD_PATH,
                PROPERTIES_INTERFACE,
                "Get",
                "ss",
                [MANAGER, "ControlGroup"],
            )
        except DBusError:
            return ""
        return str(value.value)

    async def unit_property(self, unit: str, interface: str, name: str) -> Any:
        """Read one property of a loaded unit; None when the unit is not loaded."""
        try:
            (value,) = await call(
                self._bus,
                SYSTEMD,
                unit_object_path(unit),
                PROPERTIES_INTERFACE,
                "Get",
                "ss",
                [f"org.freedesktop.systemd1.{interface}", name],
            )
        except DBusError:
            return None
        return value.value

    async def list_units(self, patterns: Sequence[str]) -> list[tuple[str, str]]:
        """(name, active state) of loaded units matching the glob ``patterns``."""
        (units,) = await self._manager("ListUnitsByPatterns", "asas", [[], list(patterns)])
        return [(u[0], u[3]) for u in units]
