"""Every role against every project endpoint, through the real server."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import httpx
import pytest
from conftest import Running
from test_projects import API, add, new_project, sign_up

from atrium.core.roles import PERMISSIONS, Action, Role, can
from atrium.persistence.database import Database

ROLES = ("owner", "collaborator", "viewer", "outsider")

# action -> expected status for (owner, collaborator, viewer, outsider).
EXPECTED: dict[str, tuple[int, int, int, int]] = {
    "list": (200, 200, 200, 200),
    "get": (200, 200, 200, 404),
    "patch_name": (200, 200, 403, 404),
    "patch_description": (200, 200, 403, 404),
    "patch_visibility": (200, 403, 403, 404),
    "patch_name_and_visibility": (200, 403, 403, 404),
    "delete": (204, 403, 403, 404),
    "add_member": (201, 403, 403, 404),
    "list_members": (200, 200, 200, 404),
    "change_role": (200, 403, 403, 404),
    "remove_other": (204, 403, 403, 404),
    "remove_self": (409, 204, 204, 404),  # the sole owner may not leave
    "events": (200, 200, 200, 404),
}
ERROR_CODES = {403: "forbidden_role", 404: "project_not_found", 409: "last_owner"}
MUTATING = {a for a in EXPECTED if a.startswith(("patch", "delete", "add", "change", "remove"))}


@pytest.mark.parametrize("role", ROLES)
async def test_role_matrix(server: Running, db: Database, role: str) -> None:
    owner, collaborator, viewer, outsider, newcomer = await sign_up(
        server, db, "owner", "collab", "viewer", "outsider", "newcomer"
    )
    actor = {"owner": owner, "collaborator": collaborator, "viewer": viewer}.get(role, outsider)
    other = viewer if actor is not viewer else collaborator
    c = server.client

    def call(pid: str) -> dict[str, Callable[[], Awaitable[httpx.Response]]]:
        h = actor.headers
        base = f"{API}/{pid}"
        return {
            "list": lambda: c.get(API, headers=h),
            "get": lambda: c.get(base, headers=h),
            "patch_name": lambda: c.patch(base, json={"name": "Renamed"}, headers=h),
            "patch_description": lambda: c.patch(base, json={"description": "d"}, headers=h),
            "patch_visibility": lambda: c.patch(base, json={"visibility": "team"}, headers=h),
            "patch_name_and_visibility": lambda: c.patch(
                base, json={"name": "R", "visibility": "team"}, headers=h
            ),
            "delete": lambda: c.delete(base, headers=h),
            "add_member": lambda: c.post(
                f"{base}/collaborators", json={"user_id": newcomer.id}, headers=h
            ),
            "list_members": lambda: c.get(f"{base}/collaborators", headers=h),
            "change_role": lambda: c.patch(
                f"{base}/collaborators/{other.id}",
                json={"role": "collaborator" if other is viewer else "viewer"},
                headers=h,
            ),
            "remove_other": lambda: c.delete(f"{base}/collaborators/{other.id}", headers=h),
            "remove_self": lambda: c.delete(f"{base}/collaborators/{actor.id}", headers=h),
            "events": lambda: c.get(f"{base}/events", headers=h),
        }

    column = ROLES.index(role)
    got: dict[str, int] = {}
    for action in EXPECTED:
        project = await new_project(server, owner)
        pid = project["id"]
        await add(server, owner, pid, collaborator, "collaborator")
        await add(server, owner, pid, viewer, "viewer")
        before = await _snapshot(db, pid)
        r = await call(pid)[action]()
        got[action] = r.status_code
        if r.status_code >= 400:
            assert r.json()["error"]["code"] == ERROR_CODES[r.status_code], (action, r.text)
        if action == "list":
            listed = [p["id"] for p in r.json()["projects"]]
            assert (pid in listed) == (role != "outsider")
        after = await _snapshot(db, pid)
        if action in MUTATING and r.status_code < 400:
            assert after[0] == before[0] + 1, action  # exactly one event appended
        else:
            assert after == before, action  # a refused or read-only call changes nothing
    assert got == {action: statuses[column] for action, statuses in EXPECTED.items()}


async def _snapshot(db: Database, pid: str) -> tuple[int, object, object]:
    row = await db.fetchrow(
        "SELECT last_seq, (name, description, visibility, deleted_at)::text AS fields,"
        " (SELECT array_agg((user_id, role)::text ORDER BY user_id) FROM project_members"
        "  WHERE project_id = $1) AS members"
        " FROM projects WHERE id = $1",
        pid,
    )
    assert row is not None
    return row["last_seq"], row["fields"], row["members"]


async def test_role_reported_per_member(server: Running, db: Database) -> None:
    owner, viewer = await sign_up(server, db, "owner", "viewer")
    pid = (await new_project(server, owner))["id"]
    await add(server, owner, pid, viewer, "viewer")
    for who, role in ((owner, "owner"), (viewer, "viewer")):
        r = await server.client.get(f"{API}/{pid}", headers=who.headers)
        assert r.json()["role"] == role
        r = await server.client.get(API, headers=who.headers)
        assert r.json()["projects"][0]["role"] == role
        assert r.json()["projects"][0]["collaborator_count"] == 2


def test_permission_table() -> None:
    """The one table the HTTP API and the workspace both read."""
    assert PERMISSIONS[Role.OWNER] == frozenset(Action)
    assert can(Role.COLLABORATOR, Action.EDIT_DETAILS)
    assert can(Role.COLLABORATOR, Action.EDIT_WORKSPACE)
    assert not can(Role.COLLABORATOR, Action.CHANGE_VISIBILITY)
    assert not can(Role.COLLABORATOR, Action.MANAGE_MEMBERS)
    assert not can(Role.COLLABORATOR, Action.DELETE)
    assert can(Role.VIEWER, Action.LEAVE)
    assert not can(Role.VIEWER, Action.EDIT_WORKSPACE)
    assert not can(Role.VIEWER, Action.EDIT_DETAILS)
    assert PERMISSIONS[Role.VIEWER] < PERMISSIONS[Role.COLLABORATOR] < PERMISSIONS[Role.OWNER]
