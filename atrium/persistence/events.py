"""The project event log: the one place events are written to and read from.

Rows become ``atrium.core.events.Event`` here and nowhere else. Every append, whether from a
project write (``append_event``, inside its transaction), from a live workspace
(``append``, a batch of edits with their client ids) or from presence (``append_presence``,
which drops a USER_JOIN/USER_LEAVE decided before the last one stored for its user), goes
through ``_insert``: the project's next seqs are reserved on its row, and payloads are
encoded by ``json_output.dumps``.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import asyncpg
import orjson

from ..core import json_output
from ..core.events import Event, EventType, NewEvent
from ..core.projects import ProjectNotFound
from .database import Database

_EVENT_COLUMNS = "project_id, seq, type, actor_id, payload, created_at"

LOG_CHANNEL = "atrium_log"
"""Notified on commit with ``<project_id>:<seq>`` by writers whose events no live workspace
in their own process delivers (a separate job worker), and by workspaces whose events the
bridge cannot carry to the other processes (no Redis, or Redis away): every process's
workspaces read the log up to that seq. The processes that follow the log also greet
each other on it (``notify_peer``), so a process learns whether any other one follows."""

_PEER = "peer:"


async def notify_appended(conn: asyncpg.Connection, events: Sequence[Event]) -> None:
    """Inside the caller's transaction: on commit, tell every process listening on
    ``LOG_CHANNEL`` the newest seq of each project in ``events`` (nothing if empty)."""
    newest: dict[uuid.UUID, int] = {}
    for event in events:
        newest[event.project_id] = max(newest.get(event.project_id, 0), event.seq)
    if newest:
        await conn.execute(
            "SELECT pg_notify($1, p) FROM unnest($2::text[]) AS p",
            LOG_CHANNEL,
            [_reached(project_id, seq) for project_id, seq in newest.items()],
        )


async def notify_reached(db: Database, project_id: uuid.UUID, seq: int) -> None:
    """Tell every process listening on ``LOG_CHANNEL`` that the project's log reached
    ``seq`` (for events committed in an earlier transaction)."""
    await db.execute("SELECT pg_notify($1, $2)", LOG_CHANNEL, _reached(project_id, seq))


def _reached(project_id: uuid.UUID, seq: int) -> str:
    """The ``LOG_CHANNEL`` payload "the project's log reached ``seq``" (``parse_appended``
    reads it)."""
    return f"{project_id}:{seq}"


async def notify_peer(db: Database, instance: str, word: str, *, connected: bool) -> None:
    """Say ``word`` (``hello``: this process started following the log; ``here``: the
    answer to another's hello; ``state``: still here) as process ``instance`` to the
    others on ``LOG_CHANNEL``, with whether its relay to them is ``connected``."""
    state = "connected" if connected else "cut_off"
    await db.execute("SELECT pg_notify($1, $2)", LOG_CHANNEL, f"{_PEER}{instance}:{word}:{state}")


def parse_peer(payload: str) -> tuple[str, str, bool] | None:
    """The instance, word and relay state (connected) of a greeting (``notify_peer``), or
    None if it is not one."""
    if not payload.startswith(_PEER):
        return None
    instance, word, state = (payload[len(_PEER) :].split(":") + ["", ""])[:3]
    return instance, word, state == "connected"


def parse_appended(payload: str) -> tuple[uuid.UUID, int] | None:
    """The project and seq of a ``LOG_CHANNEL`` payload, or None if it is not one."""
    project, _, seq = payload.partition(":")
    try:
        return uuid.UUID(project), int(seq)
    except ValueError:
        return None


def event_from_row(row: asyncpg.Record) -> Event:
    """The ``Event`` of a ``project_events`` row (``_EVENT_COLUMNS``)."""
    return Event(
        project_id=row["project_id"],
        seq=row["seq"],
        type=EventType(row["type"]),
        actor_id=row["actor_id"],
        payload=orjson.loads(row["payload"]),
        created_at=row["created_at"],
    )


@dataclass(frozen=True, slots=True)
class EventPage:
    events: list[Event]
    last_seq: int  # the project's latest seq when read
    oldest_seq: int | None = None  # the oldest event the log still holds (retention)


async def reserve_seqs(conn: asyncpg.Connection, project_id: uuid.UUID, count: int) -> int:
    """Take the project's next ``count`` seqs inside the caller's transaction; returns the
    last of them. Bumping the counter locks the project row until the transaction ends, so
    seqs stay gapless and commit in order, even with writers on other processes. Raises
    ``ProjectNotFound`` when the project does not exist or is deleted.
    """
    last = await conn.fetchval(
        "UPDATE projects SET last_seq = last_seq + $2"
        " WHERE id = $1 AND deleted_at IS NULL RETURNING last_seq",
        project_id,
        count,
    )
    if last is None:
        raise ProjectNotFound()
    return int(last)


async def append_event(
    conn: asyncpg.Connection,
    project_id: uuid.UUID,
    type: EventType,
    actor_id: uuid.UUID | None,
    payload: Mapping[str, Any],
) -> Event:
    """Append one event to the project's log inside the caller's transaction.

    Its ``seq`` is the project's next number (``reserve_seqs``). Returns the event as
    stored. Raises ``ProjectNotFound`` when the project does not exist or is deleted.
    """
    (event,) = await _insert(conn, project_id, [NewEvent(type, actor_id, dict(payload))])
    return event


async def last_seq(db: Database, project_id: uuid.UUID) -> int:
    """The seq of the project's latest event (0 when it has none or does not exist)."""
    value = await db.fetchval("SELECT last_seq FROM projects WHERE id = $1", project_id)
    return int(value or 0)


async def events_between(
    db: Database, project_id: uuid.UUID, after: int, until: int
) -> list[Event]:
    """The events with ``after < seq <= until``, in seq order."""
    rows = await db.fetch(
        f"SELECT {_EVENT_COLUMNS} FROM project_events"
        " WHERE project_id = $1 AND seq > $2 AND seq <= $3 ORDER BY seq",
        project_id,
        after,
        until,
    )
    return [event_from_row(r) for r in rows]


async def list_events(
    db: Database, project_id: uuid.UUID, user_id: uuid.UUID, *, since_seq: int, limit: int
) -> EventPage:
    """Up to ``limit`` events with ``seq > since_seq`` in seq order, for member ``user_id``,
    and the oldest seq the log still holds (older events were pruned by retention).
    Raises ``ProjectNotFound`` when the project is missing, deleted or not theirs."""

    async def read(conn: asyncpg.Connection) -> EventPage:
        # One snapshot, so ``last_seq`` and the events agree.
        await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
        last_seq = await conn.fetchval(
            "SELECT p.last_seq FROM projects p"
            " JOIN project_members m ON m.project_id = p.id AND m.user_id = $2"
            " WHERE p.id = $1 AND p.deleted_at IS NULL",
            project_id,
            user_id,
        )
        if last_seq is None:
            raise ProjectNotFound()
        rows = await conn.fetch(
            f"SELECT {_EVENT_COLUMNS} FROM project_events"
            " WHERE project_id = $1 AND seq > $2 ORDER BY seq LIMIT $3",
            project_id,
            since_seq,
            limit,
        )
        oldest = await conn.fetchval(
            "SELECT min(seq) FROM project_events WHERE project_id = $1", project_id
        )
        events = [event_from_row(r) for r in rows]
        return EventPage(events, int(last_seq), None if oldest is None else int(oldest))

    return await db.transaction(read)


Appended = tuple[Event, bool]


async def append(
    db: Database, project_id: uuid.UUID, events: Sequence[NewEvent], *, notify: bool = False
) -> list[Appended]:
    """Append ``events`` in one transaction, in order, with consecutive seqs; with
    ``notify``, NOTIFY ``LOG_CHANNEL`` on commit when any was new (``notify_appended``).

    Returns, for each, the event and True; or, for a client id stored before (or earlier
    in the same batch), the event stored under it and False. Raises ``ProjectNotFound``
    when the project is gone (then nothing is written).
    """

    async def write(conn: asyncpg.Connection) -> list[Appended]:
        stored = await _stored_client_ids(conn, project_id, events)
        results: list[Appended | None] = []
        fresh: list[int] = []  # indexes of the events to insert
        first: dict[tuple[uuid.UUID | None, str], int] = {}
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
            if notify:
                await notify_appended(conn, inserted)
        elif await conn.fetchval(_LIVE_PROJECT, project_id) is None:
            raise ProjectNotFound()
        for index, original in repeats:
            results[index] = (cast(Appended, results[original])[0], False)
        return cast(list[Appended], results)

    return await db.transaction(write)


_LIVE_PROJECT = "SELECT 1 FROM projects WHERE id = $1 AND deleted_at IS NULL"


async def append_presence(
    db: Database, project_id: uuid.UUID, events: Sequence[NewEvent], *, notify: bool
) -> list[Event]:
    """Append USER_JOIN/USER_LEAVE ``events`` in one transaction, in order, with
    consecutive seqs; with ``notify``, NOTIFY ``LOG_CHANNEL`` on commit (a writer that no
    live workspace delivers for, or whose workspace cannot reach the other processes).

    An event with a ``presence_version`` (decided by the cluster's presence) is stored
    only if that version is newer than the last stored for its user in the project: one
    decided before the newest stored is stale (the later transition already told
    everyone the user's state) and is dropped, so the log's presence events of a user
    follow the order the cluster decided them, whichever process stores first. Events
    without a version (decided by one process alone) are always stored. Returns the
    events stored, in order; those dropped are not there, and must not be delivered.
    Raises ``ProjectNotFound`` when the project is gone (then nothing is written).
    """

    if not events:
        return []
    if not notify and all(e.presence_version is None for e in events):
        return await _insert_alone(db, project_id, events)
    return await db.batcher(_append_versioned).call((project_id, events, notify))


async def _insert_alone(
    db: Database, project_id: uuid.UUID, events: Sequence[NewEvent]
) -> list[Event]:
    """``_insert`` as one statement, its own transaction: one round trip instead of four
    (BEGIN, the seqs, the insert, COMMIT), for the presence events of a join storm, and
    shared with the other projects' presence events waiting at that moment
    (``Database.batcher``: a group commit). Raises ``ProjectNotFound`` when the project
    does not exist or is deleted; DatabaseUnavailable for every project of the batch."""
    return await db.batcher(_insert_presence).call((project_id, events))


async def _insert_presence(
    db: Database, batch: Sequence[tuple[uuid.UUID, Sequence[NewEvent]]]
) -> list[list[Event] | BaseException]:
    """Each project's events after its ``last_seq``, all in one statement (one commit).
    A project missing or deleted gets ``ProjectNotFound`` and nothing written; the
    others are stored."""
    stored = await _insert_many(db, batch)
    return [_mine(stored, project_id, events) for project_id, events in batch]


def _mine(
    stored: dict[uuid.UUID, list[Event]], project_id: uuid.UUID, events: Sequence[NewEvent]
) -> list[Event] | BaseException:
    """The first ``len(events)`` of the events stored for ``project_id``, taken off them
    (a project asked twice in one batch: its events in the order asked); ProjectNotFound
    when none was stored because the project is gone."""
    mine = stored.get(project_id)
    if mine is None:
        return ProjectNotFound()
    taken = mine[: len(events)]
    del mine[: len(events)]
    return taken


async def _insert_many(
    db: Database | asyncpg.Connection, batch: Sequence[tuple[uuid.UUID, Sequence[NewEvent]]]
) -> dict[uuid.UUID, list[Event]]:
    """Insert each project's events after its ``last_seq`` in one statement; the events
    stored, by project, in seq order (a project missing or deleted is not there).

    The projects' rows are locked in id order (two processes' batches cannot deadlock)
    and bumped by the number of their events until the statement commits, as in
    ``_insert``: each project's seqs stay consecutive and gapless.
    """
    projects: list[uuid.UUID] = []
    kinds: list[str] = []
    actors: list[uuid.UUID | None] = []
    payloads: list[str] = []
    client_ids: list[str | None] = []
    for project_id, events in batch:
        for event in events:
            projects.append(project_id)
            kinds.append(str(event.type))
            actors.append(event.actor_id)
            payloads.append(json_output.dumps(event.payload).decode())
            client_ids.append(event.client_id)
    stored: dict[uuid.UUID, list[Event]] = {}
    if not projects:
        return stored
    rows = await db.fetch(
        "WITH e AS (SELECT * FROM unnest($1::uuid[], $2::text[], $3::uuid[], $4::jsonb[],"
        "   $5::text[]) WITH ORDINALITY AS e(project_id, type, actor_id, payload, client_id, n)),"
        " counts AS (SELECT project_id, count(*) AS k FROM e GROUP BY project_id),"
        " locked AS (SELECT p.id FROM projects p JOIN counts c ON c.project_id = p.id"
        "   WHERE p.deleted_at IS NULL ORDER BY p.id FOR NO KEY UPDATE OF p),"
        " bumped AS (UPDATE projects p SET last_seq = p.last_seq + c.k FROM counts c, locked l"
        "   WHERE p.id = c.project_id AND l.id = p.id RETURNING p.id, p.last_seq, c.k)"
        " INSERT INTO project_events (project_id, seq, type, actor_id, payload, client_event_id)"
        " SELECT e.project_id,"
        "  b.last_seq - b.k + row_number() OVER (PARTITION BY e.project_id ORDER BY e.n),"
        "  e.type, e.actor_id, e.payload, e.client_id"
        " FROM e JOIN bumped b ON b.id = e.project_id"
        f" RETURNING {_EVENT_COLUMNS}",
        projects,
        kinds,
        actors,
        payloads,
        client_ids,
    )
    for row in sorted(rows, key=lambda r: int(r["seq"])):
        created = event_from_row(row)
        stored.setdefault(created.project_id, []).append(created)
    return stored


async def _append_versioned(
    db: Database, batch: Sequence[tuple[uuid.UUID, Sequence[NewEvent], bool]]
) -> list[list[Event] | BaseException]:
    """``append_presence`` for several projects in one transaction: their rows locked
    (in id order) and the stored versions read in one statement, the newer versions
    recorded in a second, the fresh events inserted in a third (``_insert_many``), one
    NOTIFY for the projects that ask for it: five round trips with BEGIN and COMMIT
    however many joins and leaves wait, instead of seven each."""

    async def write(conn: asyncpg.Connection) -> list[list[Event] | BaseException]:
        projects = sorted({project_id for project_id, _, _ in batch})
        users = list(
            {e.actor_id for _, events, _ in batch for e in events if e.presence_version is not None}
            - {None}
        )
        rows = await conn.fetch(
            "SELECT p.id, v.user_id, v.version FROM projects p"
            " LEFT JOIN presence_versions v ON v.project_id = p.id"
            "  AND v.user_id = ANY($2::uuid[])"
            " WHERE p.id = ANY($1::uuid[]) AND p.deleted_at IS NULL"
            " ORDER BY p.id FOR UPDATE OF p",
            projects,
            users,
        )
        live = {r["id"] for r in rows}
        newest = {(r["id"], r["user_id"]): r["version"] for r in rows if r["user_id"]}
        changed: dict[tuple[uuid.UUID, uuid.UUID], int] = {}
        fresh: list[tuple[uuid.UUID, Sequence[NewEvent]]] = []
        for project_id, events, _ in batch:
            kept: list[NewEvent] = []
            if project_id in live:
                for event in events:
                    user, version = event.actor_id, event.presence_version
                    if user is not None and version is not None:
                        if version <= newest.get((project_id, user), -1):
                            continue  # stale: a later transition is stored
                        newest[project_id, user] = changed[project_id, user] = version
                    kept.append(event)
            fresh.append((project_id, kept))
        if changed:
            await conn.execute(
                "INSERT INTO presence_versions (project_id, user_id, version)"
                " SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::bigint[])"
                " ON CONFLICT (project_id, user_id) DO UPDATE SET version = excluded.version",
                [project_id for project_id, _ in changed],
                [user for _, user in changed],
                list(changed.values()),
            )
        stored = await _insert_many(conn, fresh)
        answers: list[list[Event] | BaseException] = []
        told: list[Event] = []
        for (project_id, _, notify), (_, fresh_events) in zip(batch, fresh, strict=True):
            if project_id not in live:
                answers.append(ProjectNotFound())
                continue
            mine = _mine(stored, project_id, fresh_events) if fresh_events else []
            assert isinstance(mine, list)  # the project is live: its events were stored
            answers.append(mine)
            if notify:
                told.extend(mine)
        await notify_appended(conn, told)
        return answers

    return await db.transaction(write)


async def presence_version_floor(db: Database) -> int:
    """The newest presence version stored (0: none yet): Redis gives out none at or
    below it (``persistence.presence``), so a failover to a Redis whose clock is behind,
    or that lost the versions, never orders a transition before one already stored.
    Raises DatabaseUnavailable."""
    return int(await db.fetchval("SELECT coalesce(max(version), 0) FROM presence_versions"))


async def _stored_client_ids(
    conn: asyncpg.Connection, project_id: uuid.UUID, events: Sequence[NewEvent]
) -> dict[tuple[uuid.UUID | None, str], Event]:
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
    conn: asyncpg.Connection, project_id: uuid.UUID, events: Sequence[NewEvent]
) -> list[Event]:
    """Insert ``events`` with the project's next seqs; returns them as stored, in order.
    The one insert path of the log."""
    last = await reserve_seqs(conn, project_id, len(events))
    rows = await conn.fetch(
        "INSERT INTO project_events (project_id, seq, type, actor_id, payload, client_event_id)"
        " SELECT $1, * FROM unnest($2::bigint[], $3::text[], $4::uuid[], $5::jsonb[], $6::text[])"
        f" RETURNING {_EVENT_COLUMNS}",
        project_id,
        list(range(last - len(events) + 1, last + 1)),
        [str(e.type) for e in events],
        [e.actor_id for e in events],
        [json_output.dumps(e.payload).decode() for e in events],
        [e.client_id for e in events],
    )
    return [event_from_row(r) for r in sorted(rows, key=lambda r: int(r["seq"]))]
