"""The per-project event log: what is recorded, gapless seqs under concurrent writers,
paging, and publication after commit."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import asyncpg
import conftest
import pytest
import trio
from conftest import Running
from test_document_actor import add_user
from test_projects import API, make_accounts, new_project, sign_up

from atrium.core.events import Event, EventType, NewEvent
from atrium.domain.services import build_services
from atrium.http.app import create_app
from atrium.persistence import events as event_log
from atrium.persistence import projects
from atrium.persistence.database import Database


async def _events(server: Running, headers: dict[str, str], pid: str, query: str = "") -> Any:
    r = await server.client.get(f"{API}/{pid}/events{query}", headers=headers)
    assert r.status_code == 200, r.text
    return r.json()


async def test_every_change_is_logged_in_order(server: Running, db: Database) -> None:
    ann, bob = await sign_up(server, db, "ann", "bob")
    c = server.client
    pid = (await new_project(server, ann, name="Apollo", visibility="team"))["id"]
    await c.patch(f"{API}/{pid}", json={"name": "Artemis"}, headers=ann.headers)
    await c.patch(f"{API}/{pid}", json={"name": "Artemis"}, headers=ann.headers)  # no change
    await c.post(f"{API}/{pid}/collaborators", json={"user_id": bob.id}, headers=ann.headers)
    await c.patch(
        f"{API}/{pid}/collaborators/{bob.id}", json={"role": "viewer"}, headers=ann.headers
    )
    await c.delete(f"{API}/{pid}/collaborators/{bob.id}", headers=bob.headers)

    body = await _events(server, ann.headers, pid)
    assert (body["project_id"], body["last_seq"], body["next_seq"]) == (pid, 5, 5)
    assert body["has_more"] is False
    got = [(e["seq"], e["type"], e["actor_id"], e["payload"]) for e in body["events"]]
    assert got == [
        (
            1,
            "PROJECT_CREATED",
            ann.id,
            {"name": "Apollo", "description": None, "visibility": "team"},
        ),
        (
            2,
            "PROJECT_UPDATED",
            ann.id,
            {"changes": {"name": "Artemis"}, "previous": {"name": "Apollo"}},
        ),
        (3, "MEMBER_ADDED", ann.id, {"user_id": bob.id, "role": "collaborator"}),
        (
            4,
            "MEMBER_ROLE_CHANGED",
            ann.id,
            {"user_id": bob.id, "role": "viewer", "previous_role": "collaborator"},
        ),
        (5, "MEMBER_REMOVED", bob.id, {"user_id": bob.id, "role": "viewer"}),
    ]
    assert all(e["project_id"] == pid and e["created_at"].endswith("Z") for e in body["events"])

    page = await _events(server, ann.headers, pid, "?limit=2")
    assert [e["seq"] for e in page["events"]] == [1, 2]
    assert (page["next_seq"], page["has_more"]) == (2, True)
    page = await _events(server, ann.headers, pid, f"?since_seq={page['next_seq']}&limit=2")
    assert [e["seq"] for e in page["events"]] == [3, 4]
    page = await _events(server, ann.headers, pid, "?since_seq=4&limit=1000")
    assert ([e["seq"] for e in page["events"]], page["has_more"]) == ([5], False)
    page = await _events(server, ann.headers, pid, "?since_seq=99")
    assert (page["events"], page["next_seq"], page["last_seq"]) == ([], 99, 5)

    for query in ("?limit=0", "?limit=1001", "?since_seq=-1", "?since_seq=x", "?limit=1.5"):
        r = await c.get(f"{API}/{pid}/events{query}", headers=ann.headers)
        assert (r.status_code, r.json()["error"]["code"]) == (422, "validation_error"), query

    # Bob left: the log is for members only. Deleting is logged, then the log is gone too.
    r = await c.get(f"{API}/{pid}/events", headers=bob.headers)
    assert r.status_code == 404
    assert (await c.delete(f"{API}/{pid}", headers=ann.headers)).status_code == 204
    r = await c.get(f"{API}/{pid}/events", headers=ann.headers)
    assert (r.status_code, r.json()["error"]["code"]) == (404, "project_not_found")
    last = await db.fetchrow(
        "SELECT seq, type FROM project_events WHERE project_id = $1 ORDER BY seq DESC LIMIT 1", pid
    )
    assert last is not None and (last["seq"], last["type"]) == (6, "PROJECT_DELETED")


async def test_concurrent_writers_get_gapless_seqs(server: Running, db: Database) -> None:
    ann, *others = await sign_up(server, db, "ann", *(f"u{i}" for i in range(5)))
    pid = (await new_project(server, ann))["id"]
    c = server.client
    statuses: list[int] = []

    async def rename(i: int) -> None:
        r = await c.patch(f"{API}/{pid}", json={"name": f"name {i}"}, headers=ann.headers)
        statuses.append(r.status_code)

    async def invite(user_id: str) -> None:
        r = await c.post(
            f"{API}/{pid}/collaborators", json={"user_id": user_id}, headers=ann.headers
        )
        statuses.append(r.status_code)

    async with trio.open_nursery() as nursery:
        for i in range(30):
            nursery.start_soon(rename, i)
        for other in others:
            nursery.start_soon(invite, other.id)
    assert sorted(statuses) == [200] * 30 + [201] * 5

    seqs = [
        r["seq"]
        for r in await db.fetch(
            "SELECT seq FROM project_events WHERE project_id = $1 ORDER BY seq", pid
        )
    ]
    assert seqs == list(range(1, 37))
    assert await db.fetchval("SELECT last_seq FROM projects WHERE id = $1", pid) == 36
    body = await _events(server, ann.headers, pid, "?limit=1000")
    assert [e["seq"] for e in body["events"]] == seqs
    # The log tells the final name: the last PROJECT_UPDATED is what the project says.
    final = [e for e in body["events"] if e["type"] == "PROJECT_UPDATED"][-1]
    r = await c.get(f"{API}/{pid}", headers=ann.headers)
    assert r.json()["name"] == final["payload"]["changes"]["name"]


async def owned_project(db: Database, email: str) -> tuple[uuid.UUID, uuid.UUID]:
    """A user (inserted directly) and a new project of theirs: (owner id, project id)."""
    owner = await add_user(db, email)
    created = await projects.create_project(
        db, owner, name="Log", description=None, visibility="private"
    )
    assert [e.seq for e in created.events] == [1]
    return owner, created.value.id


async def test_append_event_assigns_seq_in_the_transaction(db: Database) -> None:
    owner, pid = await owned_project(db, "o@example.com")

    async def append(conn: asyncpg.Connection) -> Event:
        return await event_log.append_event(
            conn, pid, EventType.FILE_CHANGE, owner, {"path": "a.txt"}
        )

    event = await db.transaction(append)
    assert event.seq == 2
    assert (event.type, event.actor_id, event.payload) == (
        "FILE_CHANGE",
        owner,
        {"path": "a.txt"},
    )

    class Abort(Exception):
        pass

    async def append_then_fail(conn: asyncpg.Connection) -> None:
        await append(conn)
        raise Abort

    with pytest.raises(Abort):
        await db.transaction(append_then_fail)
    assert (await db.transaction(append)).seq == 3  # a rollback leaves no gap

    await projects.delete_project(db, pid, owner)
    with pytest.raises(projects.ProjectNotFound):
        await db.transaction(append)
    assert await db.fetchval("SELECT max(seq) FROM project_events WHERE project_id = $1", pid) == 4


class _Recorder:
    """An EventPublisher that checks each event is committed before it is published."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.fail = False
        self.published: list[tuple[uuid.UUID, list[Event]]] = []

    async def publish(self, project_id: uuid.UUID, events: Sequence[Event]) -> None:
        self.published.append((project_id, list(events)))
        for event in events:  # read on another connection: only committed rows show
            assert (
                await self.db.fetchval(
                    "SELECT type FROM project_events WHERE project_id = $1 AND seq = $2",
                    project_id,
                    event.seq,
                )
                == event.type
            )
        if self.fail:
            raise RuntimeError("the workspace is down")


async def test_events_are_published_after_commit(db: Database, data_dir: Path) -> None:
    settings = conftest.test_settings(data_dir)
    recorder = _Recorder(db)
    services = build_services(settings, db, publisher=recorder)
    client = create_app(services).test_client()
    ann, bob = await make_accounts(settings, db, "ann", "bob")

    r = await client.post(API, json={"name": "Apollo"}, headers=ann.headers)
    pid = uuid.UUID((await r.get_json())["id"])
    await client.patch(f"{API}/{pid}", json={"name": "Apollo"}, headers=ann.headers)  # no-op
    await client.post(
        f"{API}/{pid}/collaborators", json={"email": "bob@example.com"}, headers=ann.headers
    )
    await client.get(f"{API}/{pid}/events", headers=ann.headers)  # reads publish nothing
    assert [(p, [(e.seq, e.type) for e in es]) for p, es in recorder.published] == [
        (pid, [(1, "PROJECT_CREATED")]),
        (pid, [(2, "MEMBER_ADDED")]),
    ]
    # A failing publisher loses nothing: the change is durable and answered normally.
    recorder.fail = True
    r = await client.patch(f"{API}/{pid}", json={"name": "Artemis"}, headers=ann.headers)
    assert r.status_code == 200
    assert await db.fetchval("SELECT last_seq FROM projects WHERE id = $1", pid) == 3


async def test_workspace_append_stores_a_batch_once_per_client_id(db: Database) -> None:
    owner, pid = await owned_project(db, "w@example.com")

    def change(client_id: str | None, path: str) -> NewEvent:
        return NewEvent(EventType.FILE_CHANGE, owner, {"file_path": path}, client_id)

    first = await event_log.append(db, pid, [change("a", "1.txt"), change(None, "2.txt")])
    assert [(e.seq, e.payload["file_path"], new) for e, new in first] == [
        (2, "1.txt", True),
        (3, "2.txt", True),
    ]
    # "a" again (stored before), "b" twice in the batch: one new event, consecutive seqs.
    second = await event_log.append(
        db, pid, [change("a", "again.txt"), change("b", "3.txt"), change("b", "x.txt")]
    )
    assert [(e.seq, e.payload["file_path"], new) for e, new in second] == [
        (2, "1.txt", False),
        (4, "3.txt", True),
        (4, "3.txt", False),
    ]
    rows = await db.fetch(
        "SELECT seq, client_event_id FROM project_events WHERE project_id = $1 ORDER BY seq", pid
    )
    assert [(r["seq"], r["client_event_id"]) for r in rows] == [
        (1, None),
        (2, "a"),
        (3, None),
        (4, "b"),
    ]

    await db.execute("UPDATE projects SET deleted_at = now() WHERE id = $1", pid)
    for batch in ([change("c", "late.txt")], [change("a", "dup.txt")]):
        with pytest.raises(projects.ProjectNotFound):
            await event_log.append(db, pid, batch)
    assert await db.fetchval("SELECT count(*) FROM project_events WHERE project_id = $1", pid) == 4
