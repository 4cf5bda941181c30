"""The pool wrapper: queries time out on the trio side and leave nothing behind."""

from __future__ import annotations

import asyncpg
import pytest
import trio
import trio_asyncio

from atrium.persistence import database
from atrium.persistence.database import Database, DatabaseTimeout, DatabaseUnavailable


async def test_queries_leave_no_timers_piling_up_on_the_asyncio_loop(db: Database) -> None:
    # trio-asyncio's own loop kept a cancelled asyncio timer until it would have fired:
    # with a timer per query, memory grew with the request rate for the timeout's length.
    # atrium's loop drops them as asyncio does (at most about a hundred wait to go).
    loop = trio_asyncio.current_loop.get()
    before = len(loop._timers)

    async def two_statements(connection: asyncpg.Connection) -> int:
        await connection.execute("SELECT 1")
        return int(await connection.fetchval("SELECT 2"))

    for _ in range(300):
        assert await db.fetchval("SELECT 1") == 1
        assert await db.transaction(two_statements) == 2
    assert len(loop._timers) <= before + 210


async def test_a_slow_query_times_out_and_the_pool_recovers(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(database, "QUERY_TIMEOUT", 0.2)
    with pytest.raises(trio.TooSlowError) as raised:
        await db.execute("SELECT pg_sleep(30)")
    # Clients see a database that does not answer as one that is away (HTTP 503).
    assert isinstance(raised.value, DatabaseTimeout | DatabaseUnavailable)
    for _ in range(8):  # more than the pool's connections: none was lost
        assert await db.fetchval("SELECT 41 + 1") == 42


async def test_an_unreachable_database_is_unavailable_not_an_os_error(aio_loop: None) -> None:
    pool = await trio_asyncio.aio_as_trio(asyncpg.create_pool)(
        "postgresql://postgres@127.0.0.1:1/none", min_size=0
    )
    try:
        with pytest.raises(DatabaseUnavailable) as raised:
            await Database(pool).fetchval("SELECT 1")
        assert isinstance(raised.value.__cause__, ConnectionRefusedError)
    finally:
        await trio_asyncio.aio_as_trio(pool.close)()


async def test_a_connection_lost_mid_query_is_unavailable_and_replaced(db: Database) -> None:
    with pytest.raises(DatabaseUnavailable):
        await db.fetchval("SELECT pg_terminate_backend(pg_backend_pid())")

    async def in_transaction(connection: asyncpg.Connection) -> None:
        await connection.execute("SELECT pg_terminate_backend(pg_backend_pid())")

    with pytest.raises(DatabaseUnavailable):
        await db.transaction(in_transaction)
    # The broken connections were dropped, not handed out again.
    for _ in range(8):
        assert await db.fetchval("SELECT 41 + 1") == 42


async def test_query_errors_are_not_outages(db: Database) -> None:
    with pytest.raises(asyncpg.UndefinedTableError):
        await db.fetch("SELECT * FROM no_such_table")
