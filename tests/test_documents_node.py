"""Unmodified Yjs clients (npm ``yjs`` + ``y-websocket`` in Node, tests/node/yclient.mjs)
against a real atrium: concurrent typing converges on both transports, a viewer's edits
are not applied, and a server killed with SIGKILL and restarted loses nothing any client
had received."""

from __future__ import annotations

import signal
import subprocess
import time
import uuid
from pathlib import Path

import httpx
import pytest
import trio
from conftest import Running, StartServer
from node_clients import YClient, node_modules, open_yclient
from redis_server import free_port
from served import run_py_env, start_serving
from test_cluster import signup
from test_workspace import Member, Team, make_team, project_with

from atrium.actors.document import ReadText

__all__ = ["node_modules"]  # the session fixture, used by every test here
pytestmark = pytest.mark.usefixtures("node_modules")

CAP = 30.0
FAST = {"DOC_UPDATES_PER_SECOND": "100000"}


def chars(base: int, count: int) -> str:
    """``count`` distinct characters no other call with another ``base`` gives."""
    return "".join(chr(base + i) for i in range(count))


async def ticket(
    client: httpx.AsyncClient, project_id: str, member: Member, path: str
) -> dict[str, str]:
    r = await client.post(
        f"/api/v1/projects/{project_id}/documents/tickets", json={"path": path}, headers=member.auth
    )
    assert r.status_code == 200, r.text
    return dict(r.json())


async def server_text(server: Running, room: str) -> str:
    assert server.bound.services is not None
    actor = await server.bound.services.value.documents.get(uuid.UUID(room))
    return str(await actor.ask(ReadText()))


def url_for(team: Team, issued: dict[str, str]) -> str:
    if team.transport == "main":
        return issued["url"]
    return f"ws://127.0.0.1:{team.server.bound.ws_port}/ws/documents"


async def type_together(
    a: YClient, a_chars: str, b: YClient, b_chars: str, delay_ms: int = 1
) -> None:
    """``a`` types ``a_chars`` while ``b`` types ``b_chars``, ``delay_ms`` between keys."""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(a.type, a_chars, delay_ms)
        nursery.start_soon(b.type, b_chars, delay_ms)


async def signed_up(http: httpx.AsyncClient, email: str) -> Member:
    tokens = await signup(http, email)
    return Member(email, tokens["user_id"], tokens["access_token"])


async def project_with_collaborator(
    http: httpx.AsyncClient, name: str
) -> tuple[str, Member, Member]:
    """Over ``http`` (a ``run.py`` process): owner@ and collab@ sign up, the owner creates
    project ``name`` and adds the other as a collaborator. The project's id, the owner and
    the collaborator."""
    owner = await signed_up(http, "owner@example.com")
    collab = await signed_up(http, "collab@example.com")
    return await project_with(http, owner, collab, name=name), owner, collab


@pytest.mark.parametrize("transport", ["main", "listener"])
async def test_two_clients_typing_at_once_converge(
    transport: str, start_server: StartServer, nursery: trio.Nursery
) -> None:
    async with start_server(**FAST) as server:
        team = await make_team(server, transport)
        one = await ticket(server.client, team.project_id, team.owner, "/notes.md")
        two = await ticket(server.client, team.project_id, team.collaborator, "/notes.md")
        room = one["room"]
        with trio.fail_after(CAP):
            async with (
                open_yclient(nursery, url_for(team, one), room, one["ticket"], "owner") as a,
                open_yclient(nursery, url_for(team, two), room, two["ticket"], "collab") as b,
            ):
                await a.wait_synced()
                await b.wait_synced()
                typed_a, typed_b = chars(0x4E00, 40), chars(0x4E00 + 100, 40)
                await type_together(a, typed_a, b, typed_b)
                everything = typed_a + typed_b
                text_a, text_b = (
                    await a.wait_contains(everything),
                    await b.wait_contains(everything),
                )
                assert text_a == text_b and sorted(text_a) == sorted(everything)
                three = await ticket(server.client, team.project_id, team.viewer, "/notes.md")
                async with open_yclient(nursery, url_for(team, three), room, three["ticket"]) as c:
                    assert await c.wait_contains(everything) == text_a
                assert await server_text(server, room) == text_a
                # Awareness is stamped with who is signed in, whatever a client claims.
                states = (await a.ask("awareness", "awareness"))["states"]
                assert any(team.collaborator.email in str(state) for state in states), states


async def test_a_viewer_receives_edits_but_its_own_are_not_applied(
    start_server: StartServer, nursery: trio.Nursery
) -> None:
    async with start_server(**FAST) as server:
        team = await make_team(server, "main")
        edit = await ticket(server.client, team.project_id, team.collaborator, "/a.txt")
        view = await ticket(server.client, team.project_id, team.viewer, "/a.txt")
        room = edit["room"]
        with trio.fail_after(CAP):
            async with (
                open_yclient(nursery, edit["url"], room, edit["ticket"], "editor") as editor,
                open_yclient(nursery, view["url"], room, view["ticket"], "viewer") as viewer,
            ):
                await editor.wait_synced()
                await viewer.wait_synced()
                await viewer.type("xyz")
                await editor.type("ABC")
                seen = await viewer.wait_contains("ABC")
                assert sorted(seen) == sorted("ABCxyz")  # its own stay in its local copy
                # The editor's edit came after the viewer's: had the viewer's been applied
                # and broadcast, the editor would have them by now.
                stored = await server_text(server, room)
                assert sorted(stored) == sorted("ABC")
                assert await editor.text() == stored
                fresh = await ticket(server.client, team.project_id, team.owner, "/a.txt")
                async with open_yclient(nursery, fresh["url"], room, fresh["ticket"]) as reader:
                    await reader.wait_synced()
                    assert await reader.wait_contains("ABC") == stored


async def test_the_refresh_hook_reconnects_with_a_fresh_ticket(
    start_server: StartServer, nursery: trio.Nursery
) -> None:
    """docs/DOCUMENTS.md's hook: on connection-close, set provider.params.ticket."""
    async with start_server(**FAST) as server:
        team = await make_team(server, "main")
        issued = await ticket(server.client, team.project_id, team.owner, "/r.txt")
        assert server.bound.services is not None
        tickets = server.bound.services.value.document_sessions.tickets
        claims = tickets.verify(issued["ticket"])
        expired, _ = tickets.issue(
            user_id=claims.user_id,
            session_id=claims.session_id,
            project_id=claims.project_id,
            document_id=claims.document_id,
            now=time.time() - 61,
        )
        with trio.fail_after(CAP):
            async with open_yclient(nursery, issued["url"], issued["room"], expired) as client:
                refused = await client.wait_for("close")
                assert (refused["code"], refused["reason"]) == (4001, "ticket_expired")
                await client.ask("ticket", "ticket", ticket=issued["ticket"])
                await client.wait_synced()
                await client.type("ok")
                # What it typed after the refresh reached the server: a second client sees it.
                room = issued["room"]
                async with open_yclient(nursery, issued["url"], room, issued["ticket"]) as reader:
                    assert sorted(await reader.wait_contains("ok")) == sorted("ok")


_free_port = free_port  # a port held for this process (tests/redis_server.py)


async def test_sigkill_and_restart_loses_nothing_a_client_received(
    database_url: str, data_dir: Path, nursery: trio.Nursery
) -> None:
    port = _free_port()  # the same port after the restart: the providers reconnect to it
    env = run_py_env(data_dir, database_url, PORT=str(port), **FAST)
    served = await start_serving(nursery, env, stderr=subprocess.DEVNULL)
    async with httpx.AsyncClient(base_url=served.url) as http:
        project_id, owner, collab = await project_with_collaborator(http, "Kill")
        one = await ticket(http, project_id, owner, "/kill.txt")
        two = await ticket(http, project_id, collab, "/kill.txt")
        room = one["room"]
        with trio.fail_after(2 * CAP):
            async with (
                open_yclient(nursery, one["url"], room, one["ticket"], "a") as a,
                open_yclient(nursery, two["url"], room, two["ticket"], "b") as b,
            ):
                await a.wait_synced()
                await b.wait_synced()
                typed_a, typed_b = chars(0x3041, 30), chars(0x30A1, 30)
                await type_together(a, typed_a, b, typed_b)
                await a.wait_contains(typed_b)
                last = chars(0x0410, 10)
                await a.type(last, 1)
                received = await b.wait_contains(last)  # b has it: so must everyone, after
                served.process.send_signal(signal.SIGKILL)
                await served.process.wait()
                await a.wait_for("close")
                offline = chars(0x05D0, 5)  # typed while the server is down
                await b.type(offline)
                restarted = await start_serving(nursery, env, stderr=subprocess.DEVNULL)
                try:
                    everything = typed_a + typed_b + last + offline
                    text_a, text_b = (
                        await a.wait_contains(everything),
                        await b.wait_contains(everything),
                    )
                    assert text_a == text_b and all(c in text_a for c in received)
                    async with httpx.AsyncClient(base_url=restarted.url) as again:
                        three = await ticket(again, project_id, owner, "/kill.txt")
                    assert three["room"] == room
                    async with open_yclient(nursery, three["url"], room, three["ticket"]) as c:
                        assert await c.wait_contains(everything) == text_a
                finally:
                    restarted.process.terminate()
