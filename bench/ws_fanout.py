"""WebSocket fan-out benchmark: deliveries/s, latency and memory of atrium's live workspaces.

    python bench/ws_fanout.py [--transport main|listener|both]
                              [--scenario a|b|c|durable|churn|all]
                              [--peer none|socketio] [--peer-ws auto|wsproto|websockets ...]
                              [--duration 8] [--warmup 1] [--json PATH]

Per transport, a fresh server (``python run.py``, embedded PostgreSQL in a temp dir, limits
lifted) and, in that order:

  c        1,000 workspaces x 5 members, idle: server RSS per connection
           ((RSS connected - RSS before) / 5,000). 5 users, each project owned by one of
           them, the other 4 added as collaborators.
  a        1 sender, 100 receivers in one workspace, CURSOR_UPDATE (the ephemeral path):
             paced     200 messages/s: send-to-receive latency
             max       as fast as the server goes with at most 32 messages in flight
                       (ahead of a probe receiver), receivers without and with ?batch=1
  b        the same with 1,000 receivers (paced at 20 messages/s: the same 20,000
           deliveries/s as a; 200/s would ask for 200,000/s)
  durable  1 sender pipelining FILE_CHANGE (32 un-ACKed at most), 10 receivers:
           events persisted and broadcast per second, ACK latency
  churn    8 rounds of 1,000 connections (200 workspaces x 5) opened and closed: server
           RSS after each round; memory must level off (grow by less than 5% over the
           last 3 rounds), i.e. what closed connections leave behind is reclaimed

A delivery is one message received by one receiver. Cursor moves are coalesced per user
in a connection's outbox when it falls behind, so deliveries are counted as received
(never as sent x receivers) and the skipped ones are reported (``coalesced``: gaps in the
sequence number each receiver saw). Latency is send-to-receive: the sender writes its
``perf_counter`` (microseconds) into ``position.column`` and the sequence number into
``position.line``; receivers run in the same process.

The client is one process, no framework: ``bench/_ws.py`` (non-blocking sockets, epoll,
hand-written framing). Its CPU and the server's are printed for every measurement so a
reader can see which one was saturated.

With ``--peer socketio`` the fan-out scenarios (a, b; without ``?batch=1``, which it has
no counterpart for) run a third time against bench/peer_socketio.py, a minimal
python-socketio ASGI app on uvicorn (the ``bench`` extra) that emits each ``cursor``
event of a client to the rest of its room, encoded once. The same client speaks
engine.io/socket.io text framing over plain WebSocket (``transport=websocket``): the
sender writes ``42["cursor",{...}]`` around the same CURSOR_UPDATE object, receivers
match the same pattern in what they get, and answer engine.io pings ``2`` with ``3``.
``--peer-ws`` names uvicorn's WebSocket implementation(s) for the peer (one peer run
each, labelled ``socketio`` for auto, else ``sio-wsproto``, ``sio-websockets``, ``sio-sansio``). The
summary then gives atrium's max-throughput deliveries/s over each peer run's.

``--json PATH`` also writes the fan-out figures of scenarios a and b beside the peer runs
(bench/_figures.py: what bench/sidebyside.py collects).
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script this directory would come first on sys.path, and bench/http.py would
# shadow the standard library's ``http``; the repository root is what we want there.
sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse  # noqa: E402
import contextlib  # noqa: E402
import gc  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import resource  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402

import orjson  # noqa: E402
import psutil  # noqa: E402
import trio  # noqa: E402

from bench._figures import Figure, Value, write_figures  # noqa: E402
from bench._load import (  # noqa: E402
    HOST,
    PASSWORD,
    REPO,
    _connect,
    api_request,
    bench_email,
    exit_if_not_started,
    free_port,
    log_tail,
    nearest_rank_ms,
    open_atrium,
    open_process,
    own_cpu,
    postgres_probe,
    print_load_average,
    process_cpu,
    run_script,
    wait_port,
)
from bench._ws import Conn, Engine, Handler  # noqa: E402

T0 = time.perf_counter()
START_TIMEOUT = 60.0
PONG = b'{"type":"PONG"}'
CURSOR_RE = re.compile(rb'"line":(\d+),"column":(\d+)')  # sequence number, send time
CHANGE_RE = re.compile(rb'"t":(\d+)')  # send time
ACK_RE = re.compile(rb'"type":"ACK","id":"[^"-]*-(\d+)"')

TARGETS = {  # (scenario, transport) -> minimum deliveries/s of the max-throughput runs
    ("a", "listener"): 50_000,
    ("b", "listener"): 40_000,
    ("a", "main"): 25_000,
    ("b", "main"): 15_000,
}
LATENCY_TARGET_MS = 50.0
RSS_TARGET_KB = 40.0
IDLE_SECONDS = 5  # WORKSPACE_IDLE_SECONDS of the server under test


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench/ws_fanout.py", description=__doc__.split("\n")[0])
    parser.add_argument("--transport", choices=("main", "listener", "both"), default="both")
    parser.add_argument(
        "--scenario", choices=("a", "b", "c", "durable", "churn", "all"), default="all"
    )
    parser.add_argument(
        "--peer",
        choices=("none", "socketio"),
        default="none",
        help="also run scenarios a and b against a python-socketio app "
        "(bench/peer_socketio.py, the bench extra)",
    )
    parser.add_argument(
        "--peer-ws",
        nargs="+",
        choices=("auto", "wsproto", "websockets", "websockets-sansio"),
        default=["auto"],
        help="uvicorn's WebSocket implementation for the peer; several: one peer run each",
    )
    parser.add_argument(
        "--duration", type=float, default=8.0, help="measured seconds per run (default 8)"
    )
    parser.add_argument(
        "--warmup", type=float, default=1.0, help="unmeasured seconds before each run (default 1)"
    )
    parser.add_argument(
        "--window",
        type=int,
        default=32,
        help="messages in flight in the max-throughput runs (default 32)",
    )
    parser.add_argument(
        "--profile",
        metavar="DIR",
        help="run py-spy (raw collapsed stacks) on the server during each "
        "max-throughput and durable run, into DIR; figures are then lower",
    )
    parser.add_argument("--json", help="also write the side-by-side figures here (JSON)")
    return parser.parse_args(argv)


# -- results -----------------------------------------------------------------------------


def percentile_ms(values: list[float], q: float) -> float:
    """Nearest-rank percentile of ``values`` (seconds) in milliseconds; sorts them in place."""
    values.sort()
    return nearest_rank_ms(values, q)


@dataclass(slots=True)
class Row:
    scenario: str
    transport: str
    run: str
    rate: float  # deliveries/s (durable: events/s; c: KB per connection)
    p50: float
    p99: float
    server_cpu: float
    client_cpu: float
    target: str
    met: bool | None
    note: str = ""


@dataclass(slots=True)
class Stats:
    recording: bool = False
    deliveries: int = 0
    frames: int = 0
    drops: int = 0
    latencies: list[float] = field(default_factory=list)
    acks: int = 0
    ack_latencies: list[float] = field(default_factory=list)

    def reset(self) -> None:
        self.deliveries = self.frames = self.drops = self.acks = 0
        self.latencies = []
        self.ack_latencies = []


# -- server ------------------------------------------------------------------------------


@dataclass(slots=True)
class Server:
    process: subprocess.Popen[bytes]
    port: int
    ws_port: int
    data_dir: Path
    cpu: Callable[[], float]

    def port_of(self, transport: str) -> int:
        return self.port if transport == "main" else self.ws_port

    def rss(self) -> int:
        return int(psutil.Process(self.process.pid).memory_info().rss)


@contextlib.contextmanager
def atrium_server(work: Path, name: str) -> Iterator[Server]:
    ws_port = free_port(HOST)
    with open_atrium(
        "server",
        work / name,
        work / f"{name}.log",
        timeout=START_TIMEOUT,
        note=f"  (WS_PORT={ws_port})",
        ws_port=ws_port,
        WS_RATE_LIMIT_PER_SECOND="1000000",
        WS_SEND_QUEUE="100000",
        WORKSPACE_IDLE_SECONDS=str(IDLE_SECONDS),
    ) as atrium:
        process = atrium.process
        yield Server(process, atrium.port, ws_port, atrium.data_dir, process_cpu(process.pid))
        if process.poll() is not None:
            print(f"  warning: the server exited early:\n{log_tail(atrium.log_path)}")


@contextlib.contextmanager
def socketio_server(work: Path, ws: str) -> Iterator[Server]:
    """bench/peer_socketio.py on a free port for the block (no database: no REST set-up)."""
    port = free_port(HOST)
    log_path = work / f"peer-socketio-{ws}.log"
    print(
        f"peer: python -m bench.peer_socketio --port {port} --ws {ws} (python-socketio + uvicorn)"
    )
    argv = [sys.executable, "-m", "bench.peer_socketio", "--host", HOST, "--port", str(port)]
    argv += ["--ws", ws]
    with open_process(argv, env=dict(os.environ), log_path=log_path, cwd=REPO) as process:
        with exit_if_not_started("the peer (pip install -e '.[bench]')", log_path):
            wait_port(HOST, port, process, timeout=START_TIMEOUT)
        print(f"  {log_path.read_text(errors='replace').splitlines()[0]}", flush=True)
        yield Server(process, port, port, work / "no-database", process_cpu(process.pid))
        if process.poll() is not None:
            print(f"  warning: the peer exited early:\n{log_tail(log_path)}")


# -- REST set-up -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class User:
    email: str
    user_id: str
    token: str


async def _exchange_all(
    port: int, requests: list[bytes], concurrency: int
) -> list[tuple[int, bytes]]:
    """Send every request on ``concurrency`` keep-alive connections; results in order."""
    results: list[tuple[int, bytes]] = [(0, b"")] * len(requests)
    todo = iter(range(len(requests)))

    async def worker() -> None:
        connection = await _connect(HOST, port)
        try:
            for index in todo:
                if connection.must_close:
                    connection.close()
                    connection = await _connect(HOST, port)
                results[index] = await connection.exchange(requests[index])
        finally:
            connection.close()

    async with trio.open_nursery() as nursery:
        for _ in range(min(concurrency, len(requests))):
            nursery.start_soon(worker)
    return results


def rest(port: int, requests: list[bytes], expect: int, concurrency: int = 16) -> list[dict]:
    answers = trio.run(_exchange_all, port, requests, concurrency)
    bad = [(status, body[:200]) for status, body in answers if status != expect]
    if bad:
        raise SystemExit(f"set-up request failed ({len(bad)} of {len(answers)}): {bad[0]}")
    return [orjson.loads(body) if body else {} for _, body in answers]


def make_users(port: int, count: int) -> list[User]:
    emails = [bench_email() for _ in range(count)]
    credentials = [{"email": e, "password": PASSWORD} for e in emails]
    signed = rest(
        port,
        [api_request("POST", "/api/v1/auth/signup", port, c) for c in credentials],
        201,
        concurrency=4,
    )
    logged = rest(
        port,
        [api_request("POST", "/api/v1/auth/login", port, c) for c in credentials],
        200,
        concurrency=4,
    )
    return [
        User(e, str(s["user_id"]), str(t["access_token"]))
        for e, s, t in zip(emails, signed, logged, strict=True)
    ]


def make_projects(port: int, owners: list[User], members: list[list[User]]) -> list[str]:
    """One project per owner; each gets its ``members`` as collaborators. Returns the ids."""
    created = rest(
        port,
        [
            api_request("POST", "/api/v1/projects/", port, {"name": f"bench {i}"}, o.token)
            for i, o in enumerate(owners)
        ],
        201,
    )
    ids = [str(p["id"]) for p in created]
    adds = [
        api_request(
            "POST",
            f"/api/v1/projects/{pid}/collaborators",
            port,
            {"user_id": m.user_id, "role": "collaborator"},
            owner.token,
        )
        for pid, owner, group in zip(ids, owners, members, strict=True)
        for m in group
    ]
    if adds:
        rest(port, adds, 201)
    return ids


# -- WebSocket helpers --------------------------------------------------------------------


def ws_path(project_id: str, batch: bool) -> str:
    return f"/ws/{project_id}" + ("?batch=1" if batch else "")


def connect_all(
    engine: Engine,
    port: int,
    specs: list[tuple[str, User, Callable]],
    concurrency: int = 64,
    timeout: float = 180.0,
) -> list[Conn]:
    """Open one connection per (path, user, handler); return once each got its first frame.

    A connection is ready when its handler set ``conn.ready`` (on PRESENCE_STATE, the
    first frame, sent once the server has joined it to the workspace).
    """
    conns: list[Conn] = []
    pending = iter(specs)
    opening: list[Conn] = []
    deadline = time.perf_counter() + timeout
    exhausted = False
    while True:
        opening = [c for c in opening if not c.ready and c.error is None]
        while not exhausted and len(opening) < concurrency:
            spec = next(pending, None)
            if spec is None:
                exhausted = True
                break
            path, user, handler = spec
            headers = {"Authorization": f"Bearer {user.token}"} if user.token else None
            conn = engine.connect(HOST, port, path, handler=handler, headers=headers)
            conns.append(conn)
            opening.append(conn)
        if exhausted and not opening:
            break
        if time.perf_counter() > deadline:
            raise SystemExit(f"connecting timed out: {len(opening)} connections not ready")
        engine.poll(0.05)
    failed = [c for c in conns if not c.ready]
    if failed:
        raise SystemExit(f"{len(failed)} of {len(conns)} connections failed: {failed[0].error}")
    return conns


def idle_handler(conn: Conn, payload: bytes, now: float) -> None:
    conn.ready = True
    if b'"PING"' in payload:
        conn.send_text(PONG)


def sio_control(conn: Conn, payload: bytes) -> None:
    """An engine.io/socket.io frame that is not an event: open, ping, namespace CONNECT."""
    if payload == b"2":  # engine.io ping
        conn.send_text(b"3")
    elif payload[:1] == b"0":  # engine.io open: join the default namespace
        conn.send_text(b"40")
    elif payload[:2] == b"40":  # namespace joined (the peer has put us in the room)
        conn.ready = True
    elif payload[:2] == b"44":
        conn.error = f"socket.io CONNECT refused: {payload[:200]!r}"


def sio_idle_handler(conn: Conn, payload: bytes, now: float) -> None:
    if payload[:2] != b"42":
        sio_control(conn, payload)


def receiver_handler(stats: Stats, pattern: re.Pattern[bytes], socketio: bool = False) -> Handler:
    """A receiver's handler: each match of ``pattern`` in a frame is one delivery.

    ``pattern`` captures a message's send time (``perf_counter`` microseconds after T0), and
    before it, in a pattern with two groups, its sequence number: each receiver then keeps
    the last one it saw in ``conn.last_seq`` and counts the gaps as coalesced messages.
    """
    findall = pattern.findall
    sequenced = pattern.groups == 2

    def handle(conn: Conn, payload: bytes, now: float) -> None:
        if socketio:
            if payload[:2] != b"42":
                sio_control(conn, payload)
                return
        else:
            conn.ready = True
            if b'"PING"' in payload:
                conn.send_text(PONG)
        found = findall(payload)
        if not found:
            return
        if not stats.recording:
            if sequenced:
                conn.last_seq = int(found[-1][0])
            return
        base = now - T0
        append = stats.latencies.append
        if sequenced:
            last = conn.last_seq
            drops = 0
            for line, column in found:
                seq = int(line)
                drops += seq - last - 1
                last = seq
                append(base - int(column) * 1e-6)
            conn.last_seq = last
            stats.drops += drops
        else:
            for sent in found:
                append(base - int(sent) * 1e-6)
        stats.deliveries += len(found)
        stats.frames += 1

    return handle


def ack_handler(stats: Stats, sent_at: dict[int, float]) -> Handler:
    findall = ACK_RE.findall

    def handle(conn: Conn, payload: bytes, now: float) -> None:
        conn.ready = True
        if b'"PING"' in payload:
            conn.send_text(PONG)
        for seq in findall(payload):
            sent = sent_at.pop(int(seq), None)
            conn.count += 1  # ACKs received: the window
            if sent is not None and stats.recording:
                stats.acks += 1
                stats.ack_latencies.append(now - sent)

    return handle


@dataclass(slots=True)
class Window:
    """CPU (server, client) and wall time of one measured window."""

    wall: float = 0.0
    server: float = 0.0
    client: float = 0.0
    postgres: float = 0.0


class Meter:
    """The clock of one run, and what it measures in the window after the warm-up.

    ``args.warmup`` seconds unmeasured, then ``args.duration`` seconds in which ``stats``
    record and the CPU of the server, this client and PostgreSQL is metered; with --profile
    and a ``profile_as`` name, py-spy samples the server meanwhile.
    """

    def __init__(
        self,
        server: Server,
        stats: Stats,
        args: argparse.Namespace,
        profile_as: str | None = None,
    ) -> None:
        self._server = server
        self._stats = stats
        self._args = args
        self._profile_as = profile_as
        self._pg = postgres_probe(server.data_dir)
        self._started: tuple[float, float, float, float] | None = None
        self._profiler: subprocess.Popen[bytes] | None = None
        self.begin = time.perf_counter()
        self._record_at = self.begin + args.warmup
        self.end = self._record_at + args.duration

    def tick(self) -> float | None:
        """``perf_counter()`` now, opening the window when it is due; None once the run is over."""
        now = time.perf_counter()
        if self._started is None and now >= self._record_at:
            self._stats.reset()
            self._stats.recording = True
            pg = self._pg() if self._pg else 0.0
            self._started = time.perf_counter(), self._server.cpu(), own_cpu(), pg
            if self._profile_as:
                self._profiler = start_profile(self._args, self._server, self._profile_as)
        return None if now >= self.end else now

    def stop(self, engine: Engine, settle: float) -> Window:
        """Close the window; then poll ``settle`` seconds, for what is in flight to land."""
        assert self._started is not None
        wall0, srv0, cli0, pg0 = self._started
        wall = time.perf_counter() - wall0
        pg = self._pg() if self._pg else 0.0
        window = Window(
            wall, (self._server.cpu() - srv0) / wall, (own_cpu() - cli0) / wall, (pg - pg0) / wall
        )
        self._stats.recording = False
        engine.run_for(settle)  # not counted
        stop_profile(self._profiler)
        return window


def wait_server_idle(
    engine: Engine, server: Server, *, below: float = 0.05, timeout: float = 60.0
) -> float:
    """Poll the connections until the server used < ``below`` of a core for 0.5 s."""
    deadline = time.perf_counter() + timeout
    while True:
        before, wall = server.cpu(), time.perf_counter()
        engine.run_for(0.5)
        share = (server.cpu() - before) / (time.perf_counter() - wall)
        if share < below or time.perf_counter() > deadline:
            return share


def start_profile(
    args: argparse.Namespace, server: Server, what: str
) -> subprocess.Popen[bytes] | None:
    """``py-spy record`` on the server for the measured window, when --profile is given."""
    if not args.profile:
        return None
    directory = Path(args.profile)
    directory.mkdir(parents=True, exist_ok=True)
    out = directory / f"{what.replace(' ', '-')}.txt"
    py_spy = Path(sys.executable).with_name("py-spy")
    return subprocess.Popen(
        [
            str(py_spy),
            "record",
            "--pid",
            str(server.process.pid),
            "--rate",
            "100",
            "--duration",
            str(max(1, round(args.duration))),
            "--format",
            "raw",
            "--output",
            str(out),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def stop_profile(profiler: subprocess.Popen[bytes] | None) -> None:
    if profiler is not None:
        try:
            profiler.wait(30)
        except subprocess.TimeoutExpired:
            profiler.kill()
            profiler.wait()


# -- fan-out -----------------------------------------------------------------------------


class Sender:
    """The one sender of CURSOR_UPDATE frames; ``seq`` keeps counting across runs.

    With ``socketio`` each is wrapped as a socket.io event: ``42["cursor",{...}]``.
    """

    def __init__(self, conn: Conn, socketio: bool = False) -> None:
        self.conn = conn
        self.seq = 0
        self.head, self.tail = (b'42["cursor",', b"]") if socketio else (b"", b"")

    def send(self, count: int) -> None:
        conn, seq, head, tail = self.conn, self.seq, self.head, self.tail
        now_us = int((time.perf_counter() - T0) * 1e6)
        frames = []
        for _ in range(count):
            seq += 1
            frames.append(
                conn.frame(
                    b'%s{"type":"CURSOR_UPDATE","position":{"file":"f","line":%d,"column":%d}}%s'
                    % (head, seq, now_us, tail)
                )
            )
        self.seq = seq
        conn.send_raw(b"".join(frames))


def fanout_run(
    engine: Engine,
    server: Server,
    sender: Sender,
    receivers: list[Conn],
    stats: Stats,
    *,
    rate: float | None,
    window: int,
    args: argparse.Namespace,
    profile_as: str | None = None,
) -> tuple[Window, int]:
    """One measured run: paced at ``rate`` messages/s, or window-limited when rate is None.

    Returns the window's CPU/wall and the number of messages sent in it.
    """
    probe = receivers[-1]
    for conn in receivers:
        conn.last_seq = sender.seq
    stats.reset()
    stats.recording = False
    meter = Meter(server, stats, args, profile_as)
    begin = meter.begin
    sent_before = None
    last_progress, last_probe = begin, probe.last_seq
    run_start = sender.seq
    while (now := meter.tick()) is not None:
        if sent_before is None and stats.recording:
            sent_before = sender.seq
        if rate is not None:
            due = int((now - begin) * rate) + 1 - (sender.seq - run_start)
            if due > 0:
                sender.send(min(due, 1000))
            timeout = begin + (sender.seq - run_start) / rate - time.perf_counter()
        else:
            room = window - (sender.seq - probe.last_seq)
            if room > 0:
                sender.send(room)
            timeout = 0.05
            if probe.last_seq != last_probe:
                last_probe, last_progress = probe.last_seq, now
            elif now - last_progress > 10:
                raise SystemExit(f"stalled: the probe saw nothing for 10 s ({probe.error})")
        engine.poll(max(0.0, min(timeout, meter.end - now)))
        if sender.conn.error or probe.error:
            raise SystemExit(f"connection lost: {sender.conn.error or probe.error}")
    assert sent_before is not None
    sent = sender.seq - sent_before
    return meter.stop(engine, settle=0.3), sent


def bench_fanout(
    name: str,
    receivers_n: int,
    paced_rate: float,
    server: Server,
    transport: str,
    args: argparse.Namespace,
) -> list[Row]:
    port = server.port_of(transport)
    socketio = transport.startswith("s")
    if socketio:  # no accounts: one room per scenario, named in the query string
        owner = reader = User("", "", "")
        path = f"/socket.io/?EIO=4&transport=websocket&room={uuid.uuid4().hex}"
        batches, sender_handler = (False,), sio_idle_handler
    else:
        owner, reader = make_users(server.port, 2)
        (project,) = make_projects(server.port, [owner], [[reader]])
        batches, sender_handler = (False, True), idle_handler
    rows = []
    stats = Stats()
    engine = Engine()
    for batch in batches:
        if not socketio:
            path = ws_path(project, batch)
        handler = receiver_handler(stats, CURSOR_RE, socketio)
        receivers = connect_all(engine, port, [(path, reader, handler)] * receivers_n)
        if not socketio:
            path = ws_path(project, False)
        (sender_conn,) = connect_all(engine, port, [(path, owner, sender_handler)])
        sender = Sender(sender_conn, socketio)
        wait_server_idle(engine, server)
        runs: list[tuple[str, float | None]] = [("max", None)]
        if not batch:
            runs.insert(0, (f"paced {paced_rate:g}/s", paced_rate))
        for run, rate in runs:
            label = f"{run}{' batch' if batch else ''}"
            window, sent = fanout_run(
                engine,
                server,
                sender,
                receivers,
                stats,
                rate=rate,
                window=args.window,
                args=args,
                profile_as=None if rate else f"{name} {transport} {label}",
            )
            lost = [c for c in receivers if c.error]
            per_s = stats.deliveries / window.wall
            coalesced = stats.drops / (stats.drops + stats.deliveries) if stats.deliveries else 0
            p50, p99 = percentile_ms(stats.latencies, 50), percentile_ms(stats.latencies, 99)
            per_frame = stats.deliveries / max(stats.frames, 1)
            note = (
                f"sent {sent / window.wall:,.0f} msg/s, {per_frame:.2f} msg/frame,"
                f" coalesced {coalesced:.1%}"
            )
            if lost:
                note += f", {len(lost)} receivers lost ({lost[0].error})"
            if rate is not None:
                target, met = f"p99 < {LATENCY_TARGET_MS:g} ms", p99 < LATENCY_TARGET_MS
                if name != "a" or socketio:
                    target, met = "", None
            elif (name, transport) in TARGETS:
                goal = TARGETS[(name, transport)]
                target, met = f">= {goal:,} /s", per_s >= goal
            else:
                target, met = "", None
            row = Row(
                name,
                transport,
                label,
                per_s,
                p50,
                p99,
                window.server,
                window.client,
                target,
                met,
                note,
            )
            report(row)
            rows.append(row)
        engine.close_all()
        engine.run_for(0.2)
    wait_server_idle(engine, server)
    return rows


# -- durable -----------------------------------------------------------------------------


def bench_durable(server: Server, transport: str, args: argparse.Namespace) -> list[Row]:
    port = server.port_of(transport)
    owner, reader = make_users(server.port, 2)
    (project,) = make_projects(server.port, [owner], [[reader]])
    stats = Stats()
    engine = Engine()
    sent_at: dict[int, float] = {}
    connect_all(
        engine, port, [(ws_path(project, False), reader, receiver_handler(stats, CHANGE_RE))] * 10
    )
    (sender,) = connect_all(
        engine, port, [(ws_path(project, False), owner, ack_handler(stats, sent_at))]
    )
    wait_server_idle(engine, server)
    prefix = uuid.uuid4().hex[:8]
    seq = 0
    meter = Meter(server, stats, args, f"durable {transport}")
    while (now := meter.tick()) is not None:
        room = args.window - (seq - sender.count)
        if room > 0:
            frames = []
            now_us = int((now - T0) * 1e6)
            for _ in range(room):
                seq += 1
                sent_at[seq] = now
                frames.append(
                    sender.frame(
                        b'{"type":"FILE_CHANGE","file_path":"src/bench.py","changes":'
                        b'{"lines_added":1,"lines_removed":0,"change_type":"edit","t":%d},'
                        b'"id":"%s-%d"}' % (now_us, prefix.encode(), seq)
                    )
                )
            sender.send_raw(b"".join(frames))
        engine.poll(min(0.05, max(0.0, meter.end - now)))
        if sender.error:
            raise SystemExit(f"sender lost: {sender.error}")
    window = meter.stop(engine, settle=1.0)
    engine.close_all()
    wait_server_idle(engine, server)
    rate = stats.acks / window.wall
    row = Row(
        "durable",
        transport,
        "FILE_CHANGE x10",
        rate,
        percentile_ms(stats.ack_latencies, 50),
        percentile_ms(stats.ack_latencies, 99),
        window.server,
        window.client,
        "",
        None,
        f"ACK latency; {stats.deliveries / window.wall:,.0f} deliveries/s to 10 receivers "
        f"(p99 {percentile_ms(stats.latencies, 99):.1f} ms); postgres CPU {window.postgres:.0%}",
    )
    report(row, unit="events/s")
    return [row]


# -- idle connections --------------------------------------------------------------------


def bench_idle(server: Server, transport: str, args: argparse.Namespace) -> list[Row]:
    port = server.port_of(transport)
    started = time.perf_counter()
    users = make_users(server.port, 5)
    owners = [users[i % 5] for i in range(1000)]
    members = [[u for u in users if u is not owner] for owner in owners]
    projects = make_projects(server.port, owners, members)
    print(
        f"  c: 5 users, 1,000 projects, 4,000 collaborators by REST in"
        f" {time.perf_counter() - started:.1f} s",
        flush=True,
    )
    engine = Engine()
    wait_server_idle(engine, server)
    gc.collect()
    before = server.rss()
    started = time.perf_counter()
    specs = [(ws_path(pid, False), user, idle_handler) for pid in projects for user in users]
    conns = connect_all(engine, port, specs, concurrency=128)
    took = time.perf_counter() - started
    wait_server_idle(engine, server, timeout=120)
    engine.run_for(2.0)
    after = server.rss()
    lost = [c for c in conns if c.error]
    per_conn_kb = (after - before) / len(conns) / 1024
    print(
        f"  c: {len(conns):,} connections in {took:.1f} s; server RSS {before / 2**20:.1f} MiB"
        f" -> {after / 2**20:.1f} MiB",
        flush=True,
    )
    engine.close_all()
    # The 1,000 workspaces stop once idle for WORKSPACE_IDLE_SECONDS: let that happen
    # here, not during the next scenario's measurement.
    engine.run_for(IDLE_SECONDS + 1)
    wait_server_idle(engine, server, timeout=120)
    row = Row(
        "c",
        transport,
        "5,000 idle",
        per_conn_kb,
        float("nan"),
        float("nan"),
        float("nan"),
        float("nan"),
        f"< {RSS_TARGET_KB:g} KB/conn",
        per_conn_kb < RSS_TARGET_KB,
        f"RSS {before / 2**20:.1f} -> {after / 2**20:.1f} MiB; connect {took:.1f} s"
        + (f"; {len(lost)} lost ({lost[0].error})" if lost else ""),
    )
    report(row, unit="KB/conn")
    return [row]


def bench_churn(server: Server, transport: str, rounds: int = 8) -> list[Row]:
    port = server.port_of(transport)
    users = make_users(server.port, 5)
    owners = [users[i % 5] for i in range(200)]
    projects = make_projects(
        server.port, owners, [[u for u in users if u is not o] for o in owners]
    )
    engine = Engine()
    specs = [(ws_path(pid, False), user, idle_handler) for pid in projects for user in users]
    rss: list[float] = []
    for _ in range(rounds):
        connect_all(engine, port, specs, concurrency=128)
        engine.close_all()
        engine.run_for(IDLE_SECONDS + 1)  # the workspaces stop once idle
        wait_server_idle(engine, server, timeout=120)
        rss.append(server.rss() / 2**20)
    growth = rss[-1] / rss[-4] - 1
    row = Row(
        "churn",
        transport,
        f"{rounds} x 1,000",
        growth * 100,
        float("nan"),
        float("nan"),
        float("nan"),
        float("nan"),
        "last 3 rounds < 5%",
        growth < 0.05,
        "RSS MiB after each round: " + " ".join(f"{r:.0f}" for r in rss),
    )
    report(row, unit="% growth over the last 3 rounds")
    return [row]


# -- output ------------------------------------------------------------------------------


def report(row: Row, unit: str = "deliveries/s") -> None:
    cpu = (
        ""
        if row.server_cpu != row.server_cpu
        else (f"  | CPU/wall: server {row.server_cpu:.0%}  client {row.client_cpu:.0%}")
    )
    latency = "" if row.p50 != row.p50 else f"  p50 {row.p50:.2f} ms  p99 {row.p99:.2f} ms"
    print(
        f"  {row.scenario} {row.transport} {row.run}: {row.rate:,.1f} {unit}{latency}{cpu}",
        flush=True,
    )
    if row.note:
        print(f"    {row.note}", flush=True)
    if row.server_cpu == row.server_cpu and row.client_cpu > 0.85:
        print("    warning: the client used >85% of a core; it may be the bottleneck", flush=True)


def summary(rows: list[Row]) -> bool:
    print()
    print(
        f"{'scenario':<9}{'transport':<15}{'run':<18}{'rate':>12}{'p50 ms':>9}{'p99 ms':>9}"
        f"{'srv CPU':>8}{'cli CPU':>8}  {'target':<20}{'met':<4}"
    )
    print("-" * 115)
    ok = True
    for r in rows:
        unit = {"c": " KB", "durable": " ev/s", "churn": " %"}.get(r.scenario, " /s")
        rate = f"{r.rate:,.1f}{unit}" if r.scenario in ("c", "churn") else f"{r.rate:,.0f}{unit}"
        fmt = lambda v, spec: "" if v != v else format(v, spec)  # noqa: E731
        met = "" if r.met is None else ("yes" if r.met else "NO")
        ok = ok and r.met is not False
        print(
            f"{r.scenario:<9}{r.transport:<15}{r.run:<18}{rate:>12}{fmt(r.p50, '.2f'):>9}"
            f"{fmt(r.p99, '.2f'):>9}{fmt(r.server_cpu, '.0%'):>8}{fmt(r.client_cpu, '.0%'):>8}"
            f"  {r.target:<20}{met:<4}"
        )
    return ok


def versus_socketio(rows: list[Row]) -> None:
    """atrium's max-throughput deliveries/s over python-socketio's, per scenario."""
    maxed = [r for r in rows if r.run == "max"]
    peers = [r for r in maxed if r.transport.startswith("s")]
    if not peers:
        return
    print("\natrium / python-socketio, max-throughput deliveries/s (receivers without batch)")
    for peer in peers:
        for r in maxed:
            if r.scenario == peer.scenario and r.transport in ("main", "listener"):
                print(
                    f"  {r.scenario} {r.transport:<9}{r.rate:>10,.0f} /s  {peer.transport:<15}"
                    f"{peer.rate:>10,.0f} /s  ratio {r.rate / peer.rate:.2f}"
                )


SIDE_LABELS = {
    "listener": "`WS_PORT` listener",
    "main": "main port",
    "socketio": "python-socketio (uvicorn, auto)",
    "sio-wsproto": "python-socketio (uvicorn, wsproto)",
    "sio-websockets": "python-socketio (uvicorn, websockets legacy)",
    "sio-sansio": "python-socketio (uvicorn, websockets-sansio)",
}


def figures(rows: list[Row]) -> list[Figure]:
    """Scenarios a and b beside the peer runs (bench/_figures.py), for bench/sidebyside.py.

    Per scenario: server CPU a delivery and deliveries/s of the max-throughput runs
    (receivers without batch), and p99 of the paced run; atrium's listener first.
    """
    order = {"listener": 0, "main": 1}
    out = []
    for scenario, receivers in (("a", 100), ("b", 1000)):
        ran = [r for r in rows if r.scenario == scenario and "batch" not in r.run]
        ran.sort(key=lambda r: order.get(r.transport, 2))
        maxed = [r for r in ran if r.run == "max"]
        paced = [r for r in ran if r.run.startswith("paced")]
        if not maxed:
            continue
        head = f"WebSocket fan-out, 1 sender to {receivers} receivers"
        goal = TARGETS.get((scenario, "listener"))
        out += [
            _figure(
                f"{head}, as fast as it goes: server CPU a delivery", "µs", maxed, _per_delivery
            ),
            _figure(
                f"{head}, as fast as it goes: deliveries/s",
                "deliveries/s",
                maxed,
                lambda r: r.rate,
                "higher",
                f"listener at least {goal:,}/s" if goal else "",
            ),
        ]
        if paced:
            out.append(
                _figure(
                    f"{head}, {paced[0].run.removeprefix('paced ').removesuffix('/s')} messages/s:"
                    " p99 send to receive",
                    "ms",
                    paced,
                    lambda r: r.p99,
                    target=f"under {LATENCY_TARGET_MS:g} ms" if scenario == "a" else "",
                )
            )
    return out


def _per_delivery(row: Row) -> float:
    """Server CPU microseconds a delivery."""
    return row.server_cpu / row.rate * 1e6 if row.rate else math.nan


def _figure(
    what: str,
    unit: str,
    rows: list[Row],
    measure: Callable[[Row], float],
    better: str = "lower",
    target: str = "",
) -> Figure:
    """atrium's transports against the peer runs (transports named ``s...``) among ``rows``."""
    values = [
        (r.transport.startswith("s"), Value(SIDE_LABELS[r.transport], measure(r))) for r in rows
    ]
    ours = [value for peer, value in values if not peer]
    return Figure(what, unit, ours, [value for peer, value in values if peer], better, target)


def raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, 65_536) if hard != resource.RLIM_INFINITY else 65_536
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))  # the server inherits it
    if want < 12_000:
        print(f"  warning: file descriptor limit {want}: scenario c needs ~10,000 (ulimit -n)")


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    raise_fd_limit()
    transports = ["main", "listener"] if args.transport == "both" else [args.transport]
    scenarios = ["c", "a", "b", "durable", "churn"] if args.scenario == "all" else [args.scenario]
    print(
        f"{os.cpu_count()} CPUs; Python {sys.version.split()[0]}; {args.warmup:g} s warm-up +"
        f" {args.duration:g} s measured per run; window {args.window}",
        flush=True,
    )
    print_load_average("before")
    rows: list[Row] = []
    wall = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="atrium-wsbench-") as tmp:
        for transport in transports:
            print(f"\n== transport: {transport}", flush=True)
            with atrium_server(Path(tmp), f"atrium-{transport}") as server:
                for scenario in scenarios:
                    if scenario == "c":
                        rows += bench_idle(server, transport, args)
                    elif scenario == "a":
                        rows += bench_fanout("a", 100, 200, server, transport, args)
                    elif scenario == "b":
                        rows += bench_fanout("b", 1000, 20, server, transport, args)
                    elif scenario == "durable":
                        rows += bench_durable(server, transport, args)
                    else:
                        rows += bench_churn(server, transport)
        peer_scenarios = [s for s in scenarios if s in ("a", "b")]
        if args.peer == "socketio" and peer_scenarios:
            for ws in args.peer_ws:
                label = "socketio" if ws == "auto" else f"sio-{ws.replace('websockets-', '')}"
                print(f"\n== peer: {label} (scenarios a and b only)", flush=True)
                with socketio_server(Path(tmp), ws) as server:
                    for scenario in peer_scenarios:
                        receivers, paced = (100, 200) if scenario == "a" else (1000, 20)
                        rows += bench_fanout(scenario, receivers, paced, server, label, args)
    print_load_average("after")
    print(f"total {time.perf_counter() - wall:.0f} s")
    ok = summary(rows)
    versus_socketio(rows)
    print("\nall targets met" if ok else "\nsome targets missed")
    if args.json:
        write_figures(args.json, figures(rows))
    return 0 if ok else 1


if __name__ == "__main__":
    run_script(main)
