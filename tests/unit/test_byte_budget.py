"""ByteBudget serves its waiters in order, never starves a large body, and never deadlocks bodies that can only
give bytes back once complete: when all of them wait, the oldest goes over the limit, alone."""

from __future__ import annotations

import anyio
import pytest

from model_runner.sink.budget import BudgetHold, ByteBudget

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]


async def test_waiters_are_served_in_the_order_they_came_even_when_a_later_one_would_fit() -> None:
    budget = ByteBudget(10)
    served: list[str] = []

    async def take(name: str, size: int) -> None:
        await budget.acquire(size)
        served.append(name)

    await budget.acquire(8)
    async with anyio.create_task_group() as group:
        group.start_soon(take, "five", 5)
        await anyio.wait_all_tasks_blocked()
        group.start_soon(take, "one", 1)
        await anyio.wait_all_tasks_blocked()
        assert served == []
        budget.release(8)
    assert served == ["five", "one"]
    assert budget.used == 6


async def test_a_body_larger_than_the_budget_is_served_while_smaller_ones_keep_coming() -> None:
    budget = ByteBudget(10)
    cycles = 0
    waited: list[int] = []

    async def small(start: int) -> None:
        nonlocal cycles
        for _ in range(start):
            await anyio.lowlevel.checkpoint()
        # Four bodies of 3 in a budget of 10: three hold while the fourth waits, so it is never empty.
        for _ in range(200):
            await budget.acquire(3)
            for _ in range(3):
                await anyio.lowlevel.checkpoint()
            budget.release(3)
            cycles += 1

    async def large() -> None:
        came = cycles
        await budget.acquire(25)
        waited.append(cycles - came)
        budget.release(25)

    async with anyio.create_task_group() as group:
        for start in range(4):
            group.start_soon(small, start)
        for _ in range(20):
            await anyio.lowlevel.checkpoint()
        group.start_soon(large)
    # Served once the bodies ahead of it were sent, not once the others stopped coming.
    assert waited and waited[0] <= 8


async def test_when_every_body_waits_for_more_the_oldest_goes_over_the_limit_alone() -> None:
    budget = ByteBudget(10)
    first, second = budget.hold(), budget.hold()
    await first.grow(4)
    await second.grow(4)
    grown: list[str] = []

    async def grow(name: str, hold: BudgetHold, times: int) -> None:
        for _ in range(times):
            await hold.grow(4)
            grown.append(name)

    async with anyio.create_task_group() as group:
        group.start_soon(grow, "first", first, 2)
        await anyio.wait_all_tasks_blocked()
        # The second body is not waiting yet: it could still be sent and give its bytes back.
        assert grown == []
        group.start_soon(grow, "second", second, 1)
        await anyio.wait_all_tasks_blocked()
        # Both wait: the oldest goes on, over the limit, and keeps going while the budget is over it.
        assert grown == ["first", "first"]
        assert budget.used == 16
        first.release()
    assert grown == ["first", "first", "second"]
    assert budget.peak == 16
    assert budget.used == 8
    second.release()
    assert budget.used == 0


async def test_bodies_being_sent_are_waited_for_rather_than_going_over() -> None:
    budget = ByteBudget(10)
    writer, other = budget.hold(), budget.hold()
    await writer.grow(6)
    part = writer.split(6)
    assert (part.size, writer.size, budget.used) == (6, 0, 6)
    await other.grow(3)
    grown = anyio.Event()

    async def grow() -> None:
        await other.grow(3)
        grown.set()

    async with anyio.create_task_group() as group:
        group.start_soon(grow)
        await anyio.wait_all_tasks_blocked()
        assert not grown.is_set()
        part.release()
    assert budget.used == 6
    assert budget.peak == 9


async def test_many_bodies_larger_than_the_budget_all_finish_within_the_bound() -> None:
    budget = ByteBudget(4)
    finished = 0

    async def body(index: int) -> None:
        nonlocal finished
        hold = budget.hold()
        try:
            for _ in range(8):
                await hold.grow(1)
                await anyio.lowlevel.checkpoint()
            await anyio.lowlevel.checkpoint()  # sent
        finally:
            hold.release()
        finished += 1

    async with anyio.create_task_group() as group:
        for index in range(30):
            group.start_soon(body, index)
        # Every task blocked before all bodies finished would be a deadlock: fail rather than hang.
        await anyio.wait_all_tasks_blocked()
        assert finished == 30, f"deadlock: {finished} of 30 bodies finished"
    # The limit, plus the one body allowed over it.
    assert budget.peak <= 4 + 8
    assert budget.used == 0


async def test_a_waiter_that_gives_up_lets_the_next_in_line_go() -> None:
    budget = ByteBudget(10)
    await budget.acquire(8)
    served: list[str] = []

    async def take(name: str, size: int) -> None:
        await budget.acquire(size)
        served.append(name)

    async with anyio.create_task_group() as group:
        async with anyio.create_task_group() as impatient:
            impatient.start_soon(take, "five", 5)
            await anyio.wait_all_tasks_blocked()
            group.start_soon(take, "one", 1)
            await anyio.wait_all_tasks_blocked()
            assert served == []
            impatient.cancel_scope.cancel()
        await anyio.wait_all_tasks_blocked()
        assert served == ["one"]
    assert budget.used == 9
