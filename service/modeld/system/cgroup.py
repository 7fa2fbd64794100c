"""Reading a scope's cgroup (memory, PIDs, their CPU time) on cgroup v2 and on hybrid (v1
memory) hosts.

cgroup v2 is the production target; the test machines mount the memory controller on v1.
Files read here are small in-kernel sysfs files: reads do not block.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

CGROUP_ROOT = Path("/sys/fs/cgroup")


def is_unified(root: Path = CGROUP_ROOT) -> bool:
    """True on a cgroup v2 host (``root/cgroup.controllers`` exists), False on hybrid or v1."""
    return (root / "cgroup.controllers").exists()


def memory_delegated(control_group: str, root: Path = CGROUP_ROOT) -> bool:
    """Whether the systemd manager whose cgroup is ``control_group`` (its ``ControlGroup``
    property) can put memory limits on its units.

    cgroup v2: ``memory`` is in the cgroup's ``cgroup.controllers`` (the system manager
    delegates it to ``user@UID.service`` by default). Hybrid or v1: the cgroup exists in the
    memory hierarchy and this process (which runs as the manager's user) may create cgroups
    in it; systemd hands out only the name=systemd and unified hierarchies there.
    """
    relative = control_group.strip("/")
    if is_unified(root):
        try:
            return "memory" in (root / relative / "cgroup.controllers").read_text().split()
        except OSError:
            return False
    directory = root / "memory" / relative
    return directory.is_dir() and os.access(directory, os.W_OK | os.X_OK)


@dataclass(frozen=True, slots=True)
class CgroupLayout:
    """Where the memory controller lives and which file names it uses."""

    memory_root: Path
    unified: bool
    memory: bool = True
    """False when modeld's systemd manager cannot use the memory controller (a per-user
    modeld without delegation, :func:`memory_delegated`): scopes have no memory cgroup, so
    nothing is read or watched there."""

    @classmethod
    def detect(cls, root: Path = CGROUP_ROOT, *, memory: bool = True) -> CgroupLayout:
        if is_unified(root):
            return cls(memory_root=root, unified=True, memory=memory)
        return cls(memory_root=root / "memory", unified=False, memory=memory)

    def memory_dir(self, control_group: str) -> Path:
        return self.memory_root / control_group.lstrip("/")

    def memory_current(self, control_group: str) -> int | None:
        if not self.memory:
            return None
        name = "memory.current" if self.unified else "memory.usage_in_bytes"
        return _read_int(self.memory_dir(control_group) / name)

    def memory_peak(self, control_group: str) -> int | None:
        """The highest memory use the kernel recorded for the cgroup (v2 ``memory.peak``,
        kernel 5.19+; v1 ``memory.max_usage_in_bytes``); None when the file is absent (an
        older kernel, or the cgroup is gone)."""
        if not self.memory:
            return None
        name = "memory.peak" if self.unified else "memory.max_usage_in_bytes"
        return _read_int(self.memory_dir(control_group) / name)

    def in_oom(self, control_group: str) -> bool:
        """True when the cgroup is under OOM now or has had an OOM kill."""
        if not self.memory:
            return False
        name = "memory.events" if self.unified else "memory.oom_control"
        try:
            text = (self.memory_dir(control_group) / name).read_text()
        except OSError:
            return False
        counters = dict(line.split(" ", 1) for line in text.splitlines() if " " in line)
        return int(counters.get("oom_kill", 0)) > 0 or int(counters.get("under_oom", 0)) > 0


def pids_in_cgroup(control_group: str, *, root: Path = CGROUP_ROOT) -> set[int]:
    """The PIDs in a cgroup and its descendants (e.g. a scope's ``ControlGroup`` property).

    cgroup v2 (:func:`is_unified`): the unified tree under ``root``. Hybrid or v1 hosts: the
    first hierarchy that has the cgroup, of ``root/unified`` (systemd's cgroup2 hierarchy),
    ``root/memory`` and ``root/systemd`` (name=systemd). A missing cgroup gives an empty set.
    Reads small in-kernel files; does not block.
    """
    relative = control_group.strip("/")
    if is_unified(root):
        hierarchies = [root]
    else:
        hierarchies = [root / "unified", root / "memory", root / "systemd"]
    for hierarchy in hierarchies:
        directory = hierarchy / relative if relative else hierarchy
        if (directory / "cgroup.procs").is_file():
            return _pids_below(directory)
    return set()


def process_cgroup(pid: int) -> str | None:
    """The cgroup of ``pid`` as systemd names it (a unit's ``ControlGroup``): its path in the
    name=systemd hierarchy on hybrid or v1 hosts, in the unified one on v2. None when the
    process is gone."""
    try:
        text = Path(f"/proc/{pid}/cgroup").read_text()
    except OSError:
        return None
    unified = None
    for line in text.splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if controllers == "name=systemd":
            return path
        if hierarchy == "0" and not controllers:
            unified = path
    return unified


def cpu_ticks(pids: Iterable[int]) -> int:
    """User + system CPU time of the processes ``pids`` (clock ticks); ended ones count 0."""
    total = 0
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_bytes()
        except OSError:
            continue
        fields = stat.rpartition(b")")[2].split()
        total += int(fields[11]) + int(fields[12])
    return total


def _pids_below(directory: Path) -> set[int]:
    pids: set[int] = set()
    for current, _dirs, files in os.walk(directory):
        if "cgroup.procs" not in files:
            continue
        try:
            text = Path(current, "cgroup.procs").read_text()
        except OSError:  # the cgroup went away while walking
            continue
        pids.update(int(word) for word in text.split() if word.isdigit())
    return pids


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


class OomWatch:
    """Notes in ``seen`` when the kernel OOM-kills inside a cgroup (v1: eventfd notifier).

    On cgroup v2 systemd reports ``Result=oom-kill`` on the scope instead, so this watch
    only reads ``memory.events`` when asked.
    """

    def __init__(self, layout: CgroupLayout, control_group: str) -> None:
        self._layout = layout
        self._control_group = control_group
        self._eventfd = -1
        self.seen = False
        """True once an OOM kill in the cgroup was observed."""
        self.process_exited = False
        """Set by the owner when the backend's exit was seen: cgroup removal (which also
        wakes the eventfd) can only come after it, so earlier wake-ups are OOM events."""
        if layout.memory and not layout.unified:
            self._arm_v1()

    def _arm_v1(self) -> None:
        directory = self._layout.memory_dir(self._control_group)
        try:
            control = os.open(directory / "memory.oom_control", os.O_RDONLY | os.O_CLOEXEC)
        except OSError as err:
            log.warning("cannot watch %s for OOM kills: %s", directory, err)
            return
        try:
            self._eventfd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            (directory / "cgroup.event_control").write_text(f"{self._eventfd} {control}")
        except OSError as err:
            log.warning("cannot watch %s for OOM kills: %s", directory, err)
            self.close()
            return
        finally:
            os.close(control)
        asyncio.get_running_loop().add_reader(self._eventfd, self._on_event)

    def _on_event(self) -> None:
        with contextlib.suppress(OSError):
            os.eventfd_read(self._eventfd)
        if self.seen:
            return
        if self.check() or not self.process_exited:
            self.seen = True

    def check(self) -> bool:
        """Read the cgroup's OOM-kill counter now (while the cgroup still exists)."""
        if self._layout.in_oom(self._control_group):
            self.seen = True
        return self.seen

    def close(self) -> None:
        if self._eventfd >= 0:
            with contextlib.suppress(ValueError, RuntimeError):
                asyncio.get_running_loop().remove_reader(self._eventfd)
            os.close(self._eventfd)
            self._eventfd = -1
