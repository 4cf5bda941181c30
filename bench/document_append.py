"""PostgreSQL's CPU per live-document append, and where it goes.

    python bench/document_append.py [--appends 2000] [--database-url URL]

Each figure is ``--appends`` calls from one task through atrium's ``Database`` (one
lent connection, so one backend): the CPU time of that backend (``/proc/<pid>/schedstat``,
nanoseconds, so short bursts are counted exactly), of the whole PostgreSQL process tree
(the WAL writer, the background writer...), and of this client process, per update.

- ``SELECT 1``: the floor of one statement's round trip; ``SELECT pg_sleep(0.001)``
  the same with a wait about as long as a commit's fsync (what waiting costs the client).
- ``append, 1 update``: ``documents.append_updates`` as the actor calls it when a document
  is quiet (at 100 updates/s every batch is one update): one statement, its own
  transaction, so a WAL flush (fsync) at every commit.
- ``append, 5 updates``: a batch as the group commit makes them at 1,000 updates/s.
- ``the statement without its commit``: the same statement, 100 to a transaction: what
  the statement costs; the difference to the line above is the commit.
- the parts of the statement, each 100 to a transaction: the counter's ``UPDATE`` alone,
  and the ``INSERT`` alone (with its two foreign-key checks).

The append statement's prepared plan is reported too (generic or custom: a custom plan is
planned again at every execution). Without ``--database-url`` an embedded PostgreSQL
(pgserver, as ``run.py`` starts it: fsync and synchronous_commit on) runs in a temporary
directory. Only one connection is used, so nothing else runs in that backend.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import psutil
import trio

# Run as a script this directory would come first on sys.path, and bench/http.py would
# shadow the standard library's http: the repository root instead.
sys.path[0] = str(Path(__file__).resolve().parent.parent)

from atrium.persistence import documents as store  # noqa: E402
from atrium.persistence.database import open_database  # noqa: E402
from atrium.persistence.migrate import migrate  # noqa: E402
from atrium.seams.aio_loop import open_loop  # noqa: E402
from bench._load import bench_database, bench_project  # noqa: E402

# A one-character keystroke as a Yjs editor sends it (11 bytes).
KEYSTROKE = b"\x01\x01\xe8\x07\x00\x84\xe8\x07\x05\x01a"
IN_ONE_TRANSACTION = 100


def cpu_seconds(pid: int) -> float:
    """The CPU time ``pid`` has run, from the scheduler (exact, unlike tick-sampled stat)."""
    with open(f"/proc/{pid}/schedstat") as stat:
        return int(stat.read().split()[0]) / 1e9


def tree_seconds(pid: int) -> float:
    total = 0.0
    root = psutil.Process(pid)
    for process in (root, *root.children(recursive=True)):
        with contextlib.suppress(OSError):
            total += cpu_seconds(process.pid)
    return total


async def measure(
    name: str,
    call: Callable[[], Awaitable[Any]],
    calls: int,
    updates_per_call: int,
    backend: int,
    postmaster: int | None,
) -> None:
    for _ in range(20):  # warm: prepared statements, caches
        await call()
    me = os.getpid()
    before = cpu_seconds(backend), tree_seconds(postmaster) if postmaster else 0.0, cpu_seconds(me)
    started = time.perf_counter()
    for _ in range(calls):
        await call()
    wall = time.perf_counter() - started
    after = cpu_seconds(backend), tree_seconds(postmaster) if postmaster else 0.0, cpu_seconds(me)
    n = calls * updates_per_call
    backend_us, tree_us, client_us = ((a - b) / n * 1e6 for a, b in zip(after, before, strict=True))
    tree = f"{tree_us:9.1f}" if postmaster else "        -"
    print(
        f"  {name:<44}{backend_us:9.1f}{tree}{client_us:9.1f}{wall / n * 1e6:9.1f}",
        flush=True,
    )


async def bench(args: argparse.Namespace, url: str, postmaster: int | None) -> None:
    async with open_loop(), open_database(url, pool_size=1) as db:
        await migrate(db)
        user_id, project = await bench_project(db)
        row = await store.open_document(db, project, "/bench.txt", user_id)
        document = row.id
        backend = int(await db.fetchval("SELECT pg_backend_pid()"))
        n = args.appends
        batches = n // IN_ONE_TRANSACTION
        seq = [10**12]  # the INSERT alone writes seqs far above the appends'

        def in_one_transaction(statement: Callable[[Any], Awaitable[Any]]) -> Callable[[], Any]:
            async def run(conn: Any) -> None:
                for _ in range(IN_ONE_TRANSACTION):
                    await statement(conn)

            return lambda: db.transaction(run)

        def insert(conn: Any) -> Awaitable[Any]:
            seq[0] += 1
            return conn.execute(
                "INSERT INTO document_updates (document_id, seq, update, user_id)"
                " VALUES ($1, $2, $3, $4)",
                document,
                seq[0],
                KEYSTROKE,
                user_id,
            )

        one = [(KEYSTROKE, user_id)]
        args_one = (document, 1, len(KEYSTROKE), user_id, [KEYSTROKE], [user_id])
        runs: list[tuple[str, Callable[[], Awaitable[Any]], int, int]] = [
            ("SELECT 1", lambda: db.fetchval("SELECT 1"), n, 1),
            (
                "SELECT pg_sleep(0.001) (waits like a commit)",
                lambda: db.fetchval("SELECT pg_sleep(0.001)"),
                n,
                1,
            ),
            ("append, 1 update", lambda: store.append_updates(db, document, one), n, 1),
            (
                "append, 5 updates (per update)",
                lambda: store.append_updates(db, document, one * 5),
                n // 5,
                5,
            ),
            (
                "the statement without its commit",
                in_one_transaction(lambda conn: conn.fetchval(store._APPEND, *args_one)),
                batches,
                IN_ONE_TRANSACTION,
            ),
            (
                "the counter's UPDATE alone, no commit",
                in_one_transaction(
                    lambda conn: conn.fetchval(
                        "UPDATE documents SET last_seq = last_seq + 1, byte_size = byte_size + 1,"
                        " updated_at = now(), last_edited_by = coalesce($2, last_edited_by)"
                        " WHERE id = $1 RETURNING last_seq",
                        document,
                        user_id,
                    )
                ),
                batches,
                IN_ONE_TRANSACTION,
            ),
            (
                "the INSERT alone, no commit",
                in_one_transaction(insert),
                batches,
                IN_ONE_TRANSACTION,
            ),
        ]
        print(f"PostgreSQL {await db.fetchval('SHOW server_version')}; µs an update:")
        print(f"  {'':<44}{'backend':>9}{'pg tree':>9}{'client':>9}{'wall':>9}")
        for name, call, calls, per_call in runs:
            await measure(name, call, calls, per_call, backend, postmaster)
        plans = await db.fetchrow(
            "SELECT generic_plans, custom_plans FROM pg_prepared_statements WHERE statement = $1",
            store._APPEND,
        )
        if plans is not None:
            print(
                f"the append's prepared statement: {plans['generic_plans']} generic plans,"
                f" {plans['custom_plans']} custom (planned again)"
            )
        await db.fetchval("SELECT pg_stat_force_next_flush()")
        tables = await db.fetch(
            "SELECT relname, n_tup_upd, n_tup_hot_upd, n_tup_ins FROM pg_stat_user_tables"
            " WHERE relname IN ('documents', 'document_updates') ORDER BY relname"
        )
        for t in tables:
            print(
                f"{t['relname']}: {t['n_tup_ins']} rows inserted, {t['n_tup_upd']} updated"
                f" ({t['n_tup_hot_upd']} of them HOT: no index touched)"
            )
        settings = await db.fetch(
            "SELECT name, setting FROM pg_settings WHERE name = ANY($1) ORDER BY name",
            ["shared_buffers", "synchronous_commit", "fsync", "wal_sync_method", "wal_level"],
        )
        print("settings: " + ", ".join(f"{r['name']}={r['setting']}" for r in settings))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--appends", type=int, default=2000)
    parser.add_argument("--database-url")
    args = parser.parse_args()
    with bench_database(args.database_url) as (url, postmaster):
        trio.run(bench, args, url, postmaster)


if __name__ == "__main__":
    main()
