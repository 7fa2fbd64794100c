"""What an owner publishes about its model: a typed snapshot and the change events.

Owners replace their :class:`ModelStatus` as a whole (``dataclasses.replace``, which mypy
checks field by field) and report every change as a :class:`StatusChange` holding the
snapshot before and after. Adapters derive what changed by comparing the two through typed
accessors, so renaming a field breaks the type check instead of silently dropping a signal.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from modeld.core.states import ModelState
from modeld.units import UINT64_MAX


@dataclass(frozen=True, slots=True)
class ModelStatus:
    """The published facts about one model. Written only by its owner."""

    state: ModelState = ModelState.UNLOADED
    unit: str = ""
    control_group: str = ""
    main_pid: int = 0
    endpoint: str = ""
    memory_max: int = UINT64_MAX
    last_used_us: int = 0
    in_flight: int = 0
    """Requests (waiting for the model or a slot, or running) plus open leases."""
    pinned: bool = False
    last_error: str = ""
    load_count: int = 0
    gpu: str = ""
    gpu_memory: int = 0
    retry_after_us: int = 0
    """When a load may be tried again after a failure (µs since the epoch; 0: now)."""
    memory_peak: int = 0
    """The learned peak memory of its backends under its configuration (0: not known)."""


@dataclass(frozen=True, slots=True)
class StatusChange:
    """One committed change of a model's status."""

    model: str
    before: ModelStatus
    after: ModelStatus

    @property
    def state_changed(self) -> bool:
        return self.before.state is not self.after.state

    @property
    def use_only(self) -> bool:
        """Whether only the model's use changed: requests and leases starting and ending
        (``in_flight``, ``last_used_us``, ready <-> busy). Such changes come with every
        request, so publishers may coalesce them."""
        before, after = self.before, self.after
        if not (before.state.serving and after.state.serving):
            return False
        same_otherwise = replace(
            after,
            state=before.state,
            in_flight=before.in_flight,
            last_used_us=before.last_used_us,
        )
        return same_otherwise == before
