"""modeld's D-Bus names, and names derived from model names: object paths, units, sockets.

Model names are arbitrary UTF-8 (spaces, unicode); every derived name is escaped so it is
valid where it is used, and distinct models never share a derived name.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

BUS_NAME = "org.modeld1"
MANAGER_PATH = "/org/modeld1"
MANAGER_INTERFACE = "org.modeld1.Manager"
MODEL_INTERFACE = "org.modeld1.Model"
MODEL_PATH_PREFIX = "/org/modeld1/model/"
UNIT_PREFIX = "modeld-backend-"
UNIT_SUFFIX = ".scope"
SLICE = "modeld.slice"

_UNIT_SAFE = re.compile(rb"[A-Za-z0-9:_.]")
_UNIT_RE = re.compile(
    rf"^{re.escape(UNIT_PREFIX)}(?P<escaped>.+)-(?P<generation>[0-9]+){re.escape(UNIT_SUFFIX)}$"
)
_MAX_UNIT_ESCAPED = 200
_MAX_SOCKET_STEM = 48
BACKEND_SOCKET_NAME = "backend.sock"


_ECHO_MAX = 120


def shown(name: str) -> str:
    """``repr(name)`` for messages, cut short: a caller's name of any length must not make
    a reply or a journal line of that length."""
    if len(name) <= _ECHO_MAX:
        return repr(name)
    return f"{name[:_ECHO_MAX]!r}… ({len(name)} characters)"


def bus_path_escape(name: str) -> str:
    """Escape like sd_bus_path_encode: bytes outside [A-Za-z0-9] become ``_xx``."""
    if not name:
        return "_"
    out = []
    for byte in name.encode():
        char = chr(byte)
        if char.isascii() and char.isalnum():
            out.append(char)
        else:
            out.append(f"_{byte:02x}")
    return "".join(out)


def bus_path_unescape(escaped: str) -> str:
    """Inverse of :func:`bus_path_escape`."""
    if escaped == "_":
        return ""
    data = bytearray()
    i = 0
    while i < len(escaped):
        if escaped[i] == "_":
            data.append(int(escaped[i + 1 : i + 3], 16))
            i += 3
        else:
            data.append(ord(escaped[i]))
            i += 1
    return data.decode()


def model_object_path(name: str) -> str:
    return MODEL_PATH_PREFIX + bus_path_escape(name)


def unit_escape(name: str) -> str:
    """Escape like ``systemd-escape``: ``/`` becomes ``-``, unsafe bytes ``\\xNN``.

    Very long names are shortened to a prefix plus a hash so unit names stay valid.
    """
    out = []
    for index, byte in enumerate(name.encode()):
        char = bytes([byte])
        if char == b"/":
            out.append("-")
        elif (index == 0 and char == b".") or not _UNIT_SAFE.match(char):
            out.append(f"\\x{byte:02x}")
        else:
            out.append(char.decode())
    escaped = "".join(out)
    if len(escaped) > _MAX_UNIT_ESCAPED:
        digest = hashlib.sha256(name.encode()).hexdigest()[:16]
        escaped = escaped[: _MAX_UNIT_ESCAPED - 17].rstrip("\\x") + "_" + digest
    return escaped


def scope_name(model: str, generation: int) -> str:
    return f"{UNIT_PREFIX}{unit_escape(model)}-{generation}{UNIT_SUFFIX}"


def parse_scope_name(unit: str) -> tuple[str, int] | None:
    """Return (escaped model name, generation) of one of modeld's scopes, else None."""
    match = _UNIT_RE.match(unit)
    if match is None:
        return None
    return match["escaped"], int(match["generation"])


def socket_stem(model: str) -> str:
    """A file-name-safe stem for the model's backend socket (sun_path is short)."""
    escaped = bus_path_escape(model)
    if len(escaped) > _MAX_SOCKET_STEM:
        digest = hashlib.sha256(model.encode()).hexdigest()[:16]
        escaped = escaped[: _MAX_SOCKET_STEM - 17] + "_" + digest
    return escaped


def backend_socket(runtime_dir: Path, model: str) -> Path:
    """The model's backend socket, alone in a directory of its own (see
    :mod:`modeld.supervisor.backend_dir`): ``<runtime_dir>/backends/<stem>/backend.sock``."""
    return runtime_dir / "backends" / socket_stem(model) / BACKEND_SOCKET_NAME
