"""Background jobs: throughput of the job actors and submit-to-start latency.

    python bench/jobs.py [--jobs 10000] [--users 100] [--max-running 2] [--concurrency 4]
                         [--samples 200] [--database-url URL]
    python bench/jobs.py --fair [--rounds 20] [--heavy-seconds 5]

One process, as ``python run.py`` runs jobs: the ``jobs`` supervisor with ``--concurrency``
job actors (WORKER_CONCURRENCY, default 4) on a pool of DB_POOL_SIZE (20) connections.

- **Throughput**: ``--jobs`` no-op jobs of ``--users`` users (round robin) are queued
  first (through ``JobService.submit``, as the API does), then the actors start; the figure
  is completed jobs per minute from the actors' start to the last completion. Each job is
  a full cycle: the fair claim (``FOR UPDATE SKIP LOCKED``, a user's running jobs
  counted under their lock, at most ``--max-running`` each: JOB_MAX_RUNNING_PER_USER),
  lease, heartbeat task, run, record the outcome. The queued limit is raised to fit
  ``--jobs / --users``: it is not what is measured here.
- **Latency**: on an idle queue (actors waiting), ``--samples`` jobs are submitted one at a
  time; each measures from the call to ``submit`` to the first line of the task body
  (so it includes the insert's commit and the wake-up). p50 and p99 are printed.

- **Fairness** (``--fair``, issue 19's benchmark (a)): with the default limits, user X
  fills their queued limit with heavy jobs (each ``--heavy-seconds`` of CPU in a
  trio-parallel worker process at nice 10, killed on cancel), then user Y submits one
  no-op job, ``--rounds`` times, ``--gap`` seconds apart (X's jobs end and others start
  meanwhile): Y's submit-to-start p50 and p99 are printed (the target: p99 under 2 s),
  with how many of X's jobs ran at once at most and how many ended meanwhile.

Without ``--database-url`` an embedded PostgreSQL is started in a temporary directory.

    python bench/jobs.py --csv [--csv-file PATH] [--csv-mb 100]

- **CSV summary** (issue 19, benchmark b; no database): ``data_processing``'s summary
  function, called in a job worker process (``WorkerPool``, as the job actors call it) on a
  ``--csv-mb`` MB, 20-column CSV file (written once to ``--csv-file``, or a temporary
  file), side by side with the pure-Python code it replaced (``tests/csv_reference.py``).
  Each runs in a fresh worker process (limit ``--csv-memory-mb``, default 2048): wall time
  of the call, the function's own time, and the process's peak resident memory and address
  space (what the limit counts).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse  # noqa: E402
import contextlib  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from typing import Any  # noqa: E402

import trio  # noqa: E402
import trio_parallel  # noqa: E402
from pydantic import BaseModel  # noqa: E402

from atrium.core.events import Event  # noqa: E402
from atrium.core.jobs import Job, JobStatus, QueueFull  # noqa: E402
from atrium.jobs import JobQueue, JobService, JobSettings, jobs_spec  # noqa: E402
from atrium.jobs._workers import WorkerPool  # noqa: E402
from atrium.persistence import accounts  # noqa: E402
from atrium.persistence.database import Database, open_database  # noqa: E402
from atrium.persistence.migrate import migrate  # noqa: E402
from atrium.seams.aio_loop import open_loop  # noqa: E402
from atrium.supervision import open_supervisor  # noqa: E402
from atrium.tasks import TaskContext, TaskRegistry  # noqa: E402
from atrium.tasks._csv import summarise_csv  # noqa: E402
from bench._load import CpuProbe, bench_database, process_tree_cpu  # noqa: E402
from tests import csv_reference  # noqa: E402

POOL_SIZE = 20


class Empty(BaseModel):
    pass


class Heavy(BaseModel):
    seconds: float


def burn(seconds: float) -> float:
    """Spend ``seconds`` of CPU (in a worker process, at low priority as a job's CPU
    step runs); return the CPU time spent."""
    if os.getpriority(os.PRIO_PROCESS, 0) < 10:
        os.setpriority(os.PRIO_PROCESS, 0, 10)
    start = time.process_time()
    while time.process_time() - start < seconds:
        pass
    return time.process_time() - start


class Meter:
    """The no-op task and what it saw: when each job's body started, and completions."""

    def __init__(self) -> None:
        self.started: dict[uuid.UUID, float] = {}
        self.completed = 0
        self.all_done = trio.Event()
        self.target = 0
        self.registry = TaskRegistry()

        @self.registry.task("noop", Empty)
        async def noop(ctx: TaskContext, payload: Empty) -> None:
            """Does nothing: the cost measured is the queue's."""
            self.started[ctx.job_id] = trio.current_time()

        @self.registry.task("heavy", Heavy)
        async def heavy(ctx: TaskContext, payload: Heavy) -> float:
            """Burns CPU in a worker process, killed if the job is cancelled."""
            spent: float = await trio_parallel.run_sync(burn, payload.seconds, kill_on_cancel=True)
            return spent

    async def job_changed(self, job: Job, events: Sequence[Event]) -> None:
        if job.status is JobStatus.COMPLETED:
            self.completed += 1
            if self.completed == self.target:
                self.all_done.set()


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench/jobs.py", description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=10_000, help="no-op jobs for throughput")
    parser.add_argument("--users", type=int, default=100, help="their owners (round robin)")
    parser.add_argument(
        "--max-running", type=int, default=2, help="JOB_MAX_RUNNING_PER_USER (default 2)"
    )
    parser.add_argument("--concurrency", type=int, default=4, help="job actors (default 4)")
    parser.add_argument("--samples", type=int, default=200, help="latency samples")
    parser.add_argument("--fair", action="store_true", help="run the fairness scenario only")
    parser.add_argument("--rounds", type=int, default=20, help="Y's jobs in --fair")
    parser.add_argument("--heavy-seconds", type=float, default=5.0, help="CPU of X's jobs")
    parser.add_argument("--gap", type=float, default=2.5, help="seconds between Y's jobs in --fair")
    parser.add_argument("--database-url", help="an existing PostgreSQL (default: embedded)")
    parser.add_argument("--csv", action="store_true", help="only the CSV summary benchmark")
    parser.add_argument("--csv-file", type=Path, help="the CSV file (written if missing)")
    parser.add_argument("--csv-mb", type=int, default=100, help="its size in MB (default 100)")
    parser.add_argument(
        "--csv-memory-mb", type=int, default=2048, help="the workers' JOB_WORKER_MEMORY_MB"
    )
    return parser.parse_args(argv)


async def bench(args: argparse.Namespace, url: str, postgres: CpuProbe | None) -> None:
    async with open_loop(), open_database(url, pool_size=POOL_SIZE) as db:
        await migrate(db)
        await db.execute("DELETE FROM jobs")
        if args.fair:
            await fairness(args, db)
            return
        users = [await new_user(db) for _ in range(args.users)]
        await throughput(args, db, users, postgres)
        await latency(args, db, users[0])


async def new_user(db: Database) -> uuid.UUID:
    user = await accounts.create_user(db, f"bench-{uuid.uuid4().hex[:8]}@example.com", "x")
    assert user is not None
    return user.id


def make_queue(
    args: argparse.Namespace, db: Database, meter: Meter, *, max_queued: int = 100
) -> JobQueue:
    queue = JobQueue(
        JobSettings(
            concurrency=args.concurrency,
            retention_days=0,
            max_running_per_user=args.max_running,
            max_queued_per_user=max_queued,
        ),
        database=lambda: db,
        registry=meter.registry,
        clock=time.time,
    )
    queue.observers.append(meter)
    return queue


async def throughput(
    args: argparse.Namespace, db: Database, users: list[uuid.UUID], postgres: CpuProbe | None
) -> None:
    meter = Meter()
    meter.target = args.jobs
    queue = make_queue(args, db, meter, max_queued=max(100, math.ceil(args.jobs / len(users))))
    service = JobService(queue)
    began = time.perf_counter()
    async with trio.open_nursery() as nursery:
        # Eight submitters: queueing is not what is measured here, only made quick.
        per = args.jobs // 8

        async def submit(first: int, count: int) -> None:
            for n in range(first, first + count):
                await service.submit(users[n % len(users)], task_name="noop", payload={})

        for i in range(8):
            nursery.start_soon(submit, i * per, per + (args.jobs % 8 if i == 7 else 0))
    queued = time.perf_counter() - began
    print(f"queued {args.jobs} jobs in {queued:.1f} s ({args.jobs / queued:.0f}/s)")
    cpu = time.process_time()
    pg_cpu = 0.0 if postgres is None else postgres()
    start = time.perf_counter()
    async with open_supervisor(name="bench") as root:
        await root.start_child(jobs_spec(queue))
        await meter.all_done.wait()
        elapsed = time.perf_counter() - start
    cpu = time.process_time() - cpu
    pg_cpu = 0.0 if postgres is None else postgres() - pg_cpu
    print(
        f"throughput: {args.jobs} jobs of {len(users)} users in {elapsed:.2f} s with"
        f" {args.concurrency} actors, at most {args.max_running} running per user:"
        f" {args.jobs / elapsed * 60:,.0f} jobs/minute"
        f" ({cpu / args.jobs * 1e6:.0f} us CPU per job in this process"
        + ("" if postgres is None else f", {pg_cpu / args.jobs * 1e6:.0f} us in PostgreSQL")
        + ")"
    )


async def fairness(args: argparse.Namespace, db: Database) -> None:
    meter = Meter()
    queue = make_queue(args, db, meter)
    limit = queue.settings.max_queued_per_user
    service = JobService(queue)
    x, y = await new_user(db), await new_user(db)
    samples: list[float] = []
    most_running = 0
    async with open_supervisor(name="bench") as root:
        await root.start_child(jobs_spec(queue))
        heavy: list[uuid.UUID] = []
        while True:
            try:
                sub = await service.submit(
                    x, task_name="heavy", payload={"seconds": args.heavy_seconds}
                )
            except QueueFull as full:
                print(f"X: {len(heavy)} heavy jobs accepted, then 429 ({full.message})")
                break
            heavy.append(sub.job.id)
        for _ in range(args.rounds):
            meter.target = meter.completed + 1
            meter.all_done = trio.Event()
            sent = trio.current_time()
            submitted = await service.submit(y, task_name="noop", payload={})
            await meter.all_done.wait()
            samples.append(meter.started[submitted.job.id] - sent)
            running = await db.fetchval(
                "SELECT count(*) FROM jobs WHERE user_id = $1 AND status = 'running'", x
            )
            most_running = max(most_running, running)
            await trio.sleep(args.gap)  # each round meets X's jobs at another point
        done = await db.fetchval(
            "SELECT count(*) FROM jobs WHERE user_id = $1 AND status = 'completed'", x
        )
        for job_id in heavy:
            with contextlib.suppress(Exception):
                await service.cancel(job_id, x)
    samples.sort()
    p99 = samples[min(len(samples) - 1, int(len(samples) * 0.99))]
    print(
        f"fairness: X's queued limit {limit}, heavy jobs of {args.heavy_seconds:g} s CPU,"
        f" at most {most_running} of X's running at once, {done} completed meanwhile;"
        f" Y's submit-to-start over {len(samples)} rounds: p50"
        f" {statistics.median(samples) * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms,"
        f" max {samples[-1] * 1000:.1f} ms (target p99 < 2,000 ms)"
    )


async def latency(args: argparse.Namespace, db: Database, user_id: uuid.UUID) -> None:
    meter = Meter()
    queue = make_queue(args, db, meter)
    service = JobService(queue)
    samples = []
    async with open_supervisor(name="bench") as root:
        await root.start_child(jobs_spec(queue))
        for i in range(args.samples + 10):
            meter.target = meter.completed + 1
            meter.all_done = trio.Event()
            sent = trio.current_time()
            submitted = await service.submit(user_id, task_name="noop", payload={})
            await meter.all_done.wait()
            if i >= 10:  # warm-up
                samples.append((meter.started[submitted.job.id] - sent) * 1000)
            await trio.sleep(0.01)  # an idle queue: every actor back to waiting
    samples.sort()
    p50 = statistics.median(samples)
    p99 = samples[min(len(samples) - 1, int(len(samples) * 0.99))]
    print(
        f"submit-to-start on an idle queue ({len(samples)} jobs): p50 {p50:.2f} ms,"
        f" p99 {p99:.2f} ms, max {samples[-1]:.2f} ms"
    )


CSV_COLUMNS = 20
WORDS = ("alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta")


def write_csv(path: Path, megabytes: int) -> None:
    """20 columns: decimals, integers with padding and text with a few thousand distinct
    values (and a quoted comma now and then), until the file holds ``megabytes`` MB."""
    rng = random.Random(19)
    with path.open("w") as out:
        out.write(",".join(f"c{i}" for i in range(CSV_COLUMNS)) + "\n")
        while out.tell() < megabytes * 1_000_000:
            cells = []
            for i in range(CSV_COLUMNS):
                if i % 2 == 0:
                    cells.append(f"{rng.uniform(-1e4, 1e4):.4f}")
                elif i % 4 == 1:
                    word = f"{rng.choice(WORDS)}{rng.randrange(1000)}"
                    cells.append(f'"{word}, {i}"' if rng.random() < 0.01 else word)
                else:
                    cells.append(f" {rng.randrange(100_000)} ")
            out.write(",".join(cells) + "\n")


def summarise_file(summarise: Any, path: str) -> tuple[float, int, int, int, str]:
    """In the worker: read ``path``, summarise it; the function's seconds, the rows, peak
    RSS and peak address space (KiB), and a digest of the result to compare."""
    text = Path(path).read_text()
    began = time.perf_counter()
    result = summarise(text, None)
    seconds = time.perf_counter() - began
    status = Path("/proc/self/status").read_text()
    peaks = {
        k: int(v.split()[0])
        for k, v in (line.split(":", 1) for line in status.splitlines())
        if k in ("VmHWM", "VmPeak")
    }
    digest = ",".join(
        f"{name}:{s['type']}:{s['count']}:{s.get('distinct', '')}"
        for name, s in result["stats"].items()
    )
    return seconds, result["rows"], peaks["VmHWM"], peaks["VmPeak"], digest


async def csv_bench(path: Path, size: float, memory_mb: int) -> None:
    print(
        f"CSV summary of {path} ({size:.0f} MB, {CSV_COLUMNS} columns), each in a fresh"
        f" worker process (JOB_WORKER_MEMORY_MB={memory_mb}):"
    )
    digests = set()
    for label, summarise in (
        ("Polars (atrium.tasks._csv)", summarise_csv),
        ("pure Python (tests/csv_reference.py)", csv_reference.summarise_csv),
    ):
        pool = WorkerPool(1, memory_mb=memory_mb)
        async with trio.open_nursery() as nursery:
            await nursery.start(pool.run)
            began = time.perf_counter()
            seconds, rows, rss, address, digest = await pool.run_sync(
                summarise_file, summarise, str(path)
            )
            wall = time.perf_counter() - began
            nursery.cancel_scope.cancel()
        digests.add(digest)
        print(
            f"  {label:38} {wall:6.1f} s wall (call), {seconds:6.1f} s in the function,"
            f" {rows:,} rows; peak RSS {rss / 1024:,.0f} MB, peak address space"
            f" {address / 1024:,.0f} MB"
        )
    print("  same types, counts and distinct values:", "yes" if len(digests) == 1 else "NO")


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.csv:
        with tempfile.TemporaryDirectory(prefix="atrium-bench-") as tmp:
            path = args.csv_file or Path(tmp) / "bench.csv"
            if not path.exists():
                write_csv(path, args.csv_mb)
            trio.run(csv_bench, path, path.stat().st_size / 1e6, args.csv_memory_mb)
        return 0
    with bench_database(args.database_url) as (url, postmaster):
        postgres = process_tree_cpu(postmaster) if postmaster else None
        trio.run(bench, args, url, postgres)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
