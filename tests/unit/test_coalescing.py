"""Which status changes may wait (StatusChange.use_only), and the Coalescer that waits."""

import asyncio
import dataclasses
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from modeld.coalesce import Coalescer
from modeld.core.states import ModelState
from modeld.supervisor.status import ModelStatus, StatusChange

USE_FIELDS = {"in_flight", "last_used_us"}
READY = ModelStatus(state=ModelState.READY, unit="demo.scope", main_pid=42, load_count=1)


def other_value(value: Any) -> Any:
    if isinstance(value, ModelState):
        return ModelState.UNLOADING
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    return value + "x"


@given(
    st.integers(0, 64),
    st.integers(0, 1 << 60),
    st.sampled_from([ModelState.READY, ModelState.BUSY]),
)
def test_requests_starting_and_ending_change_use_only(
    in_flight: int, last_used: int, state: ModelState
) -> None:
    after = dataclasses.replace(READY, state=state, in_flight=in_flight, last_used_us=last_used)
    assert StatusChange("demo", READY, after).use_only
    assert StatusChange("demo", after, READY).use_only


def test_any_other_field_or_state_is_not_use_only() -> None:
    for field in dataclasses.fields(ModelStatus):
        if field.name in USE_FIELDS:
            continue
        changed = dataclasses.replace(
            READY, **{field.name: other_value(getattr(READY, field.name))}
        )
        busy = dataclasses.replace(changed, in_flight=1) if field.name != "state" else changed
        assert not StatusChange("demo", READY, busy).use_only, field.name
    loading = dataclasses.replace(READY, state=ModelState.LOADING)
    assert not StatusChange("demo", loading, dataclasses.replace(loading, in_flight=1)).use_only
    assert not StatusChange("demo", loading, READY).use_only


def test_a_burst_runs_the_work_once_and_now_settles_it() -> None:
    async def scenario() -> None:
        runs: list[str] = []
        ran = asyncio.Event()

        def work() -> None:
            runs.append("ran")
            ran.set()

        coalescer = Coalescer(work, 0.01)
        for _ in range(100):
            coalescer.soon()
        assert coalescer.pending and runs == []
        await asyncio.wait_for(ran.wait(), 10)
        assert runs == ["ran"] and not coalescer.pending

        long = Coalescer(work, 3600)
        long.soon()
        long.now()
        assert runs == ["ran", "ran"] and not long.pending
        long.soon()
        long.cancel()
        assert not long.pending and runs == ["ran", "ran"]

    asyncio.run(scenario())
