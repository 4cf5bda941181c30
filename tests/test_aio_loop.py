"""atrium's asyncio loop on trio keeps asyncio's semantics and crosses cheaply."""

from __future__ import annotations

import asyncio
import collections
import threading
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import trio
import trio.testing
import trio_asyncio

from atrium.persistence.database import Database
from atrium.seams.aio_loop import BatchingEventLoop, open_loop


def _loop() -> BatchingEventLoop:
    loop = trio_asyncio.current_loop.get()
    assert isinstance(loop, BatchingEventLoop)
    return loop


async def _in_asyncio(fn: Callable[[], Awaitable[Any]]) -> Any:
    return await _loop().run_aio_coroutine(fn())


async def test_open_loop_gives_atriums_loop_and_leaves_trio_asyncio_as_it_was() -> None:
    async with open_loop() as loop:
        assert isinstance(loop, BatchingEventLoop)
        assert trio_asyncio.current_loop.get() is loop
    assert trio_asyncio.TrioEventLoop is not BatchingEventLoop
    async with trio_asyncio.open_loop() as stock:
        assert type(stock) is trio_asyncio.TrioEventLoop


async def test_callbacks_run_in_order_and_what_a_callback_schedules_runs_after_the_ready_ones(
    aio_loop: None,
) -> None:
    order: list[str] = []

    async def schedule() -> None:
        loop = asyncio.get_running_loop()
        done = loop.create_future()

        def first() -> None:
            order.append("a")
            loop.call_soon(order.append, "a2")

        def second() -> None:
            order.append("b")
            loop.call_soon(order.append, "b2")

        loop.call_soon(first)
        loop.call_soon(second)
        cancelled = loop.call_soon(order.append, "never")
        loop.call_soon(order.append, "c")
        cancelled.cancel()
        loop.call_soon(lambda: loop.call_soon(done.set_result, None))
        await done

    await _in_asyncio(schedule)
    assert order == ["a", "b", "c", "a2", "b2"]


async def test_callbacks_queued_from_trio_code_run_in_order(aio_loop: None) -> None:
    loop = _loop()
    order: list[int] = []
    for n in range(5):
        loop.call_soon(order.append, n)
    await loop.synchronize()
    assert order == [0, 1, 2, 3, 4]


async def test_timers_fire_in_deadline_order_and_cancelled_ones_leave_the_heap(
    aio_loop: None, autojump_clock: trio.testing.MockClock
) -> None:
    loop = _loop()
    fired: list[str] = []

    async def timers() -> None:
        running = asyncio.get_running_loop()
        running.call_later(0.3, fired.append, "0.3")
        running.call_later(0.1, fired.append, "0.1")
        running.call_at(running.time() + 0.2, fired.append, "0.2")
        running.call_later(0.15, fired.append, "cancelled").cancel()
        await asyncio.sleep(0.5)

    await _in_asyncio(timers)
    assert fired == ["0.1", "0.2", "0.3"]

    # asyncio's rule: once more than 100 and more than half are cancelled, they go.
    handles = [loop.call_later(3600, fired.append, "late") for _ in range(300)]
    for handle in handles:
        handle.cancel()
    loop.call_soon(fired.append, "soon")
    await loop.synchronize()
    assert len(loop._timers) < 10
    await trio.sleep(0.1)
    assert fired[-1] == "soon"


async def test_an_earlier_timer_wakes_a_loop_sleeping_to_a_later_one(
    aio_loop: None, autojump_clock: trio.testing.MockClock
) -> None:
    loop = _loop()
    fired = trio.Event()
    loop.call_later(60, lambda: None)
    await trio.testing.wait_all_tasks_blocked()  # the loop task sleeps until +60 s
    started = trio.current_time()
    loop.call_later(1, fired.set)
    await fired.wait()
    assert trio.current_time() - started == pytest.approx(1, abs=0.01)


async def test_trio_cancellation_cancels_the_asyncio_task(aio_loop: None) -> None:
    seen: list[str] = []

    async def sleeper() -> None:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            seen.append("cancelled")
            raise

    with trio.move_on_after(0.05) as scope:
        await _in_asyncio(sleeper)
    assert scope.cancelled_caught
    assert seen == ["cancelled"]

    # Already cancelled: the coroutine never starts (and is not left un-awaited).
    with trio.CancelScope() as scope:
        scope.cancel()
        await _in_asyncio(sleeper)
    assert seen == ["cancelled"]


async def test_results_and_errors_reach_the_trio_caller(aio_loop: None) -> None:
    async def answer() -> int:
        await asyncio.sleep(0)
        return 42

    async def immediate() -> str:
        return "now"

    async def fail() -> None:
        raise ValueError("from asyncio")

    assert await _in_asyncio(answer) == 42
    assert await _in_asyncio(immediate) == "now"
    with pytest.raises(ValueError, match="from asyncio"):
        await _in_asyncio(fail)

    # Any awaitable, not only coroutines (asyncpg's ``pool.acquire()`` is one).
    loop = _loop()
    future = loop.create_future()
    loop.call_soon(future.set_result, "future")
    assert await loop.run_aio_coroutine(future) == "future"


async def test_an_error_in_a_callback_reaches_the_exception_handler(aio_loop: None) -> None:
    loop = _loop()
    reported: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: reported.append(context))
    order: list[str] = []

    def broken() -> None:
        raise RuntimeError("callback failed")

    loop.call_soon(broken)
    loop.call_soon(order.append, "next")
    await loop.synchronize()
    assert order == ["next"]  # the rest of the pass still ran
    assert isinstance(reported[0]["exception"], RuntimeError)


async def test_threads_and_executors(aio_loop: None) -> None:
    loop = _loop()
    arrived = trio.Event()

    def from_thread() -> None:
        loop.call_soon_threadsafe(arrived.set)

    await trio.to_thread.run_sync(from_thread)
    await arrived.wait()

    async def in_executor() -> str:
        running = asyncio.get_running_loop()
        name: str = await running.run_in_executor(None, lambda: threading.current_thread().name)
        return name

    assert await _in_asyncio(in_executor) != threading.current_thread().name


async def test_a_busy_asyncio_side_does_not_starve_trio(aio_loop: None) -> None:
    loop = _loop()
    spins = 0
    stop = False

    def spin() -> None:
        nonlocal spins
        spins += 1
        if not stop:
            loop.call_soon(spin)

    loop.call_soon(spin)
    for _ in range(20):
        await trio.lowlevel.checkpoint()  # each needs the loop to let trio run
    stop = True
    await loop.synchronize()
    assert spins > 20


async def test_the_loop_cancels_its_asyncio_tasks_when_it_closes() -> None:
    seen: list[str] = []

    async def forever() -> None:
        try:
            await asyncio.sleep(3600)
        finally:
            seen.append("cleaned up")

    async with open_loop() as loop:
        loop.create_task(forever())
        await loop.synchronize()
    assert seen == ["cleaned up"]


class _Steps(trio.abc.Instrument):
    def __init__(self) -> None:
        self.steps: collections.Counter[str] = collections.Counter()

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self.steps[task.name] += 1


async def test_a_query_costs_two_task_steps_and_the_loop_task_none(db: Database) -> None:
    # trio-asyncio's own loop took about eleven trips through trio's scheduler a query
    # (docs/BENCHMARKS.md); now the socket poller runs asyncpg's callbacks when the reply
    # arrives, and the caller resumes with the row.
    for n in range(10):
        await db.fetchval("SELECT $1::int", n)
    steps = _Steps()
    trio.lowlevel.add_instrument(steps)
    try:
        for n in range(50):
            assert await db.fetchval("SELECT $1::int", n) == n
    finally:
        trio.lowlevel.remove_instrument(steps)
    assert sum(steps.steps.values()) <= 2 * 50 + 5
    assert not any("_main_loop" in name for name in steps.steps)


async def test_concurrent_queries_and_redis_under_the_loop(db: Database, redis_url: str) -> None:
    import redis.asyncio

    async def query(n: int) -> None:
        assert await db.fetchval("SELECT $1::int + 1", n) == n + 1

    async with trio.open_nursery() as nursery:
        for n in range(40):  # ten times the pool
            nursery.start_soon(query, n)

    async def with_redis() -> list[Any]:
        client = redis.asyncio.Redis.from_url(redis_url)
        try:
            pubsub = client.pubsub()
            await pubsub.subscribe("aio-loop-test")
            await client.set("key", "value")
            await client.publish("aio-loop-test", "hello")
            messages = []
            while len(messages) < 2:
                message = await pubsub.get_message(timeout=5)
                if message is not None:
                    messages.append(message["data"])
            await pubsub.aclose()
            return [await client.get("key"), *messages]
        finally:
            await client.aclose()

    assert await _in_asyncio(with_redis) == [b"value", 1, b"hello"]


async def test_one_poller_wake_serves_many_ready_connections(db: Database) -> None:
    async def queries(count: int) -> None:
        for n in range(count):
            assert await db.fetchval("SELECT $1::int", n) == n

    async def in_parallel(count: int) -> None:
        async with trio.open_nursery() as nursery:
            for _ in range(4):  # the pool's size
                nursery.start_soon(queries, count)

    await in_parallel(5)
    steps = _Steps()
    trio.lowlevel.add_instrument(steps)
    try:
        await in_parallel(50)
    finally:
        trio.lowlevel.remove_instrument(steps)
    polls = sum(n for name, n in steps.steps.items() if "_poll_sockets" in name)
    assert 0 < polls < 200  # trio-asyncio: a reader task's step for each of the 200 replies
