"""Projects through the real server: CRUD, validation, pagination, no leaks, deletion."""

from __future__ import annotations

import dataclasses
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import httpx
import pytest
from conftest import Running

from atrium.core.config import Settings
from atrium.core.projects import Project
from atrium.core.roles import Role
from atrium.core.timestamps import utc_iso
from atrium.identity.tokens import TokenCodec
from atrium.persistence import accounts
from atrium.persistence.database import Database

API = "/api/v1/projects"


@dataclass(frozen=True)
class Account:
    """A signed-up, logged-in user."""

    id: str
    email: str
    headers: dict[str, str]


async def sign_up(server: Running, db: Database, *names: str) -> list[Account]:
    """An account with an access token for each ``name@example.com``.

    Made directly in the database with a token signed by the server's key: password
    hashing (tested in test_auth) would otherwise be most of this suite's time.
    """
    return await make_accounts(server.settings, db, *names)


async def make_accounts(settings: Settings, db: Database, *names: str) -> list[Account]:
    """``sign_up`` for an app built from ``settings`` (e.g. one under a test client)."""
    codec = TokenCodec(
        secret=settings.secret_key,
        issuer=settings.jwt_issuer,
        audience=settings.jwt_audience,
        access_ttl_seconds=settings.access_token_expire_minutes * 60,
        refresh_ttl_seconds=60,
    )
    made = []
    for name in names:
        user = await accounts.create_user(db, f"{name}@example.com", "not-a-password-hash")
        assert user is not None
        session_id = uuid.uuid4()
        expiry = datetime.now(UTC) + timedelta(minutes=5)
        await accounts.open_session(db, user.id, session_id, uuid.uuid4(), expiry)
        token, _ = codec.issue(
            type="access", user_id=user.id, email=user.email, role=user.role, session_id=session_id
        )
        made.append(Account(str(user.id), user.email, {"Authorization": f"Bearer {token}"}))
    return made


async def new_project(server: Running, owner: Account, **body: Any) -> dict[str, Any]:
    r = await server.client.post(API, json={"name": "Apollo", **body}, headers=owner.headers)
    assert r.status_code == 201, r.text
    project: dict[str, Any] = r.json()
    return project


async def add(server: Running, owner: Account, project_id: str, member: Account, role: str) -> None:
    r = await server.client.post(
        f"{API}/{project_id}/collaborators",
        json={"user_id": member.id, "role": role},
        headers=owner.headers,
    )
    assert r.status_code == 201, r.text


def code(response: httpx.Response) -> str:
    return response.json()["error"]["code"]  # type: ignore[no-any-return]


async def test_create_get_list_update_delete(server: Running, db: Database) -> None:
    tokens = await server.signup_login("ann@example.com")  # the real path, once
    ann = Account(
        tokens["user_id"],
        "ann@example.com",
        {"Authorization": f"Bearer {tokens['access_token']}"},
    )
    c = server.client
    r = await c.post(
        f"{API}/",
        json={"name": "New Project", "description": "Project description", "visibility": "team"},
        headers=ann.headers,
    )
    assert r.status_code == 201
    created = r.json()
    pid = created["id"]
    assert uuid.UUID(pid)
    assert created["name"] == "New Project"
    assert created["description"] == "Project description"
    assert created["visibility"] == "team"
    assert created["owner_id"] == ann.id
    assert created["workspace_url"] == f"/ws/{pid}"
    assert created["created_at"].endswith("Z")
    assert created["role"] == "owner"
    assert created["collaborator_count"] == 1
    assert created["status"] == "active"

    r = await c.get(f"{API}/{pid}", headers=ann.headers)
    assert r.status_code == 200
    assert r.json() == created

    plain = await new_project(server, ann)  # defaults: private, no description
    assert (plain["visibility"], plain["description"]) == ("private", None)
    await c.delete(f"{API}/{plain['id']}", headers=ann.headers)

    for url in (API, f"{API}/"):  # both spellings, no redirect
        r = await c.get(url, headers=ann.headers)
        assert r.status_code == 200, url
        body = r.json()
        assert body["projects"] == [created]
        assert (body["total"], body["limit"], body["offset"]) == (1, 20, 0)

    r = await c.patch(
        f"{API}/{pid}", json={"name": "Renamed", "description": None}, headers=ann.headers
    )
    assert r.status_code == 200
    assert (r.json()["name"], r.json()["description"]) == ("Renamed", None)
    assert r.json()["updated_at"] >= created["updated_at"]
    assert r.json()["visibility"] == "team"

    r = await c.delete(f"{API}/{pid}", headers=ann.headers)
    assert r.status_code == 204
    assert await db.fetchval("SELECT deleted_at IS NOT NULL FROM projects WHERE id = $1", pid)


async def test_deleted_project_is_gone_for_every_api(server: Running, db: Database) -> None:
    ann, bob = await sign_up(server, db, "ann", "bob")
    pid = (await new_project(server, ann))["id"]
    await add(server, ann, pid, bob, "owner")
    r = await server.client.delete(f"{API}/{pid}", headers=ann.headers)
    assert r.status_code == 204
    for who in (ann, bob):
        for method, url, body in _every_call(pid, bob.id):
            r = await server.client.request(method, url, json=body, headers=who.headers)
            assert r.status_code == 404, (method, url)
            assert code(r) == "project_not_found"
        r = await server.client.get(API, headers=who.headers)
        assert r.json()["projects"] == [] and r.json()["total"] == 0


def _every_call(pid: str, member_id: str) -> list[tuple[str, str, Any]]:
    """One well-formed request for every project endpoint."""
    return [
        ("GET", f"{API}/{pid}", None),
        ("PATCH", f"{API}/{pid}", {"name": "x"}),
        ("PATCH", f"{API}/{pid}", {"visibility": "team"}),
        ("DELETE", f"{API}/{pid}", None),
        ("POST", f"{API}/{pid}/collaborators", {"user_id": member_id}),
        ("GET", f"{API}/{pid}/collaborators", None),
        ("PATCH", f"{API}/{pid}/collaborators/{member_id}", {"role": "viewer"}),
        ("DELETE", f"{API}/{pid}/collaborators/{member_id}", None),
        ("GET", f"{API}/{pid}/events", None),
    ]


async def test_someone_elses_project_looks_exactly_like_a_missing_one(
    server: Running, db: Database
) -> None:
    ann, eve = await sign_up(server, db, "ann", "eve")
    pid = (await new_project(server, ann))["id"]
    missing = str(uuid.uuid4())
    for (method, url, body), (_, missing_url, _) in zip(
        _every_call(pid, eve.id), _every_call(missing, eve.id), strict=True
    ):
        theirs = await server.client.request(method, url, json=body, headers=eve.headers)
        nothing = await server.client.request(method, missing_url, json=body, headers=eve.headers)
        assert theirs.status_code == nothing.status_code == 404, (method, url)
        assert theirs.json() == nothing.json()
        assert code(theirs) == "project_not_found"
    r = await server.client.get(API, headers=eve.headers)
    assert r.json()["total"] == 0
    # Eve changed nothing: still one member, only the creation event.
    assert await db.fetchval("SELECT count(*) FROM project_members") == 1
    assert await db.fetchval("SELECT last_seq FROM projects WHERE id = $1", pid) == 1
    assert await db.fetchval("SELECT deleted_at FROM projects WHERE id = $1", pid) is None


async def test_invalid_ids_in_the_path_are_422(server: Running, db: Database) -> None:
    ann, bob = await sign_up(server, db, "ann", "bob")
    pid = (await new_project(server, ann))["id"]
    for bad in ("nope", "123", "00000000-0000-0000-0000-00000000000g", "%20"):
        calls = _every_call(bad, bob.id) + [
            ("PATCH", f"{API}/{pid}/collaborators/{bad}", {"role": "viewer"}),
            ("DELETE", f"{API}/{pid}/collaborators/{bad}", None),
        ]
        for method, url, body in calls:
            r = await server.client.request(method, url, json=body, headers=ann.headers)
            assert r.status_code == 422, (method, url, r.text)
            assert code(r) == "invalid_id"


async def test_every_endpoint_needs_a_token(server: Running) -> None:
    pid = str(uuid.uuid4())
    calls = [("GET", API, None), ("POST", API, {"name": "x"}), *_every_call(pid, pid)]
    for method, url, body in calls:
        r = await server.client.request(method, url, json=body)
        assert r.status_code == 401, (method, url)
        assert code(r) == "token_missing"


INVALID_PROJECTS: list[object] = [
    {},
    {"name": ""},
    {"name": "   "},
    {"name": "x" * 201},
    {"name": "nul\x00byte"},
    {"name": 42},
    {"name": None},
    {"name": "ok", "description": "d" * 5001},
    {"name": "ok", "description": "\x00"},
    {"name": "ok", "visibility": "public"},
    {"name": "ok", "owner_id": str(uuid.uuid4())},
    ["name"],
    "name",
    None,
]


async def test_invalid_project_is_422_and_writes_nothing(server: Running, db: Database) -> None:
    (ann,) = await sign_up(server, db, "ann")
    for body in INVALID_PROJECTS:
        r = await server.client.post(API, json=body, headers=ann.headers)
        assert r.status_code == 422, (body, r.text)
        assert code(r) == "validation_error"
    r = await server.client.post(
        API, content=b"{nope", headers={**ann.headers, "Content-Type": "application/json"}
    )
    assert r.status_code == 400
    assert code(r) == "malformed_json"
    assert await db.fetchval("SELECT count(*) FROM projects") == 0
    assert await db.fetchval("SELECT count(*) FROM project_events") == 0
    # The limits themselves are allowed.
    r = await server.client.post(
        API, json={"name": "n" * 200, "description": "d" * 5000}, headers=ann.headers
    )
    assert r.status_code == 201


INVALID_PATCHES: list[object] = [
    {},
    {"name": None},
    {"visibility": None},
    {"visibility": "public"},
    {"name": ""},
    {"owner_id": str(uuid.uuid4())},
    {"name": "ok", "status": "archived"},
    [],
]


async def test_invalid_patch_is_422_and_changes_nothing(server: Running, db: Database) -> None:
    (ann,) = await sign_up(server, db, "ann")
    project = await new_project(server, ann)
    for body in INVALID_PATCHES:
        r = await server.client.patch(f"{API}/{project['id']}", json=body, headers=ann.headers)
        assert r.status_code == 422, body
        assert code(r) == "validation_error"
    r = await server.client.get(f"{API}/{project['id']}", headers=ann.headers)
    assert r.json() == project
    assert await db.fetchval("SELECT count(*) FROM project_events") == 1


async def test_pagination_edges(server: Running, db: Database) -> None:
    (ann,) = await sign_up(server, db, "ann")
    names = [f"p{i}" for i in range(5)]
    for name in names:
        await new_project(server, ann, name=name)
    newest_first = names[::-1]

    async def page(query: str) -> httpx.Response:
        return await server.client.get(f"{API}/?{query}", headers=ann.headers)

    r = await page("limit=2&offset=0")
    assert [p["name"] for p in r.json()["projects"]] == newest_first[0:2]
    r = await page("limit=2&offset=2")
    assert [p["name"] for p in r.json()["projects"]] == newest_first[2:4]
    r = await page("limit=2&offset=4")
    assert [p["name"] for p in r.json()["projects"]] == newest_first[4:5]
    r = await page("limit=5&offset=0")
    assert [p["name"] for p in r.json()["projects"]] == newest_first
    for query in ("limit=2&offset=5", "offset=1000", "limit=100&offset=999999999"):
        r = await page(query)
        assert r.status_code == 200
        assert r.json()["projects"] == [] and r.json()["total"] == 5
    r = await page("limit=100")
    assert (r.json()["limit"], len(r.json()["projects"])) == (100, 5)
    r = await page("limit=1&offset=3&utm_source=x")  # unknown parameters are ignored
    assert r.json()["projects"][0]["name"] == newest_first[3]
    assert (r.json()["limit"], r.json()["offset"], r.json()["total"]) == (1, 3, 5)

    for query in (
        "limit=0",
        "limit=101",
        "limit=-1",
        "offset=-1",
        "limit=abc",
        "limit=1&limit=2",
        "offset=99999999999999999999999",
    ):
        r = await page(query)
        assert r.status_code == 422, query
        assert code(r) == "validation_error"


@pytest.mark.parametrize("microseconds", [0, 123456])
@pytest.mark.parametrize("role", list(Role))
def test_a_listed_project_is_its_response_model_as_json(microseconds: int, role: Role) -> None:
    from atrium.http.projects import _project, _project_json  # the model and the list's dict

    moment = datetime(2026, 11, 30, 4, 30, 42, microseconds, tzinfo=UTC)
    for description, visibility in ((None, "private"), ("Ünïcode \u2028 text", "team")):
        project = Project(
            id=uuid.uuid4(),
            name="Apollo",
            description=description,
            visibility=visibility,
            owner_id=uuid.uuid4(),
            created_at=moment,
            updated_at=moment + timedelta(days=1),  # asyncpg gives timestamptz in UTC
            collaborator_count=3,
            role=role,
        )
        assert _project_json(project) == _project(project).model_dump(mode="json")
    elsewhere = moment.astimezone(timezone(timedelta(hours=5)))
    listed = _project_json(dataclasses.replace(project, updated_at=elsewhere))
    assert listed["updated_at"] == utc_iso(moment)  # the one timestamp format, in UTC
