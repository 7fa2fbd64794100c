"""What the supervisor needs from systemd, as a Protocol.

:class:`modeld.system.systemd.Systemd` implements it over D-Bus; tests of the supervisor
and the owners use a recording fake that keeps its ordering guarantees (a start or stop
returns once its job is done).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from modeld.system.systemd import ScopeSpec


class SystemdApi(Protocol):
    async def start_scope(self, spec: ScopeSpec, pid: int) -> None:
        """Create ``spec.unit`` holding ``pid``; return once the start job is done.

        Raises SystemdError when systemd refuses or the job fails.
        """
        ...

    async def stop_unit(self, unit: str) -> None:
        """Stop ``unit`` (SIGTERM, SIGKILL after its stop timeout); return once stopped.

        A unit that does not exist is already stopped.
        """
        ...

    async def kill_unit(self, unit: str, signal: int) -> None:
        """Send ``signal`` to every process of ``unit`` (best effort)."""
        ...

    async def ref_unit(self, unit: str) -> None:
        """Take a reference on ``unit`` so it is not garbage-collected (re-adoption)."""
        ...

    async def unref_unit(self, unit: str) -> None:
        """Drop the reference taken at creation or with :meth:`ref_unit`."""
        ...

    async def unit_pids(self, unit: str) -> list[int]:
        """PIDs of the processes in ``unit``; empty when it is gone."""
        ...

    async def unit_property(self, unit: str, interface: str, name: str) -> Any:
        """One property of a loaded unit (e.g. Scope.ControlGroup); None when not loaded."""
        ...

    async def list_units(self, patterns: Sequence[str]) -> list[tuple[str, str]]:
        """(name, active state) of the loaded units matching the glob ``patterns``."""
        ...

    async def set_memory_max(self, unit: str, memory_max: int) -> None:
        """Set MemoryMax of ``unit`` for this boot; raises SystemdError."""
        ...
