"""``run.py --workers N``: N serving processes on one machine, sharing PORT and WS_PORT.

A Python process uses one core; this is how one machine's cores all serve. The process
that runs this module is the group's supervisor and serves nothing itself::

    processes (one_for_one, at most 5 restarts in 60 s, backoff 0.5 s .. 10 s)
    ├── postgres    the embedded PostgreSQL, only without DATABASE_URL (root.postgres_spec)
    ├── redis       an embedded Redis on 127.0.0.1 with a password, only without REDIS_URL
    │               (or REDIS_SENTINELS: then the workers ask the sentinels)
    ├── worker-1    ``run.py serve`` as a child process (REUSE_PORT=true)
    ...
    └── worker-N

It holds PORT and WS_PORT (a bound, non-listening SO_REUSEPORT socket each, which is also
how port 0 becomes one port for everyone), applies the migrations once, and starts the
workers with DATABASE_URL and REDIS_URL pointing at the shared services, so they are
bridged like instances on several machines. Worker *i* (from 0) serves its metrics on
METRICS_PORT + *i* (each its own, as a replica would; with METRICS_PORT=0, any free port).

A worker that dies is started again (the kernel stops routing to its sockets the moment
they close; connections waiting in its accept queue are reset, as with any crash). More
than 5 restarts within 60 s and the supervisor gives up: it stops everything and
``serve_processes`` raises SupervisorEscalation. On shutdown every worker gets SIGTERM at
once and drains as a single process does; then Redis and PostgreSQL stop. Workers run in
their own session (a terminal's Ctrl-C reaches only the supervisor, which forwards it once)
and stop by themselves when the supervisor's pipe to them closes, so even a SIGKILLed
supervisor leaves nothing running.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import socket
import subprocess
import tempfile
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import trio

from ..core.config import Settings
from ..http.reuseport import reuse_port_socket
from ..persistence.database import open_database
from ..persistence.embedded import EmbeddedPostgres
from ..persistence.embedded_redis import EmbeddedRedis
from ..persistence.migrate import migrate
from ..supervision import Backoff, ChildSpec, Restart, Strategy, Supervisor, open_supervisor
from .root import postgres_spec

log = logging.getLogger("atrium.processes")

MAX_RESTARTS = 5
RESTART_PERIOD = 60.0
RESTART_BACKOFF = Backoff(base=0.5, maximum=10.0)
# A worker's own stop takes DRAIN_SECONDS and at worst about 30 s more (docs/OPERATIONS.md,
# Stopping); past this it is killed.
STOP_GRACE = 60.0
# How long a worker has to come up (the first start of a pool, the app, the listeners).
START_TIMEOUT = 60.0


class WorkerExited(RuntimeError):
    """A worker process ended without being asked to (its supervisor restarts it)."""


@dataclass(frozen=True, slots=True)
class WorkerProcess:
    """A running worker: its child name, process id and metrics port (None: no metrics)."""

    name: str
    pid: int
    metrics_port: int | None


class ProcessGroup:
    """The running group: where it listens, its supervisor, and its worker processes."""

    def __init__(self, host: str, port: int, ws_port: int | None, supervisor: Supervisor) -> None:
        self.host = host
        self.port = port
        self.ws_port = ws_port
        self.supervisor = supervisor
        self.stopping = trio.Event()
        self._processes: dict[str, trio.Process] = {}
        self._signalled: set[int] = set()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def workers(self) -> list[WorkerProcess]:
        """The workers running now, in start order."""
        return [
            child.value
            for child in self.supervisor.which_children()
            if isinstance(child.value, WorkerProcess) and child.state == "running"
        ]

    def signal_workers(self, sig: int = signal.SIGTERM) -> None:
        """Send ``sig`` to every worker process still running."""
        for process in self._processes.values():
            if process.returncode is None:
                process.send_signal(sig)
                self._signalled.add(process.pid)

    async def run_worker(
        self,
        name: str,
        command: list[str],
        env: Mapping[str, str],
        expected: tuple[str, ...],
        report: Callable[[str], None],
        *,
        task_status: trio.TaskStatus[WorkerProcess],
    ) -> None:
        """Run one worker process: started once it has printed every line in ``expected``
        (where it listens); its other output is passed to ``report`` under its name. Raises
        WorkerExited when it ends unasked; cancelled, it is stopped (SIGTERM, then SIGKILL
        after STOP_GRACE)."""
        process = await trio.lowlevel.open_process(
            command,
            env=dict(env),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            start_new_session=True,
        )
        self._processes[name] = process
        assert process.stdout is not None
        lines = _LineReader(process.stdout)
        label = f"atrium[{name}]: "
        try:
            metrics_port = None
            waiting = set(expected)
            with trio.move_on_after(START_TIMEOUT) as starting:
                while waiting:
                    line = await lines.next()
                    if line is None:
                        raise WorkerExited(
                            f"{name} exited while starting (status {await process.wait()})"
                        )
                    found = next((marker for marker in waiting if marker in line), None)
                    if found is None:
                        report(_relabel(line, label))
                        continue
                    waiting.discard(found)
                    if found == _METRICS_ON:
                        metrics_port = int(line.rsplit(":", 1)[1].split("/")[0])
            if starting.cancelled_caught:
                raise WorkerExited(f"{name} did not start within {START_TIMEOUT:g} s")
            worker = WorkerProcess(name, process.pid, metrics_port)
            metrics = "" if metrics_port is None else f", metrics on port {metrics_port}"
            report(f"atrium: {name} (pid {process.pid}) serving{metrics}")
            task_status.started(worker)
            while (line := await lines.next()) is not None:
                report(_relabel(line, label))
            status = await process.wait()
            if self.stopping.is_set():
                return
            report(f"atrium: {name} (pid {process.pid}) exited with status {status}")
            raise WorkerExited(f"{name} (pid {process.pid}) exited with status {status}")
        finally:
            with trio.CancelScope(shield=True):
                await self._stop(process, lines, label, report)
                del self._processes[name]

    async def _stop(
        self,
        process: trio.Process,
        lines: _LineReader,
        label: str,
        report: Callable[[str], None],
    ) -> None:
        async with trio.open_nursery() as nursery:

            async def forward() -> None:
                while (line := await lines.next()) is not None:
                    report(_relabel(line, label))

            nursery.start_soon(forward)
            if process.returncode is None and process.pid not in self._signalled:
                process.send_signal(signal.SIGTERM)
            with trio.move_on_after(STOP_GRACE):
                await process.wait()
            if process.returncode is None:
                process.kill()
                await process.wait()
            # Its last lines are in the pipe; something it started may hold it open.
            nursery.cancel_scope.deadline = trio.current_time() + 1.0
        self._signalled.discard(process.pid)
        assert process.stdin is not None
        await process.stdin.aclose()


_API_ON = "atrium: API on "
_WS_ON = "atrium: WebSocket listener on "
_METRICS_ON = "atrium: metrics on "


def _relabel(line: str, label: str) -> str:
    return label + line.removeprefix("atrium: ")


class _LineReader:
    """Lines of a byte stream, decoded, without their newline."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self._stream = stream
        self._buffer = b""

    async def next(self) -> str | None:
        """The next line, or None at the end of the stream (a last partial line is
        returned first)."""
        while b"\n" not in self._buffer:
            chunk = await self._stream.receive_some()
            if not chunk:
                rest, self._buffer = self._buffer, b""
                return rest.decode(errors="replace") if rest else None
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line.decode(errors="replace")


def worker_env(
    settings: Settings,
    index: int,
    port: int,
    ws_port: int | None,
    database_url: str,
    redis_url: str | None,
    base: Mapping[str, str],
) -> dict[str, str]:
    """The environment of worker ``index`` (from 0): ``base`` with the group's shared
    ports, database and Redis (``redis_url``, or None: Sentinel's settings in ``base``),
    SO_REUSEPORT on, and its own metrics port."""
    env = dict(base)
    env.update(
        HOST=settings.host,
        PORT=str(port),
        DATA_DIR=str(settings.data_dir),
        DATABASE_URL=database_url,
        WORKERS="1",
        REUSE_PORT="true",
    )
    if redis_url is not None:
        env["REDIS_URL"] = redis_url
    if ws_port is not None:
        env["WS_PORT"] = str(ws_port)
    if settings.enable_metrics:
        env["METRICS_PORT"] = str(settings.metrics_port + index if settings.metrics_port else 0)
    return env


async def serve_processes(
    settings: Settings,
    command: list[str],
    *,
    shutdown_trigger: Callable[[], Awaitable[None]],
    report: Callable[[str], None],
    environ: Mapping[str, str],
    backoff: Backoff = RESTART_BACKOFF,
    task_status: trio.TaskStatus[ProcessGroup] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run ``settings.workers`` serving processes (each ``command``, a ``run.py serve
    --supervised``, in ``environ`` and the group's variables) until ``shutdown_trigger``
    returns, then stop them all. ``backoff``: the delay before a worker is restarted.

    Must run inside the process's ``trio_asyncio`` loop (it migrates the database once).
    Reports progress to ``report`` (one line each, ``API on ...`` once every worker serves)
    and calls ``task_status.started(ProcessGroup)`` then. Raises SupervisorEscalation when
    workers keep dying (more than 5 restarts in 60 s), OSError when a port is taken.
    """
    with contextlib.ExitStack() as stack:
        http_hold = stack.enter_context(reuse_port_socket(settings.host, settings.port))
        port = http_hold.getsockname()[1]
        ws_port = None
        if settings.ws_port is not None:
            ws_hold = stack.enter_context(reuse_port_socket(settings.host, settings.ws_port))
            ws_port = ws_hold.getsockname()[1]
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        redis_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="atrium-redis-")))
        async with open_supervisor(
            name="processes",
            strategy=Strategy.ONE_FOR_ONE,
            max_restarts=MAX_RESTARTS,
            period=RESTART_PERIOD,
            backoff=backoff,
        ) as supervisor:
            group = ProcessGroup(settings.host, port, ws_port, supervisor)
            database_url = await _start_database(settings, supervisor, stack, report)
            redis_url = settings.redis_url
            if settings.redis is None:
                redis_port = _hold_port(stack)
                redis = EmbeddedRedis(redis_dir, settings.data_dir / "redis.log", redis_port)
                started = await supervisor.start_child(
                    ChildSpec("redis", redis.run, shutdown_timeout=30.0)
                )
                redis_url = started.value
                report(f"atrium: embedded Redis on {redis.address}")
            expected = [_API_ON]
            if ws_port is not None:
                expected.append(_WS_ON)
            if settings.enable_metrics:
                expected.append(_METRICS_ON)
            for index in range(settings.workers):
                name = f"worker-{index + 1}"
                env = worker_env(settings, index, port, ws_port, database_url, redis_url, environ)
                await supervisor.start_child(
                    ChildSpec(
                        name,
                        partial(group.run_worker, name, command, env, tuple(expected), report),
                        restart=Restart.TRANSIENT,
                        shutdown_timeout=STOP_GRACE,
                    )
                )
            report(
                f"atrium: API on {group.url}  (docs: {group.url}/docs)"
                f"  [{settings.workers} worker processes]"
            )
            if ws_port is not None:
                report(f"atrium: WebSocket listener on ws://{settings.host}:{ws_port}/ws/")
            task_status.started(group)
            await shutdown_trigger()
            group.stopping.set()
            group.signal_workers()


def _hold_port(stack: contextlib.ExitStack) -> int:
    """A port of 127.0.0.1 reserved for the embedded Redis while ``stack`` is open.

    The socket is bound with SO_REUSEADDR and never listens: Linux then hands the port to
    no other ``bind`` (a port-0 bind skips it, an explicit one fails), except one that also
    sets SO_REUSEADDR while nothing listens on it, which ``redis-server`` does. So Redis
    binds it, and binds it again when the supervisor restarts it, and no other process can
    take it in between (a port picked and released would be a race with every process on
    the machine that binds port 0).
    """
    sock = stack.enter_context(socket.socket())
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port: int = sock.getsockname()[1]
    return port


async def _start_database(
    settings: Settings,
    supervisor: Supervisor,
    stack: contextlib.ExitStack,
    report: Callable[[str], None],
) -> str:
    """The group's database URL (DATABASE_URL, or the embedded PostgreSQL started as the
    supervisor's ``postgres`` child), migrated once for every worker."""
    url = settings.database_url
    if url is None:
        cluster = EmbeddedPostgres(settings.data_dir)
        await trio.to_thread.run_sync(cluster.prepare)
        stack.callback(cluster.close)
        await supervisor.start_child(postgres_spec(cluster))
        report(f"atrium: embedded PostgreSQL in {cluster.pgdata}")
        url = cluster.url
    async with open_database(url, pool_size=1) as db:
        applied = await migrate(db)
    if applied:
        report(f"atrium: applied migrations {applied}")
    return url
