"""Users, sessions (refresh-token families) and refresh-token rotation."""

from __future__ import annotations

import enum
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from ..core.emails import email_key
from .database import Database


@dataclass(frozen=True, slots=True)
class User:
    id: uuid.UUID
    email: str
    role: str
    created_at: datetime


@dataclass(frozen=True, slots=True)
class Credentials:
    user: User
    password_hash: str


class Rotation(enum.Enum):
    """What happened to a refresh token presented for rotation."""

    ROTATED = "rotated"
    REUSED = "reused"  # already rotated once: treated as theft, the family is now revoked
    REVOKED = "revoked"  # the family was revoked earlier (logout or theft)
    UNKNOWN = "unknown"


def _user(row: asyncpg.Record) -> User:
    return User(id=row["id"], email=row["email"], role=row["role"], created_at=row["created_at"])


async def create_user(db: Database, email: str, password_hash: str) -> User | None:
    """Insert a user; return None when the email's normalised form (``email_key``) is taken."""
    row = await db.fetchrow(
        "INSERT INTO users (id, email, email_normalised, password_hash) VALUES ($1, $2, $3, $4)"
        " ON CONFLICT (email_normalised) DO NOTHING RETURNING id, email, role, created_at",
        uuid.uuid4(),
        email,
        email_key(email),
        password_hash,
    )
    return None if row is None else _user(row)


async def find_credentials(db: Database, email: str) -> Credentials | None:
    """The user whose email normalises like ``email`` and their password hash, if any."""
    row = await db.fetchrow(
        "SELECT id, email, role, created_at, password_hash FROM users WHERE email_normalised = $1",
        email_key(email),
    )
    return None if row is None else Credentials(_user(row), row["password_hash"])


async def find_user(db: Database, user_id: uuid.UUID) -> User | None:
    row = await db.fetchrow("SELECT id, email, role, created_at FROM users WHERE id = $1", user_id)
    return None if row is None else _user(row)


async def find_session_user(db: Database, user_id: uuid.UUID, session_id: uuid.UUID) -> User | None:
    """The user, if ``session_id`` is theirs and not revoked (one round trip per request)."""
    row = await db.fetchrow(
        "SELECT u.id, u.email, u.role, u.created_at FROM users u"
        " JOIN sessions s ON s.user_id = u.id"
        " WHERE u.id = $1 AND s.id = $2 AND s.revoked_at IS NULL",
        user_id,
        session_id,
    )
    return None if row is None else _user(row)


async def open_session(
    db: Database,
    user_id: uuid.UUID,
    session_id: uuid.UUID,
    refresh_jti: uuid.UUID,
    refresh_expires_at: datetime,
) -> None:
    """Start a refresh-token family with its first token."""

    async def insert(conn: asyncpg.Connection) -> None:
        await conn.execute(
            "INSERT INTO sessions (id, user_id) VALUES ($1, $2)", session_id, user_id
        )
        await conn.execute(
            "INSERT INTO refresh_tokens (jti, session_id, expires_at) VALUES ($1, $2, $3)",
            refresh_jti,
            session_id,
            refresh_expires_at,
        )

    await db.transaction(insert)


async def rotate_refresh_token(
    db: Database,
    session_id: uuid.UUID,
    jti: uuid.UUID,
    new_jti: uuid.UUID,
    new_expires_at: datetime,
) -> Rotation:
    """Spend refresh token ``jti`` and record ``new_jti`` as its successor.

    A token that was already spent revokes its whole family (``REUSED``): whoever holds
    the newer token may be a thief, so every token of the session stops working.
    """

    async def rotate(conn: asyncpg.Connection) -> Rotation:
        row = await conn.fetchrow(
            "SELECT rt.used_at, s.revoked_at FROM refresh_tokens rt"
            " JOIN sessions s ON s.id = rt.session_id"
            " WHERE rt.jti = $1 AND rt.session_id = $2 FOR UPDATE OF rt, s",
            jti,
            session_id,
        )
        if row is None:
            return Rotation.UNKNOWN
        if row["revoked_at"] is not None:
            return Rotation.REVOKED
        if row["used_at"] is not None:
            await conn.execute(
                "UPDATE sessions SET revoked_at = now(), revoked_reason = 'refresh_token_reuse'"
                " WHERE id = $1",
                session_id,
            )
            return Rotation.REUSED
        await conn.execute("UPDATE refresh_tokens SET used_at = now() WHERE jti = $1", jti)
        await conn.execute(
            "INSERT INTO refresh_tokens (jti, session_id, parent_jti, expires_at)"
            " VALUES ($1, $2, $3, $4)",
            new_jti,
            session_id,
            jti,
            new_expires_at,
        )
        return Rotation.ROTATED

    return await db.transaction(rotate)


async def revoke_session(db: Database, session_id: uuid.UUID, reason: str) -> None:
    """End a session: its access and refresh tokens stop working at once."""
    await db.execute(
        "UPDATE sessions SET revoked_at = now(), revoked_reason = $2"
        " WHERE id = $1 AND revoked_at IS NULL",
        session_id,
        reason,
    )


async def revoked_among(db: Database, session_ids: Sequence[uuid.UUID]) -> list[uuid.UUID]:
    """Which of ``session_ids`` are revoked (or gone)."""
    if not session_ids:
        return []
    live = await db.fetch(
        "SELECT id FROM sessions WHERE id = ANY($1::uuid[]) AND revoked_at IS NULL",
        list(session_ids),
    )
    alive = {row["id"] for row in live}
    return [session_id for session_id in session_ids if session_id not in alive]
