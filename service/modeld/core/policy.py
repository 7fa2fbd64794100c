"""Admission policy: what must go before a model may load.

A pure function over a snapshot, so the eviction engine can replace it wholesale and tests
can drive it without processes. It never logs: a plan is only a proposal until the
supervisor commits it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from modeld.core.states import ModelState


@dataclass(frozen=True, slots=True)
class ModelSnapshot:
    """What the policy may know about one configured model."""

    name: str
    state: ModelState
    last_used_us: int = 0
    in_flight: int = 0
    pinned: bool = False


@dataclass(frozen=True, slots=True)
class Limits:
    max_loaded: int = 0
    """Cap on models holding a backend (loading, ready or busy); 0 means no cap."""


@dataclass(frozen=True, slots=True)
class Eviction:
    name: str
    reason: str


@dataclass(frozen=True, slots=True)
class Plan:
    """Evict ``evict`` (in order), then load; or, if ``refusal`` is set, do nothing."""

    evict: tuple[Eviction, ...] = ()
    refusal: str | None = None


def _why_not_evictable(model: ModelSnapshot) -> str | None:
    if model.pinned:
        return "pinned"
    if model.state is ModelState.LOADING:
        return "loading"
    if model.in_flight > 0 or model.state is ModelState.BUSY:
        return "busy"
    return None


def plan_load(target: str, models: Sequence[ModelSnapshot], limits: Limits) -> Plan:
    """Plan the evictions needed to load ``target`` under ``limits``.

    Invariants: a plan never evicts the target, a pinned, busy or loading model; after its
    evictions the number of slot-holding models plus the target is within the cap; victims
    are the least recently used evictable models; a refusal is returned only when no such
    plan exists.
    """
    by_name = {m.name: m for m in models}
    current = by_name.get(target)
    if current is not None and current.state.occupies_slot:
        return Plan()
    if limits.max_loaded <= 0:
        return Plan()
    holding = [m for m in models if m.state.occupies_slot and m.name != target]
    excess = len(holding) + 1 - limits.max_loaded
    if excess <= 0:
        return Plan()
    evictable = sorted(
        (m for m in holding if _why_not_evictable(m) is None),
        key=lambda m: (m.last_used_us, m.name),
    )
    if len(evictable) < excess:
        blockers = ", ".join(
            f"{m.name} ({why})" for m in holding if (why := _why_not_evictable(m)) is not None
        )
        return Plan(
            refusal=(
                f"max_loaded={limits.max_loaded} reached and {target} cannot make room: {blockers}"
            )
        )
    return Plan(evict=tuple(Eviction(m.name, "lru") for m in evictable[:excess]))
