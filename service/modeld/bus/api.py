"""The property tables of the org.modeld1 API (version 1), for the daemon and its clients.

Each table maps a property name to its D-Bus signature. The exported
interfaces must match them exactly (checked when they are exported); clients and test doubles
import them instead of copying. :data:`CHANGES` says how each property tells caching clients
(GDBus proxies) that it changed, and :data:`ARG_NAMES` names the arguments dbus-next leaves
unnamed; both go into the introspection data. Importing this module has no side effects.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from types import MappingProxyType
from typing import Final

from modeld.bus.signatures import BOOLEAN, STRING, STRINGS, UINT32, UINT64
from modeld.naming import MANAGER_INTERFACE, MODEL_INTERFACE

MANAGER_PROPERTIES: Final[Mapping[str, str]] = MappingProxyType(
    {
        "Version": STRING,
        "LoadedCount": UINT32,
        "MaxLoaded": UINT32,
        "MemoryBudget": UINT64,
        "MemoryUsed": UINT64,
    }
)

MODEL_PROPERTIES: Final[Mapping[str, str]] = MappingProxyType(
    {
        "Name": STRING,
        "Backend": STRING,
        "State": STRING,
        "Unit": STRING,
        "ControlGroup": STRING,
        "MainPID": UINT32,
        "Endpoint": STRING,
        "MemoryCurrent": UINT64,
        "MemoryMax": UINT64,
        "MemoryPeak": UINT64,
        "GpuMemory": UINT64,
        "Gpu": STRING,
        "LastUsed": UINT64,
        "InFlight": UINT32,
        "Pinned": BOOLEAN,
        "ConcurrencyGroups": STRINGS,
        "LastError": STRING,
        "LoadCount": UINT32,
        "RetryAfter": UINT64,
    }
)

PROPERTIES: Final[Mapping[str, Mapping[str, str]]] = MappingProxyType(
    {MANAGER_INTERFACE: MANAGER_PROPERTIES, MODEL_INTERFACE: MODEL_PROPERTIES}
)
"""Interface name -> its property table."""

WRITABLE: Final[Mapping[str, frozenset[str]]] = MappingProxyType(
    {MANAGER_INTERFACE: frozenset({"MaxLoaded"}), MODEL_INTERFACE: frozenset()}
)
"""Interface name -> the properties callers may set; every other property is read-only."""


EMITS_CHANGED_SIGNAL: Final = "org.freedesktop.DBus.Property.EmitsChangedSignal"
"""The standard annotation saying how a property announces its changes."""


class Changes(StrEnum):
    """Values of :data:`EMITS_CHANGED_SIGNAL`, as the D-Bus specification defines them."""

    EMITS = "true"
    """Every change is sent in ``PropertiesChanged`` with the new value (the default)."""
    INVALIDATES = "invalidates"
    """Every change is sent in ``PropertiesChanged`` by name only, without the value."""
    CONST = "const"
    """Never changes while the object exists."""
    LIVE = "false"
    """Changes without a signal (a live figure): read it with ``Get`` when it is needed."""


_LIVE: Final = Changes.LIVE
_CONST: Final = Changes.CONST
_EMITS: Final = Changes.EMITS

CHANGES: Final[Mapping[str, Mapping[str, Changes]]] = MappingProxyType(
    {
        MANAGER_INTERFACE: MappingProxyType(
            {
                "Version": _CONST,
                "LoadedCount": _EMITS,
                "MaxLoaded": _EMITS,  # a write, and a reload
                "MemoryBudget": _EMITS,  # a reload
                "MemoryUsed": _LIVE,  # the backends' cgroups, as the kernel counts them
            }
        ),
        MODEL_INTERFACE: MappingProxyType(
            {
                "Name": _CONST,
                "Backend": _EMITS,  # a reload
                "State": _EMITS,
                "Unit": _EMITS,
                "ControlGroup": _EMITS,
                "MainPID": _EMITS,
                "Endpoint": _EMITS,
                "MemoryCurrent": _LIVE,  # its cgroup, as the kernel counts it
                "MemoryMax": _EMITS,
                "MemoryPeak": _EMITS,
                "GpuMemory": _EMITS,
                "Gpu": _EMITS,
                "LastUsed": _EMITS,
                "InFlight": _EMITS,
                "Pinned": _EMITS,
                "ConcurrencyGroups": _EMITS,  # a reload
                "LastError": _EMITS,
                "LoadCount": _EMITS,
                "RetryAfter": _EMITS,
            }
        ),
    }
)
"""Interface name -> property -> how its changes are announced; every property is listed.

Properties that mirror a model's status are sent whenever an owner publishes a change; the
manager's and those read from the configuration whenever a write or a reload changes them.
"""

ARG_NAMES: Final[Mapping[str, Mapping[str, tuple[str, ...]]]] = MappingProxyType(
    {
        MANAGER_INTERFACE: MappingProxyType(
            {
                "Load": ("model",),
                "ListModels": ("models",),
                "GetModel": ("model",),
                "Acquire": ("endpoint", "lease"),
                "ModelLoaded": ("name", "path"),
                "ModelUnloaded": ("name", "path", "reason"),
            }
        ),
        MODEL_INTERFACE: MappingProxyType({"Load": ("model",)}),
    }
)
"""Interface name -> member -> the names of a method's out arguments or a signal's arguments."""
