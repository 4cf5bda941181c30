"""What the built-in ``export_project`` task reads: a project with its members, and its
event log, as plain JSON values."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

import orjson

from ..core.timestamps import utc_iso
from .database import Database


async def project_snapshot(db: Database, project_id: uuid.UUID) -> dict[str, Any] | None:
    """The project row and its members as plain JSON values (for the export task); None
    when the project is missing or deleted."""
    row = await db.fetchrow(
        "SELECT id, name, description, visibility, owner_id, created_at, updated_at"
        " FROM projects WHERE id = $1 AND deleted_at IS NULL",
        project_id,
    )
    if row is None:
        return None
    members = await db.fetch(
        "SELECT m.user_id, u.email, m.role, m.invited_at, m.invited_by FROM project_members m"
        " JOIN users u ON u.id = m.user_id WHERE m.project_id = $1 ORDER BY m.invited_at",
        project_id,
    )
    return {
        "project": {k: _plain(v) for k, v in row.items()},
        "members": [{k: _plain(v) for k, v in m.items()} for m in members],
    }


async def project_events(
    db: Database,
    project_id: uuid.UUID,
    *,
    after_seq: int = 0,
    limit: int = 5000,
    since: datetime | None = None,
    until: datetime | None = None,
) -> list[dict[str, Any]]:
    """Up to ``limit`` events of the project after ``after_seq`` in seq order, optionally
    within ``[since, until)``, as plain JSON values."""
    rows = await db.fetch(
        "SELECT seq, type, actor_id, payload, created_at FROM project_events"
        " WHERE project_id = $1 AND seq > $2"
        " AND ($4::timestamptz IS NULL OR created_at >= $4)"
        " AND ($5::timestamptz IS NULL OR created_at < $5)"
        " ORDER BY seq LIMIT $3",
        project_id,
        after_seq,
        limit,
        since,
        until,
    )
    return [
        {
            "seq": r["seq"],
            "type": r["type"],
            "actor_id": _plain(r["actor_id"]),
            "payload": None if r["payload"] is None else orjson.loads(r["payload"]),
            "created_at": _plain(r["created_at"]),
        }
        for r in rows
    ]


def _plain(value: Any) -> Any:
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, datetime):
        return utc_iso(value)
    return value
