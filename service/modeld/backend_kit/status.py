"""The ``Status`` reply every backend gives: its state and its memory, RSS first."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from modeld.backend_kit.memory import rss_bytes
from modeld.rpc import backend_pb2 as pb


def status_reply(*, loaded: bool, busy: int, breakdown: Mapping[str, int]) -> Any:
    """UNINITIALIZED without a model, BUSY while ``busy`` requests run, else READY; memory
    total is the process's RSS, broken down into ``rss`` and the backend's own figures."""
    if not loaded:
        state = pb.StatusResponse.UNINITIALIZED
    elif busy > 0:
        state = pb.StatusResponse.BUSY
    else:
        state = pb.StatusResponse.READY
    rss = rss_bytes()
    memory = pb.MemoryUsageData(total=rss)
    memory.breakdown["rss"] = rss
    for key, value in breakdown.items():
        memory.breakdown[key] = value
    return pb.StatusResponse(state=state, memory=memory)
