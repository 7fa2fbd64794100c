"""Model states and the transitions an owner may make between them."""

from __future__ import annotations

from enum import StrEnum


class ModelState(StrEnum):
    UNLOADED = "unloaded"
    LOADING = "loading"
    READY = "ready"
    BUSY = "busy"
    UNLOADING = "unloading"
    FAILED = "failed"

    @property
    def occupies_slot(self) -> bool:
        """True while the model holds (or is about to hold) a backend."""
        return self in (ModelState.LOADING, ModelState.READY, ModelState.BUSY)

    @property
    def serving(self) -> bool:
        return self in (ModelState.READY, ModelState.BUSY)


ALLOWED_TRANSITIONS: dict[ModelState, frozenset[ModelState]] = {
    ModelState.UNLOADED: frozenset({ModelState.LOADING}),
    ModelState.FAILED: frozenset({ModelState.LOADING, ModelState.UNLOADED}),
    ModelState.LOADING: frozenset(
        {ModelState.READY, ModelState.BUSY, ModelState.UNLOADING, ModelState.FAILED}
    ),
    ModelState.READY: frozenset({ModelState.BUSY, ModelState.UNLOADING, ModelState.FAILED}),
    ModelState.BUSY: frozenset({ModelState.READY, ModelState.UNLOADING, ModelState.FAILED}),
    ModelState.UNLOADING: frozenset({ModelState.UNLOADED, ModelState.FAILED}),
}


def check_transition(old: ModelState, new: ModelState) -> None:
    """Raise ValueError for a transition the state machine does not allow."""
    if new not in ALLOWED_TRANSITIONS[old]:
        raise ValueError(f"illegal state transition {old} -> {new}")
