"""Revocation reaches live sockets: a logout or a refresh-token reuse closes that login
session's WebSockets at once (4001 session_revoked), on both transports; other sessions of
the same user stay open."""

from __future__ import annotations

import uuid
from typing import Any

from test_workspace import Member, Team, edit, joined, session, team
from trio_websocket import ConnectionClosed
from wsclient import Client, connect

from atrium.persistence.database import Database

__all__ = ["team"]  # fixtures of test_workspace


async def login(team: Team, member: Member) -> dict[str, Any]:
    """A new login session of ``member``: its tokens (``access_token``, ``refresh_token``)."""
    r = await team.server.client.post(
        "/api/v1/auth/login", json={"email": member.email, "password": "correct horse"}
    )
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


async def still_open(client: Client) -> None:
    await client.send({"type": "PING"})
    assert (await client.skip_pings_recv())["type"] == "PONG"


async def acked(client: Client, client_id: str) -> dict[str, Any]:
    while (message := await client.recv())["type"] != "ACK" or message["id"] != client_id:
        pass
    return message


async def test_logout_closes_the_sessions_sockets_and_stores_nothing_more(
    team: Team, db: Database
) -> None:
    owner = team.owner
    other_login = Member(owner.email, owner.user_id, (await login(team, owner))["access_token"])
    async with (
        session(team, team.collaborator) as watcher,
        session(team, owner) as revoked,
        connect(team.url(), other_login.token) as other_tab,
    ):
        await joined(other_tab, other_login)
        r = await team.server.client.post("/api/v1/auth/logout", headers=owner.auth)
        assert r.status_code == 200
        try:
            await revoked.send(edit("/after-logout.txt", client_id="late"))
        except ConnectionClosed:
            pass  # already closed: what closed() reports below
        assert await revoked.closed() == (4001, "session_revoked")
        # The same user's other login is untouched; an edit through the workspace after the
        # revoked one's shows that one never reached the log.
        await still_open(other_tab)
        await watcher.send(edit("/probe.txt", client_id="probe"))
        await acked(watcher, "probe")
    paths = await db.fetch(
        "SELECT payload->>'file_path' AS path FROM project_events"
        " WHERE project_id = $1 AND type = 'FILE_CHANGE'",
        uuid.UUID(team.project_id),
    )
    assert [row["path"] for row in paths] == ["/probe.txt"]


async def test_refresh_token_reuse_closes_every_socket_of_that_session(team: Team) -> None:
    owner = team.owner
    stolen = await login(team, owner)
    thief = Member(owner.email, owner.user_id, stolen["access_token"])
    second = Member(owner.email, owner.user_id, (await login(team, owner))["access_token"])
    async with (
        session(team, thief) as first_tab,
        connect(team.url(), thief.token) as second_tab,
        connect(team.url(), second.token) as unrelated,
    ):
        await joined(second_tab, thief)
        await joined(unrelated, second)
        client = team.server.client
        r = await client.post(
            "/api/v1/auth/refresh", json={"refresh_token": stolen["refresh_token"]}
        )
        assert r.status_code == 200
        r = await client.post(
            "/api/v1/auth/refresh", json={"refresh_token": stolen["refresh_token"]}
        )
        assert (r.status_code, r.json()["error"]["code"]) == (401, "refresh_token_reused")
        assert await first_tab.closed() == (4001, "session_revoked")
        assert await second_tab.closed() == (4001, "session_revoked")
        await still_open(unrelated)


async def test_a_renewed_socket_is_revoked_with_its_new_session(team: Team) -> None:
    """A connection that renewed its token over the socket with another login's token
    belongs to that login now: revoking the first no longer reaches it, the second does."""
    owner = team.owner
    newer = await login(team, owner)
    async with session(team, owner) as c:
        await c.send({"type": "AUTH", "token": newer["access_token"]})
        assert (await c.skip_pings_recv())["type"] == "AUTH_OK"
        r = await team.server.client.post("/api/v1/auth/logout", headers=owner.auth)
        assert r.status_code == 200
        await still_open(c)
        r = await team.server.client.post(
            "/api/v1/auth/logout", headers={"Authorization": f"Bearer {newer['access_token']}"}
        )
        assert r.status_code == 200
        assert await c.closed() == (4001, "session_revoked")
