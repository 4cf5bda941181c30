"""A connection's bounded outgoing queue, filled by a workspace and drained by one send task.

The workspace never waits on a client: ``put`` either queues the frame or, when the client
fell too far behind, closes the outbox (4008) and says so. Cursor updates are
kept latest-per-user, so a client that falls behind gets the newest position of each
cursor instead of every step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

import trio

from .protocol import CloseCode

# What a transport's direct write did with a frame (see ``Outbox.direct``).
REFUSED = 0  # nothing written: queue the frame
SENT = 1  # the whole frame is in the kernel's socket buffer
PARTIAL = 2  # part of it is: the send task owes the rest (``owed``), before anything else

# A frame: text for a workspace (JSON), bytes for a live document (y-websocket).
FrameT = TypeVar("FrameT", str, bytes)


class Outbox(Generic[FrameT]):
    """Frames waiting to be sent to one connection (serialised once, shared between them):
    ``Outbox[str]`` for a workspace's text frames, ``Outbox[bytes]`` for a document's."""

    __slots__ = (
        "_queue",
        "_cursors",
        "_limit",
        "_waiter",
        "close_code",
        "close_reason",
        "on_close",
        "on_ready",
        "direct",
        "owed",
        "sent",
        "counted",
    )

    def __init__(self, limit: int) -> None:
        self._queue: list[FrameT] = []
        self._cursors: dict[object, FrameT] = {}
        self._limit = limit
        # The send task while it waits in ``wait`` (only it waits): a put reschedules it
        # directly, for less than a ParkingLot's unpark_all costs per delivery.
        self._waiter: trio.lowlevel.Task | None = None
        self.close_code: int | None = None
        self.close_reason = ""
        # Told when a close is requested (flush or not), so the send task can stop waiting.
        self.on_close: Callable[[bool], None] | None = None
        # Told when frames are queued or owed, or a close is requested, while no task
        # waits in ``wait``: a session whose send task ends when idle starts one here.
        self.on_ready: Callable[[], None] | None = None
        # A transport that can write without waiting sets this: while nothing is queued, a
        # frame goes straight to the socket from the workspace's task, skipping a task
        # switch and a queue per delivery. It returns REFUSED, SENT or PARTIAL.
        self.direct: Callable[[FrameT], int] | None = None
        self.owed = False
        # Frames sent (by the send task or ``direct``), and how many of them a metric has
        # counted: a plain int here, folded into the metric before each scrape and at the
        # connection's end (a metric's counter costs ten times as much per delivery).
        self.sent = 0
        self.counted = 0

    @property
    def closing(self) -> bool:
        return self.close_code is not None

    def __len__(self) -> int:
        return len(self._queue) + len(self._cursors)

    def put(self, frame: FrameT) -> bool:
        """Queue a frame. At the limit the client is a slow consumer: the outbox closes
        itself (4008, nothing more is sent) and returns False."""
        if self.close_code is not None:
            return True
        if self._try_direct(frame):
            return True
        if len(self._queue) >= self._limit:
            self.close(CloseCode.SLOW_CONSUMER, "slow_consumer", flush=False)
            return False
        self._queue.append(frame)
        self._wake()
        return True

    def put_unbounded(self, frames: list[FrameT]) -> None:
        """Queue frames past the limit (a resume's replay: bounded by the caller)."""
        if self.close_code is None:
            self._queue.extend(frames)
            self._wake()

    def put_cursor(self, key: object, frame: FrameT) -> None:
        """Queue a cursor frame, replacing one from the same ``key`` not yet sent."""
        if self.close_code is None and not self._try_direct(frame):
            self._cursors.pop(key, None)
            self._cursors[key] = frame
            self._wake()

    def _try_direct(self, frame: FrameT) -> bool:
        if self.direct is None or self._queue or self._cursors or self.owed:
            return False  # order: what is queued or owed goes first
        outcome = self.direct(frame)
        if outcome == REFUSED:
            return False
        self.sent += 1
        if outcome == PARTIAL:
            self.owed = True
            self._wake()
        return True

    def close(self, code: int, reason: str, *, flush: bool = True) -> None:
        """Ask the send task to close the connection, after the queued frames if ``flush``.

        The first request wins; later ones are ignored.
        """
        if self.close_code is None:
            self.close_code = code
            self.close_reason = reason
            if not flush:
                self._queue.clear()
                self._cursors.clear()
            if self.on_close is not None:
                self.on_close(flush)
            self._wake()

    def take(self) -> list[FrameT]:
        """Everything queued now, oldest first (cursors last), leaving the outbox empty."""
        frames, self._queue = self._queue, []
        if self._cursors:
            frames.extend(self._cursors.values())
            self._cursors.clear()
        return frames

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            trio.lowlevel.reschedule(waiter)
        elif self.on_ready is not None:
            self.on_ready()

    async def wait(self) -> None:
        """Return once frames are queued or owed, or a close is requested. One task at a
        time may wait."""
        if not self._queue and not self._cursors and not self.owed and self.close_code is None:
            task = trio.lowlevel.current_task()
            assert self._waiter is None, "one task at a time waits on an outbox"
            self._waiter = task

            def abort(_raise_cancel: object) -> trio.lowlevel.Abort:
                if self._waiter is task:
                    self._waiter = None
                return trio.lowlevel.Abort.SUCCEEDED

            await trio.lowlevel.wait_task_rescheduled(abort)
