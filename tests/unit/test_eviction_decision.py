"""The eviction engine's pure decision: examples, and invariants under hypothesis."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from modeld.core.eviction import (
    UNLIMITED,
    Decision,
    GpuView,
    Limits,
    ModelView,
    decide_load,
    pick_pressure_victim,
)
from modeld.core.states import ModelState

R, U, L, B = ModelState.READY, ModelState.UNLOADED, ModelState.LOADING, ModelState.BUSY
G = 1024**3


def view(name: str, state: ModelState = R, used: int = 0, **kw: object) -> ModelView:
    return ModelView(name=name, state=state, last_used_us=used, **kw)  # type: ignore[arg-type]


def names(decision: Decision) -> list[tuple[str, str]]:
    return [(e.name, e.reason) for e in decision.evict]


def test_nothing_to_do_without_limits_or_when_already_loaded() -> None:
    models = [view("a"), view("t", U)]
    assert decide_load("t", models, [], Limits()) == Decision()
    assert decide_load("a", models, [], Limits(max_loaded=1)) == Decision()


def test_cap_evicts_least_recently_used_and_counts_loads_in_progress() -> None:
    models = [view("new", used=30), view("old", used=10), view("mid", used=20), view("t", U)]
    assert names(decide_load("t", models, [], Limits(max_loaded=2))) == [
        ("old", "lru"),
        ("mid", "lru"),
    ]
    loading = [view("a", L), view("t", U)]
    assert decide_load("t", loading, [], Limits(max_loaded=1)).wait_for == ("a",)


def test_groups_evict_every_member_even_under_no_cap() -> None:
    big = frozenset({"big"})
    models = [
        view("a", groups=big),
        view("b", groups=frozenset({"x", "big"})),
        view("c"),
        view("t", U, groups=big),
    ]
    assert names(decide_load("t", models, [], Limits())) == [("a", "group"), ("b", "group")]


def test_pins_are_never_victims_and_the_refusal_names_them() -> None:
    big = frozenset({"big"})
    models = [view("p", pinned=True, groups=big), view("t", U, groups=big)]
    decision = decide_load("t", models, [], Limits())
    assert decision.evict == () and decision.refusal is not None
    assert "pinned model p" in decision.refusal
    capped = decide_load("t", [view("p", pinned=True), view("t", U)], [], Limits(max_loaded=1))
    assert capped.refusal is not None and "pinned (p)" in capped.refusal


def test_busy_victims_are_waited_for_unless_forced() -> None:
    models = [view("busy", B, used=1, in_flight=2), view("t", U)]
    waiting = decide_load("t", models, [], Limits(max_loaded=1))
    assert waiting.wait_for == ("busy",) and waiting.evict == () and waiting.refusal is None
    forced = decide_load("t", models, [], Limits(max_loaded=1, force_busy=True))
    assert names(forced) == [("busy", "lru")]


def test_host_memory_fit_evicts_lru_until_the_model_fits() -> None:
    models = [
        view("a", used=1, memory_current=3 * G),
        view("b", used=2, memory_current=3 * G),
        view("c", used=3, memory_current=1 * G),
        view("t", U, memory_max=4 * G),
    ]
    decision = decide_load("t", models, [], Limits(memory_budget=8 * G))
    assert names(decision) == [("a", "memory")]
    loading = [view("l", L, memory_max=6 * G), view("t", U, memory_max=4 * G)]
    assert decide_load("t", loading, [], Limits(memory_budget=8 * G)).wait_for == ("l",)


def test_a_model_bigger_than_everything_is_refused_at_once_with_numbers() -> None:
    models = [view("a", memory_current=G), view("t", U, memory_max=20 * G, gpu_memory=G)]
    decision = decide_load("t", models, [GpuView("g0", 8 * G, 8 * G)], Limits(memory_budget=16 * G))
    assert decision.evict == ()
    assert decision.refusal == (
        "t needs 20.0 GiB of memory (memory_max) but the budget for all backends is 16.0 GiB"
    )
    gpu = decide_load(
        "t", [view("t", U, gpu_memory=9 * G)], [GpuView("g0", 8 * G, 8 * G)], Limits()
    )
    assert gpu.refusal == "t needs 9.0 GiB of GPU memory but the largest GPU has 8.0 GiB"
    none = decide_load("t", [view("t", U, gpu_memory=G)], [], Limits())
    assert none.refusal == "t needs 1.0 GiB of GPU memory but no GPU is available"


def test_gpu_placement_prefers_the_device_with_most_free_memory() -> None:
    gpus = [GpuView("g0", 16 * G, 2 * G), GpuView("g1", 16 * G, 6 * G)]
    assert decide_load("t", [view("t", U, gpu_memory=4 * G)], gpus, Limits()).gpu == "g1"


def test_gpu_fit_evicts_lru_models_on_the_chosen_device() -> None:
    gpus = [GpuView("g0", 16 * G, 1 * G), GpuView("g1", 16 * G, 2 * G)]
    models = [
        view("a", used=1, gpu="g0", gpu_used=9 * G),
        view("b", used=2, gpu="g1", gpu_used=5 * G),
        view("c", used=3, gpu="g1", gpu_used=5 * G),
        view("t", U, gpu_memory=8 * G),
    ]
    decision = decide_load("t", models, gpus, Limits())
    assert decision.gpu == "g0" and names(decision) == [("a", "gpu-memory")]
    pinned = [view("p", pinned=True, gpu="g0", gpu_used=15 * G), view("t", U, gpu_memory=8 * G)]
    refused = decide_load("t", pinned, [GpuView("g0", 16 * G, 1 * G)], Limits())
    assert refused.refusal is not None and "pinned there: p" in refused.refusal


def test_pressure_victim_is_the_lru_idle_unpinned_model() -> None:
    models = [
        view("p", used=1, pinned=True),
        view("busy", B, used=2, in_flight=1),
        view("old", used=3),
        view("new", used=4),
        view("u", U),
    ]
    assert pick_pressure_victim(models) == "old"
    assert pick_pressure_victim([view("p", pinned=True)]) is None


# ---------------------------------------------------------------------------- invariants

STATES = [U, L, R, B, ModelState.FAILED]


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[list[ModelView], list[GpuView], Limits, str]:
    gpus = [
        GpuView(f"g{i}", total, draw(st.integers(0, total)))
        for i, total in enumerate(draw(st.lists(st.sampled_from([8 * G, 16 * G]), max_size=2)))
    ]
    models = []
    for i in range(draw(st.integers(1, 7))):
        state = draw(st.sampled_from(STATES))
        holds = state.occupies_slot
        gpu = draw(st.sampled_from(["", *[g.uuid for g in gpus]])) if holds else ""
        models.append(
            ModelView(
                name=f"m{i}",
                state=state,
                last_used_us=draw(st.integers(0, 20)),
                in_flight=draw(st.integers(0, 2)) if state in (R, B) else 0,
                pinned=draw(st.booleans()),
                groups=frozenset(draw(st.lists(st.sampled_from("xy"), max_size=2))),
                memory_max=draw(st.sampled_from([UNLIMITED, G, 2 * G, 4 * G])),
                memory_peak=draw(st.sampled_from([0, 0, G // 2, 3 * G])),
                memory_current=draw(st.integers(0, 3)) * G if holds else 0,
                gpu_memory=draw(st.sampled_from([0, 0, 2 * G, 6 * G])),
                gpu=gpu,
                gpu_used=draw(st.integers(1, 6)) * G if gpu else 0,
            )
        )
    limits = Limits(
        max_loaded=draw(st.integers(0, 4)),
        memory_budget=draw(st.sampled_from([UNLIMITED, 4 * G, 8 * G])),
        force_busy=draw(st.booleans()),
    )
    return models, gpus, limits, draw(st.sampled_from([m.name for m in models]))


@settings(max_examples=400)
@given(scenarios())
def test_invariants(case: tuple[list[ModelView], list[GpuView], Limits, str]) -> None:
    models, gpus, limits, target = case
    decision = decide_load(target, models, gpus, limits)
    by = {m.name: m for m in models}
    wanted = by[target]
    victims = [by[e.name] for e in decision.evict]
    assert len({v.name for v in victims}) == len(victims)
    assert target not in {v.name for v in victims}
    assert all(not v.pinned for v in victims), "a pinned model was evicted"
    if not limits.force_busy:
        assert all(not v.busy for v in victims), "a busy model was evicted unforced"
    assert not (decision.refusal and (decision.evict or decision.wait_for))
    assert all(not by[n].pinned for n in decision.wait_for)
    if wanted.holds_backend:
        assert decision.admitted and decision.evict == ()
        return
    if not decision.admitted:
        assert decision.evict == (), "evictions decided for a load that does not happen now"
    staying = [m for m in models if m.holds_backend and m.name != target and m not in victims]
    if decision.admitted:
        if limits.max_loaded:
            assert len(staying) + 1 <= limits.max_loaded, "over the cap after the plan"
        assert not any(m.groups & wanted.groups for m in staying), "two models of a group"
        if wanted.memory_need != UNLIMITED and limits.memory_budget != UNLIMITED:
            used = sum(m.memory_charge for m in staying)
            assert used + wanted.memory_need <= limits.memory_budget
        if wanted.gpu_memory:
            device = next(g for g in gpus if g.uuid == decision.gpu)
            freed = sum(v.gpu_used for v in victims if v.gpu == device.uuid)
            assert device.free + freed >= wanted.gpu_memory
        by_reason = [v for v in victims if decision.evict[victims.index(v)].reason == "lru"]
        spared = [m for m in staying if not m.pinned and not m.busy]
        for victim in by_reason:
            assert all(victim.last_used_us <= m.last_used_us for m in spared), "not LRU"
    if decision.refusal is not None:
        assert _no_plan_exists(wanted, models, gpus, limits), decision.refusal


def _no_plan_exists(
    wanted: ModelView, models: list[ModelView], gpus: list[GpuView], limits: Limits
) -> bool:
    """Evicting every unpinned model that holds a backend still would not admit ``wanted``."""
    others = [m for m in models if m.holds_backend and m.name != wanted.name]
    pinned = [m for m in others if m.pinned]
    if wanted.memory_need != UNLIMITED and wanted.memory_need > limits.memory_budget:
        return True
    if any(m.groups & wanted.groups for m in pinned):
        return True
    if limits.max_loaded and len(pinned) + 1 > limits.max_loaded:
        return True
    if (
        wanted.memory_need != UNLIMITED
        and limits.memory_budget != UNLIMITED
        and sum(m.memory_charge for m in pinned) + wanted.memory_need > limits.memory_budget
    ):
        return True
    if wanted.gpu_memory:
        best = 0
        for gpu in gpus:
            freeable = sum(m.gpu_used for m in others if m.gpu == gpu.uuid and not m.pinned)
            if gpu.total >= wanted.gpu_memory:
                best = max(best, gpu.free + freeable)
        if best < wanted.gpu_memory:
            return True
    return False
