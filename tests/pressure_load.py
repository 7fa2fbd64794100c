"""Produce real memory pressure (PSI stalls) in a small memory cgroup of its own.

Needs root and a writable memory cgroup (v1 hybrid host or a v2 delegated one); swap is not
needed. The program

1. writes a scratch file larger than the limit and drops it from the page cache,
2. creates ``psi-load-<pid>`` under its own memory cgroup with a small limit (and, on hybrid
   hosts, a cgroup of the same name on the v2 hierarchy, where PSI is accounted),
3. prints one JSON line ``{"memory_cgroup": ..., "psi_file": ...}`` and waits for a line (or
   EOF) on stdin,
4. moves itself into the cgroup(s), pins some anonymous ballast and reads the file over and
   over: the page cache cannot hold it, so every pass reclaims and refaults (memory stalls),
5. after ``--seconds`` or on SIGTERM moves back, removes the cgroups and the file, and prints
   ``done``.

Exit status 77 when the host does not allow this (not root, no memory controller...).

    python tests/pressure_load.py --seconds 10 </dev/null
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import time
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
MIB = 1 << 20


class Unsupported(Exception):
    """The host does not allow creating a limited memory cgroup."""


def own_cgroups() -> dict[str, str]:
    """Controller name (``""`` for the v2 hierarchy) -> this process's cgroup path."""
    paths: dict[str, str] = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _id, controllers, path = line.split(":", 2)
        for name in controllers.split(",") if controllers else [""]:
            paths[name] = path
    return paths


def plan(name: str) -> tuple[Path, Path, Path | None, Path | None]:
    """(memory cgroup to create, its parent, v2 cgroup to create or None, its parent)."""
    own = own_cgroups()
    if (CGROUP_ROOT / "cgroup.controllers").exists():
        parent = CGROUP_ROOT / own.get("", "/").lstrip("/")
        return parent / name, parent, None, None
    if "memory" not in own:
        raise Unsupported("no v1 memory controller")
    parent = CGROUP_ROOT / "memory" / own["memory"].lstrip("/")
    unified = CGROUP_ROOT / "unified"
    if "" in own and (unified / "cgroup.procs").exists():
        v2_parent = unified / own[""].lstrip("/")
        return parent / name, parent, v2_parent / name, v2_parent
    return parent / name, parent, None, None


def make_file(path: Path, size: int) -> None:
    chunk = b"\x5a" * MIB
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        for _ in range(size // MIB):
            os.write(fd, chunk)
        os.fsync(fd)
        # Nobody owns its pages any more: the reads below charge them to the limited cgroup.
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def set_limit(cgroup: Path, limit: int) -> None:
    for name in ("memory.limit_in_bytes", "memory.max"):
        if (cgroup / name).exists():
            (cgroup / name).write_text(str(limit))
            return
    raise Unsupported(f"{cgroup} has no memory limit file")


def thrash(path: Path, ballast_bytes: int, seconds: float) -> int:
    ballast = bytearray(ballast_bytes)
    for offset in range(0, len(ballast), 4096):
        ballast[offset] = 1
    buffer = bytearray(MIB)
    passes = 0
    deadline = time.monotonic() + seconds
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        while time.monotonic() < deadline:
            os.lseek(fd, 0, os.SEEK_SET)
            while os.readv(fd, [buffer]) > 0:
                pass
            passes += 1
    finally:
        os.close(fd)
    return passes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit-mib", type=int, default=64)
    parser.add_argument("--file-mib", type=int, default=160)
    parser.add_argument("--ballast-mib", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--dir", type=Path, default=Path("/tmp"))
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))

    name = f"psi-load-{os.getpid()}"
    scratch = args.dir / f"{name}.bin"
    created: list[Path] = []
    moved_to: list[Path] = []  # parents to move back to
    try:
        memory_cg, memory_parent, v2_cg, v2_parent = plan(name)
        make_file(scratch, args.file_mib * MIB)
        memory_cg.mkdir()
        created.append(memory_cg)
        set_limit(memory_cg, args.limit_mib * MIB)
        if v2_cg is not None:
            v2_cg.mkdir()
            created.append(v2_cg)
        psi = (v2_cg or memory_cg) / "memory.pressure"
        report = {"memory_cgroup": str(memory_cg), "psi_file": str(psi) if psi.exists() else None}
        print(json.dumps(report), flush=True)
        sys.stdin.readline()
        for cgroup, parent in ((memory_cg, memory_parent), (v2_cg, v2_parent)):
            if cgroup is not None and parent is not None:
                (cgroup / "cgroup.procs").write_text("0")
                moved_to.append(parent)
        passes = thrash(scratch, args.ballast_mib * MIB, args.seconds)
        print(f"passes {passes}", file=sys.stderr)
    except (Unsupported, PermissionError) as err:
        print(f"unsupported: {err}", file=sys.stderr)
        return 77
    finally:
        with contextlib.suppress(FileNotFoundError):
            scratch.unlink()
        for parent in moved_to:
            with contextlib.suppress(OSError):
                (parent / "cgroup.procs").write_text("0")
        for cgroup in reversed(created):
            with contextlib.suppress(OSError):
                cgroup.rmdir()
        print("done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
