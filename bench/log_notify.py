"""What a NOTIFY costs the event log's writers: appends per second with and without one.

    python bench/log_notify.py [--appends 3000] [--writers 1,4,16] [--database-url URL]

Each append is the shape of a workspace edit's transaction (bump the project's counter,
insert one event row), by ``writers`` concurrent tasks on as many projects, on plain
asyncpg; with ``notify`` the transaction also runs ``pg_notify`` (what a degraded
workspace does, ``persistence.events.append(notify=True)``), and a connection LISTENs.
PostgreSQL takes one lock for the commits of NOTIFYing transactions, so their commits
(and WAL flushes) queue one behind another instead of flushing in groups. Runs alternate
between the two for three rounds; medians are printed. Without ``--database-url`` an
embedded PostgreSQL (pgserver, fsync and synchronous_commit on) runs in a temporary
directory.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
import uuid

import asyncpg

CHANNEL = "bench_log"


async def prepare(pool: asyncpg.Pool) -> None:
    await pool.execute(
        "DROP TABLE IF EXISTS bench_events; DROP TABLE IF EXISTS bench_projects;"
        " CREATE TABLE bench_projects (id uuid PRIMARY KEY, last_seq bigint NOT NULL DEFAULT 0);"
        " CREATE TABLE bench_events (project_id uuid, seq bigint, payload jsonb,"
        " PRIMARY KEY (project_id, seq))"
    )


async def appends_per_second(pool: asyncpg.Pool, appends: int, writers: int, notify: bool) -> float:
    projects = [uuid.uuid4() for _ in range(writers)]
    await pool.executemany("INSERT INTO bench_projects (id) VALUES ($1)", [(p,) for p in projects])
    each = appends // writers

    async def write(project: uuid.UUID) -> None:
        for _ in range(each):
            async with pool.acquire() as conn, conn.transaction():
                seq = await conn.fetchval(
                    "UPDATE bench_projects SET last_seq = last_seq + 1 WHERE id = $1"
                    " RETURNING last_seq",
                    project,
                )
                await conn.execute(
                    "INSERT INTO bench_events VALUES ($1, $2, '{\"a\": 1}')", project, seq
                )
                if notify:
                    await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, f"{project}:{seq}")

    started = time.perf_counter()
    await asyncio.gather(*(write(p) for p in projects))
    return each * writers / (time.perf_counter() - started)


async def measure(url: str, appends: int, writers: list[int]) -> None:
    pool = await asyncpg.create_pool(url, min_size=20, max_size=20)
    listener = await asyncpg.connect(url)
    await listener.add_listener(CHANNEL, lambda *_: None)
    await prepare(pool)
    for count in writers:
        rates: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(3):
            for notify in (False, True):
                rates[notify].append(await appends_per_second(pool, appends, count, notify))
        plain, notified = statistics.median(rates[False]), statistics.median(rates[True])
        print(
            f"writers={count:2d}  plain {plain:7.0f}/s  with NOTIFY {notified:7.0f}/s"
            f"  ratio {notified / plain:.2f}"
        )
    await listener.close()
    await pool.close()


def main() -> None:
    parser = argparse.ArgumentParser(prog="bench/log_notify.py")
    parser.add_argument("--appends", type=int, default=3000, help="appends per run")
    parser.add_argument("--writers", default="1,4,16", help="comma-separated writer counts")
    parser.add_argument("--database-url", help="an existing PostgreSQL (default: embedded)")
    args = parser.parse_args()
    writers = [int(w) for w in args.writers.split(",")]
    if args.database_url:
        asyncio.run(measure(args.database_url, args.appends, writers))
        return
    import pgserver

    with tempfile.TemporaryDirectory(prefix="bench-notify-") as data:
        server = pgserver.get_server(data, cleanup_mode="stop")
        try:
            asyncio.run(measure(server.get_uri(), args.appends, writers))
        finally:
            server.cleanup()


if __name__ == "__main__":
    main()
