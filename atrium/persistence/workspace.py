"""What live workspaces read from and append to the project event log."""

from __future__ import annotations

import uuid
from typing import Any

import asyncpg

from .database import Database
from .projects import append_event, event_from_row
from .projects import member_role as member_role

_EVENT_COLUMNS = "project_id, seq, type, actor_id, payload, created_at"


async def last_seq(db: Database, project_id: uuid.UUID) -> int:
    """The seq of the project's latest event (0 when it has none or does not exist)."""
    value = await db.fetchval("SELECT last_seq FROM projects WHERE id = $1", project_id)
    return int(value or 0)


async def events_between(
    db: Database, project_id: uuid.UUID, after: int, until: int
) -> list[dict[str, Any]]:
    """The events with ``after < seq <= until``, in seq order."""
    rows = await db.fetch(
        f"SELECT {_EVENT_COLUMNS} FROM project_events"
        " WHERE project_id = $1 AND seq > $2 AND seq <= $3 ORDER BY seq",
        project_id,
        after,
        until,
    )
    return [event_from_row(r) for r in rows]


async def append(
    db: Database,
    project_id: uuid.UUID,
    kind: str,
    actor_id: uuid.UUID,
    payload: dict[str, Any],
    *,
    client_id: str | None = None,
) -> tuple[dict[str, Any], bool]:
    """Append an event; with ``client_id``, at most once per (project, user, client_id).

    Returns the event and True, or the event stored earlier under the same client id and
    False. Raises ``ProjectNotFound`` when the project is gone.
    """

    async def write(conn: asyncpg.Connection) -> tuple[dict[str, Any], bool]:
        if client_id is not None:
            row = await conn.fetchrow(
                f"SELECT {_EVENT_COLUMNS} FROM project_events"
                " WHERE project_id = $1 AND actor_id = $2 AND client_event_id = $3",
                project_id,
                actor_id,
                client_id,
            )
            if row is not None:
                return event_from_row(row), False
        event = await append_event(conn, project_id, kind, actor_id, payload)
        if client_id is not None:
            await conn.execute(
                "UPDATE project_events SET client_event_id = $3 WHERE project_id = $1 AND seq = $2",
                project_id,
                event["seq"],
                client_id,
            )
        return event, True

    return await db.transaction(write)
