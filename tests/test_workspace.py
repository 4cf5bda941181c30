"""Live workspaces end to end: a real server, real trio-websocket clients, real PostgreSQL.

The transport-independent tests run against both the Quart-Trio route on the main port
and the wsproto listener on WS_PORT.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import asyncpg
import httpx
import jwt
import orjson
import pytest
import trio
import trio_asyncio
from conftest import Running, StartServer, crash_workspace
from trio_websocket import ConnectionClosed
from wsclient import Client, connect, open_sending_ahead

from atrium.persistence.database import Database

SECRET = "test-secret-key-with-enough-length-0123456789"


@dataclass
class Member:
    email: str
    user_id: str
    token: str

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


@dataclass
class Team:
    server: Running
    project_id: str
    owner: Member
    collaborator: Member
    viewer: Member
    outsider: Member
    transport: str

    def url(
        self,
        query: str = "",
        *,
        user: str | None = None,
        port: int | None = None,
        project: str | None = None,
    ) -> str:
        if port is None:
            port = self.server.bound.port if self.transport == "main" else self.server.bound.ws_port
        path = f"/ws/{project or self.project_id}" + (f"/{user}" if user else "")
        return f"ws://127.0.0.1:{port}{path}{query}"

    async def join(self, member: Member, query: str = "") -> Any:
        return connect(self.url(query), member.token)


async def make_member(server: Running, email: str) -> Member:
    body = await server.signup_login(email)
    return Member(email, body["user_id"], body["access_token"])


async def project_with(
    client: httpx.AsyncClient, owner: Member, *collaborators: Member, name: str = "Live"
) -> str:
    """A project of ``owner`` named ``name``, with ``collaborators`` in the collaborator
    role, created over ``client`` (a server's API); its id."""
    r = await client.post("/api/v1/projects/", json={"name": name}, headers=owner.auth)
    assert r.status_code == 201, r.text
    project_id: str = r.json()["id"]
    for member in collaborators:
        r = await client.post(
            f"/api/v1/projects/{project_id}/collaborators",
            json={"user_id": member.user_id, "role": "collaborator"},
            headers=owner.auth,
        )
        assert r.status_code == 201, r.text
    return project_id


async def make_team(server: Running, transport: str) -> Team:
    owner = await make_member(server, "owner@example.com")
    collaborator = await make_member(server, "collab@example.com")
    viewer = await make_member(server, "viewer@example.com")
    outsider = await make_member(server, "outsider@example.com")
    r = await server.client.post("/api/v1/projects/", json={"name": "Live"}, headers=owner.auth)
    assert r.status_code == 201, r.text
    project_id = r.json()["id"]
    for member, role in ((collaborator, "collaborator"), (viewer, "viewer")):
        r = await server.client.post(
            f"/api/v1/projects/{project_id}/collaborators",
            json={"user_id": member.user_id, "role": role},
            headers=owner.auth,
        )
        assert r.status_code == 201, r.text
    return Team(server, project_id, owner, collaborator, viewer, outsider, transport)


@pytest.fixture(params=["main", "listener"])
async def team(request: pytest.FixtureRequest, server: Running) -> Team:
    return await make_team(server, request.param)


@pytest.fixture
async def main_team(server: Running) -> Team:
    return await make_team(server, "main")


def edit(path: str, client_id: str | None = None, **changes: Any) -> dict[str, Any]:
    frame: dict[str, Any] = {
        "type": "FILE_CHANGE",
        "file_path": path,
        "changes": changes or {"lines_added": 1, "lines_removed": 0, "change_type": "modification"},
    }
    if client_id is not None:
        frame["id"] = client_id
    return frame


async def joined(client: Client, user: Member) -> dict[str, Any]:
    """Consume the greeting (PRESENCE_STATE) and return it."""
    state = await client.recv()
    assert state["type"] == "PRESENCE_STATE"
    return state


@asynccontextmanager
async def session(team: Team, member: Member, query: str = "") -> AsyncIterator[Client]:
    """A connection whose join is complete: its own USER_JOIN has arrived.

    Joins of separate connections race on the server (each authenticates first), so
    tests that care about order open their connections through this, one at a time.
    """
    async with connect(team.url(query), member.token) as client:
        await joined(client, member)
        while (message := await client.recv())["type"] != "USER_JOIN" or message[
            "user_id"
        ] != member.user_id:
            pass
        yield client


async def file_changes(client: Client, count: int) -> list[dict[str, Any]]:
    """The next ``count`` FILE_CHANGE messages, skipping everything else."""
    found = []
    while len(found) < count:
        message = await client.recv()
        if message["type"] == "FILE_CHANGE":
            found.append(message)
    return found


# -- presence ---------------------------------------------------------------------------


async def test_presence_is_per_user_across_tabs(team: Team) -> None:
    owner, collab = team.owner, team.collaborator
    async with await team.join(owner) as tab1:
        state = await joined(tab1, owner)
        assert state["users"] == []
        me = await tab1.recv()
        assert (me["type"], me["user_id"]) == ("USER_JOIN", owner.user_id)
        assert me["email"] == owner.email and isinstance(me["seq"], int)

        async with await team.join(collab) as other:
            state = await joined(other, collab)
            assert [u["user_id"] for u in state["users"]] == [owner.user_id]
            assert state["users"][0]["status"] == "active"
            join = await other.recv()
            assert (join["type"], join["user_id"]) == ("USER_JOIN", collab.user_id)
            assert (await tab1.recv())["user_id"] == collab.user_id

            async with await team.join(owner) as tab2:
                state = await joined(tab2, owner)
                assert {u["user_id"] for u in state["users"]} == {owner.user_id, collab.user_id}
                r = await team.server.client.get(
                    f"/api/v1/projects/{team.project_id}/workspace/status", headers=owner.auth
                )
                status = r.json()
                assert status["active_collaborators"] == 2
                assert status["connections"] == 3
                by_user = {u["user_id"]: u for u in status["online_users"]}
                assert by_user[owner.user_id]["connections"] == 2
                assert status["workspace_url"] == f"/ws/{team.project_id}"
                # A second tab is not a second join: the next thing the other user sees
                # is this edit, not a USER_JOIN.
                await tab2.send(edit("/after-second-tab.txt"))
                seen = await other.recv()
                assert (seen["type"], seen["file_path"]) == ("FILE_CHANGE", "/after-second-tab.txt")
            # Closing one of two tabs is not a leave either.
            await tab1.send(edit("/after-closing-tab.txt"))
            seen = await other.recv()
            assert (seen["type"], seen["file_path"]) == ("FILE_CHANGE", "/after-closing-tab.txt")
        # The other user leaves: the owner's remaining tab sees it.
        left = await tab1.until("USER_LEAVE")
        assert left["user_id"] == collab.user_id


async def test_dropped_tcp_connection_leaves_presence(main_team: Team) -> None:
    team = main_team
    async with session(team, team.owner) as watcher:
        async with session(team, team.collaborator) as dropped:
            assert (await watcher.recv())["type"] == "USER_JOIN"
            # Abort the TCP stream without a close handshake.
            await dropped.ws._stream.aclose()
            left = await watcher.recv()
            assert (left["type"], left["user_id"]) == ("USER_LEAVE", team.collaborator.user_id)


async def test_status_is_404_for_non_members(main_team: Team) -> None:
    team = main_team
    r = await team.server.client.get(
        f"/api/v1/projects/{team.project_id}/workspace/status", headers=team.outsider.auth
    )
    assert r.status_code == 404
    r = await team.server.client.get(
        f"/api/v1/projects/{team.project_id}/workspace/status", headers=team.owner.auth
    )
    assert r.json()["active_collaborators"] == 0 and r.json()["online_users"] == []


# -- events -----------------------------------------------------------------------------


async def test_edits_fan_out_to_every_member_in_log_order(team: Team, db: Database) -> None:
    async with (
        session(team, team.owner) as o,
        session(team, team.collaborator) as c,
        session(team, team.viewer) as v,
    ):
        for i in range(20):
            await c.send(edit(f"/src/{i}.py", client_id=f"e{i}"))
        seen = {
            name: await file_changes(client, 20)
            for name, client in (("owner", o), ("collab", c), ("viewer", v))
        }
    paths = [f["file_path"] for f in seen["owner"]]
    assert paths == [f"/src/{i}.py" for i in range(20)]
    seqs = [f["seq"] for f in seen["owner"]]
    assert seqs == list(range(seqs[0], seqs[0] + 20))
    for frames in seen.values():
        assert [f["seq"] for f in frames] == seqs
        assert {f["user_id"] for f in frames} == {team.collaborator.user_id}
    rows = await db.fetch(
        "SELECT seq, payload->>'file_path' AS path FROM project_events"
        " WHERE project_id = $1 AND type = 'FILE_CHANGE' ORDER BY seq",
        uuid.UUID(team.project_id),
    )
    assert [(r["seq"], r["path"]) for r in rows] == list(zip(seqs, paths, strict=True))


async def test_sender_gets_acks_and_a_resent_edit_is_not_duplicated(
    main_team: Team, db: Database
) -> None:
    team = main_team
    async with session(team, team.collaborator) as c:
        await c.send(edit("/once.txt", client_id="abc"))
        change = await c.recv()
        ack = await c.recv()
        assert ack == {"type": "ACK", "id": "abc", "seq": change["seq"]}
        await c.send(edit("/once.txt", client_id="abc"))
        assert await c.recv() == {"type": "ACK", "id": "abc", "seq": change["seq"]}
    count = await db.fetchval("SELECT count(*) FROM project_events WHERE type = 'FILE_CHANGE'")
    assert count == 1


async def test_viewer_may_move_cursor_but_not_edit(team: Team) -> None:
    async with session(team, team.owner) as owner, session(team, team.viewer) as viewer:
        await owner.until("USER_JOIN")  # the viewer's
        await viewer.send(edit("/nope.txt", client_id="v1"))
        error = await viewer.skip_pings_recv()
        assert error == {
            "type": "ERROR",
            "code": "forbidden_role",
            "message": "Viewers cannot edit files",
            "id": "v1",
        }
        await viewer.send(
            {"type": "CURSOR_UPDATE", "position": {"file": "/a.py", "line": 42, "column": 15}}
        )
        cursor = await owner.recv()
        assert cursor["type"] == "CURSOR_UPDATE"
        assert cursor["user_id"] == team.viewer.user_id
        assert cursor["position"] == {"file": "/a.py", "line": 42, "column": 15}
        assert "seq" not in cursor and "timestamp" in cursor
        # Still connected: a ping is answered.
        await viewer.send({"type": "PING"})
        assert (await viewer.recv())["type"] == "PONG"


async def test_rest_changes_appear_live(team: Team) -> None:
    server, owner = team.server, team.owner
    async with session(team, team.collaborator) as c:
        r = await server.client.patch(
            f"/api/v1/projects/{team.project_id}", json={"name": "Renamed"}, headers=owner.auth
        )
        assert r.status_code == 200
        updated = await c.recv()
        assert updated["type"] == "PROJECT_UPDATED"
        assert updated["user_id"] == owner.user_id
        newcomer = await make_member(server, "new@example.com")
        r = await server.client.post(
            f"/api/v1/projects/{team.project_id}/collaborators",
            json={"email": newcomer.email, "role": "viewer"},
            headers=owner.auth,
        )
        assert r.status_code == 201
        added = await c.recv()
        assert added["type"] == "MEMBER_ADDED" and added["seq"] == updated["seq"] + 1
        assert added["user_id"] == owner.user_id


async def test_role_change_applies_to_an_open_connection(main_team: Team) -> None:
    team = main_team
    async with session(team, team.collaborator) as c:
        r = await team.server.client.patch(
            f"/api/v1/projects/{team.project_id}/collaborators/{team.collaborator.user_id}",
            json={"role": "viewer"},
            headers=team.owner.auth,
        )
        assert r.status_code == 200
        assert (await c.recv())["type"] == "MEMBER_ROLE_CHANGED"
        await c.send(edit("/x.txt"))
        assert (await c.recv())["code"] == "forbidden_role"


async def test_removed_member_is_disconnected_at_once(team: Team) -> None:
    async with session(team, team.collaborator) as c:
        r = await team.server.client.delete(
            f"/api/v1/projects/{team.project_id}/collaborators/{team.collaborator.user_id}",
            headers=team.owner.auth,
        )
        assert r.status_code in (200, 204)
        removed = await c.recv()
        assert removed["type"] == "MEMBER_REMOVED"
        assert await c.closed() == (4005, "member_removed")
    async with await team.join(team.collaborator) as again:
        assert await again.closed() == (4004, "project_not_found")


async def test_deleted_project_closes_its_workspace(main_team: Team) -> None:
    team = main_team
    async with session(team, team.collaborator) as c:
        r = await team.server.client.delete(
            f"/api/v1/projects/{team.project_id}", headers=team.owner.auth
        )
        assert r.status_code in (200, 204)
        assert (await c.recv())["type"] == "PROJECT_DELETED"
        assert await c.closed() == (4006, "project_deleted")
    async with await team.join(team.owner) as again:
        assert await again.closed() == (4004, "project_not_found")


# -- resume -----------------------------------------------------------------------------


async def test_resume_replays_missed_events_without_gap_or_duplicate(team: Team) -> None:
    async with session(team, team.owner) as o:
        async with session(team, team.collaborator) as c:
            last_seen = (await o.until("USER_JOIN"))["seq"]
            await o.ws.aclose()
            # While the owner is away: their leave, three edits, a REST change.
            for i in range(3):
                await c.send(edit(f"/offline-{i}.txt"))
            for _ in range(3):
                await c.until("FILE_CHANGE")
            r = await team.server.client.patch(
                f"/api/v1/projects/{team.project_id}",
                json={"description": "while away"},
                headers=team.owner.auth,
            )
            assert r.status_code == 200
            latest = (await c.until("PROJECT_UPDATED"))["seq"]

            async with await team.join(team.owner, f"?since_seq={last_seen}") as back:
                state = await joined(back, team.owner)
                assert state["seq"] == latest
                replay = []
                while (message := await back.recv())["type"] != "RESUMED":
                    replay.append(message)
                assert [m["seq"] for m in replay] == list(range(last_seen + 1, latest + 1))
                assert [m["type"] for m in replay] == [
                    "USER_LEAVE",
                    "FILE_CHANGE",
                    "FILE_CHANGE",
                    "FILE_CHANGE",
                    "PROJECT_UPDATED",
                ]
                assert message == {
                    "type": "RESUMED",
                    "since_seq": last_seen,
                    "seq": latest,
                    "recovered": True,
                    "replayed": 5,
                }
                live = await back.recv()
                assert (live["type"], live["seq"]) == ("USER_JOIN", latest + 1)


async def test_resume_by_auth_frame_for_browsers(main_team: Team) -> None:
    team = main_team
    async with connect(team.url()) as browser:
        await browser.send({"type": "AUTH", "token": team.owner.token, "since_seq": 0})
        state = await joined(browser, team.owner)
        replay = []
        while (message := await browser.recv())["type"] != "RESUMED":
            replay.append(message)
        assert message["recovered"] is True
        assert [m["seq"] for m in replay] == list(range(1, state["seq"] + 1))
        assert replay[0]["type"] == "PROJECT_CREATED"


async def test_resume_from_too_old_a_seq_says_not_recovered(start_server: StartServer) -> None:
    async with start_server(RESUME_MAX_EVENTS=2) as server:
        team = await make_team(server, "main")
        # The project already has PROJECT_CREATED and two MEMBER_ADDED events (seq 1-3).
        async with await team.join(team.owner, "?since_seq=0") as c:
            state = await joined(c, team.owner)
            resumed = await c.recv()
            assert resumed == {
                "type": "RESUMED",
                "since_seq": 0,
                "seq": state["seq"],
                "recovered": False,
                "replayed": 0,
            }
            assert (await c.recv())["type"] == "USER_JOIN"


# -- refusals ---------------------------------------------------------------------------


def expired_token(member: Member) -> str:
    now = int(time.time())
    claims = jwt.decode(member.token, options={"verify_signature": False})
    claims.update(iat=now - 600, exp=now - 60)
    return jwt.encode(claims, SECRET, algorithm="HS256")


@pytest.mark.parametrize("path", ["/ws", "/ws/", "/nope/x", "/ws/a/b/c", "/ws//x"])
async def test_unknown_websocket_paths_are_refused_with_404(team: Team, path: str) -> None:
    # A raw upgrade request: trio-websocket's client leaks its socket when refused.
    port = team.server.bound.port if team.transport == "main" else team.server.bound.ws_port
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        request = (
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            f"Sec-WebSocket-Version: 13\r\nAuthorization: Bearer {team.owner.token}\r\n\r\n"
        )
        await stream.send_all(request.encode())
        response = b""
        with trio.fail_after(10):
            while b"\r\n\r\n" not in response:
                response += await stream.receive_some()
    assert response.startswith(b"HTTP/1.1 404 ")


@pytest.mark.parametrize(
    ("case", "code", "reason"),
    [
        ("no_token_first_frame_not_auth", 4001, "auth_required"),
        ("garbage_token", 4001, "token_malformed"),
        ("expired_token", 4001, "token_expired"),
        ("refresh_token", 4001, "token_wrong_type"),
        ("non_member", 4004, "project_not_found"),
        ("unknown_project", 4004, "project_not_found"),
        ("bad_project_id", 4004, "project_not_found"),
        ("wrong_user_in_path", 4003, "user_mismatch"),
        ("bad_origin", 4003, "origin_not_allowed"),
        ("bad_since_seq", 4000, "invalid_since_seq"),
        ("huge_since_seq", 4000, "invalid_since_seq"),
    ],
)
async def test_refusals_have_distinct_close_codes(
    team: Team, case: str, code: int, reason: str
) -> None:
    url, token, origin = team.url(), team.owner.token, None
    first_frame: dict[str, Any] | None = None
    if case == "no_token_first_frame_not_auth":
        token, first_frame = None, {"type": "PING"}
    elif case == "garbage_token":
        token = "garbage"
    elif case == "expired_token":
        token = expired_token(team.owner)
    elif case == "refresh_token":
        r = await team.server.client.post(
            "/api/v1/auth/login", json={"email": team.owner.email, "password": "correct horse"}
        )
        token = r.json()["refresh_token"]
    elif case == "non_member":
        token = team.outsider.token
    elif case == "unknown_project":
        url = team.url(project=str(uuid.uuid4()))
    elif case == "bad_project_id":
        url = team.url(project="not-a-uuid")
    elif case == "wrong_user_in_path":
        url = team.url(user=team.collaborator.user_id)
    elif case == "bad_origin":
        origin = "https://evil.example.com"
    elif case == "bad_since_seq":
        url = team.url("?since_seq=-4")
    elif case == "huge_since_seq":  # past 64 bits: it crashed the workspace on its reply
        url = team.url("?since_seq=99999999999999999999")
    async with connect(url, token, origin=origin) as client:
        if first_frame is not None:
            await client.send(first_frame)
        assert await client.closed() == (code, reason)


async def test_seed_url_with_matching_user_id_and_allowed_origin(team: Team) -> None:
    url = team.url(user=team.owner.user_id)
    async with connect(url, team.owner.token, origin="http://localhost:3000") as client:
        assert (await client.recv())["type"] == "PRESENCE_STATE"


async def settle_then_jump(clock: trio.testing.MockClock, seconds: float) -> None:
    """Let every task (the server's included) reach its wait, then move time."""
    await trio.testing.wait_all_tasks_blocked()
    clock.jump(seconds)


async def test_auth_frame_must_come_in_time(
    start_server: StartServer, mock_clock: trio.testing.MockClock
) -> None:
    async with start_server(WS_AUTH_TIMEOUT_SECONDS=5) as server:
        team = await make_team(server, "main")
        async with connect(team.url()) as client:
            await settle_then_jump(mock_clock, 4.9)
            await settle_then_jump(mock_clock, 0.1)
            assert await client.closed() == (4002, "auth_timeout")


# -- bad input and limits -----------------------------------------------------------------


async def test_bad_frames_get_error_frames_and_the_connection_stays(team: Team) -> None:
    async with session(team, team.collaborator) as c:
        cases = [
            ("{not json", "malformed_json"),
            ("[1, 2]", "invalid_frame"),
            ({"no": "type"}, "missing_field"),
            ({"type": "DANCE"}, "unknown_type"),
            ({"type": "FILE_CHANGE", "changes": {}}, "missing_field"),
            ({"type": "FILE_CHANGE", "file_path": "", "changes": {}}, "invalid_field"),
            (
                {"type": "FILE_CHANGE", "file_path": "/a", "changes": {"lines_added": -1}},
                "invalid_field",
            ),
            ({"type": "CURSOR_UPDATE", "position": {"file": "/a", "line": 1}}, "missing_field"),
            (
                {"type": "CURSOR_UPDATE", "position": {"file": "/a", "line": "x", "column": 1}},
                "invalid_field",
            ),
            ({"type": "AUTH"}, "missing_field"),
            ({"type": "AUTH", "token": "t", "since_seq": 2**64 - 1}, "invalid_field"),
            (
                {"type": "CURSOR_UPDATE", "position": {"file": "/a", "line": 2**63, "column": 1}},
                "invalid_field",
            ),
            # What the log (PostgreSQL) or the broadcast (orjson) could not take: before
            # these were refused, each crashed the workspace, and a stored one on every
            # replay after.
            ({"type": "FILE_CHANGE", "file_path": "/a\u0000", "changes": {}}, "invalid_field"),
            (
                {"type": "FILE_CHANGE", "file_path": "/a", "changes": {"k": ["\u0000"]}},
                "invalid_field",
            ),
            (
                {"type": "FILE_CHANGE", "file_path": "/a", "changes": {}, "id": "\u0000"},
                "invalid_field",
            ),
            (
                '{"type": "FILE_CHANGE", "file_path": "/a", "changes": {"deep": '
                + "[" * 40
                + "]" * 40
                + "}}",
                "invalid_field",
            ),
            # Past 64 levels a frame is refused as it is read, whatever its type.
            (
                '{"type": "FILE_CHANGE", "file_path": "/a", "changes": {"deep": '
                + "[" * 300
                + "]" * 300
                + "}}",
                "malformed_json",
            ),
        ]
        for frame, code in cases:
            await c.send(frame)
            reply = await c.skip_pings_recv()
            assert (reply["type"], reply["code"]) == ("ERROR", code), frame
        await c.send({"type": "PING"})
        assert (await c.recv())["type"] == "PONG"
        await c.ws.send_message(b'{"type": "PING"}')  # a binary frame is read the same way
        assert (await c.recv())["type"] == "PONG"
        await c.send(edit("/after.txt", note="\\u0000 as text is fine"))
        stored = await c.until("FILE_CHANGE")
        assert stored["changes"]["note"] == "\\u0000 as text is fine"


async def test_oversize_frame_closes_with_1009(team: Team) -> None:
    async with await team.join(team.collaborator) as c:
        await joined(c, team.collaborator)
        await c.send(edit("/big.txt", blob="x" * 70_000))
        code, _ = await c.closed()
        assert code == 1009


async def test_message_rate_limit_errors_then_closes(start_server: StartServer) -> None:
    async with start_server(WS_RATE_LIMIT_PER_SECOND=1) as server:
        team = await make_team(server, "main")
        async with session(team, team.owner) as c:
            for _ in range(3):  # burst is twice the rate
                await c.send({"type": "PING"})
            replies = [await c.recv() for _ in range(3)]
            assert [r["type"] for r in replies] == ["PONG", "PONG", "ERROR"]
            assert replies[2]["code"] == "rate_limited"
            try:
                for _ in range(40):
                    await c.send({"type": "PING"})
            except ConnectionClosed:
                pass  # closed while we were still sending: what closed() reports below
            assert await c.closed() == (4010, "rate_limited")


@pytest.mark.parametrize("transport", ["main", "listener"])
async def test_slow_client_is_closed_while_a_fast_one_keeps_up(
    start_server: StartServer, transport: str
) -> None:
    async with start_server(WS_SEND_QUEUE=16, WS_RATE_LIMIT_PER_SECOND=100_000) as server:
        team = await make_team(server, transport)
        big = "y" * 15_000
        async with (
            session(team, team.owner) as fast,
            connect(team.url(), team.viewer.token, queue=1) as slow,
        ):
            # The slow client never reads: its socket buffers fill, then its queue.
            async with session(team, team.collaborator) as sender:
                total = 600
                # The sender stays at most 8 edits ahead of the fast client (its queue holds
                # 16), so only the client that stopped reading can fall behind.
                edits = (edit(f"/f{i}", blob=big) for i in range(total))
                async with open_sending_ahead(sender, edits, ahead=8) as read_one:
                    paths, left = [], []
                    while len(paths) < total:
                        message = await fast.recv()
                        if message["type"] == "FILE_CHANGE":
                            paths.append(message["file_path"])
                            read_one()
                        elif message["type"] == "USER_LEAVE":
                            left.append(message["user_id"])
                assert paths == [f"/f{i}" for i in range(total)]
                # Out of presence at once, while its socket is still open and unread.
                assert left == [team.viewer.user_id]
            closed = await slow.closed()
            # The close frame queues behind the frames the client never read. hypercorn
            # buffers it; the listener waits up to 2 s for the client to take it, then drops
            # the TCP connection, which the client sees as an abnormal closure (1006).
            assert closed == (4008, "slow_consumer") or (
                transport == "listener" and closed[0] == 1006
            )


async def test_batching_puts_pending_messages_in_one_frame(main_team: Team) -> None:
    team = main_team
    async with await team.join(team.owner, "?batch=1") as batched:
        first = orjson.loads(await batched.ws.get_message())
        assert isinstance(first, list) and first[0]["type"] == "PRESENCE_STATE"


# -- heartbeats and token expiry (MockClock: time moves only when the test says) ----------


async def test_client_that_stops_answering_pings_is_dropped(
    start_server: StartServer, mock_clock: trio.testing.MockClock
) -> None:
    async with start_server(
        WS_HEARTBEAT_INTERVAL_SECONDS=25, WS_HEARTBEAT_TIMEOUT_SECONDS=60
    ) as server:
        team = await make_team(server, "main")
        async with session(team, team.owner) as watcher, session(team, team.collaborator) as silent:
            await watcher.until("USER_JOIN")  # the silent one's
            for _ in range(2):
                await settle_then_jump(mock_clock, 25)
                assert (await silent.recv())["type"] == "PING"
                assert (await watcher.recv())["type"] == "PING"
                await watcher.send({"type": "PONG"})
            await settle_then_jump(mock_clock, 25)  # 75 s without a word from the silent client
            assert await silent.closed() == (4009, "heartbeat_timeout")
            left = await watcher.skip_pings_recv()
            assert (left["type"], left["user_id"]) == ("USER_LEAVE", team.collaborator.user_id)


async def test_expiring_token_must_be_renewed_over_the_socket(
    start_server: StartServer, mock_clock: trio.testing.MockClock
) -> None:
    async with start_server(
        ACCESS_TOKEN_EXPIRE_MINUTES=2,
        WS_HEARTBEAT_INTERVAL_SECONDS=10_000,
        WS_HEARTBEAT_TIMEOUT_SECONDS=20_000,
    ) as server:
        team = await make_team(server, "main")
        async with session(team, team.owner) as c:
            await settle_then_jump(mock_clock, 61)  # one minute before expiry
            warning = await c.recv()
            assert warning["type"] == "TOKEN_EXPIRING"
            r = await server.client.post(
                "/api/v1/auth/login", json={"email": team.owner.email, "password": "correct horse"}
            )
            await c.send({"type": "AUTH", "token": r.json()["access_token"]})
            ok = await c.recv()
            assert ok["type"] == "AUTH_OK" and ok["user_id"] == team.owner.user_id
            # t=61 now. The new token expires at about t=181: warned at 121, closed at 211.
            await settle_then_jump(mock_clock, 58)
            await c.send({"type": "PING"})
            assert (await c.recv())["type"] == "PONG"
            await settle_then_jump(mock_clock, 3)
            assert (await c.recv())["type"] == "TOKEN_EXPIRING"
            await settle_then_jump(mock_clock, 30)  # past the first token's grace (150)
            await c.send({"type": "PING"})
            assert (await c.recv())["type"] == "PONG"
            await settle_then_jump(mock_clock, 60)
            assert await c.closed() == (4007, "token_expired")


async def wait_for_a_lock_waiter(connection: asyncpg.Connection) -> None:
    """Return once some backend of this database waits for a row lock.

    Polled in real time (a thread sleeps): the MockClock of the test stands still, and
    ``wait_all_tasks_blocked`` cannot tell a task waiting on PostgreSQL from an idle one.
    """
    query = (
        "SELECT count(*) FROM pg_stat_activity"
        " WHERE wait_event_type = 'Lock' AND datname = current_database()"
    )
    for _ in range(1000):
        if await trio_asyncio.aio_as_trio(connection.fetchval)(query):
            return
        await trio.to_thread.run_sync(time.sleep, 0.01)
    raise AssertionError("nothing waited for the lock within 10 s")


async def test_a_join_that_times_out_leaves_no_one_behind(
    start_server: StartServer, mock_clock: trio.testing.MockClock, database_url: str
) -> None:
    """The workspace is stuck (its project row is locked) while a client joins: the client
    is refused with 1012 once the join times out, and when the workspace gets to that
    join after all, it takes the connection out again: no ghost in presence."""
    async with start_server() as server:
        team = await make_team(server, "main")
        lock = await trio_asyncio.aio_as_trio(asyncpg.connect)(database_url)
        try:
            await trio_asyncio.aio_as_trio(lock.execute)("BEGIN")
            await trio_asyncio.aio_as_trio(lock.execute)(
                "SELECT 1 FROM projects WHERE id = $1 FOR UPDATE", uuid.UUID(team.project_id)
            )
            async with connect(team.url(), team.owner.token) as stuck:
                # The join writes USER_JOIN, which waits for the lock; the ask times out.
                await wait_for_a_lock_waiter(lock)
                await settle_then_jump(mock_clock, 11)
                assert await stuck.closed() == (1012, "workspace_restarting")
            async with connect(team.url(), team.collaborator.token) as c:
                await trio_asyncio.aio_as_trio(lock.execute)("ROLLBACK")
                state = await joined(c, team.collaborator)
                assert state["users"] == []  # the owner's connection was taken out
                await c.until("USER_JOIN")
                r = await server.client.get(
                    f"/api/v1/projects/{team.project_id}/events", headers=team.owner.auth
                )
        finally:
            await trio_asyncio.aio_as_trio(lock.close)()
    # The owner's late join and its leave are in the log, then the collaborator's join.
    log = [(e["type"], e["actor_id"]) for e in r.json()["events"]][-3:]
    assert log == [
        ("USER_JOIN", team.owner.user_id),
        ("USER_LEAVE", team.owner.user_id),
        ("USER_JOIN", team.collaborator.user_id),
    ]


# -- crash ------------------------------------------------------------------------------


async def test_workspace_crash_loses_and_duplicates_nothing(main_team: Team, db: Database) -> None:
    """The actor crashes mid-stream: clients are closed with 1012, reconnect and resume;
    the sender resends what was not acknowledged. Every edit is stored and seen once."""
    team = main_team
    total = 30
    acked: set[str] = set()
    received: list[dict[str, Any]] = []
    not_log = {"PRESENCE_STATE", "RESUMED", "ACK"}  # carry a seq but are not log events
    closes: list[int] = []

    async def receiver_session(since: int | None) -> int | None:
        query = "" if since is None else f"?since_seq={since}"
        last = since
        async with await team.join(team.viewer, query) as r:
            try:
                while len(received) < total:
                    message = await r.recv()
                    if message["type"] == "RESUMED":
                        assert message["recovered"] is True
                    if "seq" in message and message["type"] not in not_log:
                        assert last is None or message["seq"] == last + 1, (last, message)
                        last = message["seq"]
                        if message["type"] == "FILE_CHANGE":
                            received.append(message)
            except ConnectionClosed as closed:
                assert closed.reason is not None
                closes.append(closed.reason.code)
                await r.release()
        return last

    async def receive_until_done() -> None:
        since: int | None = 0  # from the start of the log: nothing can slip past
        while len(received) < total:
            since = await receiver_session(since)

    async def sender_session(crash: bool) -> None:
        async with await team.join(team.collaborator) as s:
            await joined(s, team.collaborator)
            try:
                todo = [i for i in range(total) if f"e{i}" not in acked]
                for n, i in enumerate(todo):
                    await s.send(edit(f"/crash/{i}", client_id=f"e{i}"))
                    if crash and n == 9:
                        # Ten edits confirmed, the rest still to come: crash now.
                        while len(acked) < 10:
                            if (message := await s.recv())["type"] == "ACK":
                                acked.add(message["id"])
                        actor = await team.server.workspace_actor(team.project_id)
                        await crash_workspace(actor)
                while len(acked) < total:
                    if (message := await s.recv())["type"] == "ACK":
                        acked.add(message["id"])
            except ConnectionClosed as closed:
                assert closed.reason is not None
                closes.append(closed.reason.code)
                await s.release()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(receive_until_done)
        await sender_session(crash=True)
        while len(acked) < total:
            await sender_session(crash=False)

    assert 1012 in closes
    assert sorted(m["file_path"] for m in received) == sorted(f"/crash/{i}" for i in range(total))
    assert len({m["seq"] for m in received}) == total
    count = await db.fetchval("SELECT count(*) FROM project_events WHERE type = 'FILE_CHANGE'")
    assert count == total
    root = team.server.bound.supervisor
    assert root is not None
    workspaces = root.child("workspaces").value
    child = workspaces.child(f"workspace:{team.project_id}")
    assert child.restart_count == 1
    assert child.last_failure is not None and child.last_failure.type == "InjectedFault"
