"""Property-based fuzzing of the real server: hostile frames and bodies never hurt others.

How it runs: each test starts the real server once (the ``start_server`` fixture, port
0, both transports) inside pytest-trio's run, then hands a worker thread to hypothesis
(``trio.to_thread.run_sync``). The ``@given`` function runs there, synchronously, and
sends each example's batch back into the test's trio loop with ``trio.from_thread.run``.
So hypothesis drives (and shrinks) many examples against one server: no server per
example, no event loop per example, no sleeps.

After every batch the properties a user would notice are checked: ``/health`` answers,
no shared child of the supervision tree restarted, no failure had to be contained (a
hostile input must be refused, not crash a connection), the authenticated connections
are still open and answer a PING, and a fresh authenticated join works. At the end, every
FILE_CHANGE the server ACKed is in the project's event log.

hypothesis's recursive strategies stay shallow, so nesting past every limit (65 to 3,000
levels; orjson stops at 1,024) is also built directly as text. hypothesis raises the
interpreter's recursion limit while it runs, and the server shares the process: each batch
runs under the normal limit again (``normal_stack``), or a stack overflow such as issue
9's would go unseen. ``FUZZ_EXAMPLES`` (an environment variable) runs a longer profile.
"""

from __future__ import annotations

import json
import os
import sys
import uuid
from collections.abc import Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import trio
from conftest import StartServer
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from job_payloads import job_bodies
from test_workspace import Team, make_team, session
from trio_websocket import ConnectionClosed
from wsclient import Client, connect

from atrium.core.jobs import JobStatus

ADMIN_TOKEN = "operator-token-0123456789"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
SHARED = ("database", "http", "ws_listener", "workspaces")
TRANSPORTS = ("main", "listener")
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "30"))
NORMAL_RECURSION_LIMIT = sys.getrecursionlimit()  # read at import, before hypothesis runs
SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,  # no example database written into the work tree
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
# Refusals a hostile first frame may get: never 1011 (a contained failure) or 1006.
UNAUTHENTICATED_CLOSES = {4001, 4002}
SERVER_OPTIONS = {
    "ADMIN_TOKEN": ADMIN_TOKEN,
    "WS_RATE_LIMIT_PER_SECOND": "100000",
}

# -- strategies ---------------------------------------------------------------------------

HUGE_INTS = st.one_of(
    st.integers(min_value=2**63 - 2, max_value=2**70),
    st.integers(max_value=-1, min_value=-(2**70)),
    st.sampled_from([2**64, 10**30, -(2**63)]),
)
HOSTILE_TEXT = st.one_of(
    st.text(max_size=50),
    st.text(max_size=20).map(lambda s: s + "\x00"),
    st.sampled_from(["", "\x00", "\ud7ff\ue000", "'; DROP TABLE users; --", "../../etc/passwd"]),
    st.integers(min_value=1025, max_value=5000).map(lambda n: "p" * n),
)
JSON = st.recursive(
    st.none() | st.booleans() | HUGE_INTS | st.integers() | st.floats() | HOSTILE_TEXT,
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(HOSTILE_TEXT, children, max_size=5)
    ),
    max_leaves=25,
)


def deep(depth: int, opener: str, inner: str = "") -> str:
    closer = {"[": "]", "{": "}"}[opener]
    if opener == "{":
        return '{"k":' * depth + (inner or "1") + "}" * depth
    return opener * depth + inner + closer * depth


# Depths around every limit (ours 64, orjson's write 254 and read 1,024, Python's stack
# near 1,000) come up often; the rest of the range now and then.
DEPTHS = st.one_of(
    st.sampled_from([65, 254, 256, 900, 999, 1000, 1023, 1024, 1025, 3000]),
    st.integers(min_value=65, max_value=3000),
)
DEEP = st.builds(deep, DEPTHS, st.sampled_from(["[", "{"]))


def dumps(value: Any) -> str:
    """JSON text for any generated value (stdlib: big ints and NaN pass through as text)."""
    return json.dumps(value)


FIELD_VALUE = st.one_of(JSON.map(dumps), DEEP, HUGE_INTS.map(str), HOSTILE_TEXT.map(dumps))


@st.composite
def hostile_frame(draw: st.DrawFn) -> str | bytes:
    """One frame: random JSON, text or bytes, deep nesting, or a frame of a known type
    whose fields hold hostile values (huge ints, NUL, wrong types, deep ``changes``)."""
    kind = draw(st.sampled_from(["json", "text", "bytes", "deep", "typed"]))
    if kind == "json":
        return dumps(draw(JSON))
    if kind == "text":
        return draw(st.text(max_size=200))
    if kind == "bytes":
        return draw(st.binary(max_size=200))
    if kind == "deep":
        return '{"type":' + draw(DEEP) + "}"
    frame_type = draw(
        st.sampled_from(["FILE_CHANGE", "CURSOR_UPDATE", "AUTH", "PING", "PONG", "NOPE"])
    )
    fields = draw(
        st.lists(
            st.sampled_from(
                ["file_path", "changes", "position", "token", "since_seq", "id", "type"]
            ),
            unique=True,
            max_size=4,
        )
    )
    parts = [f'"type":{json.dumps(frame_type)}'] + [
        f"{json.dumps(name)}:{draw(FIELD_VALUE)}" for name in fields
    ]
    return "{" + ",".join(parts) + "}"


FRAMES = st.lists(hostile_frame(), min_size=1, max_size=8)
# Always tried first: issue 9's reproduction and its neighbours.
KNOWN_FRAMES: list[str | bytes] = [
    '{"type":' + deep(1000, "[") + "}",
    '{"type":' + deep(950, "{") + "}",
    '{"type":"FILE_CHANGE","file_path":"/a","changes":' + deep(1000, "{") + "}",
    '{"type":"AUTH","token":' + deep(1023, "[") + "}",
]


# -- the properties -----------------------------------------------------------------------


class Watch:
    """What the fuzzer checks after every batch, and the ACKs it must find in the log."""

    def __init__(self, team: Team) -> None:
        self.team = team
        self.server = team.server
        self.acked: dict[int, str] = {}  # seq -> file_path of every ACKed FILE_CHANGE
        self._next = 0

    async def serving(self, *, fresh_join: bool = True) -> None:
        server = self.server
        with trio.fail_after(20):
            r = await server.client.get("/health")
            assert r.status_code == 200
            view = (await server.client.get("/health/supervisor", headers=ADMIN)).json()
            restarts = {
                c["name"]: c["restart_count"]
                for c in view["supervisor"]["children"]
                if c["name"] in SHARED
            }
            assert restarts == dict.fromkeys(SHARED, 0), restarts
            assert view["contained_failures"] == {"connection": 0, "request": 0}
            if fresh_join:
                for transport in TRANSPORTS:
                    self.team.transport = transport
                    async with connect(self.team.url(), self.team.owner.token) as client:
                        assert (await client.recv())["type"] == "PRESENCE_STATE"

    async def edit_and_sync(self, client: Client) -> None:
        """Send one valid edit and a PING; read until the PONG and the edit's ACK (the
        frames sent before were all handled by then)."""
        self._next += 1
        client_id, path = f"ok-{self._next}", f"/fuzz/{self._next}.txt"
        await client.send(
            {
                "type": "FILE_CHANGE",
                "id": client_id,
                "file_path": path,
                "changes": {"lines_added": 1, "lines_removed": 0},
            }
        )
        await client.send({"type": "PING"})
        ponged = acked = False
        with trio.fail_after(20):
            while not (ponged and acked):
                message = await client.recv()
                if message["type"] == "PONG":
                    ponged = True
                elif message["type"] == "ACK":
                    if message["id"] == client_id:
                        acked = True
                        self.acked[message["seq"]] = path
                    elif str(message["id"]).startswith("ok-"):
                        raise AssertionError(f"an ACK out of turn: {message}")

    async def nothing_lost(self) -> None:
        """Every ACKed FILE_CHANGE is in the project's event log, at its seq."""
        team, found = self.team, {}
        since = 0
        while True:
            r = await team.server.client.get(
                f"/api/v1/projects/{team.project_id}/events",
                params={"since_seq": since, "limit": 1000},
                headers=team.owner.auth,
            )
            assert r.status_code == 200, r.text
            page = r.json()
            for event in page["events"]:
                if event["type"] == "FILE_CHANGE":
                    found[event["seq"]] = event["payload"].get("file_path")
            if not page["has_more"]:
                break
            since = page["next_seq"]
        assert self.acked, "the fuzzer checked no edits"
        missing = {seq: path for seq, path in self.acked.items() if found.get(seq) != path}
        assert not missing, missing


@contextmanager
def normal_stack() -> Iterator[None]:
    """Run the server under the recursion limit it has in production, not hypothesis's.

    Safe here: hypothesis's thread is blocked in ``trio.from_thread.run`` meanwhile, and
    finds its own limit back when it resumes."""
    raised = sys.getrecursionlimit()
    sys.setrecursionlimit(NORMAL_RECURSION_LIMIT)
    try:
        yield
    finally:
        sys.setrecursionlimit(raised)


def drive(examples: Callable[[], None]) -> Callable[[], Any]:
    """Run ``examples`` (a @given function) in a worker thread; it calls back into trio."""

    async def run() -> None:
        await trio.to_thread.run_sync(examples)

    return run


@asynccontextmanager
async def fuzzing(start_server: StartServer) -> Any:
    async with start_server(**SERVER_OPTIONS) as server:
        team = await make_team(server, "main")
        yield Watch(team)


def per_transport(team: Team) -> Iterator[str]:
    for transport in TRANSPORTS:
        team.transport = transport
        yield transport


# -- WebSocket frames ---------------------------------------------------------------------


async def test_hostile_first_frames_are_refused_on_both_transports(
    start_server: StartServer,
) -> None:
    async with fuzzing(start_server) as watch:
        team = watch.team

        async def batch(frames: list[str | bytes]) -> None:
            for _ in per_transport(team):
                for frame in frames:
                    # No token: the first frame must be an AUTH, and these never are valid.
                    project = team.project_id if len(frames) % 2 else str(uuid.uuid4())
                    async with connect(team.url(project=project)) as client:
                        try:
                            await client.ws.send_message(frame)
                        except ConnectionClosed:
                            pass  # refused before the frame went out
                        code, _ = await client.closed()
                        assert code in UNAUTHENTICATED_CLOSES, (team.transport, frame, code)
            await watch.serving()

        @SETTINGS
        @given(FRAMES)
        @example(KNOWN_FRAMES)
        def run(frames: list[str | bytes]) -> None:
            with normal_stack():
                trio.from_thread.run(batch, frames)

        await drive(run)()


async def test_hostile_frames_after_join_leave_the_session_and_the_log_intact(
    start_server: StartServer,
) -> None:
    async with fuzzing(start_server) as watch:
        team = watch.team
        team.transport = "main"
        async with session(team, team.collaborator) as on_main:
            team.transport = "listener"
            # Another user: a second tab of the same one would not announce a USER_JOIN.
            async with session(team, team.owner) as on_listener:
                clients = {"main": on_main, "listener": on_listener}

                async def batch(frames: list[str | bytes]) -> None:
                    for transport, client in clients.items():
                        for frame in frames:
                            await client.ws.send_message(frame)
                        # Still open, still answering, and its edits still stored.
                        await watch.edit_and_sync(client)
                        assert client.ws.closed is None, transport
                    await watch.serving(fresh_join=False)

                @SETTINGS
                @given(FRAMES)
                @example(KNOWN_FRAMES)
                def run(frames: list[str | bytes]) -> None:
                    with normal_stack():
                        trio.from_thread.run(batch, frames)

                await drive(run)()
        await watch.serving()
        await watch.nothing_lost()


# -- REST bodies --------------------------------------------------------------------------

# Email fields: hostile text includes NUL and other control characters (a 422 each).
EMAIL = st.one_of(st.emails().map(str), HOSTILE_TEXT)
BODY_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "email": EMAIL,
    "password": st.one_of(HOSTILE_TEXT, JSON),
    "name": st.one_of(HOSTILE_TEXT, JSON),
    "description": st.one_of(HOSTILE_TEXT, JSON),
    "visibility": st.one_of(st.sampled_from(["public", "private", "team"]), JSON),
    "user_id": st.one_of(st.uuids().map(str), JSON),
    "role": st.one_of(st.sampled_from(["owner", "collaborator", "viewer", "admin"]), JSON),
    "refresh_token": HOSTILE_TEXT,
    "path": st.one_of(HOSTILE_TEXT, JSON),  # a live document's
    "text": st.one_of(HOSTILE_TEXT, JSON),
}


@st.composite
def hostile_body(draw: st.DrawFn) -> bytes:
    """A request body: random JSON, deep JSON, random bytes, or an object of the routes'
    field names with hostile values."""
    kind = draw(st.sampled_from(["json", "deep", "bytes", "fields"]))
    if kind == "json":
        return dumps(draw(JSON)).encode()
    if kind == "deep":
        return draw(DEEP).encode()
    if kind == "bytes":
        return draw(st.binary(max_size=300))
    names = draw(st.lists(st.sampled_from(sorted(BODY_FIELDS)), unique=True, max_size=4))
    body = {name: draw(BODY_FIELDS[name]) for name in names}
    return dumps(body).encode()


REQUESTS = st.lists(
    st.tuples(
        st.sampled_from(["login", "signup", "create", "collaborators", "update", "document"]),
        hostile_body(),
    ),
    min_size=1,
    max_size=6,
)


async def test_hostile_bodies_get_4xx_in_the_error_shape(start_server: StartServer) -> None:
    async with fuzzing(start_server) as watch:
        team = watch.team
        routes = {
            "login": ("POST", "/api/v1/auth/login"),
            "signup": ("POST", "/api/v1/auth/signup"),
            "create": ("POST", "/api/v1/projects/"),
            "collaborators": ("POST", f"/api/v1/projects/{team.project_id}/collaborators"),
            "update": ("PATCH", f"/api/v1/projects/{team.project_id}"),
            "document": ("POST", f"/api/v1/projects/{team.project_id}/documents"),
        }
        headers = {**team.owner.auth, "Content-Type": "application/json"}

        async def batch(requests: list[tuple[str, bytes]]) -> None:
            for route, body in requests:
                method, path = routes[route]
                with trio.fail_after(20):
                    r = await team.server.client.request(
                        method, path, content=body, headers=headers
                    )
                assert r.status_code < 500, (route, body, r.status_code, r.text)
                if r.status_code >= 400:
                    error = r.json()["error"]
                    assert set(error) == {"code", "message"}, error
                    assert isinstance(error["code"], str) and isinstance(error["message"], str)
            await watch.serving(fresh_join=False)

        @SETTINGS
        @given(REQUESTS)
        @example([(route, deep(1000, "[").encode()) for route in ("login", "update")])
        @example([("document", dumps({"path": "/f\u00e9", "text": "a\u0000\U0001f600"}).encode())])
        def run(requests: list[tuple[str, bytes]]) -> None:
            with normal_stack():
                trio.from_thread.run(batch, requests)

        await drive(run)()
        await watch.serving()


async def test_hostile_job_submissions_are_refused_or_run_without_a_retry(
    start_server: StartServer,
) -> None:
    """``POST /api/v1/jobs/run`` from every role and from no one, with each task's payload
    strategy (tests/job_payloads.py) and raw hostile bodies: every answer is below 500 in
    the error shape (401 without a token), and every job accepted ends completed or dead
    with no attempt failed (an input the run would refuse is refused at submission)."""
    async with fuzzing(start_server) as watch:
        team = watch.team
        server = team.server
        assert server.bound.services is not None
        queue = server.bound.services.value.jobs.queue
        members = {
            "owner": team.owner,
            "collaborator": team.collaborator,
            "viewer": team.viewer,
            "outsider": team.outsider,
        }
        accepted: list[str] = []

        async def batch(requests: list[tuple[str | None, bytes]]) -> None:
            for who, body in requests:
                headers = {"Content-Type": "application/json"}
                if who is not None:
                    headers.update(members[who].auth)
                with trio.fail_after(20):
                    r = await server.client.post("/api/v1/jobs/run", content=body, headers=headers)
                assert r.status_code < 500, (who, body, r.status_code, r.text)
                if who is None:
                    assert r.status_code == 401, (body, r.text)
                if r.status_code >= 400:
                    error = r.json()["error"]
                    assert set(error) == {"code", "message"}, error
                else:
                    accepted.append(r.json()["job_id"])
            await watch.serving(fresh_join=False)

        bodies = st.one_of(job_bodies(team.project_id).map(dumps).map(str.encode), hostile_body())
        who = st.sampled_from(["owner", None, *members])  # the owner twice as often

        @SETTINGS
        @given(st.lists(st.tuples(who, bodies), min_size=1, max_size=6))
        @example(
            [
                (
                    "owner",
                    dumps({"task_name": "data_processing", "payload": {"csv": "a\x00"}}).encode(),
                ),
                (
                    "owner",
                    dumps(
                        {
                            "task_name": "project_activity_report",
                            "payload": {"since": "0001-01-01T00:00:00+14:00"},
                            "project_id": team.project_id,
                        }
                    ).encode(),
                ),
            ]
        )
        def run(requests: list[tuple[str | None, bytes]]) -> None:
            with normal_stack():
                trio.from_thread.run(batch, requests)

        await drive(run)()
        await watch.serving()
        finished = {JobStatus.COMPLETED, JobStatus.DEAD, JobStatus.FAILED}
        for job_id in accepted:
            with trio.fail_after(30):
                job = await queue.wait_for(uuid.UUID(job_id.removeprefix("job_")), finished)
            outcomes = [a["outcome"] for a in job.attempts]
            assert "failed" not in outcomes, (job_id, job.task_name, job.error)


async def test_deep_frames_and_bodies_at_the_edges_of_the_limits(
    start_server: StartServer,
) -> None:
    """Depths hypothesis rarely reaches: each is refused cleanly on every path."""
    async with fuzzing(start_server) as watch:
        team = watch.team
        for depth in (65, 1000, 1023, 1025, 4000):
            frame = '{"type":' + deep(depth, "[") + "}"
            for _ in per_transport(team):
                async with connect(team.url()) as client:
                    await client.send(frame)
                    assert (await client.closed())[0] == 4001
                async with connect(team.url(), team.owner.token) as client:
                    await client.send(frame)
                    assert (await client.until("ERROR"))["code"] == "malformed_json"
            r = await team.server.client.post(
                "/api/v1/auth/login",
                content=deep(depth, "{"),
                headers={"Content-Type": "application/json"},
            )
            assert (r.status_code, r.json()["error"]["code"]) == (400, "malformed_json")
        await watch.serving()
