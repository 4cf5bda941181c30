"""The pool wrapper: queries time out on the trio side and leave nothing behind."""

from __future__ import annotations

import asyncpg
import pytest
import trio
import trio_asyncio

from atrium.persistence import database
from atrium.persistence.database import Database


async def test_queries_leave_no_timers_on_the_asyncio_loop(db: Database) -> None:
    # trio-asyncio keeps a cancelled asyncio timer until it would have fired; asyncpg's
    # command_timeout and pool inactivity timer made two per query (memory that grew
    # with the request rate for up to five minutes).
    loop = trio_asyncio.current_loop.get()
    before = len(loop._timers)

    async def two_statements(connection: asyncpg.Connection) -> int:
        await connection.execute("SELECT 1")
        return int(await connection.fetchval("SELECT 2"))

    for _ in range(100):
        assert await db.fetchval("SELECT 1") == 1
        assert await db.transaction(two_statements) == 2
    assert len(loop._timers) <= before + 2


async def test_a_slow_query_times_out_and_the_pool_recovers(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(database, "QUERY_TIMEOUT", 0.2)
    with pytest.raises(trio.TooSlowError):
        await db.execute("SELECT pg_sleep(30)")
    for _ in range(8):  # more than the pool's connections: none was lost
        assert await db.fetchval("SELECT 41 + 1") == 42
