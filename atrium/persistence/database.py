"""The asyncpg pool, reached from trio through the root trio-asyncio loop.

asyncpg is an asyncio library. The process opens one ``trio_asyncio`` loop at its root;
this module is the only place (with the Redis bridge) that crosses into it, so the rest
of atrium calls plain trio functions.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import asyncpg
import trio
import trio_asyncio

T = TypeVar("T")
_CLOSE_TIMEOUT = 10.0
# Queries time out on the trio side. asyncpg's own timers (command_timeout, and the pool's
# inactivity timer) are asyncio TimerHandles, and trio-asyncio keeps a cancelled one in its
# heap until it would have fired: two per query, held 30 and 300 seconds, which at a few
# thousand queries a second is hundreds of MB.
QUERY_TIMEOUT = 30.0


class Database:
    """A connection pool whose methods are trio-native coroutines.

    Use ``transaction(fn)`` for several statements that must commit together: ``fn``
    receives an asyncpg connection inside an open transaction and runs on the asyncio side.
    """

    __slots__ = ("_pool",)

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def fetch(self, query: str, *args: Any) -> list[asyncpg.Record]:
        return await _call(self._pool.fetch, query, *args)

    async def fetchrow(self, query: str, *args: Any) -> asyncpg.Record | None:
        return await _call(self._pool.fetchrow, query, *args)

    async def fetchval(self, query: str, *args: Any) -> Any:
        return await _call(self._pool.fetchval, query, *args)

    async def execute(self, query: str, *args: Any) -> str:
        return await _call(self._pool.execute, query, *args)

    async def transaction(self, fn: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
        """Run ``fn(connection)`` in one transaction; it commits when ``fn`` returns."""

        async def run() -> T:
            async with self._pool.acquire() as connection, connection.transaction():
                return await fn(connection)

        return await _call(run)

    async def ping(self) -> bool:
        """True when the database answers a trivial query."""
        return bool(await self.fetchval("SELECT 1") == 1)


async def _call(fn: Callable[..., Awaitable[T]], *args: Any) -> T:
    """``fn(*args)`` on the asyncio side, within QUERY_TIMEOUT (trio.TooSlowError)."""
    with trio.fail_after(QUERY_TIMEOUT):
        result: T = await trio_asyncio.aio_as_trio(fn)(*args)
    return result


async def _keep_session(connection: asyncpg.Connection) -> None:
    """Release a connection as is.

    asyncpg's default release runs ``pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *;
    RESET ALL`` (a second round trip per query). atrium keeps no session state on pooled
    connections (no LISTEN, SET, cursors or session advisory locks), and asyncpg still
    rolls back a transaction left open, so there is nothing to reset.
    """


@asynccontextmanager
async def open_database(url: str, *, pool_size: int = 10) -> AsyncIterator[Database]:
    """Open a pool to ``url`` for the duration of the block (needs a trio-asyncio loop)."""
    pool = await trio_asyncio.aio_as_trio(asyncpg.create_pool)(
        url,
        min_size=1,
        max_size=pool_size,
        reset=_keep_session,
        max_inactive_connection_lifetime=0,  # no timer per release (see QUERY_TIMEOUT)
    )
    try:
        yield Database(pool)
    finally:
        # Shielded: the block usually ends by cancellation, and an unclosed pool leaks
        # connections. A close that hangs (a dead server) is cut short and terminated.
        with trio.move_on_after(_CLOSE_TIMEOUT, shield=True) as scope:
            await trio_asyncio.aio_as_trio(pool.close)()
        if scope.cancelled_caught:
            pool.terminate()
