"""One email normalisation for signup, login, lookups and limits, enforced by the schema;
NUL characters refused as input, never reaching the database."""

from __future__ import annotations

import itertools
import uuid
from collections.abc import AsyncIterator

import asyncpg
import httpx
import pytest
import trio_asyncio
from conftest import FakeClock, Running, StartServer, _admin, _with_database
from test_projects import API, new_project, sign_up

from atrium.core.emails import email_key, email_problem
from atrium.persistence import accounts
from atrium.persistence.database import Database, open_database
from atrium.persistence.migrate import MigrationError, available_migrations, migrate


def code(response: httpx.Response) -> str:
    return response.json()["error"]["code"]  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("Bob@Example.COM", "bob@example.com"),
        ("Ｂｏｂ@example.com", "bob@example.com"),  # fullwidth letters (NFKC)
        ("STRASSE@example.com", "straße@example.com"),  # casefold, not lower
        ("ΣΊΣΥΦΟΣ@example.com", "σίσυφος@example.com"),  # final sigma
    ],
)
def test_spellings_of_one_address_share_one_key(a: str, b: str) -> None:
    assert email_key(a) == email_key(b)
    assert email_key(email_key(a)) == email_key(a)


def test_dotted_capital_i_is_not_a_plain_i() -> None:
    # Python folds U+0130 to "i" + combining dot; PostgreSQL's lower() (by locale) may give
    # "i": whichever is right, the application's fold is the only one used now.
    assert email_key("İiii-x@example.com") != email_key("iiii-x@example.com")


@pytest.mark.parametrize("email", ["a\x00b@example.com", "a\nb@example.com", "\x7f@example.com"])
def test_control_characters_are_a_problem(email: str) -> None:
    assert email_problem(email) == "must not contain control characters"


async def test_a_second_spelling_neither_logs_in_nor_gets_a_fresh_budget(
    start_server: StartServer,
) -> None:
    clock = FakeClock()
    async with start_server(clock=clock, AUTH_RATE_LIMIT_PER_MINUTE=3) as srv:
        c = srv.client
        r = await c.post(
            "/api/v1/auth/signup", json={"email": "iiii-x@example.com", "password": "password1"}
        )
        assert r.status_code == 201
        # The dotted capital I is another address: no account there, no way in.
        r = await c.post(
            "/api/v1/auth/login", json={"email": "İiii-x@example.com", "password": "password1"}
        )
        assert r.status_code == 401 and code(r) == "invalid_credentials"

        # Spellings that are the same account share one budget.
        for spelling in ("IIII-X@example.com", "iiii-x@EXAMPLE.com", " iiii-x@example.com"):
            r = await c.post(
                "/api/v1/auth/login", json={"email": spelling, "password": "wrong-one"}
            )
            assert r.status_code == 401
        r = await c.post(
            "/api/v1/auth/login", json={"email": "Ｉiii-x@example.com", "password": "wrong-one"}
        )
        assert r.status_code == 429 and code(r) == "rate_limited"

        clock.advance(60)
        r = await c.post(
            "/api/v1/auth/login", json={"email": "IIII-X@Example.com", "password": "password1"}
        )
        assert r.status_code == 200


@pytest.mark.parametrize(
    "taken", ["STRASSE@example.com", "Ｓtraße@example.com", "strasse@example.com"]
)
async def test_signup_refuses_any_spelling_of_a_taken_address(server: Running, taken: str) -> None:
    c = server.client
    r = await c.post(
        "/api/v1/auth/signup", json={"email": "straße@example.com", "password": "password1"}
    )
    assert r.status_code == 201
    r = await c.post("/api/v1/auth/signup", json={"email": taken, "password": "password2"})
    assert r.status_code == 409 and code(r) == "email_taken"
    r = await c.post("/api/v1/auth/login", json={"email": taken, "password": "password1"})
    assert r.status_code == 200


async def test_add_collaborator_by_any_spelling(server: Running, db: Database) -> None:
    ann, _ = await sign_up(server, db, "ann", "strasse")
    pid = (await new_project(server, ann))["id"]
    r = await server.client.post(
        f"{API}/{pid}/collaborators", json={"email": "Straße@Example.com"}, headers=ann.headers
    )
    assert r.status_code == 201, r.text


@pytest.mark.parametrize("step", ["signup", "login"])
async def test_nul_in_an_email_is_422(server: Running, db: Database, step: str) -> None:
    r = await server.client.post(
        f"/api/v1/auth/{step}", json={"email": "a\x00@example.com", "password": "password1"}
    )
    assert r.status_code == 422 and code(r) == "validation_error"
    assert await db.fetchval("SELECT count(*) FROM users") == 0


async def test_nul_in_an_add_collaborator_email_is_422(server: Running, db: Database) -> None:
    (ann,) = await sign_up(server, db, "ann")
    pid = (await new_project(server, ann))["id"]
    r = await server.client.post(
        f"{API}/{pid}/collaborators", json={"email": "bob\x00@example.com"}, headers=ann.headers
    )
    assert r.status_code == 422 and code(r) == "validation_error"


async def test_nul_in_a_password_just_works(server: Running) -> None:
    tokens = await server.signup_login("nul@example.com", password="pass\x00word")
    assert tokens["token_type"] == "bearer"
    r = await server.client.post(
        "/api/v1/auth/login", json={"email": "nul@example.com", "password": "pass"}
    )
    assert r.status_code == 401


async def test_the_schema_refuses_keys_that_are_not_normalised(db: Database) -> None:
    for key in ("Bob@example.com", "ｂob@example.com"):
        with pytest.raises(asyncpg.CheckViolationError):
            await db.execute(
                "INSERT INTO users (id, email, email_normalised, password_hash)"
                " VALUES ($1, $2, $2, 'x')",
                uuid.uuid4(),
                key,
            )
    assert await accounts.create_user(db, "bob@example.com", "x") is not None
    with pytest.raises(asyncpg.UniqueViolationError):
        await db.execute(
            "INSERT INTO users (id, email, email_normalised, password_hash)"
            " VALUES ($1, 'BOB@example.com', 'bob@example.com', 'x')",
            uuid.uuid4(),
        )


_legacy = itertools.count()


@pytest.fixture
async def legacy_db(aio_loop: None, pg_server: str) -> AsyncIterator[Database]:
    """A database at schema version 3 (before 0004), for the migration of existing rows."""
    name = f"atrium_legacy_{uuid.uuid4().hex[:8]}_{next(_legacy)}"
    await trio_asyncio.aio_as_trio(_admin)(pg_server, f"CREATE DATABASE {name}")
    try:
        async with open_database(_with_database(pg_server, name), pool_size=2) as db:
            await db.execute(
                "CREATE TABLE schema_migrations (version integer PRIMARY KEY,"
                " name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            for migration in available_migrations():
                if migration.version < 4:
                    await db.execute(migration.sql)
                    await db.execute(
                        "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                        migration.version,
                        migration.name,
                    )
            yield db
    finally:
        await trio_asyncio.aio_as_trio(_admin)(
            pg_server, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"
        )


async def _legacy_user(db: Database, email: str) -> uuid.UUID:
    user_id = uuid.uuid4()
    await db.execute(
        "INSERT INTO users (id, email, password_hash) VALUES ($1, $2, 'x')", user_id, email
    )
    return user_id


async def test_migration_normalises_existing_rows(legacy_db: Database) -> None:
    ascii_user = await _legacy_user(legacy_db, "Ann.Smith@Example.COM")
    folded_user = await _legacy_user(legacy_db, "Straße@example.com")
    assert 4 in await migrate(legacy_db)
    rows = await legacy_db.fetch("SELECT id, email, email_normalised FROM users")
    keys = {r["id"]: r["email_normalised"] for r in rows}
    assert keys == {ascii_user: "ann.smith@example.com", folded_user: "strasse@example.com"}
    found = await accounts.find_credentials(legacy_db, "STRASSE@example.com")
    assert found is not None and found.user.email == "Straße@example.com"


async def test_migration_stops_on_accounts_that_now_collide(legacy_db: Database) -> None:
    first = await _legacy_user(legacy_db, "strasse@example.com")
    second = await _legacy_user(legacy_db, "straße@example.com")
    with pytest.raises(MigrationError) as caught:
        await migrate(legacy_db)
    assert str(first) in str(caught.value) and str(second) in str(caught.value)
    # Nothing of 0004 applied: the column is not there and the version is not recorded.
    assert await legacy_db.fetchval("SELECT max(version) FROM schema_migrations") == 3
    assert not await legacy_db.fetchval(
        "SELECT count(*) FROM information_schema.columns"
        " WHERE table_name = 'users' AND column_name = 'email_normalised'"
    )
