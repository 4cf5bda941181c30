"""Apply the numbered SQL migrations in ``migrations/`` (``NNNN_name.sql``), in order.

All pending migrations run in one transaction, each inside its own savepoint: either every
one of them applies or none does. Applied versions are recorded in ``schema_migrations``;
an advisory lock keeps two instances starting at once from applying the same migration
twice.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib import resources

import asyncpg

from ..core.emails import email_key
from .database import Database

_FILENAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
_LOCK_KEY = 0x61747269  # "atri"


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str


class MigrationError(RuntimeError):
    """A migration cannot apply to the data as it is; the message says what to change."""


async def _normalise_legacy_emails(conn: asyncpg.Connection) -> None:
    # 0004 normalised the ASCII addresses in SQL; case folding needs Python.
    rows = await conn.fetch(
        "SELECT id, email FROM users WHERE email_normalised LIKE 'pending-normalisation:%'"
    )
    for row in rows:
        key = email_key(row["email"])
        other = await conn.fetchval(
            "SELECT id FROM users WHERE email_normalised = $1 AND id <> $2", key, row["id"]
        )
        if other is not None:
            raise MigrationError(
                f"users {other} and {row['id']} both have the normalised email {key!r};"
                " change one address (UPDATE users SET email = ...) and migrate again"
            )
        await conn.execute("UPDATE users SET email_normalised = $1 WHERE id = $2", key, row["id"])


# Steps that finish a migration in Python, in its transaction, right after its SQL.
_FINISH: dict[int, Callable[[asyncpg.Connection], Awaitable[None]]] = {
    4: _normalise_legacy_emails,
}


def available_migrations() -> list[Migration]:
    """Every migration shipped with atrium, in version order."""
    found = []
    for entry in resources.files("atrium.persistence").joinpath("migrations").iterdir():
        match = _FILENAME.match(entry.name)
        if match:
            found.append(Migration(int(match[1]), match[2], entry.read_text()))
    return sorted(found, key=lambda m: m.version)


async def migrate(db: Database) -> list[int]:
    """Apply the migrations not applied yet; return the versions applied now.

    Raises ``MigrationError`` when existing data stops one (nothing of it is applied).
    """

    async def apply(conn: asyncpg.Connection) -> list[int]:
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _LOCK_KEY)
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version integer PRIMARY KEY, name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
        applied = []
        for migration in available_migrations():
            if migration.version in done:
                continue
            async with conn.transaction():
                await conn.execute(migration.sql)
                if (finish := _FINISH.get(migration.version)) is not None:
                    await finish(conn)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                    migration.version,
                    migration.name,
                )
            applied.append(migration.version)
        return applied

    return await db.transaction(apply)
