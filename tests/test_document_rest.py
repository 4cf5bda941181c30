"""Live documents over REST through the real server: list, read the text and the Yjs
state, write by path (live clients see it merge), delete (live clients closed, rows
gone), every refusal with its code, and ``project_export`` carrying the documents."""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import pycrdt
import pytest
import trio
from conftest import Running, StartServer
from test_document_sockets import doc_url, first_message, get_ticket
from test_workspace import Member, Team, make_team
from wsclient import Client, connect

from atrium.persistence.database import Database
from atrium.persistence.jobs import JobStatus
from atrium.realtime import yjs
from atrium.tasks._documents import document_text

CAP = 10.0


def documents_url(team: Team, *tail: str) -> str:
    return "/".join([f"/api/v1/projects/{team.project_id}/documents", *tail])


def code(response: httpx.Response) -> tuple[int, str]:
    return response.status_code, response.json()["error"]["code"]


async def write(team: Team, member: Member, path: str, text: str) -> httpx.Response:
    return await team.server.client.post(
        documents_url(team), json={"path": path, "text": text}, headers=member.auth
    )


async def read_text(team: Team, member: Member, document: str) -> str:
    r = await team.server.client.get(documents_url(team, document, "text"), headers=member.auth)
    assert r.status_code == 200, r.text
    text: str = r.json()["text"]
    return text


class LiveClient:
    """A Yjs client on a document socket: its own pycrdt document, kept in sync."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.doc: pycrdt.Doc[Any] = pycrdt.Doc()
        self.text = self.doc.get("content", type=pycrdt.Text)
        self._made: list[bytes] = []
        self.doc.observe(lambda event: self._made.append(event.update))

    @property
    def content(self) -> str:
        return str(self.text)

    async def sync(self) -> None:
        """Exchange sync steps with the server until it has sent what we lack."""
        await self.client.ws.send_message(yjs.sync_step1(self.doc.get_state()))
        while True:
            message = await first_message(self.client)
            if isinstance(message, yjs.SyncStep1):
                await self.client.ws.send_message(
                    yjs.sync_step2(self.doc.get_update(message.state_vector))
                )
            elif isinstance(message, yjs.SyncStep2):
                self._apply(message.update)
                return

    def _apply(self, update: bytes) -> None:
        self.doc.apply_update(update)
        self._made.clear()  # received, not made here

    def type_offline(self, index: int, value: str) -> list[bytes]:
        """Edit the local replica only; returns the updates to send later."""
        self.text.insert(index, value)
        made = list(self._made)
        self._made.clear()
        return made

    async def send(self, updates: list[bytes]) -> None:
        for update in updates:
            await self.client.ws.send_message(yjs.sync_update(update))

    async def type(self, index: int, value: str) -> None:
        await self.send(self.type_offline(index, value))

    async def receive_update(self) -> None:
        while not isinstance(message := await first_message(self.client), yjs.SyncUpdate):
            pass
        self._apply(message.update)


async def test_write_list_and_read_a_document(server: Running) -> None:
    team = await make_team(server, "main")
    c = server.client
    r = await write(team, team.collaborator, "/src/app.py", "print('hello')\n")
    assert r.status_code == 201, r.text
    created = r.json()
    assert created["path"] == "/src/app.py" and created["seq"] >= 1 and created["size"] > 0
    assert created["room"] == uuid.UUID(created["id"]).hex
    assert created["created_by"] == created["last_edited_by"] == team.collaborator.user_id
    # The same text again changes nothing; a new one replaces it.
    r = await write(team, team.owner, "/src/app.py", "print('hello')\n")
    assert r.status_code == 200 and r.json()["seq"] == created["seq"]
    assert r.json()["last_edited_by"] == team.collaborator.user_id  # nothing changed
    r = await write(team, team.owner, "/src/app.py", "print('hello, world')\n")
    assert r.status_code == 200 and r.json()["seq"] > created["seq"]
    assert r.json()["last_edited_by"] == team.owner.user_id
    assert r.json()["created_by"] == team.collaborator.user_id
    assert (await write(team, team.owner, "/README.md", "# Live")).status_code == 201

    # Any member, a viewer too, lists and reads; by id or by room.
    r = await c.get(documents_url(team), headers=team.viewer.auth)
    assert r.status_code == 200
    listed = r.json()
    assert listed["total"] == 2 and listed["project_id"] == team.project_id
    assert [d["path"] for d in listed["documents"]] == ["/README.md", "/src/app.py"]
    assert "text" not in listed["documents"][0]
    r = await c.get(documents_url(team), params={"path": "/src/app.py"}, headers=team.viewer.auth)
    (found,) = r.json()["documents"]
    assert found["id"] == created["id"]
    r = await c.get(documents_url(team), params={"path": "/nothing"}, headers=team.viewer.auth)
    assert r.json() == {
        "project_id": team.project_id,
        "documents": [],
        "total": 0,
        "limit": 100,
        "offset": 0,
    }
    # One page at a time, by path.
    r = await c.get(documents_url(team), params={"limit": 1, "offset": 1}, headers=team.owner.auth)
    page = r.json()
    assert [d["path"] for d in page["documents"]] == ["/src/app.py"]
    assert (page["total"], page["limit"], page["offset"]) == (2, 1, 1)
    for bad in ({"limit": 0}, {"limit": 1001}, {"offset": -1}, {"limit": "x"}):
        r = await c.get(documents_url(team), params=bad, headers=team.owner.auth)
        assert code(r) == (422, "validation_error"), bad
    for name in (found["id"], found["room"]):
        r = await c.get(documents_url(team, name), headers=team.viewer.auth)
        assert r.status_code == 200 and r.json() == found
        assert await read_text(team, team.viewer, name) == "print('hello, world')\n"
    r = await c.get(documents_url(team, found["room"], "text"), headers=team.viewer.auth)
    assert r.json()["document"] == found

    # The Yjs state is one update a Yjs client applies as it is.
    r = await c.get(documents_url(team, found["room"], "state"), headers=team.viewer.auth)
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/octet-stream"
    doc: pycrdt.Doc[Any] = pycrdt.Doc()
    doc.apply_update(r.content)
    assert str(doc.get("content", type=pycrdt.Text)) == "print('hello, world')\n"


async def test_a_rest_write_reaches_live_clients_and_merges(server: Running) -> None:
    team = await make_team(server, "main")
    assert (await write(team, team.owner, "/notes.md", "hello world")).status_code == 201
    issued = await get_ticket(team, team.collaborator, "/notes.md")
    url = doc_url(team, issued["room"], issued["ticket"])
    async with connect(url) as raw_a, connect(url) as raw_b:
        a, b = LiveClient(raw_a), LiveClient(raw_b)
        await a.sync()
        await b.sync()
        assert a.content == b.content == "hello world"
        # A live edit at the start, then a REST write that changes the end: both survive.
        await a.type(0, ">> ")
        await b.receive_update()
        assert await read_text(team, team.owner, issued["room"]) == ">> hello world"
        r = await write(team, team.owner, "/notes.md", ">> hello there")
        assert r.status_code == 200
        await a.receive_update()
        await b.receive_update()
        assert a.content == b.content == ">> hello there"
        # An edit typed while a REST write is on its way (not yet at the server) merges
        # with it: neither is lost, and every replica ends the same.
        pending = b.type_offline(len(b.content), "!")
        assert (await write(team, team.owner, "/notes.md", "<< hello there")).status_code == 200
        await a.receive_update()
        await b.receive_update()
        assert a.content == "<< hello there" and b.content == "<< hello there!"
        await b.send(pending)
        await a.receive_update()
        assert a.content == b.content == "<< hello there!"
        assert await read_text(team, team.viewer, issued["room"]) == "<< hello there!"


async def test_refusals_have_their_codes_and_change_nothing(server: Running, db: Database) -> None:
    team = await make_team(server, "main")
    other = await make_team_project(server, team)
    c = server.client
    r = await write(team, team.owner, "/a.txt", "kept")
    room = r.json()["room"]
    foreign = (await write(other, team.owner, "/a.txt", "theirs")).json()["room"]

    # Not a member: 404 as for a missing project, on every route.
    outsider = team.outsider.auth
    for method, url in (
        ("GET", documents_url(team)),
        ("GET", documents_url(team, room)),
        ("GET", documents_url(team, room, "text")),
        ("GET", documents_url(team, room, "state")),
        ("DELETE", documents_url(team, room)),
    ):
        r = await c.request(method, url, headers=outsider)
        assert code(r) == (404, "project_not_found"), (method, url)
    r = await write(team, team.outsider, "/a.txt", "mine")
    assert code(r) == (404, "project_not_found")
    r = await c.get(f"/api/v1/projects/{uuid.uuid4()}/documents", headers=team.owner.auth)
    assert code(r) == (404, "project_not_found")

    # A viewer reads but writes nothing, creates nothing; a collaborator deletes nothing.
    assert code(await write(team, team.viewer, "/a.txt", "viewer")) == (403, "forbidden_role")
    assert code(await write(team, team.viewer, "/new.txt", "viewer")) == (403, "forbidden_role")
    r = await c.delete(documents_url(team, room), headers=team.collaborator.auth)
    assert code(r) == (403, "forbidden_role")
    r = await c.delete(documents_url(team, room), headers=team.viewer.auth)
    assert code(r) == (403, "forbidden_role")

    # Another project's document, or none, is not found here; ids must be ids.
    for name in (foreign, uuid.uuid4().hex):
        for tail in ((), ("text",), ("state",)):
            r = await c.get(documents_url(team, name, *tail), headers=team.owner.auth)
            assert code(r) == (404, "document_not_found"), (name, tail)
        r = await c.delete(documents_url(team, name), headers=team.owner.auth)
        assert code(r) == (404, "document_not_found")
    r = await c.get(documents_url(team, "tickets"), headers=team.owner.auth)
    assert code(r) == (422, "invalid_id")
    r = await c.get("/api/v1/projects/nope/documents", headers=team.owner.auth)
    assert code(r) == (422, "invalid_id")
    r = await c.get(documents_url(team), params={"path": ""}, headers=team.owner.auth)
    assert r.status_code == 422

    # Malformed bodies and paths: 422, nothing written.
    for bad in (
        {"path": "", "text": "x"},
        {"path": "x" * 1025, "text": "x"},
        {"path": "/nul\x00", "text": "x"},
        {"path": 3, "text": "x"},
        {"path": "/b.txt"},
        {"path": "/b.txt", "text": 7},
        {"path": "/b.txt", "text": "x", "extra": 1},
        ["/b.txt", "x"],
    ):
        r = await c.post(documents_url(team), json=bad, headers=team.owner.auth)
        assert r.status_code == 422, (bad, r.text)
    r = await c.post(
        documents_url(team),
        content=b'{"path": "/b.txt", "te',
        headers={**team.owner.auth, "Content-Type": "application/json"},
    )
    assert r.status_code == 400
    r = await c.post(documents_url(team), json={"path": "/b.txt", "text": "x"})
    assert r.status_code == 401
    paths = await db.fetch(
        "SELECT path FROM documents WHERE project_id = $1 ORDER BY path", team.project_id
    )
    assert [p["path"] for p in paths] == ["/a.txt"]
    assert await read_text(team, team.viewer, room) == "kept"


async def make_team_project(server: Running, team: Team) -> Team:
    """Another project of the same owner (nobody else in it)."""
    r = await server.client.post(
        "/api/v1/projects/", json={"name": "Other"}, headers=team.owner.auth
    )
    assert r.status_code == 201, r.text
    return Team(
        server, r.json()["id"], team.owner, team.owner, team.owner, team.outsider, team.transport
    )


async def test_a_text_past_the_document_limit_is_refused(start_server: StartServer) -> None:
    async with start_server(DOC_MAX_BYTES="2048") as server:
        team = await make_team(server, "main")
        r = await write(team, team.owner, "/big.txt", "small")
        assert r.status_code == 201
        room, seq = r.json()["room"], r.json()["seq"]
        r = await write(team, team.owner, "/big.txt", "x" * 4096)
        assert code(r) == (413, "document_too_large")
        assert await read_text(team, team.owner, room) == "small"
        r = await server.client.get(documents_url(team, room), headers=team.owner.auth)
        assert r.json()["seq"] == seq
        # A new path with a text too large for any document creates nothing.
        r = await write(team, team.owner, "/new-big.txt", "ü" * 1100)  # 2,200 bytes
        assert code(r) == (413, "document_too_large")
        r = await server.client.get(documents_url(team), headers=team.owner.auth)
        assert [d["path"] for d in r.json()["documents"]] == ["/big.txt"]
        # Under the limit is fine.
        assert (await write(team, team.owner, "/big.txt", "y" * 1000)).status_code == 200


async def test_delete_closes_live_clients_and_removes_the_rows(
    server: Running, db: Database
) -> None:
    team = await make_team(server, "main")
    room = (await write(team, team.owner, "/gone.txt", "bye")).json()["room"]
    issued = await get_ticket(team, team.collaborator, "/gone.txt")
    async with connect(doc_url(team, issued["room"], issued["ticket"])) as raw:
        live = LiveClient(raw)
        await live.sync()
        assert live.content == "bye"
        r = await server.client.delete(documents_url(team, room), headers=team.owner.auth)
        assert r.status_code == 204 and r.content == b""
        assert await raw.closed() == (4013, "document_deleted")
    r = await server.client.get(documents_url(team, room, "text"), headers=team.owner.auth)
    assert code(r) == (404, "document_not_found")
    r = await server.client.delete(documents_url(team, room), headers=team.owner.auth)
    assert code(r) == (404, "document_not_found")
    assert (await server.client.get(documents_url(team), headers=team.owner.auth)).json()[
        "total"
    ] == 0
    document_id = uuid.UUID(room)
    assert await db.fetchval("SELECT count(*) FROM documents WHERE id = $1", document_id) == 0
    updates = await db.fetchval(
        "SELECT count(*) FROM document_updates WHERE document_id = $1", document_id
    )
    assert updates == 0
    # The path is free again: writing it creates a new, different document.
    r = await write(team, team.owner, "/gone.txt", "back")
    assert r.status_code == 201 and r.json()["room"] != room


async def test_project_export_carries_each_documents_text(start_server: StartServer) -> None:
    async with start_server(WORKER_CONCURRENCY=1) as server:
        team = await make_team(server, "main")
        texts = {"/src/app.py": "print('hi')\n", "/docs/ünïcode.md": "naïve – ✓\n", "/empty": ""}
        for path, text in texts.items():
            assert (await write(team, team.collaborator, path, text)).status_code == 201
        # Typed live too: the export reads what clients made, not only REST writes.
        issued = await get_ticket(team, team.collaborator, "/src/app.py")
        url = doc_url(team, issued["room"], issued["ticket"])
        async with connect(url) as raw_a, connect(url) as raw_b:
            a, b = LiveClient(raw_a), LiveClient(raw_b)
            await a.sync()
            await b.sync()
            await a.type(0, "# typed\n")
            await b.receive_update()  # shared, so stored
        texts["/src/app.py"] = "# typed\n" + texts["/src/app.py"]
        r = await server.client.post(
            "/api/v1/jobs/run",
            json={"task_name": "project_export", "project_id": team.project_id},
            headers=team.owner.auth,
        )
        assert r.status_code == 202, r.text
        job_id = r.json()["job_id"]
        assert server.bound.services is not None
        queue = server.bound.services.value.jobs.queue
        with trio.fail_after(CAP * 3):
            await queue.wait_for(uuid.UUID(job_id.removeprefix("job_")), (JobStatus.COMPLETED,))
        r = await server.client.get(f"/api/v1/jobs/{job_id}/status", headers=team.owner.auth)
        exported = r.json()["result"]
        assert {d["path"]: d["text"] for d in exported["documents"]} == texts
        for document in exported["documents"]:
            assert document["text"] == await read_text(team, team.viewer, document["id"])
        # Without documents, when asked.
        r = await server.client.post(
            "/api/v1/jobs/run",
            json={
                "task_name": "project_export",
                "project_id": team.project_id,
                "payload": {"include_documents": False, "include_events": False},
            },
            headers=team.owner.auth,
        )
        job_id = r.json()["job_id"]
        with trio.fail_after(CAP * 3):
            await queue.wait_for(uuid.UUID(job_id.removeprefix("job_")), (JobStatus.COMPLETED,))
        r = await server.client.get(f"/api/v1/jobs/{job_id}/status", headers=team.owner.auth)
        assert r.json()["result"]["documents"] == []


def test_a_jobs_text_is_the_snapshot_then_the_updates() -> None:
    """What ``project_export`` runs in a worker process, run here: the text a snapshot and
    the updates after it make."""
    doc: pycrdt.Doc[Any] = pycrdt.Doc()
    text = doc.get("content", type=pycrdt.Text)
    text += "hello"
    snapshot = doc.get_update()
    made: list[bytes] = []
    doc.observe(lambda event: made.append(event.update))
    text += " world"
    text.insert(0, "» ")
    assert document_text([snapshot, *made]) == "» hello world"
    assert document_text([snapshot]) == "hello"
    assert document_text([]) == ""


async def test_a_read_while_the_document_stops_is_answered_or_503(
    server: Running, monkeypatch: pytest.MonkeyPatch
) -> None:
    team = await make_team(server, "main")
    room = (await write(team, team.owner, "/s.txt", "still here")).json()["room"]
    assert server.bound.services is not None
    documents = server.bound.services.value.documents
    # The actor stops (idle, say) just as a read arrives: the read finds the next one.
    actor = await documents.get(uuid.UUID(room))
    actor.request_stop()
    assert await read_text(team, team.viewer, room) == "still here"
    # One that keeps stopping under every attempt: 503, retry later; nothing changed.
    stopped = await documents.get(uuid.UUID(room))
    stopped.request_stop()

    async def always_stopped(document_id: uuid.UUID) -> Any:
        return stopped

    monkeypatch.setattr(documents, "get", always_stopped)
    for method, url, body in (
        ("GET", documents_url(team, room, "text"), None),
        ("GET", documents_url(team, room, "state"), None),
        ("POST", documents_url(team), {"path": "/s.txt", "text": "changed"}),
    ):
        r = await server.client.request(method, url, json=body, headers=team.owner.auth)
        assert code(r) == (503, "document_unavailable"), (method, url)
        assert r.headers["Retry-After"].isdigit()
    monkeypatch.undo()
    assert await read_text(team, team.viewer, room) == "still here"
