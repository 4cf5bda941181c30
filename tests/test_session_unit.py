"""One workspace connection's state machine, without a socket or a database.

``Realtime.serve`` runs against an in-memory ``Connection`` and small fakes at its seams
(the login-session and membership lookups, the workspace registry), on trio's MockClock:
auth timeouts, heartbeats, token expiry and rate windows pass in no real time, and each
close is checked for its code, its reason and the moment it happened.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime
from functools import partial
from types import SimpleNamespace
from typing import Any, cast

import orjson
import pytest
import trio
from trio.testing import MockClock, wait_all_tasks_blocked

import atrium.domain.realtime as realtime_module
from atrium.actors import ActorStopped, AskTimeout
from atrium.actors.workspace import Cursor, Edit, Join, Leave
from atrium.core.config import Settings
from atrium.core.roles import Role
from atrium.core.timestamps import utc_iso_at
from atrium.domain.realtime import ConnectionGone, ConnectionSettings, Handshake, Realtime
from atrium.domain.workspaces import Workspaces
from atrium.identity.tokens import TokenCodec
from atrium.persistence.database import Database, DatabaseUnavailable
from atrium.realtime.outbox import PARTIAL, REFUSED, SENT
from atrium.realtime.protocol import CursorUpdate, FileChange

SECRET = "unit-test-secret-that-is-long-enough-for-hs256"
PROJECT = uuid.UUID("00000000-0000-4000-8000-000000000001")
ISSUER, AUDIENCE = "atrium", "atrium-api"
# Long enough that token expiry stays out of the tests that are not about it.
LONG_TTL = 24 * 3600


def codec(access_ttl: int = LONG_TTL, secret: str = SECRET) -> TokenCodec:
    return TokenCodec(secret, ISSUER, AUDIENCE, access_ttl, 30 * 24 * 3600)


# -- the fakes ----------------------------------------------------------------------------


class FakeConnection:
    """A ``Connection`` over two in-memory channels; the test plays the client."""

    def __init__(self) -> None:
        self._to_server, self._inbound = trio.open_memory_channel[str | bytes](math.inf)
        self._outbound, self._from_server = trio.open_memory_channel[str](math.inf)
        self.close_code: int | None = None
        self.close_reason: str | None = None
        self.closed_at: float | None = None
        self.stalled = False  # a client that stopped reading: sends never complete
        self.reset = False  # the peer went away: sends fail
        self.close_error: Exception | None = None

    # The transport side, as the session sees it.

    async def receive(self) -> str | bytes:
        try:
            return await self._inbound.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise ConnectionGone from None

    async def send(self, text: str) -> None:
        if self.stalled:
            await trio.sleep_forever()
        if self.reset or self.close_code is not None:
            raise ConnectionGone
        self._outbound.send_nowait(text)

    async def close(self, code: int, reason: str) -> None:
        if self.close_error is not None:
            raise self.close_error
        if self.close_code is None:
            self.close_code, self.close_reason = code, reason
            self.closed_at = trio.current_time()
            self._outbound.close()

    async def flush(self) -> None:
        pass

    # The client side.

    def push(self, message: dict[str, Any] | str | bytes) -> None:
        self._to_server.send_nowait(
            orjson.dumps(message).decode() if isinstance(message, dict) else message
        )

    def hang_up(self) -> None:
        self._to_server.close()

    async def frame(self) -> Any:
        """The next frame the server sent (raises EndOfChannel once it closed)."""
        return orjson.loads(await self._from_server.receive())

    async def rest(self) -> list[Any]:
        """Every frame up to the close."""
        return [orjson.loads(text) async for text in self._from_server]

    @property
    def closed(self) -> tuple[int | None, str | None]:
        return self.close_code, self.close_reason


class FakeActor:
    """A workspace actor that records what a session tells and asks it."""

    def __init__(self) -> None:
        self.joins: list[Join] = []
        self.told: list[object] = []
        self.joined = trio.Event()
        self.ask_error: Exception | None = None
        self.tell_error: Exception | None = None
        self.stopped = False  # every tell raises ActorStopped, a Leave included

    async def ask(self, message: object, *, timeout: float | None = None) -> int:  # noqa: ASYNC109
        if self.ask_error is not None:
            raise self.ask_error
        assert isinstance(message, Join)
        self.joins.append(message)
        self.joined.set()
        return 0

    async def tell(self, message: object) -> None:
        if self.stopped:
            raise ActorStopped()
        if self.tell_error is not None and not isinstance(message, Leave):
            raise self.tell_error
        self.told.append(message)

    def of(self, kind: type) -> list[Any]:
        return [message for message in self.told if isinstance(message, kind)]


class FakeWorkspaces:
    def __init__(self) -> None:
        self.actor = FakeActor()
        self.projects: list[uuid.UUID] = []

    async def get(self, project_id: uuid.UUID) -> FakeActor:
        self.projects.append(project_id)
        return self.actor


@dataclass
class User:
    id: uuid.UUID = field(default_factory=uuid.uuid4)
    session_id: uuid.UUID = field(default_factory=uuid.uuid4)
    email: str = "ada@example.com"

    def token(
        self, tokens: TokenCodec | None = None, type: Any = "access", now: float | None = None
    ) -> str:
        token, _ = (tokens or codec()).issue(
            type=type,
            user_id=self.id,
            email=self.email,
            role="user",
            session_id=self.session_id,
            now=now,
        )
        return token


@dataclass
class World:
    """The seams a session reaches: live login sessions, memberships, workspaces."""

    live_sessions: set[uuid.UUID] = field(default_factory=set)
    roles: dict[uuid.UUID, Role] = field(default_factory=dict)  # of PROJECT, by user
    workspaces: FakeWorkspaces = field(default_factory=FakeWorkspaces)
    db_error: Exception | None = None
    realtime: Realtime | None = None

    @property
    def actor(self) -> FakeActor:
        return self.workspaces.actor

    def member(self, role: Role = Role.COLLABORATOR, **fields: Any) -> User:
        user = User(**fields)
        self.live_sessions.add(user.session_id)
        self.roles[user.id] = role
        return user

    async def find_session_user(
        self, db: Database, user_id: uuid.UUID, session_id: uuid.UUID
    ) -> object | None:
        if self.db_error is not None:
            raise self.db_error
        return object() if session_id in self.live_sessions else None

    async def session_member_role(
        self, db: Database, project_id: uuid.UUID, user_id: uuid.UUID, session_id: uuid.UUID
    ) -> tuple[bool, Role | None]:
        live = await self.find_session_user(db, user_id, session_id) is not None
        return live, await self.member_role(db, project_id, user_id)

    async def member_role(
        self, db: Database, project_id: uuid.UUID, user_id: uuid.UUID
    ) -> Role | None:
        return self.roles.get(user_id) if project_id == PROJECT else None

    def start(self, **settings: Any) -> Realtime:
        self.realtime = Realtime(
            db=cast(Database, object()),
            tokens=codec(),
            workspaces=cast(Workspaces, self.workspaces),
            allowed_origins=("https://app.example.com",),
            settings=replace(ConnectionSettings.of(Settings()), **settings),
        )
        return self.realtime


@pytest.fixture
def world(monkeypatch: pytest.MonkeyPatch) -> World:
    world = World()
    monkeypatch.setattr(
        "atrium.domain.realtime.accounts.find_session_user", world.find_session_user
    )
    monkeypatch.setattr(
        "atrium.domain.realtime.projects.session_member_role", world.session_member_role
    )
    return world


def handshake(
    *,
    project: str = str(PROJECT),
    user: str | None = None,
    query: dict[str, str] | None = None,
    headers: dict[str, str] | None = None,
) -> Handshake:
    return Handshake(project, user, query or {}, headers or {})


@asynccontextmanager
async def connection(
    realtime: Realtime, hs: Handshake | None = None
) -> AsyncIterator[FakeConnection]:
    """A connection served for the body of the block; the client hangs up at its end."""
    conn = FakeConnection()
    # A session that never ends fails the test (on the mock clock: at once) instead of
    # hanging it.
    with trio.fail_after(3600):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(partial(realtime.serve, conn, hs or handshake(), transport="fake"))
            try:
                yield conn
            finally:
                conn.hang_up()


@asynccontextmanager
async def joined(
    world: World,
    user: User,
    hs: Handshake | None = None,
    *,
    ttl: int = LONG_TTL,
    issued: float | None = None,
    **auth: Any,
) -> AsyncIterator[FakeConnection]:
    """A connection that authenticated with an AUTH frame (a token valid for ``ttl``
    seconds from ``issued``, a wall-clock time, by default now) and joined the workspace."""
    realtime = world.realtime or world.start()
    async with connection(realtime, hs) as conn:
        conn.push({"type": "AUTH", "token": user.token(codec(ttl), now=issued), **auth})
        await world.actor.joined.wait()
        yield conn


async def ping(conn: FakeConnection) -> None:
    """Round trip: once the PONG is back, every frame sent before it was acted on."""
    conn.push({"type": "PING"})
    assert await conn.frame() == {"type": "PONG"}


def edit_frame(client_id: str = "e1") -> dict[str, Any]:
    return {"type": "FILE_CHANGE", "id": client_id, "file_path": "/a.py", "changes": {}}


# -- opening --------------------------------------------------------------------------------


async def test_an_auth_frame_joins_the_workspace_and_frames_reach_the_actor(
    autojump_clock: MockClock, world: World
) -> None:
    user = world.member(Role.VIEWER, email="vi@example.com")
    async with joined(world, user, since_seq=7) as conn:
        (join,) = world.actor.joins
        assert world.workspaces.projects == [PROJECT]
        assert join.since_seq == 7  # the AUTH frame's resume point
        assert (join.subscriber.user_id, join.subscriber.email) == (user.id, "vi@example.com")
        assert join.subscriber.role is Role.VIEWER
        conn.push({"type": "CURSOR_UPDATE", "position": {"file": "/a", "line": 3, "column": 4}})
        conn.push(edit_frame())
        conn.push({"type": "PONG"})
        await ping(conn)
        (cursor,) = world.actor.of(Cursor)
        assert cursor.cursor == CursorUpdate("/a", 3, 4)
        assert cursor.subscriber is join.subscriber
        (edit,) = world.actor.of(Edit)
        assert edit.change == FileChange("/a.py", {}, "e1")
        # A bad frame is answered with an ERROR and the connection stays open.
        conn.push("{nope")
        assert (await conn.frame())["code"] == "malformed_json"
        await ping(conn)
        assert world.actor.of(Leave) == []
    # The client hung up: the workspace is told the connection left.
    (leave,) = world.actor.of(Leave)
    assert leave.subscriber is join.subscriber
    assert conn.close_code is None  # nothing to close: the peer went away
    assert world.realtime is not None and len(world.realtime.connections) == 0


async def test_a_bearer_header_authenticates_without_an_auth_frame(
    autojump_clock: MockClock, world: World
) -> None:
    user = world.member()
    hs = handshake(
        headers={"authorization": f"Bearer {user.token()}"},
        query={"since_seq": "42"},
        user=str(user.id),
    )
    async with connection(world.start(), hs) as conn:
        await world.actor.joined.wait()
        assert world.actor.joins[0].since_seq == 42
        await ping(conn)


async def test_no_auth_frame_in_time_is_closed_4002(
    autojump_clock: MockClock, world: World
) -> None:
    realtime = world.start(auth_timeout=5.0)
    start = trio.current_time()
    async with connection(realtime) as conn:
        assert await conn.rest() == []
    assert conn.closed == (4002, "auth_timeout")
    assert conn.closed_at == start + 5.0
    assert world.actor.joins == [] and world.actor.told == []


@pytest.mark.parametrize("first", [{"type": "PING"}, "{not json", {"type": "AUTH"}])
async def test_a_first_frame_that_is_not_auth_is_closed_4001(
    autojump_clock: MockClock, world: World, first: dict[str, Any] | str
) -> None:
    world.member()
    async with connection(world.start()) as conn:
        conn.push(first)
        assert await conn.rest() == []
    assert conn.closed == (4001, "auth_required")
    assert conn.closed_at == 0.0  # at once, not after the auth timeout
    assert world.actor.joins == []


async def test_a_refused_first_token_closes_4001_with_its_code(
    autojump_clock: MockClock, world: World
) -> None:
    user = world.member()
    cases = [
        (
            user.token(codec(secret="another-secret-that-is-long-enough-too")),
            "token_invalid_signature",
        ),
        (user.token(type="refresh"), "token_wrong_type"),
        (user.token(codec(access_ttl=-120)), "token_expired"),
        ("not-a-jwt", "token_malformed"),
    ]
    realtime = world.start()
    for token, code in cases:
        async with connection(realtime) as conn:
            conn.push({"type": "AUTH", "token": token})
            assert await conn.rest() == []
        assert conn.closed == (4001, code)
    assert world.actor.joins == []


async def test_a_client_that_leaves_during_auth_is_not_closed_or_joined(
    autojump_clock: MockClock, world: World
) -> None:
    async with connection(world.start()) as conn:
        conn.hang_up()
    assert conn.close_code is None
    assert world.actor.joins == [] and world.actor.told == []


@dataclass
class Refusal:
    name: str
    code: int
    reason: str
    hs: Callable[[User], Handshake] = lambda user: handshake()
    setup: Callable[[World, User], None] = lambda world, user: None


REFUSALS = [
    Refusal(
        "origin",
        4003,
        "origin_not_allowed",
        lambda user: handshake(headers={"origin": "https://evil.example"}),
    ),
    Refusal(
        "origin of another port",
        4003,
        "origin_not_allowed",
        lambda user: handshake(headers={"origin": "http://host:3001", "host": "host:8000"}),
    ),
    Refusal("project id", 4004, "project_not_found", lambda user: handshake(project="nope")),
    Refusal(
        "since_seq", 4000, "invalid_since_seq", lambda user: handshake(query={"since_seq": "-1"})
    ),
    Refusal("path user", 4003, "user_mismatch", lambda user: handshake(user=str(uuid.uuid4()))),
    Refusal(
        "revoked",
        4001,
        "session_revoked",
        setup=lambda world, user: world.live_sessions.discard(user.session_id),
    ),
    Refusal(
        "not a member", 4004, "project_not_found", setup=lambda world, user: world.roles.clear()
    ),
    Refusal(
        "database down",
        1013,
        "database_unavailable",
        setup=lambda world, user: setattr(world, "db_error", DatabaseUnavailable("down")),
    ),
    Refusal(
        "workspace stopped",
        1012,
        "workspace_restarting",
        setup=lambda world, user: setattr(world.actor, "ask_error", ActorStopped()),
    ),
]


@pytest.mark.parametrize("refusal", REFUSALS, ids=[r.name for r in REFUSALS])
async def test_the_handshake_refuses_with_a_documented_close_code(
    autojump_clock: MockClock, world: World, refusal: Refusal
) -> None:
    user = world.member()
    refusal.setup(world, user)
    realtime = world.start()
    headers = {"authorization": f"Bearer {user.token()}"}
    hs = refusal.hs(user)
    hs = replace(hs, headers={**headers, **hs.headers})
    async with connection(realtime, hs) as conn:
        assert await conn.rest() == []
    assert conn.closed == (refusal.code, refusal.reason)
    assert world.actor.joins == []
    assert world.actor.of(Leave) == []  # never joined: no Leave either
    assert len(realtime.connections) == 0


async def test_allowed_origins_and_no_origin_are_let_in(
    autojump_clock: MockClock, world: World
) -> None:
    user = world.member()
    realtime = world.start()
    same_origin = {"origin": "http://atrium.example:8000", "host": "atrium.example:8000"}
    for headers in ({"origin": "https://app.example.com/"}, same_origin, {}):
        world.actor.joined = trio.Event()
        hs = handshake(headers={"authorization": f"Bearer {user.token()}", **headers})
        async with connection(realtime, hs) as conn:
            await world.actor.joined.wait()
            await ping(conn)
        assert conn.close_code is None


async def test_a_join_that_times_out_still_leaves(autojump_clock: MockClock, world: World) -> None:
    # The Join may still be handled later: the Leave must follow it into the mailbox.
    user = world.member()
    world.actor.ask_error = AskTimeout()
    async with connection(world.start()) as conn:
        conn.push({"type": "AUTH", "token": user.token()})
        assert await conn.rest() == []
    assert conn.closed == (1012, "workspace_restarting")
    assert len(world.actor.of(Leave)) == 1


async def test_a_user_over_the_connection_limit_is_closed_4011(
    autojump_clock: MockClock, world: World
) -> None:
    user = world.member()
    realtime = world.start(max_connections_per_user=1)
    async with joined(world, user) as first:
        async with connection(realtime) as second:
            second.push({"type": "AUTH", "token": user.token()})
            assert await second.rest() == []
        assert second.closed == (4011, "too_many_connections")
        await ping(first)  # the first one is untouched
    # Its slot is free again once it ended.
    world.actor.joined = trio.Event()
    async with joined(world, user) as third:
        await ping(third)


# -- re-authentication and token expiry -----------------------------------------------------


async def test_a_refused_reauth_is_an_error_frame_and_the_connection_stays(
    autojump_clock: MockClock, world: World
) -> None:
    user = world.member()
    stranger = world.member()
    revoked = User(id=user.id)  # same user, a session that is not live
    async with joined(world, user) as conn:
        for token, code in [
            (
                user.token(codec(secret="forged-secret-that-is-long-enough-too")),
                "token_invalid_signature",
            ),
            (user.token(codec(access_ttl=-120)), "token_expired"),
            (user.token(type="refresh"), "token_wrong_type"),
            (stranger.token(), "user_mismatch"),
            (revoked.token(), "session_revoked"),
        ]:
            conn.push({"type": "AUTH", "token": token})
            error = await conn.frame()
            assert (error["type"], error["code"]) == ("ERROR", code)
            await ping(conn)
        assert conn.close_code is None


async def test_database_down_during_reauth_closes_1013(
    autojump_clock: MockClock, world: World
) -> None:
    user = world.member()
    async with joined(world, user) as conn:
        world.db_error = DatabaseUnavailable("down")
        conn.push({"type": "AUTH", "token": user.token()})
        assert await conn.rest() == []
    assert conn.closed == (1013, "database_unavailable")


@pytest.fixture
def wall(monkeypatch: pytest.MonkeyPatch) -> float:
    """The wall clock a session reads to place a token's expiry on the trio clock, stopped
    at a whole second. Tokens issued at it (``issued=wall``) expire exactly their TTL of
    MockClock time after the session accepts them: the real wall clock would move on
    while the mock clock stands still (by a second or more on a loaded machine), and the
    moments below would only be right to within that."""
    now = float(int(time.time()))
    monkeypatch.setattr("atrium.domain.realtime.time", SimpleNamespace(time=lambda: now))
    return now


async def test_an_unrenewed_token_is_warned_then_closed_4007(
    autojump_clock: MockClock, world: World, wall: float
) -> None:
    # The client answers every PING (it is alive) but never sends a fresh token.
    world.start(heartbeat_interval=25.0, heartbeat_timeout=60.0)
    user = world.member()
    start = trio.current_time()
    others: list[tuple[float, Any]] = []
    async with joined(world, user, ttl=300, issued=wall) as conn:
        with pytest.raises(trio.EndOfChannel):
            while True:
                frame = await conn.frame()
                if frame["type"] == "PING":
                    conn.push({"type": "PONG"})
                else:
                    others.append((trio.current_time() - start, frame))
    # One warning a minute before the expiry, nothing else but pings.
    assert others == [
        (
            300 - 60,
            {
                "type": "TOKEN_EXPIRING",
                "expires_at": utc_iso_at(wall + 300),
                "reauth_within_seconds": 90.0,
            },
        )
    ]
    assert others[0][1]["expires_at"].endswith("Z")
    # Closed at expiry plus the grace, pings in the grace period notwithstanding.
    assert conn.closed == (4007, "token_expired")
    assert conn.closed_at == start + 300 + 30


async def test_a_renewal_answers_auth_ok_and_moves_the_deadline(
    autojump_clock: MockClock, world: World, wall: float
) -> None:
    realtime = world.start(heartbeat_interval=10_000.0, heartbeat_timeout=20_000.0)
    user = world.member()
    renewal = codec(access_ttl=600)
    start = trio.current_time()
    async with joined(world, user, ttl=300, issued=wall) as conn:
        assert (await conn.frame())["type"] == "TOKEN_EXPIRING"
        assert trio.current_time() == start + 300 - 60
        # Renewed within the grace, by another login of the same user.
        other_login = User(id=user.id)
        world.live_sessions.add(other_login.session_id)
        token, claims = renewal.issue(
            type="access",
            user_id=user.id,
            email=user.email,
            role="user",
            session_id=other_login.session_id,
            now=wall,
        )
        await trio.sleep(20)
        renewed_at = trio.current_time()
        conn.push({"type": "AUTH", "token": token})
        ok = await conn.frame()
        assert ok["type"] == "AUTH_OK"
        assert ok["user_id"] == str(user.id)
        assert datetime.fromisoformat(ok["expires_at"]).timestamp() == claims.expires_at
        # The next warning is for the new expiry, a minute before it: no close at the old
        # deadline (start + 330).
        warning = await conn.frame()
        assert warning["type"] == "TOKEN_EXPIRING"
        assert datetime.fromisoformat(warning["expires_at"]).timestamp() == claims.expires_at
        assert trio.current_time() == renewed_at + 600 - 60
        assert conn.close_code is None
        # Revoking the login that renewed the token now reaches this connection...
        assert realtime.revoke_session(user.session_id) == 0
        assert realtime.revoke_session(other_login.session_id) == 1
        assert await conn.rest() == []
    assert conn.closed == (4001, "session_revoked")


# -- heartbeats -----------------------------------------------------------------------------


async def test_pings_go_out_every_interval_and_a_silent_client_is_closed_4009(
    autojump_clock: MockClock, world: World
) -> None:
    world.start(heartbeat_interval=25.0, heartbeat_timeout=60.0)
    user = world.member()
    start = trio.current_time()
    async with joined(world, user) as conn:
        # A client that answers stays connected, however long.
        for n in range(1, 11):
            frame = await conn.frame()
            assert frame["type"] == "PING" and frame["timestamp"].endswith("Z")
            assert trio.current_time() == start + 25 * n
            conn.push({"type": "PONG"})
        answered = trio.current_time()
        # Then it goes quiet: two more pings, and closed at the first tick past 60 s.
        assert (await conn.frame())["type"] == "PING"
        assert (await conn.frame())["type"] == "PING"
        assert await conn.rest() == []
    assert conn.closed == (4009, "heartbeat_timeout")
    assert conn.closed_at == answered + 75
    assert len(world.actor.of(Leave)) == 1


async def test_a_dead_peer_is_closed_at_the_heartbeat_timeout_without_grace(
    autojump_clock: MockClock, world: World
) -> None:
    world.start(heartbeat_interval=25.0, heartbeat_timeout=60.0)
    user = world.member()
    async with joined(world, user) as conn:
        conn.stalled = True  # neither reads nor answers: the first PING never gets out
        start = trio.current_time()
        assert await conn.rest() == []
    assert conn.closed == (4009, "heartbeat_timeout")
    assert conn.closed_at == start + 75


async def test_any_frame_counts_as_a_sign_of_life(autojump_clock: MockClock, world: World) -> None:
    world.start(heartbeat_interval=25.0, heartbeat_timeout=60.0)
    user = world.member()
    async with joined(world, user) as conn:
        for _ in range(6):  # 150 s without a PONG, but cursors all along
            assert (await conn.frame())["type"] == "PING"
            conn.push({"type": "CURSOR_UPDATE", "position": {"file": "/a", "line": 1, "column": 1}})
        await ping(conn)
        assert conn.close_code is None


async def test_a_timer_that_raises_ends_its_connection_with_1011_alone(
    autojump_clock: MockClock, world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every connection's timers run in one task: a bug in one connection's timer is that
    # connection's failure (1011, counted), and the others' PINGs go on.
    realtime = world.start(heartbeat_interval=25.0, heartbeat_timeout=60.0)
    ann, bob = world.member(), world.member()
    on_timer = realtime_module._LiveConnection._on_timer

    def explode(connection: Any, now: float) -> None:
        if connection.claims.user_id == ann.id:
            raise RuntimeError("a bug in a timer")
        on_timer(connection, now)

    monkeypatch.setattr(realtime_module._LiveConnection, "_on_timer", explode)
    async with joined(world, ann) as broken, joined(world, bob) as fine:
        assert await broken.rest() == []
        for _ in range(2):
            assert (await fine.frame())["type"] == "PING"
            fine.push({"type": "PONG"})
    assert broken.closed == (1011, "internal_error")
    assert realtime.failures.counts()["connection"] == 1


# -- limits ---------------------------------------------------------------------------------


async def test_over_the_message_rate_errors_then_closes_4010(
    autojump_clock: MockClock, world: World
) -> None:
    world.start(rate_per_second=50.0, rate_burst=100, rate_strikes=20)
    user = world.member()
    async with joined(world, user) as conn:
        start = trio.current_time()
        for _ in range(100):  # the burst
            conn.push({"type": "PING"})
        for _ in range(100):
            assert await conn.frame() == {"type": "PONG"}
        conn.push({"type": "PING"})
        assert await conn.frame() == {
            "type": "ERROR",
            "code": "rate_limited",
            "message": "Too many messages; slow down",
        }
        # Within a second, the bucket holds 50 more: a PING is answered and the strikes
        # start again from zero.
        await trio.sleep(1)
        conn.push({"type": "PING"})
        assert await conn.frame() == {"type": "PONG"}
        refill = trio.current_time()
        for _ in range(49):
            conn.push({"type": "PING"})
        for _ in range(49):
            assert await conn.frame() == {"type": "PONG"}
        for _ in range(19):  # 19 strikes in a row: still open
            conn.push({"type": "PING"})
            assert (await conn.frame())["code"] == "rate_limited"
        assert conn.close_code is None
        assert refill == trio.current_time() == start + 1  # no refill meanwhile
        conn.push(edit_frame())  # the 20th: closed, and not acted on
        assert await conn.rest() == []
    assert conn.closed == (4010, "rate_limited")
    assert world.actor.of(Edit) == []


async def test_a_users_edit_rate_is_answered_with_the_edits_id(
    autojump_clock: MockClock, world: World
) -> None:
    world.start(user_edits_per_second=1.0, user_edit_burst=2)
    user = world.member()
    async with joined(world, user) as conn:
        for n in range(3):
            conn.push(edit_frame(f"e{n}"))
        error = await conn.frame()
        assert (error["code"], error["id"]) == ("rate_limited", "e2")
        assert [edit.change.client_id for edit in world.actor.of(Edit)] == ["e0", "e1"]
        await trio.sleep(1)
        conn.push(edit_frame("e3"))
        await ping(conn)
        assert [edit.change.client_id for edit in world.actor.of(Edit)][-1] == "e3"


async def test_a_client_that_stops_reading_is_closed_4008(
    autojump_clock: MockClock, world: World
) -> None:
    world.start(send_queue=2)
    user = world.member()
    async with joined(world, user) as conn:
        conn.stalled = True
        start = trio.current_time()
        for _ in range(5):
            conn.push({"type": "PING"})
        assert await conn.rest() == []
    assert conn.closed == (4008, "slow_consumer")
    assert conn.closed_at == start  # at once: a slow consumer gets no grace


async def test_a_close_waits_at_most_two_seconds_for_a_stalled_client(
    autojump_clock: MockClock, world: World, wall: float
) -> None:
    world.start(heartbeat_interval=10_000.0, heartbeat_timeout=20_000.0)
    user = world.member()
    async with joined(world, user, ttl=300, issued=wall) as conn:
        conn.stalled = True  # the TOKEN_EXPIRING never gets out
        start = trio.current_time()
        assert await conn.rest() == []
    assert conn.closed == (4007, "token_expired")
    # At expiry plus the grace, the close then waits its two seconds for the client.
    assert conn.closed_at == start + 300 + 30 + 2


async def test_batched_connections_get_arrays(autojump_clock: MockClock, world: World) -> None:
    user = world.member()
    async with joined(world, user, handshake(query={"batch": "1"})) as conn:
        for _ in range(3):
            conn.push({"type": "PING"})
        pongs: list[Any] = []
        while len(pongs) < 3:
            batch = await conn.frame()
            assert isinstance(batch, list)
            pongs.extend(batch)
        assert pongs == [{"type": "PONG"}] * 3


class DirectConnection(FakeConnection):
    """A transport that can write without waiting (``try_send``), as the dedicated
    listener's is; each write's outcome is scripted, and every write is logged."""

    def __init__(self, outcomes: list[int]) -> None:
        super().__init__()
        self.outcomes = outcomes
        self.log: list[str] = []

    def try_send(self, text: str) -> int:
        outcome = self.outcomes.pop(0)
        self.log.append({SENT: "sent", PARTIAL: "partial", REFUSED: "refused"}[outcome])
        if outcome != REFUSED:
            self._outbound.send_nowait(text)  # the client gets it (the rest of it: later)
        return outcome

    async def send(self, text: str) -> None:
        self.log.append("send")
        await super().send(text)

    async def flush(self) -> None:
        self.log.append("flush")


@pytest.mark.parametrize("batch", [False, True])
async def test_direct_writes_skip_the_queue_and_partial_ones_are_flushed(
    mock_clock: MockClock, world: World, batch: bool
) -> None:
    user = world.member()
    realtime = world.start()
    conn = DirectConnection([PARTIAL, SENT, REFUSED])
    hs = handshake(query={"batch": "1"} if batch else {})
    async with trio.open_nursery() as nursery:
        nursery.start_soon(partial(realtime.serve, conn, hs, transport="fake"))
        conn.push({"type": "AUTH", "token": user.token()})
        await world.actor.joined.wait()
        for _ in range(3):
            conn.push({"type": "PING"})
            await wait_all_tasks_blocked()
            assert await conn.frame() in ({"type": "PONG"}, [{"type": "PONG"}])
        conn.hang_up()
    if batch:  # a batch is built by the send task: never written directly
        assert conn.log == ["send"] * 3
    else:
        assert conn.log == ["partial", "flush", "sent", "refused", "send"]


# -- what ends a connection from the server side ------------------------------------------


async def test_a_revoked_session_is_closed_4001_and_nothing_more_is_acted_on(
    autojump_clock: MockClock, world: World
) -> None:
    user = world.member()
    async with joined(world, user) as conn:
        assert world.realtime is not None
        assert world.realtime.revoke_session(user.session_id) == 1
        conn.push(edit_frame())
        assert await conn.rest() == []
    assert conn.closed == (4001, "session_revoked")
    assert world.actor.of(Edit) == []
    assert len(world.actor.of(Leave)) == 1


async def test_a_stopped_workspace_closes_1012(autojump_clock: MockClock, world: World) -> None:
    user = world.member()
    async with joined(world, user) as conn:
        world.actor.stopped = True
        conn.push(edit_frame())
        assert await conn.rest() == []
    assert conn.closed == (1012, "workspace_restarted")
    assert world.actor.told == []  # the Leave found it stopped too, and that is fine


async def test_a_bug_ends_one_connection_with_1011_and_is_counted(
    autojump_clock: MockClock, world: World
) -> None:
    user = world.member()
    realtime = world.start()
    async with joined(world, user) as broken:
        world.actor.tell_error = RuntimeError("a bug in the workspace")
        broken.push(edit_frame())
        assert await broken.rest() == []
    assert broken.closed == (1011, "internal_error")
    assert realtime.failures.counts() == {"connection": 1, "request": 0}
    assert realtime.active == 0
    with trio.fail_after(1):
        await realtime.wait_drained()
    # The next connection is served as usual.
    world.actor.tell_error = None
    world.actor.joined = trio.Event()
    async with joined(world, user) as conn:
        await ping(conn)
        assert realtime.active == 1


async def test_a_bug_with_a_broken_transport_is_still_contained(
    autojump_clock: MockClock, world: World
) -> None:
    user = world.member()
    realtime = world.start()
    async with joined(world, user) as conn:
        world.actor.tell_error = RuntimeError("a bug")
        conn.close_error = RuntimeError("and the transport broke too")
        conn.push(edit_frame())
    assert realtime.failures.counts() == {"connection": 1, "request": 0}
    assert realtime.active == 0


async def test_a_peer_that_resets_mid_send_ends_the_session(
    autojump_clock: MockClock, world: World
) -> None:
    user = world.member()
    realtime = world.start()
    async with joined(world, user) as conn:
        conn.reset = True
        conn.push({"type": "PING"})  # its PONG finds the peer gone
        with trio.fail_after(1):
            await realtime.wait_drained()
    assert conn.close_code is None
    assert len(world.actor.of(Leave)) == 1
    assert len(realtime.connections) == 0
    assert realtime.failures.counts() == {"connection": 0, "request": 0}


async def test_a_revocation_during_the_checks_still_reaches_the_connection(
    autojump_clock: MockClock, world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The session is indexed before it is checked: a revocation committed after the
    # database said "live" still closes it, before it joins.
    user = world.member()
    realtime = world.start()

    async def revoked_meanwhile(
        db: Database, project_id: uuid.UUID, user_id: uuid.UUID, session_id: uuid.UUID
    ) -> tuple[bool, Role]:
        assert realtime.revoke_session(user.session_id) == 1
        return True, Role.OWNER

    monkeypatch.setattr("atrium.domain.realtime.projects.session_member_role", revoked_meanwhile)
    async with connection(realtime) as conn:
        conn.push({"type": "AUTH", "token": user.token()})
        assert await conn.rest() == []
    assert conn.closed == (4001, "session_revoked")
    assert world.actor.joins == []


# -- the handshake's URL --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/ws/p1", ("p1", None)),
        ("/ws/p1/", ("p1", None)),
        ("/ws/p1/u1", ("p1", "u1")),
        ("/ws", None),
        ("/ws/", None),
        ("/ws//u1", None),
        ("/api/p1", None),
        ("/ws/p1/u1/x", None),
    ],
)
def test_handshake_paths(path: str, expected: tuple[str, str | None] | None) -> None:
    hs = Handshake.parse(path, "since_seq=3&batch=1", [])
    if expected is None:
        assert hs is None
    else:
        assert hs is not None
        assert (hs.project_id, hs.path_user_id) == expected
        assert hs.query == {"since_seq": "3", "batch": "1"}


def test_handshake_keeps_only_the_headers_a_session_reads() -> None:
    hs = Handshake.parse(
        "/ws/p1",
        "",
        [(b"Origin", b"https://a.example"), (b"AUTHORIZATION", b"Bearer t"), (b"cookie", b"x")],
    )
    assert hs is not None
    assert hs.headers == {"origin": "https://a.example", "authorization": "Bearer t"}
