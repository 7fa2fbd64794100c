"""The admission policy (pure): LRU under a cap, never evicting what must stay."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from modeld.core.policy import Limits, ModelSnapshot, plan_load
from modeld.core.states import ModelState

READY = ModelState.READY


def snap(name: str, state: ModelState = READY, used: int = 0, **kw: object) -> ModelSnapshot:
    return ModelSnapshot(name=name, state=state, last_used_us=used, **kw)  # type: ignore[arg-type]


def test_no_cap_means_no_evictions() -> None:
    models = [snap("a"), snap("b"), snap("t", ModelState.UNLOADED)]
    assert plan_load("t", models, Limits(max_loaded=0)).evict == ()


def test_evicts_least_recently_used_first() -> None:
    models = [
        snap("new", used=30),
        snap("old", used=10),
        snap("mid", used=20),
        snap("t", ModelState.UNLOADED),
    ]
    plan = plan_load("t", models, Limits(max_loaded=2))
    assert [e.name for e in plan.evict] == ["old", "mid"]
    assert all(e.reason == "lru" for e in plan.evict)


def test_target_already_loaded_or_loading_needs_nothing() -> None:
    models = [snap("a"), snap("t", ModelState.LOADING)]
    assert plan_load("t", models, Limits(max_loaded=1)).evict == ()


def test_loads_in_progress_count_against_the_cap() -> None:
    models = [snap("a", ModelState.LOADING), snap("t", ModelState.UNLOADED)]
    plan = plan_load("t", models, Limits(max_loaded=1))
    assert plan.evict == ()
    assert plan.refusal is not None and "a (loading)" in plan.refusal


def test_pinned_and_busy_are_never_victims() -> None:
    models = [
        snap("pinned", used=1, pinned=True),
        snap("busy", ModelState.BUSY, used=2, in_flight=1),
        snap("idle", used=3),
        snap("t", ModelState.UNLOADED),
    ]
    plan = plan_load("t", models, Limits(max_loaded=3))
    assert [e.name for e in plan.evict] == ["idle"]
    refused = plan_load("t", [*models[:2], models[3]], Limits(max_loaded=2))
    assert refused.evict == ()
    assert refused.refusal is not None
    assert "pinned (pinned)" in refused.refusal and "busy (busy)" in refused.refusal


states = st.sampled_from(list(ModelState))


@st.composite
def snapshots(draw: st.DrawFn) -> tuple[list[ModelSnapshot], int]:
    count = draw(st.integers(min_value=1, max_value=8))
    models = [
        ModelSnapshot(
            name=f"m{i}",
            state=draw(states),
            last_used_us=draw(st.integers(min_value=0, max_value=50)),
            in_flight=draw(st.integers(min_value=0, max_value=2)),
            pinned=draw(st.booleans()),
        )
        for i in range(count)
    ]
    return models, draw(st.integers(min_value=0, max_value=8))


@given(snapshots(), st.data())
def test_invariants(case: tuple[list[ModelSnapshot], int], data: st.DataObject) -> None:
    models, cap = case
    target = data.draw(st.sampled_from([m.name for m in models]))
    plan = plan_load(target, models, Limits(max_loaded=cap))
    by_name = {m.name: m for m in models}
    victims = [by_name[e.name] for e in plan.evict]
    assert target not in {v.name for v in victims}
    for victim in victims:
        assert victim.state is ModelState.READY
        assert not victim.pinned and victim.in_flight == 0
    if plan.refusal is None and cap and not by_name[target].state.occupies_slot:
        holding = [m for m in models if m.state.occupies_slot and m.name != target]
        assert len(holding) - len(victims) + 1 <= cap
    if victims:
        spared = [
            m
            for m in models
            if m.state is ModelState.READY
            and not m.pinned
            and m.in_flight == 0
            and m.name != target
            and m not in victims
        ]
        assert max(v.last_used_us for v in victims) <= min(
            (m.last_used_us for m in spared), default=10**9
        )
    if plan.refusal is not None:
        evictable = [
            m
            for m in models
            if m.state is ModelState.READY
            and not m.pinned
            and m.in_flight == 0
            and m.name != target
        ]
        holding = [m for m in models if m.state.occupies_slot and m.name != target]
        assert len(holding) + 1 - len(evictable) > cap
