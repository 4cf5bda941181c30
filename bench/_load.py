"""Shared pieces of the benchmarks: server subprocesses, CPU probes and a lean HTTP load.

The load generator is deliberately small: raw trio sockets, one pre-built request per
scenario, keep-alive connections, and a parser that reads only the status line and
``Content-Length``. A general client (httpx) spends more CPU per request than the
servers under test, so it would measure itself.

The last part is what every script does with atrium itself: start ``run.py`` (embedded
PostgreSQL, rate limits lifted) and stop it, sign a user up, print the load average and
run ``main``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import orjson
import psutil
import trio

if TYPE_CHECKING:
    from atrium.persistence.database import Database

CpuProbe = Callable[[], float]
"""Returns CPU seconds (user + system) consumed so far by something being watched."""

HOST = "127.0.0.1"
"""Where the servers under test listen, and the client connects."""
REPO = Path(__file__).resolve().parent.parent
"""The repository root: the servers run from there."""
PASSWORD = "bench-Passw0rd!"
"""The password of every benchmark user."""

_STOP_TIMEOUT = 15.0
_RECV_SIZE = 65536


class ProtocolError(Exception):
    """The server sent something this minimal client does not understand."""


# -- processes ---------------------------------------------------------------------------


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the server binds it right after)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def open_process(
    argv: Sequence[str], *, env: Mapping[str, str], log_path: Path, cwd: Path | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``argv`` in its own session, output to ``log_path``; stop it when the block ends.

    Stopping sends SIGTERM (a graceful shutdown), then SIGKILL to the whole session after
    15 s. This runs on every exit, including errors and Ctrl-C.
    """
    with open(log_path, "wb") as log:
        # A session of its own: the terminal's Ctrl-C reaches only us, and we stop it in order.
        process = subprocess.Popen(
            list(argv),
            env=dict(env),
            cwd=cwd,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            yield process
        finally:
            stop_process(process)


def stop_process(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM, wait up to 15 s, then SIGKILL the process's session."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def log_tail(log_path: Path, lines: int = 20) -> str:
    """The last ``lines`` of a process log, for an error message."""
    try:
        text = log_path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def wait_http_ok(
    host: str, port: int, path: str, process: subprocess.Popen[bytes], *, timeout: float
) -> None:
    """Poll ``GET path`` until it answers 200; raise if ``process`` exits or time runs out.

    Blocking and polling on purpose: callers time a cold start in wall-clock terms.
    """
    request = build_request("GET", path, host=f"{host}:{port}", keep_alive=False)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with status {process.returncode} while starting")
        with contextlib.suppress(OSError, ProtocolError):
            with socket.create_connection((host, port), timeout=0.25) as sock:
                sock.sendall(request)
                data = b""
                while b"\r\n" not in data:
                    chunk = sock.recv(_RECV_SIZE)
                    if not chunk:
                        raise ProtocolError("closed before the status line")
                    data += chunk
                if _status(data) == 200:
                    return
        time.sleep(0.01)
    raise TimeoutError(f"GET {path} did not answer 200 within {timeout} s")


def wait_port(host: str, port: int, process: subprocess.Popen[bytes], *, timeout: float) -> None:
    """Poll until ``port`` accepts a connection; raise if ``process`` exits or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with status {process.returncode}")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.25):
            return
        time.sleep(0.02)
    raise TimeoutError(f"port {port} not listening within {timeout} s")


@contextlib.contextmanager
def exit_if_not_started(name: str, log_path: Path) -> Iterator[None]:
    """Turn a failed wait for a server (RuntimeError, TimeoutError) into an exit with its log."""
    try:
        yield
    except (RuntimeError, TimeoutError) as error:
        raise SystemExit(f"{name} did not start: {error}\n{log_tail(log_path)}") from None


def process_cpu(pid: int) -> CpuProbe:
    """A probe of one process's CPU seconds."""
    process = psutil.Process(pid)

    def probe() -> float:
        times = process.cpu_times()
        return float(times.user + times.system)

    return probe


def process_tree_cpu(pid: int) -> CpuProbe:
    """A probe of a process and its current descendants (e.g. a postmaster and its backends)."""
    root = psutil.Process(pid)

    def probe() -> float:
        total = 0.0
        try:
            processes = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:  # it exited (a crashed postmaster): count nothing
            processes = []
        for process in processes:
            with contextlib.suppress(psutil.NoSuchProcess):
                times = process.cpu_times()
                total += times.user + times.system
        return total

    return probe


def own_cpu() -> float:
    """CPU seconds this process has used (``resource.getrusage``)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# -- HTTP/1.1 ----------------------------------------------------------------------------


def build_request(
    method: str,
    path: str,
    *,
    host: str,
    headers: Mapping[str, str] | None = None,
    body: bytes = b"",
    keep_alive: bool = True,
) -> bytes:
    """The bytes of one HTTP/1.1 request, built once and sent many times."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    if body or method in ("POST", "PUT", "PATCH"):
        lines.append(f"Content-Length: {len(body)}")
    if not keep_alive:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def _status(data: bytes | bytearray) -> int:
    if not data.startswith(b"HTTP/1.") or len(data) < 12:
        raise ProtocolError(f"not an HTTP/1.x status line: {bytes(data[:40])!r}")
    return int(data[9:12])


class _Connection:
    """One keep-alive connection: send a request, read exactly one response."""

    __slots__ = ("_buffer", "_sock", "must_close")

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self._sock = sock
        self._buffer = bytearray()
        self.must_close = False

    async def exchange(self, request: bytes) -> tuple[int, bytes]:
        """Send ``request``; return the status and body of the response."""
        sock = self._sock
        view = memoryview(request)
        while view:
            view = view[await sock.send(view) :]
        buffer = self._buffer
        while (end := buffer.find(b"\r\n\r\n")) < 0:
            await self._fill()
        status = _status(buffer)
        head = bytes(buffer[:end]).lower()
        start = head.find(b"\r\ncontent-length:")
        if start >= 0:
            stop = head.find(b"\r\n", start + 2)
            length = int(head[start + 17 : stop if stop >= 0 else len(head)])
        elif status in (204, 304) or status < 200:
            length = 0
        else:
            raise ProtocolError("response without Content-Length (chunked is not supported)")
        self.must_close = b"\r\nconnection: close" in head
        total = end + 4 + length
        while len(buffer) < total:
            await self._fill()
        body = bytes(buffer[end + 4 : total])
        del buffer[:total]
        return status, body

    async def _fill(self) -> None:
        chunk = await self._sock.recv(_RECV_SIZE)
        if not chunk:
            raise ProtocolError("connection closed mid-response")
        self._buffer += chunk

    def close(self) -> None:
        self._sock.close()


async def _connect(host: str, port: int) -> _Connection:
    sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_STREAM)
    try:
        sock.setsockopt(trio.socket.IPPROTO_TCP, trio.socket.TCP_NODELAY, 1)
        await sock.connect((host, port))
    except BaseException:
        sock.close()
        raise
    return _Connection(sock)


async def fetch(host: str, port: int, request: bytes) -> tuple[int, bytes]:
    """Send one request on a fresh connection; return status and body (for set-up steps)."""
    connection = await _connect(host, port)
    try:
        return await connection.exchange(request)
    finally:
        connection.close()


# -- load --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LoadResult:
    """What one load run measured (only the window after the warm-up counts)."""

    completed: int
    errors: int
    error_kinds: Mapping[str, int]
    wall_seconds: float
    latencies: Sequence[float]  # seconds, sorted
    cpu: Mapping[str, float]  # probe name -> CPU seconds / wall seconds ("client" included)

    @property
    def rate(self) -> float:
        return self.completed / self.wall_seconds

    def percentile_ms(self, q: float) -> float:
        """Nearest-rank percentile of the latencies, in milliseconds (NaN with none)."""
        return nearest_rank_ms(self.latencies, q)

    def cpu_us_per_request(self, probe: str = "server") -> float:
        """CPU microseconds of ``probe`` per request: the cost, whatever else ran on the
        machine (NaN with no request completed)."""
        if not self.completed:
            return float("nan")
        return self.cpu[probe] * self.wall_seconds / self.completed * 1e6

    def cpu_shares(self) -> str:
        """Each probe's CPU over wall time, for a report line: ``client 12%  server 98%``."""
        return "  ".join(f"{name} {share:.0%}" for name, share in self.cpu.items())


def print_report(result: LoadResult, line: str) -> None:
    """Print a run's report ``line``, then its errors by kind if there were any."""
    print(line, flush=True)
    if result.error_kinds:
        print(f"    errors by kind: {dict(result.error_kinds)}")


def nearest_rank_ms(seconds: Sequence[float], q: float) -> float:
    """The nearest-rank ``q`` percentile of ``seconds`` (sorted), in milliseconds; NaN if empty."""
    if not seconds:
        return float("nan")
    rank = max(0, min(len(seconds) - 1, round(q / 100 * len(seconds)) - 1))
    return seconds[rank] * 1000


@dataclass(slots=True)
class _Recorder:
    recording: bool = False
    completed: int = 0
    latencies: list[float] = field(default_factory=list)
    error_kinds: dict[str, int] = field(default_factory=dict)

    def error(self, kind: str) -> None:
        if self.recording:
            self.error_kinds[kind] = self.error_kinds.get(kind, 0) + 1


async def _drive(host: str, port: int, request: bytes, recorder: _Recorder) -> None:
    clock = time.perf_counter
    while True:
        try:
            connection = await _connect(host, port)
        except OSError as error:
            recorder.error(f"connect: {error.strerror or error}")
            await trio.sleep(0.01)
            continue
        try:
            while not connection.must_close:
                started = clock()
                status, _ = await connection.exchange(request)
                elapsed = clock() - started
                if recorder.recording:
                    if status >= 400:
                        recorder.error(f"HTTP {status}")
                    else:
                        recorder.completed += 1
                        recorder.latencies.append(elapsed)
        except (OSError, ProtocolError) as error:
            recorder.error(type(error).__name__)
        finally:
            connection.close()


async def run_http_load(
    host: str,
    port: int,
    request: bytes,
    *,
    connections: int,
    duration: float,
    warmup: float = 1.0,
    probes: Mapping[str, CpuProbe] | None = None,
) -> LoadResult:
    """Send ``request`` back to back on ``connections`` keep-alive connections.

    Measures ``duration`` seconds after ``warmup`` seconds. Each probe (and this client,
    as "client") is sampled at both ends of the window and reported as CPU time over wall
    time, so a reader sees whether the client or the server was the one saturated.
    Responses of status 400 and above, and broken connections, count as errors.
    """
    probes = {"client": own_cpu, **(probes or {})}
    recorder = _Recorder()
    async with trio.open_nursery() as nursery:
        for _ in range(connections):
            nursery.start_soon(_drive, host, port, request, recorder)
        await trio.sleep(warmup)
        before = {name: probe() for name, probe in probes.items()}
        started = time.perf_counter()
        recorder.recording = True
        await trio.sleep(duration)
        recorder.recording = False
        wall = time.perf_counter() - started
        after = {name: probe() for name, probe in probes.items()}
        nursery.cancel_scope.cancel()
    return LoadResult(
        completed=recorder.completed,
        errors=sum(recorder.error_kinds.values()),
        error_kinds=dict(recorder.error_kinds),
        wall_seconds=wall,
        latencies=sorted(recorder.latencies),
        cpu={name: (after[name] - before[name]) / wall for name in probes},
    )


def add_load_options(parser: argparse.ArgumentParser) -> None:
    """The options :func:`run_load` reads: --duration, --connections and --warmup."""
    parser.add_argument(
        "--duration", type=float, default=10.0, help="measured seconds per scenario (default 10)"
    )
    parser.add_argument(
        "--connections", type=int, default=32, help="concurrent keep-alive connections (default 32)"
    )
    parser.add_argument(
        "--warmup",
        type=float,
        default=1.0,
        help="unmeasured seconds of load before each scenario (default 1)",
    )


def run_load(
    port: int, request: bytes, args: argparse.Namespace, probes: Mapping[str, CpuProbe]
) -> LoadResult:
    """:func:`run_http_load` on ``port`` with the --connections, --duration, --warmup given."""
    return trio.run(
        functools.partial(
            run_http_load,
            HOST,
            port,
            request,
            connections=args.connections,
            duration=args.duration,
            warmup=args.warmup,
            probes=probes,
        )
    )


# -- atrium under test -------------------------------------------------------------------

_NO_LIMIT = "100000000"

# Everything atrium reads from the environment: the bench sets what it needs, nothing leaks.
_ATRIUM_VARIABLES = (
    "ACCESS_TOKEN_EXPIRE_MINUTES",
    "ADMIN_TOKEN",
    "ALLOWED_ORIGINS",
    "AUTH_ADDRESS_RATE_LIMIT_PER_MINUTE",
    "AUTH_RATE_LIMIT_PER_MINUTE",
    "DATABASE_URL",
    "DATA_DIR",
    "DB_POOL_SIZE",
    "ENVIRONMENT",
    "HOST",
    "JWT_AUDIENCE",
    "JWT_ISSUER",
    "LOGIN_BACKOFF_AFTER_FAILURES",
    "LOGIN_BACKOFF_MAX_SECONDS",
    "LOG_LEVEL",
    "MAX_BODY_BYTES",
    "PASSWORD_HASH_CONCURRENCY",
    "PASSWORD_HASH_QUEUE_SECONDS",
    "PORT",
    "PROJECT_CACHE_TTL_SECONDS",
    "RATE_LIMIT_PER_MINUTE",
    "REDIS_URL",
    "REFRESH_TOKEN_EXPIRE_DAYS",
    "SECRET_KEY",
    "TRUSTED_PROXIES",
    "WS_PORT",
    "WS_MAX_CONNECTIONS_PER_USER",
    "WS_USER_EDITS_PER_SECOND",
    "EVENT_LOG_RETENTION_DAYS",
    "EVENT_LOG_MAX_EVENTS_PER_PROJECT",
)


def atrium_env(
    port: int, data_dir: Path, database_url: str | None = None, **settings: str
) -> dict[str, str]:
    """The environment of a ``run.py`` under test, none of atrium's variables leaking in.

    Development mode, warnings only, HTTP rate limits and per-user WebSocket bounds lifted
    (a bench drives many connections and edits from few users), no WebSocket listener; then
    ``settings`` (more variables, or other values).
    """
    env = {k: v for k, v in os.environ.items() if k not in _ATRIUM_VARIABLES}
    env.update(
        ENVIRONMENT="development",
        PORT=str(port),
        DATA_DIR=str(data_dir),
        WS_PORT="0",
        LOG_LEVEL="WARNING",
        RATE_LIMIT_PER_MINUTE=_NO_LIMIT,
        AUTH_RATE_LIMIT_PER_MINUTE=_NO_LIMIT,
        WS_MAX_CONNECTIONS_PER_USER=_NO_LIMIT,
        WS_USER_EDITS_PER_SECOND=_NO_LIMIT,
    )
    if database_url:
        env["DATABASE_URL"] = database_url
    env.update(settings)
    return env


def _postmaster_pid(data_dir: Path) -> int:
    """The pid in the embedded PostgreSQL's pid file (OSError, ValueError or IndexError if none)."""
    return int((data_dir / "pg" / "postmaster.pid").read_text().split()[0])


def postgres_probe(data_dir: Path) -> CpuProbe | None:
    """The embedded postmaster and its backends, found through its pid file."""
    try:
        return process_tree_cpu(_postmaster_pid(data_dir))
    except (OSError, ValueError, IndexError):
        return None


@contextlib.contextmanager
def stop_embedded_postgres(data_dir: Path) -> Iterator[None]:
    """After the block, stop a postmaster that outlived run.py (killed, not shut down).

    pg_ctl detaches PostgreSQL from our session, so killing run.py's session misses it.
    """
    try:
        yield
    finally:
        with contextlib.suppress(OSError, ValueError, IndexError, psutil.Error):
            postmaster = psutil.Process(_postmaster_pid(data_dir))
            if postmaster.name().startswith("postgres"):  # not a stale pid reused since
                postmaster.send_signal(signal.SIGQUIT)  # PostgreSQL's immediate shutdown


@dataclass(frozen=True, slots=True)
class Atrium:
    """A ``run.py`` under test that has answered ``GET /health``."""

    process: subprocess.Popen[bytes]
    port: int
    data_dir: Path
    log_path: Path
    cold_start: float  # seconds from the process's start to its first GET /health 200

    def probes(self) -> dict[str, CpuProbe]:
        """CPU probes: "server", and "postgres" when it runs an embedded PostgreSQL."""
        probes = {"server": process_cpu(self.process.pid)}
        postgres = postgres_probe(self.data_dir)
        if postgres is not None:
            probes["postgres"] = postgres
        return probes


@contextlib.contextmanager
def open_atrium(
    label: str,
    data_dir: Path,
    log_path: Path,
    *,
    timeout: float,
    note: str = "",
    database_url: str | None = None,
    ws_port: int | None = None,
    **settings: str,
) -> Iterator[Atrium]:
    """Run ``python run.py`` on a free port for the block; yield it once it answers.

    Prints its command line after ``label:`` (``note`` appended). The environment is
    :func:`atrium_env` with ``settings``; with ``ws_port`` the WebSocket listener runs there
    and must accept connections too. Exits with the log's tail if the server does not start
    within ``timeout`` seconds; stops it, and an embedded PostgreSQL it leaves, at the end.
    """
    port = free_port(HOST)
    if ws_port is not None:
        settings["WS_PORT"] = str(ws_port)
    env = atrium_env(port, data_dir, database_url, **settings)
    print(f"{label}: python run.py --port {port} --data-dir {data_dir}{note}", flush=True)
    with (
        stop_embedded_postgres(data_dir),
        open_process(
            [
                sys.executable,
                # ATRIUM_RUN: a wrapper to run instead of run.py, for experiments
                # (tracemalloc, other GC settings) that must not live in run.py.
                os.environ.get("ATRIUM_RUN", "run.py"),
                "--port",
                str(port),
                "--data-dir",
                str(data_dir),
            ],
            env=env,
            log_path=log_path,
            cwd=REPO,
        ) as process,
    ):
        started = time.perf_counter()
        with exit_if_not_started("atrium", log_path):
            wait_http_ok(HOST, port, "/health", process, timeout=timeout)
            cold_start = time.perf_counter() - started
            if ws_port is not None:
                wait_port(HOST, ws_port, process, timeout=timeout)
        yield Atrium(process, port, data_dir, log_path, cold_start)


def bench_email() -> str:
    """A fresh address for a benchmark user."""
    return f"bench-{uuid.uuid4().hex[:12]}@example.com"


def api_request(
    method: str, path: str, port: int, body: object = None, token: str | None = None
) -> bytes:
    """A request to atrium's REST API on ``port``: ``body`` as JSON, ``token`` as bearer."""
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    payload = b"" if body is None else orjson.dumps(body)
    return build_request(method, path, host=f"{HOST}:{port}", headers=headers, body=payload)


async def sign_up(port: int) -> str:
    """Sign up and log in a fresh user; return its access token."""
    credentials = {"email": bench_email(), "password": PASSWORD}
    for step, expect in (("signup", 201), ("login", 200)):
        request = api_request("POST", f"/api/v1/auth/{step}", port, credentials)
        status, body = await fetch(HOST, port, request)
        if status != expect:
            raise RuntimeError(f"{step} answered {status}: {body[:200]!r}")
    return str(orjson.loads(body)["access_token"])


# -- atrium in this process, no server -----------------------------------------------------
# atrium is imported where it is used: the scripts that only drive run.py never load it.


@contextlib.contextmanager
def bench_database(url: str | None) -> Iterator[tuple[str, int | None]]:
    """``url``, or an embedded PostgreSQL (pgserver, as ``run.py`` starts it: fsync and
    synchronous_commit on) in a temporary directory for the block; with the postmaster's
    pid when it is that embedded one, else None."""
    if url:
        yield url, None
        return
    from atrium.persistence.embedded import embedded_postgres

    with tempfile.TemporaryDirectory(prefix="atrium-bench-") as tmp:
        with embedded_postgres(Path(tmp)) as embedded:
            yield embedded, _postmaster_pid(Path(tmp))


async def bench_project(db: Database) -> tuple[uuid.UUID, uuid.UUID]:
    """A fresh user and a private project of theirs, written straight to ``db``: the
    user's id and the project's."""
    from atrium.persistence import accounts, projects

    user = await accounts.create_user(db, bench_email(), "x")
    assert user is not None
    created = await projects.create_project(
        db, user.id, name="bench", description=None, visibility="private"
    )
    return user.id, created.value.id


# -- scripts -----------------------------------------------------------------------------


def print_run_header(args: argparse.Namespace, extra: str = "") -> None:
    """What every run measures and on what (the --connections, --warmup and --duration
    of :func:`add_load_options`, ``extra``, cores, Python), then the load average."""
    print(
        f"{args.connections} connections, {args.warmup:g} s warm-up + {args.duration:g} s"
        f" measured per scenario; {extra}{os.cpu_count()} CPUs;"
        f" Python {sys.version.split()[0]}",
        flush=True,
    )
    print_load_average("before")


def print_load_average(when: str) -> None:
    """The 1, 5 and 15 minute load average: other work on the machine skews the figures."""
    print("load average {}: {:.2f} {:.2f} {:.2f}".format(when, *os.getloadavg()), flush=True)


def run_script(main: Callable[[list[str]], int]) -> NoReturn:
    """Exit with ``main(sys.argv[1:])``; on Ctrl-C with 130, once its servers are stopped."""
    try:
        status = main(sys.argv[1:])
    except* KeyboardInterrupt:  # trio's nurseries deliver it inside an exception group
        print("\ninterrupted; servers stopped", file=sys.stderr)
        status = 130
    sys.exit(status)
