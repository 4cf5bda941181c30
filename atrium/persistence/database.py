"""The asyncpg pool, reached from trio through the root trio-asyncio loop.

asyncpg is an asyncio library. The process opens one ``trio_asyncio`` loop at its root;
this module is the only place (with the Redis bridge) that crosses into it, so the rest
of atrium calls plain trio functions.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, NoReturn, TypeVar

import asyncpg
import trio
import trio_asyncio

T = TypeVar("T")
log = logging.getLogger("atrium.database")
Observe = Callable[[float], None]
"""Told the seconds of each query or transaction (a latency metric)."""
_CLOSE_TIMEOUT = 10.0
# Queries time out on the trio side. asyncpg's own timers (command_timeout, and the pool's
# inactivity timer) are asyncio TimerHandles, and trio-asyncio keeps a cancelled one in its
# heap until it would have fired: two per query, held 30 and 300 seconds, which at a few
# thousand queries a second is hundreds of MB.
QUERY_TIMEOUT = 30.0


class DatabaseUnavailable(Exception):
    """The database cannot be reached now: refused, reset or shut down, a connection lost
    mid-query, or a server still starting. Weather, not a bug: callers refuse the work
    (HTTP 503, WebSocket 1013) and the pool reconnects on its own once the server is back.
    The asyncpg (or OS) error is kept as ``__cause__``."""


class DatabaseTimeout(DatabaseUnavailable, trio.TooSlowError):
    """No answer within QUERY_TIMEOUT. Also a ``trio.TooSlowError``: a query that never
    answers and a server that cannot be reached look the same from here."""


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
    return isinstance(error, asyncpg.InterfaceError) and "closed" in str(error)


class Database:
    """A connection pool whose methods are trio-native coroutines.

    Use ``transaction(fn)`` for several statements that must commit together: ``fn``
    receives an asyncpg connection inside an open transaction and runs on the asyncio side.
    """

    __slots__ = ("_pool", "_observe")

    def __init__(self, pool: asyncpg.Pool, observe: Observe | None = None) -> None:
        self._pool = pool
        self._observe = observe

    def pool_statistics(self) -> tuple[int, int]:
        """``(open, idle)``: connections the pool holds now, and how many wait unused."""
        return self._pool.get_size(), self._pool.get_idle_size()

    async def fetch(self, query: str, *args: Any) -> list[asyncpg.Record]:
        return await self._timed(self._pool.fetch, query, *args)

    async def fetchrow(self, query: str, *args: Any) -> asyncpg.Record | None:
        return await self._timed(self._pool.fetchrow, query, *args)

    async def fetchval(self, query: str, *args: Any) -> Any:
        return await self._timed(self._pool.fetchval, query, *args)

    async def execute(self, query: str, *args: Any) -> str:
        return await self._timed(self._pool.execute, query, *args)

    async def _timed(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        observe = self._observe
        if observe is None:
            return await _call(fn, *args)
        started = time.perf_counter()
        try:
            return await _call(fn, *args)
        finally:
            observe(time.perf_counter() - started)

    async def transaction(self, fn: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
        """Run ``fn(connection)`` in one transaction; it commits when ``fn`` returns."""

        async def run() -> T:
            async with self._pool.acquire() as connection, connection.transaction():
                return await fn(connection)

        return await self._timed(run)

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

        connection = await _call(self._pool.acquire)

        async def ping() -> None:
            await _call(connection.execute, "SELECT 1")

        try:
            await _call(connection.add_listener, channel, callback)
            yield ping
        finally:
            with trio.move_on_after(_CLOSE_TIMEOUT, shield=True):
                with contextlib.suppress(DatabaseUnavailable):
                    await _call(connection.remove_listener, channel, callback)
                with contextlib.suppress(DatabaseUnavailable):
                    await _call(self._pool.release, connection)

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
    # The hot path of every query, so it skips two conveniences (see docs/BENCHMARKS.md,
    # "Database round trip"): ``trio.fail_after`` is a generator-based context manager
    # around the same CancelScope, and ``aio_as_trio(fn)(*args)`` builds a wrapper and a
    # second coroutine per call. ``fn(*args)`` only creates the coroutine; its body runs
    # in the asyncio task, as with ``aio_as_trio``.
    scope = trio.CancelScope(deadline=trio.current_time() + QUERY_TIMEOUT)
    try:
        with scope:
            result: T = await trio_asyncio.current_loop.get().run_aio_coroutine(fn(*args))
    except Exception as error:
        if _unavailable(error):
            raise DatabaseUnavailable(f"the database is unavailable: {error}") from error
        raise
    if scope.cancelled_caught:
        raise DatabaseTimeout(f"the database did not answer within {QUERY_TIMEOUT} s")
    return result


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
    try:
        yield Database(pool, observe)
    finally:
        # Shielded: the block usually ends by cancellation, and an unclosed pool leaks
        # connections. A close that hangs (a dead server) is cut short and terminated.
        with trio.move_on_after(_CLOSE_TIMEOUT, shield=True) as scope:
            await trio_asyncio.aio_as_trio(pool.close)()
        if scope.cancelled_caught:
            pool.terminate()
