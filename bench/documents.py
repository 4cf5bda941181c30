"""Live documents side by side: atrium, Hocuspocus and pycrdt-websocket, one load client.

    python bench/documents.py [--servers atrium,atrium-ws,hocuspocus,pycrdt]
                              [--rates 100,1000] [--clients 50] [--processes 5]
                              [--duration 10] [--docs 20] [--idle-clients 5]
                              [--history 100000] [--history-run 20] [--parts a,b,c]
                              [--measure-every 5] [--work DIR] [--json PATH]

(from the repository root, after ``npm ci --prefix bench/node`` and the ``bench`` extra).

The servers, each started fresh for each part and pinned to CPU 0 (``taskset``; atrium's
embedded PostgreSQL is pinned there with it), the load on CPU 1:

- ``atrium``: ``run.py`` as it ships, durable (every update appended to PostgreSQL before
  it is broadcast; compaction every ``DOC_COMPACT_AFTER`` = 500 updates), y-websocket on
  the main port (Quart-Trio on hypercorn); ``atrium-ws`` the same server, clients on the
  ``WS_PORT`` listener. One user holds every connection (its per-user limits lifted).
- ``hocuspocus``: ``@hocuspocus/server`` (bench/node/package.json) on Node, in memory
  (no extension), bench/node/hocuspocus.mjs.
- ``pycrdt``: pycrdt-websocket served by hypercorn on trio, in memory,
  bench/peer_pycrdt_websocket.py.

The load client is bench/node/load.mjs in ``--processes`` Node processes: every client
is a real Yjs document that types (one character an update, at the end of its text) and a
raw protocol connection that reads what it receives without applying it; every
``--measure-every``-th client also timestamps the keystrokes each frame carries.

(a) ``--clients`` clients in one document type ``--rates`` updates a second between them,
    at a steady rate each, for ``--duration`` seconds; then the bench waits (up to 10 s)
    until every client received every other client's keystrokes. Latency runs from the
    time a keystroke was sent to the time a client received it, over every (keystroke,
    receiver) pair; how late the senders were (their own saturation) is printed beside,
    with the p99 counted from the time each keystroke was due (the schedule: the sender's
    lag included) and the load processes' own event-loop delay at p99 (how late a frame
    that had arrived could be read and timestamped: the receivers' saturation).
    Server CPU is counted from the first keystroke to the last delivery (or the end of
    the wait): CPU milliseconds per update, and updates per CPU-second (throughput per
    core), an update being one keystroke delivered to every other client, so a server
    that fell behind is charged for what it delivered. atrium's PostgreSQL is counted
    beside its process.
(b) ``--docs`` documents, each typed to 10 KB of text (100-character updates) by one of
    its ``--idle-clients`` clients, every client then idle: the server's resident memory
    over its memory with one such document open, per document.
(c) A document whose history is ``--history`` one-character keystrokes, in runs of
    ``--history-run`` at one place, each run at a random place (made in Node, sent in
    updates of 1,000 keystrokes; a run of 1 is the worst case for loading: no item
    merges with its neighbour): the time a new client takes from opening its socket to
    the whole document (sync step 2), after two untimed connections in its process.
    atrium: after the document was compacted and stopped (``DOC_IDLE_SECONDS`` = 2), so
    it is read from PostgreSQL; then again while it is open. The peers keep documents in
    memory only: their figure is a document already in memory (they have no history to
    load; a restart loses it).

``--json PATH`` also writes these figures, atrium beside the peers (bench/_figures.py:
what bench/sidebyside.py collects).
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script this directory would come first on sys.path, and bench/http.py would
# shadow the standard library's ``http``; the repository root is what we want there.
sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import urllib.request  # noqa: E402
from array import array  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Any  # noqa: E402

import psutil  # noqa: E402

from bench._figures import Figure, Value, write_figures  # noqa: E402
from bench._load import (  # noqa: E402
    HOST,
    PASSWORD,
    REPO,
    CpuProbe,
    bench_email,
    exit_if_not_started,
    free_port,
    open_atrium,
    open_process,
    postgres_probe,
    print_load_average,
    process_cpu,
    wait_port,
)

NODE_DIR = REPO / "bench" / "node"
SERVER_CPU = 0
CLIENT_CPU = 1
START_TIMEOUT = 60.0
DRAIN_TIMEOUT = 10.0
ATRIUM_SETTINGS = {
    "DOC_UPDATES_PER_SECOND": "100000000",
    "DOC_TICKET_SECONDS": "3600",
    "DOC_IDLE_SECONDS": "2",
    "DOC_MAX_UPDATE_BYTES": str(16 * 1024 * 1024),
    "WS_SEND_QUEUE": "100000",
    "METRICS_PORT": "0",  # 9090 may be taken by another server on the machine
}


@dataclass(frozen=True, slots=True)
class Server:
    """A server under test: where its documents are, its process and CPU probes."""

    name: str
    protocol: str  # "y-websocket" or "hocuspocus"
    pid: int
    probes: dict[str, CpuProbe]
    document_url: Callable[[str], tuple[str, str]]  # document name -> (url, name)


def pin(pid: int, cpu: int) -> None:
    """Pin a process and its descendants (a postmaster and its backends) to ``cpu``."""
    process = psutil.Process(pid)
    for each in (process, *process.children(recursive=True)):
        with contextlib.suppress(psutil.NoSuchProcess):
            each.cpu_affinity([cpu])


def _post(port: int, path: str, body: object, token: str | None = None) -> Any:
    request = urllib.request.Request(
        f"http://{HOST}:{port}{path}",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"}
        | ({"Authorization": f"Bearer {token}"} if token else {}),
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


@contextlib.contextmanager
def open_server(name: str, work: Path) -> Iterator[Server]:
    """Start ``name`` on CPU 0; stop it (and atrium's PostgreSQL) when the block ends."""
    log = work / f"{name}.log"
    if name in ("atrium", "atrium-ws"):
        ws_port = free_port(HOST)
        data_dir = Path(tempfile.mkdtemp(prefix="data-", dir=work))
        with open_atrium(
            name, data_dir, log, timeout=START_TIMEOUT, ws_port=ws_port, **ATRIUM_SETTINGS
        ) as atrium:
            pin(atrium.process.pid, SERVER_CPU)
            postgres = postgres_probe(data_dir)
            if postgres is not None:
                pin(int((data_dir / "pg" / "postmaster.pid").read_text().split()[0]), SERVER_CPU)
            credentials = {"email": bench_email(), "password": PASSWORD}
            _post(atrium.port, "/api/v1/auth/signup", credentials)
            token = _post(atrium.port, "/api/v1/auth/login", credentials)["access_token"]
            project = _post(atrium.port, "/api/v1/projects/", {"name": "bench"}, token)["id"]

            def document_url(path: str) -> tuple[str, str]:
                ticket = _post(
                    atrium.port,
                    f"/api/v1/projects/{project}/documents/tickets",
                    {"path": f"/{path}"},
                    token,
                )
                base = (
                    f"ws://{HOST}:{ws_port}/ws/documents" if name == "atrium-ws" else ticket["url"]
                )
                return f"{base}/{ticket['room']}?ticket={ticket['ticket']}", ticket["room"]

            probes = {"server": process_cpu(atrium.process.pid)}
            if postgres is not None:
                probes["postgres"] = postgres
            yield Server(name, "y-websocket", atrium.process.pid, probes, document_url)
        return
    port = free_port(HOST)
    if name == "hocuspocus":
        argv = ["node", str(NODE_DIR / "hocuspocus.mjs"), str(port)]
        protocol = "hocuspocus"
    elif name == "pycrdt":
        argv = [sys.executable, str(REPO / "bench" / "peer_pycrdt_websocket.py")]
        argv += ["--port", str(port)]
        protocol = "y-websocket"
    else:
        raise SystemExit(f"unknown server {name!r}")
    print(f"{name}: {' '.join(argv)}", flush=True)
    argv = ["taskset", "-c", str(SERVER_CPU), *argv]
    with open_process(argv, env=dict(os.environ), log_path=log, cwd=REPO) as process:
        with exit_if_not_started(name, log):
            wait_port(HOST, port, process, timeout=START_TIMEOUT)

        def document_url(path: str) -> tuple[str, str]:
            if protocol == "hocuspocus":
                return f"ws://{HOST}:{port}", path
            return f"ws://{HOST}:{port}/{path}", path

        yield Server(
            name, protocol, process.pid, {"server": process_cpu(process.pid)}, document_url
        )


class Load:
    """Node load processes (bench/node/load.mjs) on CPU 1, driven over their stdin.

    Each process is started once the one before has connected and synced all its clients.
    """

    def __init__(
        self, server: Server, clients: list[dict[str, Any]], processes: int, **config: Any
    ):
        self.work = Path(tempfile.mkdtemp(prefix="load-"))
        self.processes: list[subprocess.Popen[str]] = []
        for index in range(processes):
            mine = clients[index::processes]
            if not mine:
                continue
            spec = {
                "protocol": server.protocol,
                "out": str(self.work / f"p{index}"),
                "clients": mine,
                **config,
            }
            self.processes.append(
                subprocess.Popen(
                    [
                        "taskset",
                        "-c",
                        str(CLIENT_CPU),
                        "node",
                        str(NODE_DIR / "load.mjs"),
                        json.dumps(spec),
                    ],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    text=True,
                    cwd=NODE_DIR,
                )
            )
            self.expect("ready", self.processes[-1:])

    def expect(
        self, event: str, processes: list[subprocess.Popen[str]] | None = None
    ) -> list[dict[str, Any]]:
        """The next ``event`` line of every process (other lines are printed)."""
        answers = []
        for process in self.processes if processes is None else processes:
            assert process.stdout is not None
            while True:
                line = process.stdout.readline()
                if not line:
                    raise SystemExit(f"a load process exited (status {process.wait()})")
                message = json.loads(line)
                if message.get("event") == event:
                    answers.append(message)
                    break
                print(f"    load: {line.strip()}", flush=True)
        return answers

    def tell(self, line: str) -> None:
        for process in self.processes:
            assert process.stdin is not None
            process.stdin.write(line + "\n")
            process.stdin.flush()

    def close(self) -> None:
        with contextlib.suppress(BrokenPipeError):
            self.tell("exit")
        for process in self.processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
        shutil.rmtree(self.work, ignore_errors=True)


@contextlib.contextmanager
def open_load(
    server: Server, clients: list[dict[str, Any]], processes: int, **config: Any
) -> Iterator[Load]:
    load = Load(server, clients, processes, **config)
    try:
        yield load
    finally:
        load.close()


def fetch(
    server: Server, url: str, name: str, warmups: list[tuple[str, str]] = ()
) -> dict[str, Any]:
    """A fresh client opens a document: milliseconds to sync step 2, bytes, characters.

    The documents of ``warmups`` are opened first in the same Node process, untimed.
    """
    spec = {
        "protocol": server.protocol,
        "fetch": True,
        "warmups": [{"url": u, "doc": n, "id": 0, "sends": False} for u, n in warmups],
        "clients": [{"url": url, "doc": name, "id": 0, "sends": False}],
    }
    out = subprocess.run(
        ["taskset", "-c", str(CLIENT_CPU), "node", str(NODE_DIR / "load.mjs"), json.dumps(spec)],
        capture_output=True,
        text=True,
        cwd=NODE_DIR,
        timeout=120,
        check=True,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def cpu(server: Server) -> dict[str, float]:
    return {name: probe() for name, probe in server.probes.items()}


# -- (a) one document, many typists -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Typing:
    server: str
    rate: int
    sent: int
    delivered: float  # share of (keystroke, receiver) pairs delivered
    converged_after: float  # seconds after the last keystroke was due; nan if never
    p50_ms: float
    p99_ms: float
    max_ms: float
    cpu_ms: dict[str, float]  # CPU ms per update delivered to all others, by process
    lag_p99_ms: float  # how late the load client sent (its own saturation)
    due_p99_ms: float  # p99 latency counted from when each keystroke was due, not sent
    loop_p99_ms: float  # the load processes' event-loop delay at p99 (worst process)


def typing(server: Server, args: argparse.Namespace, rate: int) -> Typing:
    url, name = server.document_url("typing.txt")
    measuring = range(0, args.clients, args.measure_every)
    clients = [
        {"url": url, "doc": name, "id": i, "sends": True, "measures": i in measuring}
        for i in range(args.clients)
    ]
    per_sender = rate / args.clients
    with open_load(server, clients, args.processes, rate=per_sender, senders=args.clients) as load:
        time.sleep(0.5)
        t0 = time.monotonic_ns() + 300_000_000
        load.tell(f"go {t0} {args.duration}")
        time.sleep((t0 - time.monotonic_ns()) / 1e9)
        before = cpu(server)
        keystrokes = int(per_sender * args.duration) * args.clients
        expected = keystrokes * (args.clients - 1) // args.clients * len(measuring)
        end = t0 / 1e9 + args.duration
        time.sleep(args.duration)
        received, converged = 0, float("nan")
        while time.monotonic() < end + DRAIN_TIMEOUT:
            load.tell("stats")
            stats = load.expect("stats")
            received = sum(s["keystrokes"] for s in stats)
            if received >= expected:
                converged = max(0.0, time.monotonic() - end)
                break
            time.sleep(0.05)
        after = cpu(server)
        lag = max(s["lag_p99_ms"] for s in stats)
        loop = max(s["loop_delay_p99_ms"] for s in stats)
        load.tell("dump")
        load.expect("dumped")
        latencies, from_due = _latencies(load.work, len(load.processes))
    # Per update delivered to every other client: a server that fell behind did less.
    handled = max(1, received) / expected * keystrokes
    used = {k: (after[k] - before[k]) * 1000 / handled for k in after}
    q = [percentile(latencies, p) for p in (50, 99, 100)]
    due = percentile(from_due, 99)
    return Typing(
        server.name, rate, keystrokes, received / expected, converged, *q, used, lag, due, loop
    )


def _latencies(work: Path, processes: int) -> tuple[list[float], list[float]]:
    """Milliseconds to each receipt of each keystroke from its sending, and from when it
    was due (the sender's lag included), each sorted."""
    sent_at: dict[tuple[int, int], tuple[float, float]] = {}
    for i in range(processes):
        rows = array("d", (work / f"p{i}.sent").read_bytes())
        for j in range(0, len(rows), 4):
            sent_at[int(rows[j]), int(rows[j + 1])] = rows[j + 2], rows[j + 3]
    latencies, from_due = [], []
    for i in range(processes):
        rows = array("d", (work / f"p{i}.recv").read_bytes())
        for j in range(0, len(rows), 4):
            # A struct carries keystrokes clock .. clock + length - 1 of its sender.
            sender, clock, at = int(rows[j]), int(rows[j + 1]), rows[j + 3]
            for k in range(clock, clock + int(rows[j + 2])):
                times = sent_at.get((sender, k))
                if times is not None:
                    latencies.append((at - times[0]) / 1e6)
                    from_due.append((at - times[1]) / 1e6)
    latencies.sort()
    from_due.sort()
    return latencies, from_due


def percentile(ordered: list[float], q: float) -> float:
    """The nearest-rank percentile ``q`` (0-100) of sorted values; nan when empty."""
    if not ordered:
        return float("nan")
    return ordered[max(0, min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1))]


# -- (b) memory per open document ----------------------------------------------------------


def rss(pid: int) -> int:
    return int(psutil.Process(pid).memory_info().rss)


def settle_rss(pid: int, seconds: float = 1.5) -> int:
    time.sleep(seconds)
    return rss(pid)


def memory(server: Server, args: argparse.Namespace) -> tuple[float, int]:
    """Resident bytes per open document (10 KB of text, idle clients), and the baseline."""

    def clients(first: int, docs: int) -> list[dict[str, Any]]:
        out = []
        for d in range(first, first + docs):
            url, name = server.document_url(f"memory-{d}.txt")
            for c in range(args.idle_clients):
                out.append(
                    {"url": url, "doc": name, "id": d * args.idle_clients + c, "sends": c == 0}
                )
        return out

    with open_load(server, clients(0, 1), 1, rate=1, senders=1) as warm:
        warm.tell("seed 10000 100")
        warm.expect("seeded")
        baseline = settle_rss(server.pid)
        with open_load(server, clients(1, args.docs), args.processes, rate=1, senders=1) as load:
            load.tell("seed 10000 100")
            load.expect("seeded")
            after = settle_rss(server.pid, 3.0)
    return (after - baseline) / args.docs, baseline


# -- (c) a document with a long history ----------------------------------------------------


def loading(server: Server, args: argparse.Namespace) -> tuple[float, float, int]:
    """Milliseconds for a new client to receive the document (cold, then open), its bytes."""
    url, name = server.document_url("history.txt")
    warmup = server.document_url("warmup.txt")
    spec = [{"url": url, "doc": name, "id": 0, "sends": True}]
    with open_load(server, spec, 1, rate=1, senders=1) as load:
        load.tell(f"history {args.history} 1000 {args.history_run}")
        load.expect("seeded")
        deadline = time.monotonic() + 120
        while fetch(server, url, name)["chars"] < args.history:
            if time.monotonic() > deadline:
                raise SystemExit(f"{server.name}: the history never arrived")
            time.sleep(0.5)
        if not server.name.startswith("atrium"):
            # The peers drop a document when its last client leaves: the writer stays.
            cold = fetch(server, url, name, [warmup, warmup])
            warm = fetch(server, url, name, [warmup, (url, name)])
    if server.name.startswith("atrium"):
        time.sleep(float(ATRIUM_SETTINGS["DOC_IDLE_SECONDS"]) + 3)  # compacted and stopped
        cold = fetch(server, url, name, [warmup, warmup])
        warm = fetch(server, url, name, [warmup, (url, name)])
    assert cold["chars"] == warm["chars"] == args.history, (cold, warm)
    return cold["ms"], warm["ms"], int(cold["bytes"])


# -- the run ---------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--servers", default="atrium,atrium-ws,hocuspocus,pycrdt")
    parser.add_argument(
        "--rates", default="100,1000", type=lambda s: [int(x) for x in s.split(",")]
    )
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--processes", type=int, default=5)
    parser.add_argument(
        "--measure-every",
        type=int,
        default=5,
        help="every n-th client timestamps what it receives (the rest only read frames)",
    )
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--docs", type=int, default=20)
    parser.add_argument("--idle-clients", type=int, default=5)
    parser.add_argument("--history", type=int, default=100_000)
    parser.add_argument(
        "--history-run",
        type=int,
        default=20,
        help="(c)'s keystrokes typed at one place before moving (1: each somewhere else)",
    )
    parser.add_argument("--parts", default="a,b,c")
    parser.add_argument("--work", help="keep servers' logs and data here (default: a temp dir)")
    parser.add_argument("--json", help="also write the side-by-side figures here (JSON)")
    args = parser.parse_args()
    servers = args.servers.split(",")
    parts = set(args.parts.split(","))
    if not (NODE_DIR / "node_modules").exists():
        raise SystemExit("run `npm ci --prefix bench/node` first")
    print(
        f"{os.cpu_count()} CPUs; servers pinned to CPU {SERVER_CPU}, load clients to CPU"
        f" {CLIENT_CPU}; Python {sys.version.split()[0]}; node {_node_version()}",
        flush=True,
    )
    print_load_average("before")
    rows: list[Typing] = []
    memories: dict[str, float] = {}
    loads: dict[str, tuple[float, float, int]] = {}
    with contextlib.ExitStack() as stack:
        if args.work:
            work = Path(args.work)
            work.mkdir(parents=True, exist_ok=True)
        else:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-docs-")))
        # Interleaved: every server at one rate before the next rate.
        for rate in args.rates if "a" in parts else []:
            for name in servers:
                with open_server(name, work) as server:
                    row = typing(server, args, rate)
                rows.append(row)
                print_typing(row)
        for name in servers if "b" in parts else []:
            with open_server(name, work) as server:
                memories[name], baseline = memory(server, args)
            print(
                f"  (b) {name}: {memories[name] / 1024:,.0f} KiB a document"
                f" (baseline {baseline / 2**20:.0f} MiB)",
                flush=True,
            )
        for name in servers if "c" in parts else []:
            with open_server(name, work) as server:
                loads[name] = loading(server, args)
            cold, warm, size = loads[name]
            print(f"  (c) {name}: {cold:.1f} ms (open: {warm:.1f} ms), {size:,} bytes", flush=True)
    print_load_average("after")
    print_table(rows, memories, loads, args)
    if args.json:
        write_figures(args.json, figures(rows, memories, loads, args))
    return 0


ATRIUM = ("atrium-ws", "atrium")
LABELS = {  # in the order of the table: atrium's listener first
    "atrium-ws": "`WS_PORT`",
    "atrium": "main port",
    "hocuspocus": "Hocuspocus, in memory",
    "pycrdt": "pycrdt-websocket, in memory",
}


def figures(
    rows: list[Typing],
    memories: dict[str, float],
    loads: dict[str, tuple[float, float, int]],
    args: argparse.Namespace,
) -> list[Figure]:
    """atrium's listener and main port beside the peers (bench/_figures.py), per part run."""
    typists = f"{args.clients} clients typing into one document"
    out = []
    for rate in sorted({row.rate for row in rows}):
        at_rate = {row.server: row for row in rows if row.rate == rate}
        what = f"Live documents, {typists}, {rate:,} updates/s"
        cpu_ms = {name: sum(row.cpu_ms.values()) for name, row in at_rate.items()}
        out.append(_figure(f"{what}: server CPU an update (atrium with PostgreSQL)", "ms", cpu_ms))
        p99 = {name: row.p99_ms for name, row in at_rate.items()}
        out.append(_figure(f"{what}: p99 from one client to the others", "ms", p99))
    if memories:
        what = (
            f"Live documents: resident memory an open document ({args.idle_clients} idle clients)"
        )
        out.append(_figure(what, "KiB", {name: size / 1024 for name, size in memories.items()}))
    if loads:
        what = (
            f"Live documents: a fresh client's sync of a document of {args.history:,} updates"
            " (atrium from PostgreSQL, the peers from memory)"
        )
        out.append(_figure(what, "ms", {name: load[0] for name, load in loads.items()}))
    return out


def _figure(what: str, unit: str, by_server: dict[str, float]) -> Figure:
    """atrium's servers (the listener first) beside the peers, lower being better."""
    ran = [name for name in LABELS if name in by_server]
    ours = [Value(LABELS[name], by_server[name]) for name in ran if name in ATRIUM]
    theirs = [Value(LABELS[name], by_server[name]) for name in ran if name not in ATRIUM]
    return Figure(what, unit, ours, theirs)


def _node_version() -> str:
    return subprocess.run(["node", "--version"], capture_output=True, text=True).stdout.strip()


def print_typing(row: Typing) -> None:
    cpu_ms = " + ".join(f"{k} {v:.3f}" for k, v in row.cpu_ms.items())
    converged = (
        "never" if row.converged_after != row.converged_after else f"{row.converged_after:.2f} s"
    )
    print(
        f"  (a) {row.server} at {row.rate}/s: {row.sent} sent, {row.delivered:.1%} delivered,"
        f" converged {converged} after the load; latency p50 {row.p50_ms:.1f} p99 {row.p99_ms:.1f}"
        f" max {row.max_ms:.1f} ms; CPU ms an update: {cpu_ms};"
        f" sender lag p99 {row.lag_p99_ms:.1f} ms (p99 from when due {row.due_p99_ms:.1f} ms);"
        f" load event-loop delay p99 {row.loop_p99_ms:.1f} ms",
        flush=True,
    )


def print_table(
    rows: list[Typing],
    memories: dict[str, float],
    loads: dict[str, tuple[float, float, int]],
    args: argparse.Namespace,
) -> None:
    """The one table: (a) a row per server and rate, then (b) and (c) a row per server."""
    if rows:
        print(f"\n(a) {args.clients} clients typing into one document for {args.duration:g} s")
        head = ("server", "upd/s", "deliv", "p50 ms", "p99 ms", "max ms", "CPU ms/upd", "upd/CPU-s")
        print(
            f"{head[0]:<11}"
            + "".join(f"{h:>11}" for h in head[1:])
            + "  of which / sender lag, p99 from due, load loop delay"
        )
        for row in rows:
            total = sum(row.cpu_ms.values())
            split = ", ".join(f"{k} {v:.3f}" for k, v in row.cpu_ms.items())
            cells = (
                f"{row.rate:,}",
                f"{row.delivered:.1%}",
                f"{row.p50_ms:.1f}",
                f"{row.p99_ms:.1f}",
                f"{row.max_ms:.1f}",
                f"{total:.3f}",
                f"{1000 / total:,.0f}" if total else "-",
            )
            lag = f"{row.lag_p99_ms:.1f}, {row.due_p99_ms:.1f}, {row.loop_p99_ms:.1f} ms"
            print(f"{row.server:<11}" + "".join(f"{c:>11}" for c in cells) + f"  {split} / {lag}")
    if memories:
        print(f"\n(b) {args.docs} documents of 10 KB, {args.idle_clients} idle clients each")
        for name, per_doc in memories.items():
            print(f"{name:<11}{per_doc / 1024:>11,.0f} KiB resident an open document")
    if loads:
        print(
            f"\n(c) a document of {args.history:,} one-character updates"
            f" ({args.history_run} at a place): a new client's sync"
        )
        for name, (cold, warm, size) in loads.items():
            if name.startswith("atrium"):
                what = f"from PostgreSQL after compaction (open: {warm:.1f} ms)"
            else:
                what = f"in memory, no history kept (again: {warm:.1f} ms)"
            print(f"{name:<11}{cold:>8.1f} ms {what}; {size:,} bytes")


if __name__ == "__main__":
    sys.exit(main())
