"""Failure domains: a connection or a request that fails ends alone, and is counted.

Issue 9's reproductions, run against the real server: a hostile frame, an unexpected
exception inside a session, deep JSON bodies, a non-ASCII operator token and a refused
oversize body each end that one unit cleanly while every other client keeps being served
and no shared child of the supervision tree restarts.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest
import trio
from conftest import Running, StartServer
from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable, ASGISendEvent, Scope
from test_workspace import Team, edit, file_changes, make_team, session
from wsclient import connect

import atrium.domain.realtime
import atrium.domain.workspaces
import atrium.http.hot
from atrium.http.edge import Edge

ADMIN_TOKEN = "operator-token-0123456789"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
SHARED = ("database", "http", "ws_listener", "workspaces")
# Issue 9: one unauthenticated 2 KB frame crashed the listener (RecursionError).
HOSTILE_FRAME = '{"type":' + "[" * 1000 + "]" * 1000 + "}"


async def operator_view(server: Running) -> dict[str, Any]:
    r = await server.client.get("/health/supervisor", headers=ADMIN)
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


async def restarts(server: Running) -> dict[str, int]:
    tree = (await operator_view(server))["supervisor"]
    return {c["name"]: c["restart_count"] for c in tree["children"] if c["name"] in SHARED}


async def contained(server: Running) -> dict[str, int]:
    counts: dict[str, int] = (await operator_view(server))["contained_failures"]
    return counts


async def still_served(team: Team, path: str) -> None:
    """A fresh authenticated join on the same transport stores and broadcasts an edit."""
    async with session(team, team.owner) as client:
        # A client id of its own: a resent id is deduplicated, not broadcast again.
        await client.send(edit(path, client_id=path))
        assert (await file_changes(client, 1))[0]["file_path"] == path
        assert (await client.until("ACK"))["id"] == path


@pytest.mark.parametrize("transport", ["main", "listener"])
async def test_hostile_first_frame_ends_only_that_connection(
    start_server: StartServer, transport: str
) -> None:
    async with start_server(ADMIN_TOKEN=ADMIN_TOKEN) as server:
        team = await make_team(server, transport)
        async with session(team, team.collaborator) as bystander:
            for _ in range(8):  # more than the root's restart intensity (5 in 60 s)
                url = team.url(project=str(uuid.uuid4()))
                async with connect(url) as attacker:
                    await attacker.send(HOSTILE_FRAME)
                    assert await attacker.closed() == (4001, "auth_required")
            # The bystander on the same listener was never dropped.
            await bystander.send(edit("/still-here.txt"))
            changed = await file_changes(bystander, 1)
            assert changed[0]["file_path"] == "/still-here.txt"
        assert await restarts(server) == dict.fromkeys(SHARED, 0)
        assert await contained(server) == {"connection": 0, "request": 0}


@pytest.mark.parametrize("transport", ["main", "listener"])
async def test_hostile_frame_after_join_is_an_error_frame(
    start_server: StartServer, transport: str
) -> None:
    async with start_server(ADMIN_TOKEN=ADMIN_TOKEN) as server:
        team = await make_team(server, transport)
        async with session(team, team.owner) as client:
            await client.send(HOSTILE_FRAME)
            error = await client.until("ERROR")
            assert error["code"] == "malformed_json"
            await client.send({"type": "PING"})
            assert (await client.until("PONG"))["type"] == "PONG"
        assert await restarts(server) == dict.fromkeys(SHARED, 0)


@pytest.mark.parametrize("transport", ["main", "listener"])
async def test_unexpected_exception_closes_only_that_connection_with_1011(
    start_server: StartServer, transport: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with start_server(ADMIN_TOKEN=ADMIN_TOKEN) as server:
        team = await make_team(server, transport)
        async with session(team, team.collaborator) as bystander:
            # While opening (the database refusing, say): a bare exception.
            async def refused(*args: object) -> None:
                raise ConnectionRefusedError("the database went away")

            with monkeypatch.context() as patch:
                patch.setattr(atrium.domain.realtime.projects, "session_member_role", refused)
                for _ in range(7):
                    async with connect(team.url(), team.owner.token) as failing:
                        assert await failing.closed() == (1011, "internal_error")
            assert (await contained(server))["connection"] == 7

            # While running, inside the connection's nursery: an exception group.
            parse = atrium.domain.realtime.protocol.parse_client_frame

            def explode(raw: str | bytes) -> object:
                if "boom" in str(raw):
                    raise RuntimeError("a bug in frame handling")
                return parse(raw)

            async with session(team, team.owner) as failing:
                monkeypatch.setattr(atrium.domain.realtime.protocol, "parse_client_frame", explode)
                await failing.send({"type": "boom"})
                assert await failing.closed() == (1011, "internal_error")
            monkeypatch.undo()
            assert await contained(server) == {"connection": 8, "request": 0}

            await bystander.send(edit("/after.txt"))
            assert (await file_changes(bystander, 1))[0]["file_path"] == "/after.txt"
        assert await restarts(server) == dict.fromkeys(SHARED, 0)
        await still_served(team, "/fresh.txt")


async def test_failures_are_logged_once_with_context(
    start_server: StartServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async with start_server(ADMIN_TOKEN=ADMIN_TOKEN) as server:
        team = await make_team(server, "listener")

        async def refused(*args: object) -> None:
            raise ConnectionRefusedError("the database went away")

        monkeypatch.setattr(atrium.domain.realtime.projects, "session_member_role", refused)
        async with connect(team.url(), team.owner.token) as failing:
            assert await failing.closed() == (1011, "internal_error")
        records = [r for r in caplog.records if r.name == "atrium.failures"]
        assert len(records) == 1
        message = records[0].getMessage()
        assert "transport=listener" in message and team.project_id in message
        assert "ConnectionRefusedError" in message
        assert records[0].exc_info is not None


# A Quart view, and a route answered past Quart (atrium/http/hot.py): the same boundary.
BROKEN_ROUTES = {
    "quart": (atrium.domain.workspaces.event_log, "last_seq", "/{project}/workspace/status"),
    "hot": (atrium.http.hot, "list_page", "/"),
}


@pytest.mark.parametrize("route", list(BROKEN_ROUTES))
async def test_unexpected_exception_in_a_request_is_a_counted_500(
    start_server: StartServer, monkeypatch: pytest.MonkeyPatch, route: str
) -> None:
    module, name, path = BROKEN_ROUTES[route]
    async with start_server(ADMIN_TOKEN=ADMIN_TOKEN) as server:
        team = await make_team(server, "main")

        async def broken(*args: object) -> int:
            raise RuntimeError("a bug in a handler")

        monkeypatch.setattr(module, name, broken)
        url = "/api/v1/projects" + path.format(project=team.project_id)
        r = await server.client.get(url, headers=team.owner.auth)
        assert r.status_code == 500
        assert r.json() == {
            "error": {"code": "internal_error", "message": "Something went wrong on our side"}
        }
        assert r.headers["x-request-id"] and r.headers["x-content-type-options"] == "nosniff"
        assert await contained(server) == {"connection": 0, "request": 1}
        assert await restarts(server) == dict.fromkeys(SHARED, 0)
        r = await server.client.get("/api/v1/auth/me", headers=team.owner.auth)
        assert r.status_code == 200  # the next request is served


async def test_edge_contains_what_escapes_the_app() -> None:
    async def crashing(scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        raise RuntimeError("escaped the framework")

    edge = Edge(crashing, production=False, allowed_origins=("*",))  # type: ignore[arg-type]
    sent: list[ASGISendEvent] = []

    async def send(message: ASGISendEvent) -> None:
        sent.append(message)

    async def receive() -> Any:
        return {"type": "http.request", "body": b"", "more_body": False}

    scope: Any = {"type": "http", "path": "/api/v1/x", "method": "GET", "headers": []}
    await edge(scope, receive, send)
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 500
    assert sent[1]["body"] == (  # type: ignore[typeddict-item]
        b'{"error":{"code":"internal_error","message":"Something went wrong on our side"}}'
    )
    assert edge.failures.counts() == {"connection": 0, "request": 1}

    async def cancelled(scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        raise KeyboardInterrupt

    edge = Edge(cancelled, production=False, allowed_origins=("*",))  # type: ignore[arg-type]
    with pytest.raises(KeyboardInterrupt):
        await edge(scope, receive, send)


# -- HTTP bodies and headers --------------------------------------------------------------


async def test_deep_json_bodies_are_400_not_500(server: Running) -> None:
    token = (await server.signup_login("deep@example.com"))["access_token"]
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {token}"}
    for depth in (65, 200, 1000, 1023, 5000):
        inner = "[" * depth + "]" * depth
        for body in (inner, '{"email": ' + inner + ', "password": "x"}'):
            for path in ("/api/v1/auth/login", "/api/v1/auth/signup", "/api/v1/projects/"):
                r = await server.client.post(path, content=body, headers=headers)
                assert r.status_code == 400, (path, depth, r.text)
                assert r.json()["error"]["code"] == "malformed_json"


async def test_non_ascii_operator_token_is_401(start_server: StartServer) -> None:
    async with start_server(ADMIN_TOKEN=ADMIN_TOKEN) as server:
        for token in ("é", "operator-token-012345678é", "\u2603" * 40):
            r = await server.client.get(
                "/health/supervisor", headers={"Authorization": f"Bearer {token}".encode()}
            )
            assert r.status_code == 401, r.text
            assert r.json()["error"]["code"] == "operator_token_required"
        assert (await operator_view(server))["contained_failures"]["request"] == 0


async def test_413_closes_the_connection(start_server: StartServer) -> None:
    async with start_server(MAX_BODY_BYTES=2048) as server:
        head = (
            b"POST /api/v1/auth/login HTTP/1.1\r\nHost: test\r\n"
            b"Content-Type: application/json\r\nContent-Length: 200000\r\n\r\n"
        )
        with trio.fail_after(5):
            stream = await trio.open_tcp_stream(server.bound.host, server.bound.port)
            # Part of the body only: what a client sends before it sees the early answer.
            await stream.send_all(head + b"x" * 4096)
            answer = b""
            while chunk := await stream.receive_some(65536):  # until the server closes
                answer += chunk
            await stream.aclose()
        status, _, rest = answer.partition(b"\r\n")
        assert status.startswith(b"HTTP/1.1 413")
        assert b"\r\nconnection: close\r\n" in rest.lower()
        assert rest.endswith(b'"payload_too_large","message":' + rest.split(b'"message":')[1])
        with trio.fail_after(5):
            r = await server.client.get("/ready")
        assert r.status_code == 200


HANDSHAKE = (
    b"GET /ws/%s HTTP/1.1\r\nHost: test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


async def test_hostile_bytes_on_the_wire_never_restart_a_server(start_server: StartServer) -> None:
    async with start_server(ADMIN_TOKEN=ADMIN_TOKEN) as server:
        team = await make_team(server, "main")
        upgrade = HANDSHAKE % team.project_id.encode()
        payloads = [
            bytes(range(256)) * 2,
            b"GET /ws/x HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\r\n",
            b"\x00" * 100 + b"\r\n\r\n",
            HANDSHAKE % b"%ff%fe",
            # Frames pipelined behind the upgrade, before the 101: on the main port this
            # took hypercorn's h11 into an error that ended the whole HTTP server.
            upgrade + b"\x81\x05hello",
            upgrade + b"\x8f\x80abcd",  # unknown opcode
            upgrade + b"\x81\xfe\xff\xffabcd" + b"x" * 100,  # truncated, oversized
            upgrade + b"\x01\x80abcd\x81\x80abcd",  # a data frame inside a fragmented one
            upgrade + b"\x81\x83abcd\xff\xfe\xfd",  # text that is not UTF-8
        ]

        async def send(port: int, payload: bytes) -> None:
            stream = await trio.open_tcp_stream(server.bound.host, port)
            # What the server answers matters less than what it survives: stop reading
            # after a while (the listener waits out AUTH_TIMEOUT on some of these).
            with trio.move_on_after(1):
                try:
                    await stream.send_all(payload)
                    while await stream.receive_some(65536):
                        pass  # until the server closes it
                except trio.BrokenResourceError:
                    pass  # reset: closed without reading everything
            await stream.aclose()

        async with trio.open_nursery() as nursery:
            for port in (server.bound.port, server.bound.ws_port):
                for payload in payloads:
                    assert port is not None
                    nursery.start_soon(send, port, payload)
        assert await restarts(server) == dict.fromkeys(SHARED, 0)
        await still_served(team, "/after-bytes.txt")
        team.transport = "listener"
        await still_served(team, "/after-bytes-listener.txt")
