"""Discovery of installed backends, in LocalAI's on-disk layout.

Each backends directory holds one subdirectory per backend::

    <dir>/<name>/run.sh           the executable that starts the gRPC backend
    <dir>/<name>/metadata.json    optional: {"alias": "...", "meta_backend_for": "...",
                                  "requires_python_modules": [...], "install_hint": "..."}

A *concrete* backend has a ``run.sh``.  Its ``alias`` (if any) is another
name it answers to.  A *meta* backend is a directory whose metadata names, in
``meta_backend_for``, the concrete backend (in the same backends directory)
that it stands for; it usually has no ``run.sh`` of its own and runs the
concrete backend's.  This is how LocalAI installs e.g. ``llama-cpp`` as a
meta backend for ``cuda12-llama-cpp``.

A backend whose ``requires_python_modules`` cannot be found by the Python running
modeld (which is the ``MODELD_PYTHON`` backends run with) is still listed, marked
*unavailable* with the reason and its ``install_hint``, so a load of it fails at once
saying how to install what it needs instead of starting a process that cannot work.

Directories are searched in order and the first one that provides a name
wins.  Broken entries are skipped and described in
:attr:`BackendIndex.problems`; they do not hide a same-named backend in a
later directory.
"""

from __future__ import annotations

import importlib.util
import json
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

__all__ = [
    "BUILTIN_BACKENDS_DIR",
    "Backend",
    "BackendIndex",
    "discover_backends",
    "effective_backend_dirs",
]

BUILTIN_BACKENDS_DIR: Final = Path(__file__).parent / "data" / "backends"
"""Backends shipped with modeld (such as ``reference``); searched last."""

RUN_FILE: Final = "run.sh"
METADATA_FILE: Final = "metadata.json"


@dataclass(frozen=True, slots=True)
class Backend:
    """One usable backend.

    ``run`` is the ``run.sh`` to execute and ``directory`` the directory that
    contains it.  For a meta backend, ``name`` is the meta backend's own name
    and ``run``/``directory`` are those of the concrete backend named by
    ``meta_backend_for``.  ``origin`` is the backends directory it came from.
    """

    name: str
    run: Path
    directory: Path
    alias: str | None
    meta_backend_for: str | None
    origin: Path
    unavailable: str | None = None
    """Why it cannot run here (a required Python module is missing), or None."""


class BackendIndex:
    """The result of :func:`discover_backends`: backends by name, alias and meta name."""

    __slots__ = ("_aliases", "_all", "_direct", "_meta", "_problems")

    def __init__(self, backends: Sequence[Backend], problems: Sequence[str]) -> None:
        self._all = list(backends)
        self._problems = list(problems)
        self._direct: dict[str, Backend] = {}
        self._aliases: dict[str, Backend] = {}
        self._meta: dict[str, Backend] = {}
        for backend in self._all:
            table = self._direct if backend.meta_backend_for is None else self._meta
            table.setdefault(backend.name, backend)
            if backend.alias is not None:
                self._aliases.setdefault(backend.alias, backend)

    def resolve(self, name: str) -> Backend | None:
        """The backend for ``name``: a concrete backend's name first, then an
        alias, then a meta backend's name; ``None`` if nothing matches."""
        return self._direct.get(name) or self._aliases.get(name) or self._meta.get(name)

    def all(self) -> list[Backend]:
        """Every usable backend (concrete and meta), in discovery order."""
        return list(self._all)

    @property
    def problems(self) -> list[str]:
        """One line per skipped entry: ``<path>: <reason>``."""
        return list(self._problems)


class _Skip(Exception):
    pass


def _regular_file(path: Path) -> bool:
    try:
        return stat.S_ISREG(path.stat().st_mode)
    except OSError:
        return False


def _executable(path: Path) -> bool:
    """Whether anyone may execute ``path`` (root's X_OK would only say whether some bit is
    set, too; the backend's user is decided later, per model)."""
    try:
        return bool(path.stat().st_mode & 0o111)
    except OSError:
        return False


@dataclass(frozen=True, slots=True)
class _Metadata:
    alias: str | None = None
    meta_backend_for: str | None = None
    requires_python_modules: tuple[str, ...] = ()
    install_hint: str | None = None


def _optional_string(data: dict[str, object], key: str) -> str | None:
    value = data.get(key)
    if value is not None and not isinstance(value, str):
        raise _Skip(f"{METADATA_FILE}: {key}: expected a string")
    return value or None


METADATA_MAX_BYTES: Final = 64 * 1024


def _read_small_file(path: Path) -> str:
    """The text of the regular file ``path``: a named pipe or a device is refused unread
    (discovery runs on modeld's event loop: a read that blocks would stop modeld)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as file:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise _Skip(f"{METADATA_FILE}: not a regular file")
        raw = file.read(METADATA_MAX_BYTES + 1)
    if len(raw) > METADATA_MAX_BYTES:
        raise _Skip(f"{METADATA_FILE}: larger than {METADATA_MAX_BYTES} bytes")
    return raw.decode("utf-8")


def _read_metadata(directory: Path) -> _Metadata:
    path = directory / METADATA_FILE
    try:
        text = _read_small_file(path)
    except FileNotFoundError:
        return _Metadata()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise _Skip(f"{METADATA_FILE}: cannot read: {reason}") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _Skip(f"{METADATA_FILE}: invalid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise _Skip(f"{METADATA_FILE}: expected a JSON object")
    modules = data.get("requires_python_modules", [])
    if not isinstance(modules, list) or not all(isinstance(m, str) and m for m in modules):
        raise _Skip(f"{METADATA_FILE}: requires_python_modules: expected a list of module names")
    return _Metadata(
        alias=_optional_string(data, "alias"),
        meta_backend_for=_optional_string(data, "meta_backend_for"),
        requires_python_modules=tuple(modules),
        install_hint=_optional_string(data, "install_hint"),
    )


def _module_missing(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is None
    except (ImportError, ValueError):
        return True


def _unavailable(metadata: _Metadata) -> str | None:
    missing = [m for m in metadata.requires_python_modules if _module_missing(m)]
    if not missing:
        return None
    reason = f"needs the Python module{'s' if len(missing) > 1 else ''} {', '.join(missing)}"
    return f"{reason}: {metadata.install_hint}" if metadata.install_hint else reason


def _load_entry(origin: Path, name: str) -> Backend:
    directory = origin / name
    metadata = _read_metadata(directory)
    alias, meta_for = metadata.alias, metadata.meta_backend_for
    if meta_for is not None:
        if meta_for in (".", "..") or "/" in meta_for:
            raise _Skip(f"{METADATA_FILE}: meta_backend_for: not a backend name: {meta_for!r}")
        target = origin / meta_for
        if not _regular_file(target / RUN_FILE):
            raise _Skip(f"meta backend for {meta_for!r}, which has no {RUN_FILE} in {origin}")
        if not _executable(target / RUN_FILE):
            raise _Skip(f"meta backend for {meta_for!r}, whose {RUN_FILE} is not executable")
        try:
            target_metadata = _read_metadata(target)
        except _Skip as skip:
            raise _Skip(f"meta backend for {meta_for!r}: {skip}") from None
        return Backend(
            name, target / RUN_FILE, target, alias, meta_for, origin, _unavailable(target_metadata)
        )
    run = directory / RUN_FILE
    if not os.path.lexists(run):
        raise _Skip(f"no {RUN_FILE}")
    if not _regular_file(run):
        raise _Skip(f"{RUN_FILE} is not a regular file")
    if not _executable(run):
        raise _Skip(f"{RUN_FILE} is not executable")
    return Backend(name, run, directory, alias, None, origin, _unavailable(metadata))


def _scan(origin: Path, problems: list[str]) -> list[Backend]:
    try:
        names = sorted(os.listdir(origin))
    except FileNotFoundError:
        return []
    except NotADirectoryError:
        problems.append(f"{origin}: cannot list backends directory: not a directory")
        return []
    except OSError as exc:
        problems.append(f"{origin}: cannot list backends directory: {exc.strerror or exc}")
        return []
    found = []
    for name in names:
        if name.startswith(".") or not (origin / name).is_dir():
            continue
        try:
            backend = _load_entry(origin, name)
        except _Skip as skip:
            problems.append(f"{origin / name}: skipped: {skip}")
            continue
        found.append(backend)
    return found


def discover_backends(dirs: Sequence[Path]) -> BackendIndex:
    """Scan ``dirs`` in order.  Missing directories are ignored; for a name
    found in several directories the first usable one wins."""
    problems: list[str] = []
    backends: list[Backend] = []
    seen: set[str] = set()
    for origin in dirs:
        for backend in _scan(origin, problems):
            if backend.name not in seen:
                seen.add(backend.name)
                backends.append(backend)
    return BackendIndex(backends, problems)


def effective_backend_dirs(configured: Sequence[Path]) -> tuple[Path, ...]:
    """The configured backends directories followed by :data:`BUILTIN_BACKENDS_DIR`
    (unless it is already among them)."""
    dirs = tuple(configured)
    return dirs if BUILTIN_BACKENDS_DIR in dirs else (*dirs, BUILTIN_BACKENDS_DIR)
