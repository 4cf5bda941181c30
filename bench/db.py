"""Database micro-benchmark: one ``SELECT`` by primary key, through atrium and on plain asyncio.

    python bench/db.py [--queries 20000] [--concurrency 1,16] [--rounds 3] [--database-url URL]

The same query on the same database, each side in its own process:

- ``trio``: ``atrium.persistence.database.Database.fetchrow`` under ``trio.run`` inside
  atrium's asyncio loop (``atrium.seams.aio_loop.open_loop()``, as ``run.py`` opens
  it), the pool opened by ``open_database`` (what a request does);
- ``asyncio``: ``asyncpg.Pool.fetchrow`` under ``asyncio.run`` on the default event loop,
  a pool with the same settings (no reset on release, no inactivity timer), so the
  difference is the path from trio into asyncpg and back, not the pool's configuration.

Each run makes ``--queries`` sequential queries spread over ``concurrency`` tasks (after a
warm-up of 10%), and reports the process's CPU time (``time.process_time``: user + system,
all threads) per query, and wall time per query. Runs alternate between the sides for
``--rounds`` rounds, so both see the same machine; the medians are printed at the end.
CPU per query holds when other processes share the machine; wall time does not.

Without ``--database-url`` an embedded PostgreSQL is started in a temporary directory (and
stopped at the end). A table ``bench_items`` of 1,000 rows is (re)created in the database.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from collections.abc import Awaitable, Callable  # noqa: E402
from typing import Any  # noqa: E402

QUERY = "SELECT id, name, score FROM bench_items WHERE id = $1"
ROWS = 1000
POOL_SIZE = 20  # atrium's DB_POOL_SIZE default


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench/db.py", description=__doc__.split("\n")[0])
    parser.add_argument("--queries", type=int, default=20_000, help="queries per run")
    parser.add_argument(
        "--concurrency", default="1,16", help="comma-separated task counts (default 1,16)"
    )
    parser.add_argument("--rounds", type=int, default=3, help="runs per side and concurrency")
    parser.add_argument("--database-url", help="an existing PostgreSQL (default: embedded)")
    parser.add_argument("--side", choices=["trio", "asyncio"], help=argparse.SUPPRESS)
    parser.add_argument("--tasks", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument(
        "--profile", help="with --side: write a cProfile of the measured window to this path"
    )
    return parser.parse_args(argv)


# -- one side, in its own process --------------------------------------------------------


async def _measure(
    fetchrow: Callable[[str, int], Awaitable[Any]],
    gather: Callable[[list[Callable[[], Awaitable[None]]]], Awaitable[None]],
    queries: int,
    tasks: int,
    profile: str | None,
) -> dict[str, float]:
    """Warm up, then ``queries`` queries over ``tasks`` tasks: CPU and wall per query."""

    def worker(count: int, start: int) -> Callable[[], Awaitable[None]]:
        async def run() -> None:
            for i in range(count):
                row = await fetchrow(QUERY, (start + i) % ROWS + 1)
                assert row is not None

        return run

    def workers(total: int) -> list[Callable[[], Awaitable[None]]]:
        return [worker(total // tasks, n * 7919) for n in range(tasks)]

    await gather(workers(max(queries // 10, tasks)))
    profiler = None
    if profile:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    cpu, wall = time.process_time(), time.perf_counter()
    await gather(workers(queries))
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    if profiler is not None:
        profiler.disable()
        profiler.dump_stats(profile)
    done = queries // tasks * tasks
    return {"cpu_us": cpu / done * 1e6, "wall_us": wall / done * 1e6, "queries": done}


def run_trio_side(url: str, queries: int, tasks: int, profile: str | None) -> dict[str, float]:
    import trio

    from atrium.persistence.database import open_database
    from atrium.seams.aio_loop import open_loop

    async def gather(jobs: list[Callable[[], Awaitable[None]]]) -> None:
        async with trio.open_nursery() as nursery:
            for job in jobs:
                nursery.start_soon(job)

    async def main() -> dict[str, float]:
        async with open_loop(), open_database(url, pool_size=POOL_SIZE) as db:
            return await _measure(db.fetchrow, gather, queries, tasks, profile)

    return trio.run(main)


def run_asyncio_side(url: str, queries: int, tasks: int, profile: str | None) -> dict[str, float]:
    import asyncio

    import asyncpg

    async def no_reset(connection: asyncpg.Connection) -> None:
        pass

    async def gather(jobs: list[Callable[[], Awaitable[None]]]) -> None:
        await asyncio.gather(*(job() for job in jobs))

    async def main() -> dict[str, float]:
        pool = await asyncpg.create_pool(
            url,
            min_size=1,
            max_size=POOL_SIZE,
            reset=no_reset,
            max_inactive_connection_lifetime=0,
        )
        try:
            return await _measure(pool.fetchrow, gather, queries, tasks, profile)
        finally:
            await pool.close()

    return asyncio.run(main())


# -- the driver --------------------------------------------------------------------------


def create_table(url: str) -> None:
    import asyncio

    import asyncpg

    async def create() -> None:
        connection = await asyncpg.connect(url)
        try:
            await connection.execute(
                "DROP TABLE IF EXISTS bench_items;"
                " CREATE TABLE bench_items (id int PRIMARY KEY, name text NOT NULL,"
                " score double precision NOT NULL)"
            )
            await connection.executemany(
                "INSERT INTO bench_items VALUES ($1, $2, $3)",
                [(i, f"item {i}", i / 7) for i in range(1, ROWS + 1)],
            )
        finally:
            await connection.close()

    asyncio.run(create())


def run_side(side: str, url: str, queries: int, tasks: int) -> dict[str, float]:
    output = subprocess.run(
        [
            sys.executable,
            __file__,
            "--side",
            side,
            "--database-url",
            url,
            "--queries",
            str(queries),
            "--tasks",
            str(tasks),
        ],
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
    )
    return dict(json.loads(output.stdout.strip().splitlines()[-1]))


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.side:
        run = run_trio_side if args.side == "trio" else run_asyncio_side
        print(json.dumps(run(args.database_url, args.queries, args.tasks, args.profile)))
        return 0
    from bench._load import bench_database  # the driver's only: each side loads what it measures

    levels = [int(n) for n in args.concurrency.split(",")]
    print(
        f"{args.queries:,} queries per run, {args.rounds} rounds, concurrency {levels};"
        f" {os.cpu_count()} CPUs; Python {sys.version.split()[0]}"
    )
    print("load average before: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()), flush=True)
    results: dict[tuple[str, int], list[dict[str, float]]] = {}
    with bench_database(args.database_url) as (url, _):
        create_table(url)
        for round_ in range(1, args.rounds + 1):
            for tasks in levels:
                for side in ("asyncio", "trio"):
                    result = run_side(side, url, args.queries, tasks)
                    results.setdefault((side, tasks), []).append(result)
                    print(
                        f"  round {round_}: {side:<7} {tasks:>3} tasks:"
                        f" {result['cpu_us']:7.1f} us CPU/query  {result['wall_us']:7.1f} us wall",
                        flush=True,
                    )
    print("load average after: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
    print()
    print(f"{'tasks':>5}  {'asyncio us CPU':>14}  {'trio us CPU':>11}  {'extra':>7}  {'ratio':>5}")
    for tasks in levels:
        aio = statistics.median(r["cpu_us"] for r in results[("asyncio", tasks)])
        tri = statistics.median(r["cpu_us"] for r in results[("trio", tasks)])
        print(f"{tasks:>5}  {aio:>14.1f}  {tri:>11.1f}  {tri - aio:>+7.1f}  {tri / aio:>5.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
