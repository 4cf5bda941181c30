"""A connection's outgoing queue: bounded, cursor-coalescing, closable."""

from __future__ import annotations

import trio
import trio.testing

from atrium.realtime.outbox import Outbox


def test_frames_come_out_in_order_and_cursors_last() -> None:
    box = Outbox(limit=10)
    assert box.put("a") and box.put("b")
    box.put_cursor("ann", "ann@1")
    assert box.put("c")
    assert box.take() == ["a", "b", "c", "ann@1"]
    assert box.take() == [] and len(box) == 0


def test_a_client_that_falls_behind_gets_the_latest_cursor_per_user() -> None:
    box = Outbox(limit=10)
    for line in range(100):
        box.put_cursor("ann", f"ann@{line}")
        box.put_cursor("bob", f"bob@{line}")
    assert box.take() == ["ann@99", "bob@99"]


def test_the_queue_is_bounded_but_a_resume_replay_is_not() -> None:
    box = Outbox(limit=2)
    assert box.put("1") and box.put("2")
    box.put_unbounded(["r1", "r2", "r3"])
    assert box.take() == ["1", "2", "r1", "r2", "r3"]


def test_a_full_queue_closes_the_outbox_as_a_slow_consumer() -> None:
    box = Outbox(limit=2)
    told: list[bool] = []
    box.on_close = told.append
    assert box.put("1") and box.put("2")
    assert not box.put("3")
    assert (box.close_code, box.close_reason) == (4008, "slow_consumer")
    assert told == [False] and box.take() == []  # nothing more is sent


def test_close_without_flush_drops_what_is_queued() -> None:
    box = Outbox(limit=5)
    box.put("pending")
    box.close(4008, "slow_consumer", flush=False)
    box.close(1000, "later requests are ignored")
    assert (box.close_code, box.close_reason) == (4008, "slow_consumer")
    assert box.take() == []
    assert box.put("after close")  # accepted and dropped: the client is going away
    assert box.take() == []


async def test_wait_wakes_on_a_frame_and_on_close() -> None:
    box = Outbox(limit=5)
    woke: list[str] = []
    told: list[bool] = []
    box.on_close = told.append

    async def waiter() -> None:
        await box.wait()
        woke.append("frame")
        box.take()
        await box.wait()
        woke.append("close")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        assert woke == []
        box.put("x")
        await trio.testing.wait_all_tasks_blocked()
        assert woke == ["frame"]
        box.close(1001, "server_shutdown")
    assert woke == ["frame", "close"]
    assert told == [True]  # the send task learns of the close, and that it may flush
