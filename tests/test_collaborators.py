"""Collaborators and roles through the real server: adding, listing, roles, removal,
the last-owner rule, and membership changes racing each other."""

from __future__ import annotations

import uuid

import httpx
import trio
import trio.testing
from conftest import Running
from test_projects import API, Account, add, code, new_project, sign_up

from atrium.persistence.database import Database


async def _owners(db: Database, pid: str) -> list[str]:
    rows = await db.fetch(
        "SELECT user_id FROM project_members WHERE project_id = $1 AND role = 'owner'", pid
    )
    return sorted(str(r["user_id"]) for r in rows)


async def test_add_by_id_and_by_email_then_list(server: Running, db: Database) -> None:
    ann, bob, cat = await sign_up(server, db, "ann", "bob", "cat")
    project = await new_project(server, ann)
    pid = project["id"]
    c = server.client
    r = await c.post(
        f"{API}/{pid}/collaborators",
        json={"user_id": bob.id, "role": "collaborator"},
        headers=ann.headers,
    )
    assert r.status_code == 201
    body = r.json()
    assert body["message"] == "Collaborator added successfully"
    added = body["collaboration"]
    assert added["user_id"] == bob.id
    assert added["project_id"] == pid
    assert added["role"] == "collaborator"
    assert added["invited_by"] == ann.id
    assert added["invited_at"].endswith("Z")

    # By email, any letter case; the role defaults to collaborator.
    r = await c.post(
        f"{API}/{pid}/collaborators", json={"email": "CAT@Example.COM"}, headers=ann.headers
    )
    assert r.status_code == 201
    assert r.json()["collaboration"]["user_id"] == cat.id
    assert r.json()["collaboration"]["role"] == "collaborator"

    r = await c.get(f"{API}/{pid}/collaborators", headers=bob.headers)
    assert r.status_code == 200
    listed = r.json()
    assert listed["project_id"] == pid
    assert listed["total"] == 3
    members = {m["user_id"]: m for m in listed["collaborators"]}
    assert members[ann.id]["role"] == "owner"
    assert members[ann.id]["invited_by"] is None
    assert members[ann.id]["email"] == "ann@example.com"
    assert members[bob.id] == {
        "user_id": bob.id,
        "email": "bob@example.com",
        "role": "collaborator",
        "invited_at": added["invited_at"],
        "invited_by": ann.id,
    }
    assert [m["user_id"] for m in listed["collaborators"]][0] == ann.id  # longest-standing first
    assert (await c.get(f"{API}/{pid}", headers=cat.headers)).json()["collaborator_count"] == 3


async def test_refused_additions_write_nothing(server: Running, db: Database) -> None:
    ann, bob = await sign_up(server, db, "ann", "bob")
    pid = (await new_project(server, ann))["id"]
    await add(server, ann, pid, bob, "viewer")
    url = f"{API}/{pid}/collaborators"
    cases: list[tuple[object, int, str]] = [
        ({"user_id": str(uuid.uuid4())}, 404, "user_not_found"),
        ({"email": "nobody@example.com"}, 404, "user_not_found"),
        ({"user_id": bob.id}, 409, "already_member"),
        ({"email": "BOB@example.com", "role": "owner"}, 409, "already_member"),
        ({"user_id": ann.id}, 409, "already_member"),
        ({}, 422, "validation_error"),
        ({"user_id": bob.id, "email": "bob@example.com"}, 422, "validation_error"),
        ({"user_id": "not-a-uuid"}, 422, "validation_error"),
        ({"user_id": bob.id, "role": "admin"}, 422, "validation_error"),
        ({"user_id": bob.id, "role": None}, 422, "validation_error"),
        ({"email": ""}, 422, "validation_error"),
        ({"user_id": bob.id, "extra": 1}, 422, "validation_error"),
        (["user_id"], 422, "validation_error"),
    ]
    for body, status, error in cases:
        r = await server.client.post(url, json=body, headers=ann.headers)
        assert (r.status_code, code(r)) == (status, error), body
    assert await db.fetchval("SELECT count(*) FROM project_members") == 2
    assert await db.fetchval("SELECT last_seq FROM projects WHERE id = $1", pid) == 2


async def test_change_role_and_removal(server: Running, db: Database) -> None:
    ann, bob, cat = await sign_up(server, db, "ann", "bob", "cat")
    pid = (await new_project(server, ann))["id"]
    await add(server, ann, pid, bob, "viewer")
    c = server.client
    r = await c.patch(
        f"{API}/{pid}/collaborators/{bob.id}", json={"role": "collaborator"}, headers=ann.headers
    )
    assert r.status_code == 200
    assert (r.json()["user_id"], r.json()["role"]) == (bob.id, "collaborator")
    r = await c.patch(f"{API}/{pid}", json={"name": "Bob was here"}, headers=bob.headers)
    assert r.status_code == 200  # the new role takes effect at once

    for body in ({}, {"role": "boss"}, {"role": None}, {"role": "viewer", "x": 1}):
        r = await c.patch(f"{API}/{pid}/collaborators/{bob.id}", json=body, headers=ann.headers)
        assert (r.status_code, code(r)) == (422, "validation_error"), body

    # cat is no member: 404 member_not_found, not a project leak (ann may see the project).
    for method, body in (("PATCH", {"role": "viewer"}), ("DELETE", None)):
        r = await c.request(
            method, f"{API}/{pid}/collaborators/{cat.id}", json=body, headers=ann.headers
        )
        assert (r.status_code, code(r)) == (404, "member_not_found")

    r = await c.delete(f"{API}/{pid}/collaborators/{bob.id}", headers=ann.headers)
    assert r.status_code == 204
    for url in (f"{API}/{pid}", f"{API}/{pid}/collaborators", f"{API}/{pid}/events"):
        r = await c.get(url, headers=bob.headers)
        assert (r.status_code, code(r)) == (404, "project_not_found")
    assert await db.fetchval("SELECT count(*) FROM project_members") == 1


async def test_a_member_may_leave(server: Running, db: Database) -> None:
    ann, bob = await sign_up(server, db, "ann", "bob")
    pid = (await new_project(server, ann))["id"]
    await add(server, ann, pid, bob, "viewer")
    r = await server.client.delete(f"{API}/{pid}/collaborators/{bob.id}", headers=bob.headers)
    assert r.status_code == 204
    r = await server.client.get(API, headers=bob.headers)
    assert r.json()["total"] == 0


async def test_the_last_owner_cannot_go(server: Running, db: Database) -> None:
    ann, bob = await sign_up(server, db, "ann", "bob")
    pid = (await new_project(server, ann))["id"]
    await add(server, ann, pid, bob, "collaborator")
    c = server.client
    me = f"{API}/{pid}/collaborators/{ann.id}"
    for role in ("collaborator", "viewer"):
        r = await c.patch(me, json={"role": role}, headers=ann.headers)
        assert (r.status_code, code(r)) == (409, "last_owner")
    r = await c.delete(me, headers=ann.headers)
    assert (r.status_code, code(r)) == (409, "last_owner")
    assert await _owners(db, pid) == [ann.id]
    assert await db.fetchval("SELECT last_seq FROM projects WHERE id = $1", pid) == 2

    # Re-granting the role one has is a no-op, not a conflict.
    r = await c.patch(me, json={"role": "owner"}, headers=ann.headers)
    assert (r.status_code, r.json()["role"]) == (200, "owner")
    assert await db.fetchval("SELECT last_seq FROM projects WHERE id = $1", pid) == 2


async def test_shared_ownership_can_be_handed_over(server: Running, db: Database) -> None:
    ann, bob, cat = await sign_up(server, db, "ann", "bob", "cat")
    pid = (await new_project(server, ann))["id"]
    await add(server, ann, pid, bob, "collaborator")
    c = server.client
    r = await c.patch(
        f"{API}/{pid}/collaborators/{bob.id}", json={"role": "owner"}, headers=ann.headers
    )
    assert r.status_code == 200
    # Bob now manages members and settings.
    await add(server, bob, pid, cat, "viewer")
    r = await c.patch(f"{API}/{pid}", json={"visibility": "team"}, headers=bob.headers)
    assert r.status_code == 200
    # With two owners, the creator may step down; bob becomes the primary owner.
    r = await c.patch(
        f"{API}/{pid}/collaborators/{ann.id}", json={"role": "viewer"}, headers=ann.headers
    )
    assert r.status_code == 200
    r = await c.get(f"{API}/{pid}", headers=ann.headers)
    assert (r.json()["owner_id"], r.json()["role"]) == (bob.id, "viewer")
    r = await c.patch(f"{API}/{pid}", json={"name": "mine again"}, headers=ann.headers)
    assert (r.status_code, code(r)) == (403, "forbidden_role")
    # Now bob is the last owner, and the rule holds for him.
    r = await c.delete(f"{API}/{pid}/collaborators/{bob.id}", headers=bob.headers)
    assert (r.status_code, code(r)) == (409, "last_owner")
    # An owner may remove another owner while one remains.
    r = await c.patch(
        f"{API}/{pid}/collaborators/{cat.id}", json={"role": "owner"}, headers=bob.headers
    )
    assert r.status_code == 200
    r = await c.delete(f"{API}/{pid}/collaborators/{bob.id}", headers=cat.headers)
    assert r.status_code == 204
    assert await _owners(db, pid) == [cat.id]
    r = await c.get(f"{API}/{pid}", headers=cat.headers)
    assert r.json()["owner_id"] == cat.id


async def _race(
    requests: list[tuple[str, str, Account, object]], c: httpx.AsyncClient
) -> list[int]:
    """Fire every request at once; return their statuses in order."""
    statuses = [0] * len(requests)
    start = trio.Event()

    async def one(i: int, method: str, url: str, who: Account, body: object) -> None:
        await start.wait()
        r = await c.request(method, url, json=body, headers=who.headers)
        statuses[i] = r.status_code

    async with trio.open_nursery() as nursery:
        for i, (method, url, who, body) in enumerate(requests):
            nursery.start_soon(one, i, method, url, who, body)
        await trio.testing.wait_all_tasks_blocked()
        start.set()
    return statuses


async def test_owners_demoting_each_other_at_once_leave_an_owner(
    server: Running, db: Database
) -> None:
    ann, bob = await sign_up(server, db, "ann", "bob")
    c = server.client
    for _ in range(5):
        pid = (await new_project(server, ann))["id"]
        await add(server, ann, pid, bob, "owner")
        demote = {"role": "viewer"}
        statuses = await _race(
            [
                ("PATCH", f"{API}/{pid}/collaborators/{bob.id}", ann, demote),
                ("PATCH", f"{API}/{pid}/collaborators/{ann.id}", bob, demote),
                ("DELETE", f"{API}/{pid}/collaborators/{bob.id}", ann, None),
                ("DELETE", f"{API}/{pid}/collaborators/{ann.id}", bob, None),
            ]
            * 3,
            c,
        )
        owners = await _owners(db, pid)
        assert len(owners) >= 1, statuses
        assert statuses.count(200) + statuses.count(204) >= 1
        assert set(statuses) <= {200, 204, 403, 404, 409}, statuses
        primary = await db.fetchval("SELECT owner_id FROM projects WHERE id = $1", pid)
        assert str(primary) in owners


async def test_adding_the_same_user_at_once_adds_them_once(server: Running, db: Database) -> None:
    ann, bob = await sign_up(server, db, "ann", "bob")
    pid = (await new_project(server, ann))["id"]
    url = f"{API}/{pid}/collaborators"
    statuses = await _race(
        [("POST", url, ann, {"user_id": bob.id, "role": "viewer"})] * 10, server.client
    )
    assert sorted(statuses) == [201] + [409] * 9
    assert (
        await db.fetchval(
            "SELECT count(*) FROM project_members WHERE project_id = $1 AND user_id = $2",
            pid,
            bob.id,
        )
        == 1
    )
    events = await db.fetchval(
        "SELECT count(*) FROM project_events WHERE project_id = $1 AND type = 'MEMBER_ADDED'", pid
    )
    assert events == 1
