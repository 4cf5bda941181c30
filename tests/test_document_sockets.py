"""Live document sockets end to end, with Python clients speaking y-websocket's messages:
the ticket endpoint, and every way a ticket or a connection is refused or ended, on both
transports. (Real Yjs clients in Node: tests/test_documents_node.py.)"""

from __future__ import annotations

import time
import uuid

import pycrdt
import pytest
import trio
from conftest import FakeClock, StartServer
from test_workspace import Member, Team, main_team, make_team, team
from trio_websocket import ConnectionClosed
from wsclient import Client, connect

from atrium.domain.document_sessions import DocumentHandshake
from atrium.identity.tickets import TicketCodec
from atrium.persistence.database import Database
from atrium.realtime import yjs

CAP = 10.0

__all__ = ["main_team", "team"]  # fixtures of test_workspace


async def get_ticket(team: Team, member: Member, path: str = "/src/app.py") -> dict[str, str]:
    r = await team.server.client.post(
        f"/api/v1/projects/{team.project_id}/documents/tickets",
        json={"path": path},
        headers=member.auth,
    )
    assert r.status_code == 200, r.text
    return dict(r.json())


def doc_url(team: Team, room: str, ticket: str | None) -> str:
    bound = team.server.bound
    port = bound.port if team.transport == "main" else bound.ws_port
    query = "" if ticket is None else f"?ticket={ticket}"
    return f"ws://127.0.0.1:{port}/ws/documents/{room}{query}"


def codec(team: Team) -> TicketCodec:
    assert team.server.bound.services is not None
    return team.server.bound.services.value.document_sessions.tickets


async def refused(url: str) -> tuple[int, str]:
    async with connect(url) as client:
        return await client.closed()


async def first_message(client: Client) -> yjs.YMessage:
    with trio.fail_after(CAP):
        raw = await client.ws.get_message()
    assert isinstance(raw, bytes)
    return yjs.parse_message(raw)


async def test_a_member_gets_a_ticket_for_a_path(main_team: Team) -> None:
    team = main_team
    owner = await get_ticket(team, team.owner)
    assert owner["url"] == f"ws://127.0.0.1:{team.server.bound.port}/ws/documents"
    assert owner["expires_in"] == 60
    assert len(owner["room"]) == 32 and int(owner["room"], 16) >= 0
    # The same path is the same document, for every member (a viewer too).
    viewer = await get_ticket(team, team.viewer)
    assert viewer["room"] == owner["room"] and viewer["ticket"] != owner["ticket"]
    other = await get_ticket(team, team.owner, "/src/other.py")
    assert other["room"] != owner["room"]


async def test_ticket_endpoint_refusals(main_team: Team) -> None:
    team = main_team
    client, base = team.server.client, f"/api/v1/projects/{team.project_id}/documents/tickets"
    body = {"path": "/a.txt"}
    r = await client.post(base, json=body, headers=team.outsider.auth)
    assert (r.status_code, r.json()["error"]["code"]) == (404, "project_not_found")
    r = await client.post(base, json=body)
    assert r.status_code == 401
    r = await client.post(
        "/api/v1/projects/nope/documents/tickets", json=body, headers=team.owner.auth
    )
    assert (r.status_code, r.json()["error"]["code"]) == (422, "invalid_id")
    for bad in ({"path": ""}, {"path": "x" * 1025}, {"path": 3}, {}, {"path": "/a", "x": 1}):
        r = await client.post(base, json=bad, headers=team.owner.auth)
        assert r.status_code == 422, (bad, r.text)
    r = await client.post(base, json={"path": "/nul\x00"}, headers=team.owner.auth)
    assert r.status_code == 422
    r = await client.post(
        f"/api/v1/projects/{uuid.uuid4()}/documents/tickets", json=body, headers=team.owner.auth
    )
    assert (r.status_code, r.json()["error"]["code"]) == (404, "project_not_found")


async def test_the_url_follows_a_trusted_proxys_scheme(start_server: StartServer) -> None:
    async with start_server(TRUSTED_PROXIES="127.0.0.1/32") as trusting:
        team = await make_team(trusting, "main")
        path = f"/api/v1/projects/{team.project_id}/documents/tickets"
        headers = {**team.owner.auth, "X-Forwarded-Proto": "https", "Host": "docs.example"}
        r = await trusting.client.post(path, json={"path": "/a"}, headers=headers)
        assert r.json()["url"] == "wss://docs.example/ws/documents"
        async with start_server() as untrusting:  # the same database: the same users
            r = await untrusting.client.post(path, json={"path": "/a"}, headers=headers)
            assert r.json()["url"] == "ws://docs.example/ws/documents"


async def test_a_ticket_opens_its_document(team: Team) -> None:
    issued = await get_ticket(team, team.collaborator)
    async with connect(doc_url(team, issued["room"], issued["ticket"])) as client:
        assert isinstance(await first_message(client), yjs.SyncStep1)
        doc: pycrdt.Doc = pycrdt.Doc()
        text = doc.get("content", type=pycrdt.Text)
        updates: list[bytes] = []
        doc.observe(lambda event: updates.append(event.update))
        text += "hello"
        await client.ws.send_message(yjs.sync_update(updates[0]))
    # Another connection, with the same ticket (a reconnect), finds the text.
    async with connect(doc_url(team, issued["room"], issued["ticket"])) as again:
        await again.ws.send_message(yjs.sync_step1(pycrdt.Doc().get_state()))
        while not isinstance(message := await first_message(again), yjs.SyncStep2):
            pass
        fresh: pycrdt.Doc = pycrdt.Doc()
        fresh.apply_update(message.update)
        assert str(fresh.get("content", type=pycrdt.Text)) == "hello"


async def test_bad_tickets_are_refused_with_their_codes(team: Team) -> None:
    issued = await get_ticket(team, team.collaborator)
    room, ticket = issued["room"], issued["ticket"]
    assert await refused(doc_url(team, room, None)) == (4001, "ticket_missing")
    head, body, signature = ticket.split(".")
    tampered = f"{head}.{body}.{signature[:5]}{'B' if signature[5] == 'A' else 'A'}{signature[6:]}"
    assert await refused(doc_url(team, room, tampered)) == (4001, "ticket_invalid")
    # An access token is not a ticket.
    assert await refused(doc_url(team, room, team.collaborator.token)) == (4001, "ticket_invalid")
    # Expired: signed 61 s ago with the server's own key.
    claims = codec(team).verify(ticket)
    old, _ = codec(team).issue(
        user_id=claims.user_id,
        session_id=claims.session_id,
        project_id=claims.project_id,
        document_id=claims.document_id,
        now=time.time() - 61,
    )
    assert await refused(doc_url(team, room, old)) == (4001, "ticket_expired")
    # A valid ticket for another document (of this or another project) opens only its own.
    other = await get_ticket(team, team.collaborator, "/other.txt")
    assert await refused(doc_url(team, room, other["ticket"])) == (
        4003,
        "ticket_not_for_this_document",
    )
    r = await team.server.client.post(
        "/api/v1/projects/", json={"name": "Mine"}, headers=team.outsider.auth
    )
    mine = Team(
        team.server,
        r.json()["id"],
        team.outsider,
        team.outsider,
        team.outsider,
        team.outsider,
        team.transport,
    )
    elsewhere = await get_ticket(mine, team.outsider)
    assert await refused(doc_url(team, room, elsewhere["ticket"])) == (
        4003,
        "ticket_not_for_this_document",
    )
    assert await refused(doc_url(team, "not-a-room", ticket)) == (
        4003,
        "ticket_not_for_this_document",
    )


async def test_a_removed_member_s_ticket_no_longer_opens(main_team: Team) -> None:
    team = main_team
    issued = await get_ticket(team, team.collaborator)
    url = doc_url(team, issued["room"], issued["ticket"])
    async with connect(url) as client:
        assert isinstance(await first_message(client), yjs.SyncStep1)
        r = await team.server.client.delete(
            f"/api/v1/projects/{team.project_id}/collaborators/{team.collaborator.user_id}",
            headers=team.owner.auth,
        )
        assert r.status_code in (200, 204)
        assert await client.closed() == (4005, "member_removed")
    # Within the ticket's 60 s, yet refused: membership is checked at every connection.
    assert await refused(url) == (4004, "project_not_found")


async def test_logout_closes_document_sockets_and_their_tickets(team: Team) -> None:
    issued = await get_ticket(team, team.owner)
    url = doc_url(team, issued["room"], issued["ticket"])
    async with connect(url) as client:
        assert isinstance(await first_message(client), yjs.SyncStep1)
        r = await team.server.client.post("/api/v1/auth/logout", headers=team.owner.auth)
        assert r.status_code == 200
        assert await client.closed() == (4001, "session_revoked")
    assert await refused(url) == (4001, "session_revoked")


async def test_a_role_change_closes_so_the_reconnect_gets_the_new_role(main_team: Team) -> None:
    team = main_team
    issued = await get_ticket(team, team.collaborator)
    async with connect(doc_url(team, issued["room"], issued["ticket"])) as client:
        assert isinstance(await first_message(client), yjs.SyncStep1)
        r = await team.server.client.patch(
            f"/api/v1/projects/{team.project_id}/collaborators/{team.collaborator.user_id}",
            json={"role": "viewer"},
            headers=team.owner.auth,
        )
        assert r.status_code == 200, r.text
        assert await client.closed() == (4014, "role_changed")


async def test_text_frames_and_oversized_messages_are_refused(main_team: Team) -> None:
    team = main_team
    issued = await get_ticket(team, team.collaborator)
    url = doc_url(team, issued["room"], issued["ticket"])
    async with connect(url) as client:
        await client.ws.send_message("not binary")
        assert await client.closed() == (4000, "binary_frames_only")
    async with connect(url) as client:
        try:
            await client.ws.send_message(b"\x00\x02" + b"x" * 1_100_000)  # DOC_MAX_UPDATE_BYTES
        except ConnectionClosed:
            pass
        code, _ = await client.closed()
        assert code == 1009


async def test_an_update_larger_than_a_workspace_frame_is_taken(team: Team) -> None:
    # 100 KB: over WS_MAX_MESSAGE_BYTES (a workspace frame), under DOC_MAX_UPDATE_BYTES.
    issued = await get_ticket(team, team.collaborator)
    url = doc_url(team, issued["room"], issued["ticket"])
    pasted = "".join(chr(0x61 + i % 26) for i in range(100_000))
    async with connect(url) as client:
        assert isinstance(await first_message(client), yjs.SyncStep1)
        doc: pycrdt.Doc = pycrdt.Doc()
        updates: list[bytes] = []
        doc.observe(lambda event: updates.append(event.update))
        doc.get("content", type=pycrdt.Text).insert(0, pasted)
        await client.ws.send_message(yjs.sync_update(updates[0]))
        assert len(updates[0]) > 65_536
    async with connect(url) as again:
        await again.ws.send_message(yjs.sync_step1(pycrdt.Doc().get_state()))
        while not isinstance(message := await first_message(again), yjs.SyncStep2):
            pass
        fresh: pycrdt.Doc = pycrdt.Doc()
        fresh.apply_update(message.update)
        assert str(fresh.get("content", type=pycrdt.Text)) == pasted


async def test_a_user_over_the_update_rate_is_closed(start_server: StartServer) -> None:
    # The server's clock stands still unless the test moves it: no token refills while
    # the messages go, however slow the machine.
    clock = FakeClock()
    async with start_server(clock=clock, DOC_UPDATES_PER_SECOND="1") as server:
        team = await make_team(server, "main")
        issued = await get_ticket(team, team.collaborator)
        url = doc_url(team, issued["room"], issued["ticket"])
        owners = await get_ticket(team, team.owner)
        step1 = yjs.sync_step1(pycrdt.Doc().get_state())

        async def answered(client: Client) -> None:
            """Send a sync step 1 and wait for its answer (so messages count in order)."""
            await client.ws.send_message(step1)
            while not isinstance(await first_message(client), yjs.SyncStep2):
                pass

        async with (
            connect(url) as one,
            connect(url) as two,
            connect(doc_url(team, owners["room"], owners["ticket"])) as owner,
        ):
            # Two messages of burst, shared by the user's connections: the third is over.
            for client in (one, two):
                await answered(client)
            await one.ws.send_message(step1)
            assert await one.closed() == (4010, "rate_limited")
            # Another user under the rate is not closed: their budget is their own.
            for _ in range(2):
                await answered(owner)
            # A second later the user has one message again (under the rate: answered),
            # and no more.
            clock.advance(1)
            await answered(two)
            await two.ws.send_message(step1)
            assert await two.closed() == (4010, "rate_limited")
            clock.advance(1)
            await answered(owner)


async def test_too_many_connections_counts_document_sockets(start_server: StartServer) -> None:
    async with start_server(WS_MAX_CONNECTIONS_PER_USER="2") as server:
        team = await make_team(server, "main")
        issued = await get_ticket(team, team.collaborator)
        url = doc_url(team, issued["room"], issued["ticket"])
        async with connect(url) as one, connect(url) as two:
            assert isinstance(await first_message(one), yjs.SyncStep1)
            assert isinstance(await first_message(two), yjs.SyncStep1)
            assert await refused(url) == (4011, "too_many_connections")


async def test_an_origin_not_allowed_is_refused(main_team: Team) -> None:
    team = main_team
    issued = await get_ticket(team, team.collaborator)
    async with connect(
        doc_url(team, issued["room"], issued["ticket"]), origin="https://evil.example"
    ) as c:
        assert await c.closed() == (4003, "origin_not_allowed")


async def test_a_removal_this_process_did_not_hear_of_is_found_by_the_recheck(
    start_server: StartServer, db: Database
) -> None:
    # As if another process had removed the member: the row goes, no event reaches here.
    async with start_server(DOC_TICKET_SECONDS="2") as server:
        team = await make_team(server, "main")
        issued = await get_ticket(team, team.collaborator)
        async with connect(doc_url(team, issued["room"], issued["ticket"])) as client:
            assert isinstance(await first_message(client), yjs.SyncStep1)
            await db.execute(
                "DELETE FROM project_members WHERE project_id = $1 AND user_id = $2",
                uuid.UUID(team.project_id),
                uuid.UUID(team.collaborator.user_id),
            )
            assert await client.closed() == (4005, "member_removed")


async def test_an_unexpected_error_ends_that_connection_alone(
    main_team: Team, monkeypatch: pytest.MonkeyPatch
) -> None:
    team = main_team
    issued = await get_ticket(team, team.collaborator)
    services = team.server.bound.services
    assert services is not None
    sessions = services.value.document_sessions
    before = sessions.failures.counts().get("connection", 0)

    async def broken(document_id: uuid.UUID) -> object:
        raise RuntimeError("a bug in the registry")

    monkeypatch.setattr(sessions.documents, "get", broken)
    assert await refused(doc_url(team, issued["room"], issued["ticket"])) == (
        1011,
        "internal_error",
    )
    monkeypatch.undo()
    async with connect(doc_url(team, issued["room"], issued["ticket"])) as client:
        assert isinstance(await first_message(client), yjs.SyncStep1)
    assert sessions.failures.counts().get("connection", 0) == before + 1


async def test_a_deleted_project_closes_its_document_sockets(main_team: Team) -> None:
    team = main_team
    issued = await get_ticket(team, team.collaborator)
    url = doc_url(team, issued["room"], issued["ticket"])
    async with connect(url) as client:
        assert isinstance(await first_message(client), yjs.SyncStep1)
        r = await team.server.client.delete(
            f"/api/v1/projects/{team.project_id}", headers=team.owner.auth
        )
        assert r.status_code in (200, 204)
        assert await client.closed() == (4006, "project_deleted")
    assert await refused(url) == (4004, "project_not_found")
    r = await team.server.client.post(
        f"/api/v1/projects/{team.project_id}/documents/tickets",
        json={"path": "/x"},
        headers=team.owner.auth,
    )
    assert r.status_code == 404


def test_the_document_handshake_is_one_room_and_its_ticket() -> None:
    headers = [(b"Origin", b"https://a.example"), (b"Authorization", b"Bearer x")]
    parsed = DocumentHandshake.parse("/ws/documents/ab12", "ticket=t.k.n&x=1", headers)
    assert parsed == DocumentHandshake("ab12", "t.k.n", {"origin": "https://a.example"})
    assert DocumentHandshake.parse("/ws/documents/ab12", "", []) == DocumentHandshake(
        "ab12", "", {}
    )
    for path in ("/ws/documents/", "/ws/documents/a/b", "/ws/documents", "/ws/" + "a" * 32):
        assert DocumentHandshake.parse(path, "ticket=t", []) is None


async def test_a_slow_reader_on_the_listener_gets_every_frame_in_order(
    start_server: StartServer,
) -> None:
    # On the listener frames go straight to the socket while nothing is queued: once the
    # reader stops reading the socket fills (a direct write is PARTIAL, the rest owed),
    # frames queue behind it, and the send task must flush the rest before them.
    async with start_server(DOC_UPDATES_PER_SECOND="1000", DOC_MAX_BYTES="67108864") as server:
        team = await make_team(server, "listener")
        issued = await get_ticket(team, team.collaborator)
        url = doc_url(team, issued["room"], issued["ticket"])
        async with connect(url) as writer, connect(url, queue=1) as reader:
            for client in (writer, reader):
                assert isinstance(await first_message(client), yjs.SyncStep1)
            doc: pycrdt.Doc = pycrdt.Doc()
            text = doc.get("content", type=pycrdt.Text)
            updates: list[bytes] = []
            doc.observe(lambda event: updates.append(event.update))
            chunk = 200_000
            for i in range(60):  # 12 MB, in 60 frames: more than the socket buffers hold
                text.insert(len(text), chr(0x61 + i % 26) * chunk)
                await writer.ws.send_message(yjs.sync_update(updates[-1]))
                # Answered once the update was handled (stored, then sent or queued).
                await writer.ws.send_message(yjs.sync_step1(doc.get_state()))
                while not isinstance(await first_message(writer), yjs.SyncStep2):
                    pass
            seen: pycrdt.Doc = pycrdt.Doc()
            seen_text = seen.get("content", type=pycrdt.Text)
            while len(seen_text) < len(text):
                message = await first_message(reader)
                if isinstance(message, yjs.SyncUpdate):
                    before = len(seen_text)
                    seen.apply_update(message.update)
                    assert len(seen_text) > before  # in order: nothing held back
            assert str(seen_text) == str(text)
