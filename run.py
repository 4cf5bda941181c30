"""atrium command line: serve (default) | worker | migrate.

    python run.py [serve] [--host H] [--port P] [--data-dir D] [--workers N]
    python run.py worker [--data-dir D]
    python run.py migrate [--data-dir D]

With no DATABASE_URL an embedded PostgreSQL runs in DATA_DIR (default ./.atrium).
``--workers N`` (or WORKERS) serves from N processes sharing the ports
(atrium/runtime/process_group.py), bridged through REDIS_URL or an embedded Redis.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Iterator

import trio

from atrium.core.config import ConfigError, Settings, load_settings
from atrium.core.logs import configure_logging
from atrium.persistence.database import open_database
from atrium.persistence.embedded import EmbeddedPostgresError, embedded_postgres
from atrium.persistence.embedded_redis import EmbeddedRedisError
from atrium.persistence.migrate import migrate
from atrium.runtime.limits import raise_open_files
from atrium.runtime.process_group import ProcessGroup, WorkerExited, serve_processes
from atrium.runtime.root import Bound, serve, serve_worker, tune_gc
from atrium.seams.aio_loop import open_loop
from atrium.supervision import SupervisorEscalation

_RUN_PY = os.path.abspath(__file__)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="run.py",
        description="atrium: real-time collaborative workspace backend.",
        epilog="Every flag can also be set by environment (HOST, PORT, DATA_DIR, WORKERS); "
        "see docs/CONFIGURATION.md for all variables.",
    )
    sub = parser.add_subparsers(dest="command", metavar="command")
    serve_cmd = sub.add_parser("serve", help="serve the HTTP API and WebSockets (default)")
    worker_cmd = sub.add_parser(
        "worker", help="run background jobs only (WORKER_CONCURRENCY job actors, no HTTP)"
    )
    migrate_cmd = sub.add_parser("migrate", help="apply database migrations and exit")
    for p in (parser, serve_cmd, worker_cmd, migrate_cmd):
        p.add_argument("--data-dir", help="embedded PostgreSQL and dev secrets (default ./.atrium)")
    for p in (parser, serve_cmd):
        p.add_argument("--host", help="interface to listen on (default 127.0.0.1)")
        p.add_argument("--port", type=int, help="HTTP port (default 8000)")
        p.add_argument(
            "--workers",
            type=int,
            help="serving processes sharing PORT and WS_PORT (default 1; see docs/OPERATIONS.md)",
        )
        # Set by the --workers supervisor on the processes it runs: stop when its pipe on
        # stdin closes (the supervisor stopped or died).
        p.add_argument("--supervised", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.command = args.command or "serve"
    return args


@contextlib.contextmanager
def database_url(settings: Settings) -> Iterator[str]:
    """The database to migrate: DATABASE_URL, or an embedded PostgreSQL while the block runs."""
    if settings.database_url:
        yield settings.database_url
        return
    print(f"atrium: starting embedded PostgreSQL in {settings.data_dir / 'pg'}", flush=True)
    with embedded_postgres(settings.data_dir) as url:
        yield url


async def stop_when_stdin_closes(stop: trio.Event) -> None:
    """Set ``stop`` once standard input reaches its end (a --workers process: its
    supervisor closed the pipe, or died)."""
    stdin = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
    async with stdin:
        while await stdin.receive_some():
            pass
    if not stop.is_set():
        print("atrium: the --workers supervisor is gone; shutting down", flush=True)
        stop.set()


async def run_serve(settings: Settings, url: str | None, supervised: bool = False) -> None:
    """Serve until SIGINT/SIGTERM (or, ``supervised``, until stdin closes); with ``url``
    None, the supervision tree runs an embedded PostgreSQL as its ``postgres`` child
    (restarted when it dies, stopped with the server)."""
    stop = trio.Event()
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with open_loop(), trio.open_nursery() as nursery:
            if supervised:
                nursery.start_soon(stop_when_stdin_closes, stop)

            async def watch_signals() -> None:
                async for _ in signals:
                    if stop.is_set():  # a second Ctrl-C: stop waiting for requests
                        print("atrium: forced stop", flush=True)
                        nursery.cancel_scope.cancel()
                        return
                    print(
                        f"atrium: shutting down (draining for {settings.drain_seconds:g} s, "
                        "then finishing in-flight requests)",
                        flush=True,
                    )
                    stop.set()

            async def run_server(task_status: trio.TaskStatus[Bound]) -> None:
                await serve(settings, url, shutdown_trigger=stop.wait, task_status=task_status)
                nursery.cancel_scope.cancel()

            nursery.start_soon(watch_signals)
            bound: Bound = await nursery.start(run_server)
            tune_gc()
            print(f"atrium: API on {bound.url}  (docs: {bound.url}/docs)", flush=True)
            if bound.ws_port is not None:
                print(
                    f"atrium: WebSocket listener on ws://{bound.host}:{bound.ws_port}/ws/",
                    flush=True,
                )
            if bound.metrics_port is not None:
                print(
                    f"atrium: metrics on http://{bound.host}:{bound.metrics_port}/metrics",
                    flush=True,
                )


async def run_worker(settings: Settings, url: str | None) -> None:
    """Run job actors until SIGINT/SIGTERM; the jobs they hold finish or go back to the
    queue (uncounted) within the shutdown deadline."""
    stop = trio.Event()
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with open_loop(), trio.open_nursery() as nursery:

            async def watch_signals() -> None:
                async for _ in signals:
                    if stop.is_set():
                        print("atrium: forced stop", flush=True)
                        nursery.cancel_scope.cancel()
                        return
                    print("atrium: worker shutting down (releasing held jobs)", flush=True)
                    stop.set()

            async def run(task_status: trio.TaskStatus[Bound]) -> None:
                await serve_worker(
                    settings, url, shutdown_trigger=stop.wait, task_status=task_status
                )
                nursery.cancel_scope.cancel()

            nursery.start_soon(watch_signals)
            bound: Bound = await nursery.start(run)
            tune_gc()
            print(f"atrium: worker running {settings.worker_concurrency} job actors", flush=True)
            if bound.metrics_port is not None:
                print(
                    f"atrium: metrics on http://{settings.host}:{bound.metrics_port}/metrics",
                    flush=True,
                )


async def run_processes(settings: Settings, supervised: bool = False) -> None:
    """Serve from ``settings.workers`` processes until SIGINT/SIGTERM: the first signal
    is forwarded to every worker (each drains), a second one too (each stops at once).
    Raises SupervisorEscalation when the workers keep dying."""
    stop = trio.Event()
    command = [sys.executable, _RUN_PY, "serve", "--supervised"]
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with open_loop(), trio.open_nursery() as nursery:
            group: ProcessGroup | None = None

            async def watch_signals() -> None:
                async for _ in signals:
                    if stop.is_set() and group is not None:
                        print("atrium: forced stop of every worker", flush=True)
                        group.signal_workers()
                        continue
                    print(f"atrium: stopping {settings.workers} worker processes", flush=True)
                    stop.set()

            async def run_group(task_status: trio.TaskStatus[ProcessGroup]) -> None:
                await serve_processes(
                    settings, command, shutdown_trigger=stop.wait, report=_say,
                    environ=os.environ, task_status=task_status,
                )  # fmt: skip
                nursery.cancel_scope.cancel()

            nursery.start_soon(watch_signals)
            if supervised:
                nursery.start_soon(stop_when_stdin_closes, stop)
            group = await nursery.start(run_group)


GROUP_FAILURES = (
    SupervisorEscalation, WorkerExited, EmbeddedPostgresError, EmbeddedRedisError, OSError
)  # fmt: skip


def run_group(settings: Settings, supervised: bool) -> bool:
    """Run the process group until it is stopped (True) or gives up (False, after saying
    why: a worker that cannot start or keeps dying, a port taken, a service that cannot
    start; everything is stopped by then, and the workers' own output shows their errors)."""
    stopped = False
    try:
        trio.run(run_processes, settings, supervised)
        stopped = True
    except* GROUP_FAILURES as failed:
        for error in _leaves(failed):
            print(f"atrium: gave up: {error}", file=sys.stderr, flush=True)
    return stopped


def _leaves(group: BaseExceptionGroup[Exception]) -> list[Exception]:
    found: list[Exception] = []
    for error in group.exceptions:
        found.extend(_leaves(error) if isinstance(error, BaseExceptionGroup) else [error])
    return found


def _say(line: str) -> None:
    print(line, flush=True)


async def run_migrate(settings: Settings, url: str) -> None:
    async with open_loop(), open_database(url, pool_size=1) as db:
        applied = await migrate(db)
    print(f"atrium: applied migrations {applied}" if applied else "atrium: schema is up to date")


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    try:
        settings = load_settings(
            host=args.host, port=args.port, data_dir=args.data_dir, workers=args.workers
        )
    except ConfigError as error:
        print(f"atrium: configuration error: {error}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_format)
    # pgserver narrates every pg_ctl call at INFO; its warnings are what an operator needs.
    logging.getLogger("pgserver").setLevel(logging.WARNING)
    # Every WebSocket is an open file: serve up to the hard limit (each --workers
    # process raises its own).
    raise_open_files()
    if args.command == "migrate":
        with database_url(settings) as url:
            trio.run(run_migrate, settings, url)
    else:
        if not settings.database_url and settings.workers == 1:
            print(f"atrium: embedded PostgreSQL in {settings.data_dir / 'pg'}", flush=True)
        if args.command == "worker":
            trio.run(run_worker, settings, settings.database_url)
        elif settings.workers > 1:
            if not run_group(settings, args.supervised):
                return 1
        else:
            trio.run(run_serve, settings, settings.database_url, args.supervised)
    print("atrium: stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
