"""The property tables of the org.modeld1 API (version 1), for the daemon and its clients.

Each table maps a property name to its D-Bus signature. The exported
interfaces must match them exactly (checked when they are exported); clients and test doubles
import them instead of copying. Importing this module has no side effects.
"""

from __future__ import annotations

from collections.abc import Mapping
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
