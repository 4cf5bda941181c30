"""Shared pieces of the benchmarks: server subprocesses, CPU probes and a lean HTTP load.

The load generator is deliberately small: raw trio sockets, one pre-built request per
scenario, keep-alive connections, and a parser that reads only the status line and
``Content-Length``. A general client (httpx) spends more CPU per request than the
servers under test, so it would measure itself.
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import trio

CpuProbe = Callable[[], float]
"""Returns CPU seconds (user + system) consumed so far by something being watched."""

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
            list(argv), env=dict(env), cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
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
        for process in [root, *root.children(recursive=True)]:
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
        if not self.latencies:
            return float("nan")
        rank = max(0, min(len(self.latencies) - 1, round(q / 100 * len(self.latencies)) - 1))
        return self.latencies[rank] * 1000


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
