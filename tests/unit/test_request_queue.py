"""The bounded queue in front of a model's ``parallel`` slots."""

from __future__ import annotations

import asyncio

import pytest

from modeld.errors import QueueFull
from modeld.supervisor.request_queue import RequestQueue


def test_a_full_queue_refuses_with_a_retry_after() -> None:
    queue = RequestQueue("m", parallel=1, max_queue=2)
    queue.enter()
    queue.enter()
    with pytest.raises(QueueFull, match="m: 2 requests already wait") as refused:
        queue.enter()
    assert refused.value.retry_after >= 1
    queue.leave(had_slot=False)
    queue.enter()  # room again
    assert (queue.waiting, queue.running) == (2, 0)


def test_slots_bound_running_requests_and_waiting_ones_count_as_queued() -> None:
    async def scenario() -> None:
        queue = RequestQueue("m", parallel=2, max_queue=3)
        for _ in range(3):
            queue.enter()
        await queue.take_slot()
        await queue.take_slot()
        third = asyncio.ensure_future(queue.take_slot())
        await asyncio.sleep(0)  # let it block on the slots
        assert not third.done()
        assert (queue.waiting, queue.running) == (1, 2)
        queue.enter()  # a slot-holder does not count against max_queue
        queue.leave(had_slot=True)
        await third
        assert (queue.waiting, queue.running) == (1, 2)

    asyncio.run(scenario())


def test_a_request_cancelled_while_waiting_for_a_slot_leaves_no_trace() -> None:
    async def scenario() -> None:
        queue = RequestQueue("m", parallel=1, max_queue=4)
        queue.enter()
        await queue.take_slot()
        queue.enter()
        waiter = asyncio.ensure_future(queue.take_slot())
        await asyncio.sleep(0)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        queue.leave(had_slot=False)  # what serving() does for it
        queue.leave(had_slot=True)
        assert (queue.waiting, queue.running) == (0, 0)
        queue.enter()
        await asyncio.wait_for(queue.take_slot(), 1)  # the slot is free for the next

    asyncio.run(scenario())
