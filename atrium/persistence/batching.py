"""Group commit: the calls that arrive while a round trip is out go together in the next.

A join storm asks the same small question of PostgreSQL thousands of times a second (is
this session live, what is this user's role; store this USER_JOIN). Asked one by one,
each is a round trip whose fixed cost (the crossing into asyncio, the protocol, the
executor's start-up) dwarfs the row it reads. A ``Batcher`` sends the first call at once;
the calls that arrive while it is out wait, and go in one statement when it returns
(``run(keys) -> results``), and so on: an idle process adds no latency, a busy one makes
one round trip for every call that waited.
"""

from __future__ import annotations

import copy
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

import trio

K = TypeVar("K")
V = TypeVar("V")
Run = Callable[[Sequence[K]], Awaitable[Sequence[V | BaseException]]]
"""Answers one batch: a result or an exception for every key, in order."""


class _Call(Generic[K, V]):
    __slots__ = ("key", "done", "value", "error")

    def __init__(self, key: K) -> None:
        self.key = key
        self.done = False
        self.value: V | None = None
        self.error: BaseException | None = None


class Batcher(Generic[K, V]):
    """Calls of ``run`` made concurrently, batched: at most one batch out at a time.

    The caller that finds no batch out sends one with every call waiting (its own among
    them) and hands each its answer; the others wait for that batch to return and then
    go in the next. An exception ``run`` raises fails every call of its batch (each gets
    its own copy); one ``run`` returns for a key fails that call alone. The batch a
    caller sends is shielded from that caller's cancellation: it carries the others'
    calls (writes among them, which must not be sent twice), and every database call
    ends within the pool's query timeout; the cancelled caller raises once it returns.
    """

    __slots__ = ("_run", "_waiting", "_out", "_returned", "batches")

    def __init__(self, run: Run[K, V]) -> None:
        self._run = run
        self._waiting: list[_Call[K, V]] = []
        self._out = False
        self._returned = trio.Event()
        self.batches = 0  # sent so far (a statistic, for tests and benchmarks)

    async def call(self, key: K) -> V:
        """``run``'s answer for ``key``, asked with whatever else waits; raises what
        ``run`` raised (for the batch, or for this key)."""
        mine: _Call[K, V] = _Call(key)
        self._waiting.append(mine)
        try:
            while not mine.done:
                if self._out:
                    await self._returned.wait()
                else:
                    await self._send()
        except BaseException:
            if mine in self._waiting:  # not sent: nobody answers it now
                self._waiting.remove(mine)
            raise
        if mine.error is not None:
            raise mine.error
        return mine.value  # type: ignore[return-value]  # V, set with done

    async def _send(self) -> None:
        batch, self._waiting = self._waiting, []
        self._out = True
        self.batches += 1
        answered = False
        try:
            try:
                with trio.CancelScope(shield=True):
                    results = await self._run([c.key for c in batch])
            except Exception as error:
                for call in batch:
                    call.error = _own_copy(error)
            else:
                if len(results) != len(batch):
                    raise AssertionError("a batch must answer every key")
                for call, result in zip(batch, results, strict=True):
                    if isinstance(result, BaseException):
                        call.error = result
                    else:
                        call.value = result
            answered = True
        finally:
            for call in batch:
                if not answered:  # ``run`` broke its promise: its calls must not wait on
                    call.error = BatchUnanswered("the batch ended without an answer")
                call.done = True
            self._out = False
            returned, self._returned = self._returned, trio.Event()
            returned.set()
        await trio.lowlevel.checkpoint_if_cancelled()


class BatchUnanswered(RuntimeError):
    """``run`` ended without answering its batch (a bug, or the process stopping)."""


def _own_copy(error: Exception) -> BaseException:
    """``error`` for one caller: a copy, so the callers' tracebacks do not pile up on
    one object (the error itself when it cannot be copied)."""
    try:
        mine = copy.copy(error)
    except Exception:
        return error
    mine.__cause__ = error
    return mine
