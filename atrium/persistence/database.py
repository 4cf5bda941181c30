"""The asyncpg pool, reached from trio through the root trio-asyncio loop.

asyncpg is an asyncio library. The process opens one ``trio_asyncio`` loop at its root;
this module is the only place (with the Redis bridge) that crosses into it, so the rest
of atrium calls plain trio functions.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any, NoReturn, TypeVar

import asyncpg
import outcome
import trio
import trio_asyncio

# Defined in core, where the layers that refuse work during an outage (HTTP's 503) can
# name them without importing persistence; raised here.
from ..core.outages import DatabaseTimeout as DatabaseTimeout
from ..core.outages import DatabaseUnavailable as DatabaseUnavailable
from .batching import Batcher as Batcher
from .batching import K, V

T = TypeVar("T")
log = logging.getLogger("atrium.database")
Observe = Callable[[float], None]
"""Told the seconds of each query or transaction (a latency metric)."""
_CLOSE_TIMEOUT = 10.0
# Every call (a statement, a transaction) must end within this many seconds. The timer is
# an asyncio one (``_within_timeout``); asyncpg's own timers stay off (command_timeout, the
# pool's inactivity timer): they would add two timers per query for nothing.
QUERY_TIMEOUT = 30.0


# asyncpg's errors that say "no usable connection", as opposed to "the query was wrong":
# connection exceptions (SQLSTATE class 08), a server shutting down, crashed or still
# starting (57P01-57P03), and the client-side "connection/pool is closed" errors.
_UNAVAILABLE = (
    OSError,  # refused, reset, no socket file, connect timeout
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CrashShutdownError,
    asyncpg.exceptions.CannotConnectNowError,
    # "cannot switch to state N; another operation is in progress": a connection that died
    # between two protocol steps (seen when the server is killed under load).
    asyncpg.InternalClientError,
)


def _unavailable(error: Exception) -> bool:
    if isinstance(error, _UNAVAILABLE):
        return True
    # "connection is closed", or "connection has been released back to the pool": asyncpg
    # takes a lost connection back from whoever holds it.
    return isinstance(error, asyncpg.InterfaceError) and (
        "closed" in str(error) or "released back to the pool" in str(error)
    )


class Database:
    """A connection pool whose methods are trio-native coroutines.

    Use ``transaction(fn)`` for several statements that must commit together: ``fn``
    receives an asyncpg connection inside an open transaction and runs on the asyncio side.

    Connections are lent on the trio side: one taken from asyncpg's pool stays out of it
    and goes back to a list here after each call, so a query is one crossing into asyncio
    (the statement on a connection) instead of asyncpg's acquire, statement and release
    (whose ``shield`` is a second asyncio task): about a third of a round trip's CPU. At
    most ``pool.get_max_size()`` are out; a caller that finds none free waits its turn.
    A connection goes back to asyncpg's pool (which resets, replaces or closes it) when a
    call on it did not end cleanly: cancelled, timed out, lost, or left in a transaction.
    """

    __slots__ = ("_pool", "_observe", "_free", "_out", "_size", "_waiting", "_batchers")

    def __init__(self, pool: asyncpg.Pool, observe: Observe | None = None) -> None:
        self._pool = pool
        self._observe = observe
        self._free: list[asyncpg.Connection] = []
        self._out = 0  # taken from asyncpg's pool: free here or lent
        self._size: int = pool.get_max_size()
        # Callers waiting for a connection, in order; each is handed one (or None: a slot
        # freed up, take a new connection from asyncpg's pool).
        self._waiting: collections.deque[trio.lowlevel.Task] = collections.deque()
        self._batchers: dict[object, Batcher[Any, Any]] = {}

    def batcher(
        self, run: Callable[[Database, Sequence[K]], Awaitable[Sequence[V | BaseException]]]
    ) -> Batcher[K, V]:
        """This pool's one ``Batcher`` of ``run(db, keys)`` (a module-level function):
        concurrent calls through it share round trips (``batching``)."""
        batcher = self._batchers.get(run)
        if batcher is None:
            batcher = self._batchers[run] = Batcher(functools.partial(run, self))
        return batcher

    def pool_statistics(self) -> tuple[int, int]:
        """``(open, idle)``: connections the pool holds now, and how many wait unused."""
        return self._pool.get_size(), self._pool.get_idle_size() + len(self._free)

    async def fetch(self, query: str, *args: Any) -> list[asyncpg.Record]:
        return await self._timed(lambda connection: connection.fetch(query, *args))

    async def fetchrow(self, query: str, *args: Any) -> asyncpg.Record | None:
        return await self._timed(lambda connection: connection.fetchrow(query, *args))

    async def fetchval(self, query: str, *args: Any) -> Any:
        return await self._timed(lambda connection: connection.fetchval(query, *args))

    async def execute(self, query: str, *args: Any) -> str:
        return await self._timed(lambda connection: connection.execute(query, *args))

    async def transaction(self, fn: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
        """Run ``fn(connection)`` in one transaction; it commits when ``fn`` returns."""

        async def run(connection: asyncpg.Connection) -> T:
            async with connection.transaction():
                return await fn(connection)

        return await self._timed(run)

    async def _timed(self, fn: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
        observe = self._observe
        if observe is None:
            return await self._on_connection(fn)
        started = time.perf_counter()
        try:
            return await self._on_connection(fn)
        finally:
            observe(time.perf_counter() - started)

    async def _on_connection(self, fn: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
        """``fn(connection)`` on the asyncio side (``_call``), on a lent connection."""
        connection = await self._borrow()
        try:
            result = await _call(fn, connection)
        except Exception as error:
            if isinstance(error, DatabaseUnavailable) or not _reusable(connection):
                await self._discard(connection)
            else:  # the statement failed (a constraint, bad SQL): the connection is fine
                self._give_back(connection)
            raise
        except BaseException:  # cancelled: asyncpg's pool finishes the cancellation
            await self._discard(connection)
            raise
        self._give_back(connection)
        return result

    async def _borrow(self) -> asyncpg.Connection:
        """A free connection, a new one from asyncpg's pool while fewer than its size are
        out, or (all are lent) the next one given back. Raises DatabaseUnavailable."""
        while True:
            free = self._free
            while free:
                connection = free.pop()
                if _reusable(connection):
                    return connection
                await self._discard(connection)
            if self._out >= self._size:
                connection = await self._wait_turn()
                if connection is not None:
                    return connection
                continue
            self._out += 1
            try:
                taken: asyncpg.Connection = await _call(self._pool.acquire)
            except BaseException:
                self._slot_freed()
                raise
            return taken

    async def _wait_turn(self) -> asyncpg.Connection | None:
        task = trio.lowlevel.current_task()
        self._waiting.append(task)

        def abort(_raise_cancel: object) -> trio.lowlevel.Abort:
            self._waiting.remove(task)
            return trio.lowlevel.Abort.SUCCEEDED

        connection: asyncpg.Connection | None = await trio.lowlevel.wait_task_rescheduled(abort)
        return connection

    def _give_back(self, connection: asyncpg.Connection) -> None:
        if self._waiting:
            trio.lowlevel.reschedule(self._waiting.popleft(), outcome.Value(connection))
        else:
            self._free.append(connection)

    def _slot_freed(self) -> None:
        self._out -= 1
        if self._waiting:
            trio.lowlevel.reschedule(self._waiting.popleft(), outcome.Value(None))

    async def _discard(self, connection: asyncpg.Connection) -> None:
        """Give ``connection`` back to asyncpg's pool, which waits out a cancelled
        statement, rolls back, or terminates it (and opens a new one when next needed)."""
        try:
            with trio.move_on_after(_CLOSE_TIMEOUT, shield=True) as scope:
                with contextlib.suppress(DatabaseUnavailable):
                    await _call(self._pool.release, connection)
            if scope.cancelled_caught:
                connection.terminate()
        finally:
            self._slot_freed()

    async def _release_free(self) -> None:
        """Give every free connection back to asyncpg's pool (before it closes)."""
        while self._free:
            await self._discard(self._free.pop())

    @asynccontextmanager
    async def listening(
        self, channel: str, notified: Callable[[str], None]
    ) -> AsyncIterator[Callable[[], Awaitable[None]]]:
        """Hold one pooled connection with ``LISTEN channel`` for the block;
        ``notified(payload)`` runs (on the loop's thread, between trio tasks) for every
        notification. The block
        gets a ``ping()`` that raises DatabaseUnavailable once that connection is lost (a
        lost connection delivers nothing, silently). The connection leaves ``UNLISTEN``ed.
        Raises DatabaseUnavailable."""

        def callback(_connection: object, _pid: int, _channel: str, payload: str) -> None:
            notified(payload)

        connection = await self._borrow()

        async def ping() -> None:
            await _call(connection.execute, "SELECT 1")

        try:
            await _call(connection.add_listener, channel, callback)
            yield ping
        finally:
            with trio.move_on_after(_CLOSE_TIMEOUT, shield=True):
                with contextlib.suppress(DatabaseUnavailable):
                    await _call(connection.remove_listener, channel, callback)
            await self._discard(connection)

    async def follow(
        self,
        channel: str,
        notified: Callable[[str], None],
        *,
        ping_seconds: float,
        on_listen: Callable[[], None] = lambda: None,
    ) -> NoReturn:
        """Listen on ``channel`` (``listening``) until cancelled, and again whenever the
        connection is lost: a ping every ``ping_seconds`` notices a silent loss, and a
        database that is away is waited out (0.1 s, doubling up to 5 s). ``on_listen()``
        runs each time listening (re)starts, for what was notified while nobody listened."""
        delay = 0.1
        while True:
            try:
                async with self.listening(channel, notified) as ping:
                    delay = 0.1
                    on_listen()
                    while True:
                        await trio.sleep(ping_seconds)
                        await ping()
            except DatabaseUnavailable as error:
                log.warning("listening on %s: %s; again in %.1fs", channel, error, delay)
                await trio.sleep(delay)
                delay = min(5.0, delay * 2)

    async def ping(self) -> bool:
        """True when the database answers a trivial query. Raises DatabaseUnavailable."""
        return bool(await self.fetchval("SELECT 1") == 1)


async def _call(fn: Callable[..., Awaitable[T]], *args: Any) -> T:
    """``fn(*args)`` on the asyncio side, within QUERY_TIMEOUT.

    Raises DatabaseTimeout past QUERY_TIMEOUT and DatabaseUnavailable when the connection
    failed; other errors (constraint violations, the caller's own) pass unchanged. A
    connection that broke is closed, and the pool opens a new one on the next acquire.
    """
    # The hot path of every query (docs/BENCHMARKS.md, "Database round trip"): one
    # asyncio task, whose first steps run in this trio task (``BatchingEventLoop``), and
    # the timeout is an asyncio timer in that task, not a trio deadline (a trio cancel
    # scope with a deadline cost about a tenth of a round trip; atrium's loop drops
    # cancelled asyncio timers, which trio-asyncio's own kept for their whole delay).
    try:
        result: T = await trio_asyncio.current_loop.get().run_aio_coroutine(
            _within_timeout(fn, *args)
        )
    except Exception as error:
        if _unavailable(error):
            raise DatabaseUnavailable(f"the database is unavailable: {error}") from error
        raise
    return result


async def _within_timeout(fn: Callable[..., Awaitable[T]], *args: Any) -> T:
    # ``fn`` is called inside the task: a task cancelled before its first step then
    # leaves no coroutine behind that was never awaited.
    timeout = asyncio.timeout(QUERY_TIMEOUT)
    try:
        async with timeout:
            return await fn(*args)
    except TimeoutError:
        if timeout.expired():
            raise DatabaseTimeout(f"the database did not answer within {QUERY_TIMEOUT} s") from None
        raise


def _reusable(connection: asyncpg.Connection) -> bool:
    """Whether a connection can be lent (again) as it is: open, not taken back by asyncpg
    (it does that with a connection it lost), outside a transaction."""
    try:
        return not connection.is_closed() and not connection.is_in_transaction()
    except asyncpg.InterfaceError:  # taken back: the proxy refuses every call
        return False


async def _keep_session(connection: asyncpg.Connection) -> None:
    """Release a connection as is.

    asyncpg's default release runs ``pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *;
    RESET ALL`` (a second round trip per query). atrium keeps no session state on pooled
    connections (no LISTEN, SET, cursors or session advisory locks), and asyncpg still
    rolls back a transaction left open, so there is nothing to reset.
    """


@asynccontextmanager
async def open_database(
    url: str, *, pool_size: int = 10, observe: Observe | None = None
) -> AsyncIterator[Database]:
    """Open a pool to ``url`` for the duration of the block (needs a trio-asyncio loop);
    ``observe`` is told the duration of every query and transaction."""
    pool = await trio_asyncio.aio_as_trio(asyncpg.create_pool)(
        url,
        min_size=1,
        max_size=pool_size,
        reset=_keep_session,
        max_inactive_connection_lifetime=0,  # no timer per release (see QUERY_TIMEOUT)
    )
    database = Database(pool, observe)
    try:
        yield database
    finally:
        await database._release_free()
        # Shielded: the block usually ends by cancellation, and an unclosed pool leaks
        # connections. A close that hangs (a dead server) is cut short and terminated.
        with trio.move_on_after(_CLOSE_TIMEOUT, shield=True) as scope:
            await trio_asyncio.aio_as_trio(pool.close)()
        if scope.cancelled_caught:
            pool.terminate()
