"""What live workspaces read from and append to the project event log."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import asyncpg
import orjson

from .database import Database
from .projects import ProjectNotFound, event_from_row, reserve_seqs
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


@dataclass(frozen=True, slots=True)
class NewEvent:
    """An event to append; with ``client_id``, at most once per (project, actor, client_id)."""

    type: str
    actor_id: uuid.UUID
    payload: dict[str, Any]
    client_id: str | None = None


Appended = tuple[dict[str, Any], bool]


async def append(db: Database, project_id: uuid.UUID, events: Sequence[NewEvent]) -> list[Appended]:
    """Append ``events`` in one transaction, in order, with consecutive seqs.

    Returns, for each, the event and True; or, for a client id stored before (or earlier
    in the same batch), the event stored under it and False. Raises ``ProjectNotFound``
    when the project is gone (then nothing is written).
    """

    async def write(conn: asyncpg.Connection) -> list[Appended]:
        stored = await _stored_client_ids(conn, project_id, events)
        results: list[Appended | None] = []
        fresh: list[int] = []  # indexes of the events to insert
        first: dict[tuple[uuid.UUID, str], int] = {}
        repeats: list[tuple[int, int]] = []  # (index, index of the first with its client id)
        for index, event in enumerate(events):
            results.append(None)
            if event.client_id is not None:
                key = (event.actor_id, event.client_id)
                if key in stored:
                    results[index] = (stored[key], False)
                    continue
                if key in first:
                    repeats.append((index, first[key]))
                    continue
                first[key] = index
            fresh.append(index)
        if fresh:
            inserted = await _insert(conn, project_id, [events[i] for i in fresh])
            for index, stored_event in zip(fresh, inserted, strict=True):
                results[index] = (stored_event, True)
        elif await conn.fetchval(_LIVE_PROJECT, project_id) is None:
            raise ProjectNotFound()
        for index, original in repeats:
            results[index] = (cast(Appended, results[original])[0], False)
        return cast(list[Appended], results)

    return await db.transaction(write)


_LIVE_PROJECT = "SELECT 1 FROM projects WHERE id = $1 AND deleted_at IS NULL"


async def _stored_client_ids(
    conn: asyncpg.Connection, project_id: uuid.UUID, events: Sequence[NewEvent]
) -> dict[tuple[uuid.UUID, str], dict[str, Any]]:
    """The events already stored under the client ids of ``events``."""
    keyed = [e for e in events if e.client_id is not None]
    if not keyed:
        return {}
    rows = await conn.fetch(
        f"SELECT {_EVENT_COLUMNS}, client_event_id FROM project_events"
        " WHERE project_id = $1 AND (actor_id, client_event_id) IN"
        " (SELECT * FROM unnest($2::uuid[], $3::text[]))",
        project_id,
        [e.actor_id for e in keyed],
        [e.client_id for e in keyed],
    )
    return {(r["actor_id"], r["client_event_id"]): event_from_row(r) for r in rows}


async def _insert(
    conn: asyncpg.Connection, project_id: uuid.UUID, events: list[NewEvent]
) -> list[dict[str, Any]]:
    """Insert ``events`` with the project's next seqs; returns them as stored, in order."""
    last = await reserve_seqs(conn, project_id, len(events))
    rows = await conn.fetch(
        "INSERT INTO project_events (project_id, seq, type, actor_id, payload, client_event_id)"
        " SELECT $1, * FROM unnest($2::bigint[], $3::text[], $4::uuid[], $5::jsonb[], $6::text[])"
        f" RETURNING {_EVENT_COLUMNS}",
        project_id,
        list(range(last - len(events) + 1, last + 1)),
        [e.type for e in events],
        [e.actor_id for e in events],
        [orjson.dumps(e.payload).decode() for e in events],
        [e.client_id for e in events],
    )
    return [event_from_row(r) for r in sorted(rows, key=lambda r: int(r["seq"]))]
