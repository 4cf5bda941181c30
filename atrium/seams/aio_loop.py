"""The process's asyncio loop on trio: trio-asyncio's loop, with asyncio's callback passes.

Written against trio-asyncio 0.16.0 (and CPython 3.11-3.13's ``asyncio`` handles and
selector loop). A seam: it subclasses ``trio_asyncio.TrioEventLoop`` and overrides its
private methods (``_queue_handle``, ``_handle_sig``, ``_timer_handle_cancelled``,
``_add_callback``, ``_main_loop_init``, ``_main_loop_one``, ``_cancel_fds``), reads its
private state (``_selector``, ``_token``, ``_nursery``, ``_close_files``,
``_signal_handlers``), starts trio tasks for ``trio_asyncio._handles.AsyncHandle`` (its
``_started``, ``_context``, ``_run``), reads asyncio's handles by their private fields
(``_run``, ``_cancelled``, ``_when``, ``_scheduled``), borrows
``BaseSelectorEventLoop._add_reader``/``_add_writer``, and has :func:`open_loop` point
``trio_asyncio._loop.TrioEventLoop`` at its class while ``trio_asyncio.open_loop`` builds
the loop (it takes no class; the swap is undone before the first checkpoint, so no other
code ever sees it, and nothing is changed at import). tests/test_seams.py checks each of
these.

asyncpg (and redis-py) run inside one trio-asyncio loop that the process opens at its root
with :func:`open_loop`. trio-asyncio 0.16 runs one asyncio callback per trip through trio's
scheduler: every ``call_soon`` handle is sent on a trio memory channel, and the loop's task
receives it in a fresh ``move_on_after`` scope, runs it, and goes round again; every
``call_soon`` also checks its callback with an ``inspect`` walk that asyncio does in debug
mode only. One query through asyncpg's pool makes 8 or 9 handles (task steps, a future's
wake-up, the ``shield`` in ``Pool.release``...), so those trips, not asyncpg, were most of
a query's CPU (docs/BENCHMARKS.md, "Issue 11").

:class:`BatchingEventLoop` keeps trio-asyncio's loop (tasks, futures, executors, signals,
shutdown, the exception handler) and replaces how callbacks are queued and run, and how
sockets are waited for:

- The queue is a deque. A *pass* runs every handle that is ready when it starts, in
  order; handles queued during a pass run in the next one, and timers join the queue when
  they are due, in deadline order: asyncio's own rules.
- Passes run back to back until the queue is empty (at most ``_TURN`` handles, then trio's
  other tasks get a turn), in whichever trio task made the work: the caller of
  :meth:`run_aio_coroutine` right after creating its asyncio task, the socket poller right
  after queuing the ready sockets' callbacks. The loop's own task runs what is queued from
  anywhere else (trio code, other threads, timers) and is woken only for that.
- Sockets are registered once in a real selector (epoll), as in asyncio, and one trio
  task waits for the selector's own fd; trio-asyncio ran a trio task per socket, woken
  (and re-armed with an ``epoll_ctl``) per read. With many connections busy, one wake-up
  serves all the ready ones.
- Cancelled timers leave the heap as in asyncio (trio-asyncio kept each one until it would
  have fired).

A query thus costs two trips through trio's scheduler (the poller, the caller's wake-up),
fewer when queries run concurrently, instead of about eleven.
"""

from __future__ import annotations

import asyncio
import collections
import heapq
import inspect
import math
import os
import selectors
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import trio
import trio_asyncio
from sniffio import thread_local as sniffio_library
from trio_asyncio import _loop as trio_asyncio_loop
from trio_asyncio._handles import AsyncHandle

# Handles one task runs before it lets trio's other tasks run (asyncio itself has no bound:
# this keeps a burst of asyncio work from holding trio's tasks for long).
_TURN = 256
# asyncio's rule for dropping cancelled timers from the heap (base_events.py).
_MIN_CANCELLED_TIMERS = 100
_MIN_CANCELLED_TIMERS_FRACTION = 0.5


# asyncio's own socket registration (trio-asyncio replaces it with a task per socket).
_SELECTOR_LOOP: Any = asyncio.selector_events.BaseSelectorEventLoop


class BatchingEventLoop(trio_asyncio.TrioEventLoop):  # type: ignore[misc]
    """A trio-asyncio loop that runs ready callbacks in passes, in the task that made them.

    Promises asyncio's ordering: callbacks run in the order they were scheduled, a callback
    scheduled by a callback runs after every callback that was ready before it, due timers
    run in deadline order, and a socket's callback runs after what was queued before the
    socket became ready.
    """

    def __init__(self, queue_len: int | None = None) -> None:
        super().__init__(queue_len=queue_len)
        # trio-asyncio's selector only records the sockets; this one waits for them.
        self._selector.close()
        # epoll (kqueue elsewhere): a selector with a file descriptor of its own to wait on.
        self._selector: Any = selectors.DefaultSelector()
        # asyncio's handles, read through their private fields as asyncio's loop does.
        self._queue: collections.deque[Any] = collections.deque()
        self._timers: list[Any] = []
        # The loop task while it sleeps, with the deadline it sleeps to.
        self._sleeping: trio.lowlevel.Task | None = None
        self._sleep_deadline = math.inf
        # True while a task runs handles: what they queue, that task runs too.
        self._in_pass = False
        # False once stop() is called: its handle raises TrioAsyncioExit, which must end
        # the loop task, not a caller's task.
        self._inline = True
        self._cancelled_timers = 0

    # -- queueing ------------------------------------------------------------------------

    def _queue_handle(self, handle: Any) -> Any:
        self._check_closed()
        if isinstance(handle, asyncio.TimerHandle):
            timer: Any = handle
            heapq.heappush(self._timers, timer)
            timer._scheduled = True
            if timer._when < self._sleep_deadline:
                self._wake()
        else:
            self._queue.append(handle)
            if not self._in_pass:
                self._wake()
        return handle

    def _wake(self) -> None:
        sleeping = self._sleeping
        if sleeping is not None:
            self._sleeping = None
            self._sleep_deadline = math.inf
            trio.lowlevel.reschedule(sleeping)

    def call_soon(self, callback: Callable[..., object], *args: Any, context: Any = None) -> Any:
        # As asyncio's loop: the callback is checked in debug mode only (the check, an
        # ``inspect`` walk, cost about as much as the rest of a crossing).
        if self._debug:
            self._check_callback(callback, "call_soon")
        return self._queue_handle(asyncio.Handle(callback, args, self, context=context))

    def call_at(
        self, when: float, callback: Callable[..., object], *args: Any, context: Any = None
    ) -> Any:
        if self._debug:
            self._check_callback(callback, "call_at")
        return self._queue_handle(asyncio.TimerHandle(when, callback, args, self, context))

    def call_later(
        self, delay: float, callback: Callable[..., object], *args: Any, context: Any = None
    ) -> Any:
        return self.call_at(self.time() + delay, callback, *args, context=context)

    def call_soon_threadsafe(
        self, callback: Callable[..., object], *args: Any, context: Any = None
    ) -> asyncio.Handle:
        self._check_callback(callback, "call_soon_threadsafe")
        self._check_closed()
        handle = asyncio.Handle(callback, args, self, context=context)
        self._token.run_sync_soon(self._queue_handle, handle)
        return handle

    def _handle_sig(self, sig: int, _frame: object) -> None:
        self._token.run_sync_soon(self._queue_handle, self._signal_handlers[sig])

    def _timer_handle_cancelled(self, handle: Any) -> None:
        if handle._scheduled:
            self._cancelled_timers += 1

    def stop(self, waiter: trio.Event | None = None) -> trio.Event:
        self._inline = False
        stopped: trio.Event = super().stop(waiter)
        return stopped

    # -- running -------------------------------------------------------------------------

    def _run_passes(self, *, inline: bool = False) -> bool:
        """Run passes until the queue is empty, an ``AsyncHandle`` (a trio task to start,
        which the loop task does) is next, or ``_TURN`` handles ran; when ``inline`` (not
        the loop task), also once ``stop()`` was called. True when the queue is empty.
        Never checkpoints."""
        queue = self._queue
        self._in_pass = True
        previous, sniffio_library.name = sniffio_library.name, "asyncio"
        try:
            ran = 0
            # The clock is read once per run: a run is short, and a timer is never early.
            if self._timers:
                self._move_due_timers()
            while ran < _TURN and (self._inline or not inline):
                count = len(queue)
                if not count:
                    break
                ran += count
                for _ in range(count):
                    handle = queue[0]
                    if isinstance(handle, AsyncHandle):
                        return False
                    queue.popleft()
                    if not handle._cancelled:
                        handle._run()
        finally:
            sniffio_library.name = previous
            self._in_pass = False
        return not queue

    def _move_due_timers(self) -> None:
        timers = self._timers
        if (
            self._cancelled_timers > _MIN_CANCELLED_TIMERS
            and self._cancelled_timers > len(timers) * _MIN_CANCELLED_TIMERS_FRACTION
        ):
            kept = [timer for timer in timers if not timer._cancelled]
            for timer in timers:
                if timer._cancelled:
                    timer._scheduled = False
            heapq.heapify(kept)
            self._timers = timers = kept
            self._cancelled_timers = 0
        now = self.time()
        while timers and timers[0]._when <= now:
            timer = heapq.heappop(timers)
            timer._scheduled = False
            if timer._cancelled:
                self._cancelled_timers -= 1
            else:
                self._queue.append(timer)

    def _run_here(self) -> bool:
        """Run what is queued in the calling task if the loop allows it (not stopping),
        else leave it to the loop task. True when nothing is left queued."""
        if self._inline and self._run_passes(inline=True):
            return True
        if self._queue:
            self._wake()
            return False
        return True

    async def _main_loop_one(self, no_wait: bool = False) -> None:
        """The loop task's turn: run what is queued, start a trio task for an
        ``AsyncHandle``, then sleep until a handle is queued or the first timer is due
        (``no_wait``: raise ``trio.WouldBlock`` instead of sleeping)."""
        self._run_passes()
        queue = self._queue
        if queue:
            if isinstance(queue[0], AsyncHandle):
                handle = queue.popleft()
                handle._context.run(self._nursery.start_soon, handle._run, name=handle._callback)
                await handle._started.wait()
            else:
                await trio.lowlevel.cancel_shielded_checkpoint()
            return
        if no_wait:
            raise trio.WouldBlock
        timers = self._timers
        await self._sleep(timers[0]._when if timers else math.inf)

    async def _sleep(self, deadline: float) -> None:
        """Wait for ``_wake``, or for ``deadline``."""
        task = trio.lowlevel.current_task()
        self._sleeping = task
        self._sleep_deadline = deadline

        def abort(_raise_cancel: object) -> trio.lowlevel.Abort:
            if self._sleeping is task:
                self._sleeping = None
                self._sleep_deadline = math.inf
            return trio.lowlevel.Abort.SUCCEEDED

        if deadline == math.inf:
            await trio.lowlevel.wait_task_rescheduled(abort)
            return
        # The loop task runs under a shield; only this scope's deadline can cancel it.
        with trio.CancelScope(deadline=deadline):
            await trio.lowlevel.wait_task_rescheduled(abort)

    # -- sockets -------------------------------------------------------------------------
    # trio-asyncio waits for each socket in a trio task of its own (a task step and an
    # epoll_ctl per read). Here, as in asyncio, sockets are registered once in a real
    # epoll selector, and one trio task waits for that selector's fd: every socket that
    # is ready is handled in one step, its callback queued after what was queued before
    # (asyncio's order), and the passes run right there.

    _add_reader = _SELECTOR_LOOP._add_reader
    _add_writer = _SELECTOR_LOOP._add_writer

    def _add_callback(self, handle: Any) -> None:
        if not handle._cancelled:
            self._queue.append(handle)

    async def _main_loop_init(self, nursery: trio.Nursery) -> None:
        await super()._main_loop_init(nursery)
        nursery.start_soon(self._poll_sockets)

    async def _poll_sockets(self) -> None:
        """Wait for the selector; queue the callbacks of the ready sockets and run them."""
        selector = self._selector
        while True:
            await trio.lowlevel.wait_readable(selector.fileno())
            events = selector.select(0)
            if events:
                self._process_events(events)
                if not self._run_here():
                    # asyncio runs the ready queue before it polls again.
                    await self._wait_for_pass()

    async def _wait_for_pass(self) -> None:
        """Return once every handle queued so far has run (``synchronize``, without an
        Event: the handle reschedules this task)."""
        task = trio.lowlevel.current_task()
        wake = self._queue_handle(asyncio.Handle(trio.lowlevel.reschedule, (task,), self))

        def abort(_raise_cancel: object) -> trio.lowlevel.Abort:
            wake.cancel()
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)

    def _cancel_fds(self) -> None:
        fd: Any
        for fd, key in list(self._selector.get_map().items()):
            reader, writer = key.data
            for handle in (reader, writer):
                if handle is not None:
                    handle.cancel()
            self._selector.unregister(fd)
            if fd in self._close_files:
                os.close(fd)

    async def run_aio_coroutine(self, coro: Any) -> Any:
        """Run ``coro`` (a coroutine or any awaitable) in an asyncio task on this loop;
        return or raise its result.

        The task's first steps run here, before this trio task waits (a query is on the
        wire before anything else runs). Trio cancellation cancels the asyncio task, as
        in trio-asyncio: ``trio.Cancelled`` if the task ends cancelled because of it. A
        checkpoint, as trio's functions are."""
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
            self._in_pass = True
            try:
                task = asyncio.ensure_future(coro, loop=self)
            finally:
                self._in_pass = False
        except BaseException:
            if inspect.iscoroutine(coro):
                coro.close()  # never awaited, and not to be warned about
            raise
        self._run_here()
        if task.done():
            await trio.lowlevel.cancel_shielded_checkpoint()
            return task.result()
        return await trio_asyncio.run_aio_future(task)


@asynccontextmanager
async def open_loop() -> AsyncIterator[BatchingEventLoop]:
    """``trio_asyncio.open_loop()`` with a :class:`BatchingEventLoop`: the process's asyncio
    loop for the block, shut down as trio-asyncio shuts down its own (its asyncio tasks
    cancelled and awaited, async generators finalised)."""
    # trio-asyncio builds its loop from its module's ``TrioEventLoop`` and takes no class:
    # the name points at ours while the block is entered (no checkpoint comes before the
    # loop is built), and the check below fails loudly if a release changes that.
    manager = trio_asyncio.open_loop()
    trio_asyncio_loop.TrioEventLoop = BatchingEventLoop
    try:
        loop = await manager.__aenter__()
    finally:
        trio_asyncio_loop.TrioEventLoop = trio_asyncio.TrioEventLoop
    if not isinstance(loop, BatchingEventLoop):  # pragma: no cover - a trio-asyncio upgrade
        await manager.__aexit__(None, None, None)
        raise RuntimeError("trio_asyncio.open_loop did not build atrium's loop class")
    try:
        yield loop
    except BaseException as error:
        if not await manager.__aexit__(type(error), error, error.__traceback__):
            raise
    else:
        await manager.__aexit__(None, None, None)
