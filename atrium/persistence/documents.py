"""Live documents in PostgreSQL: each one a snapshot plus the Yjs updates appended after it.

A document is named by its project and a path (``open`` finds or creates it). Its updates
get a gapless per-document ``seq`` from the counter on its row (``append``, one
transaction for a batch), so several processes appending to one document still write one
sequence. ``load`` reads the latest snapshot and the updates after it; ``compact`` stores a
new snapshot at a seq and deletes the updates it holds, in one transaction. The bytes are
opaque here: what they mean (Yjs updates) is ``atrium.realtime.yjs``'s and the actor's.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from .database import Database
from .events import LOG_CHANNEL

_COLUMNS = (
    "id, project_id, path, created_by, created_at, updated_at, last_seq, snapshot_seq, byte_size,"
    " last_edited_by"
)


class DocumentNotFound(Exception):
    """The document does not exist (deleted, or its project was: ``project_deleted``)."""

    code = "document_not_found"

    def __init__(self, *, project_deleted: bool = False) -> None:
        super().__init__(
            "The document's project was deleted" if project_deleted else "No such document"
        )
        self.project_deleted = project_deleted


@dataclass(frozen=True, slots=True)
class DocumentRef:
    """Which document: its id, and the project and path that name it."""

    id: uuid.UUID
    project_id: uuid.UUID
    path: str


@dataclass(frozen=True, slots=True)
class DocumentRow:
    """A document's row without its bytes."""

    id: uuid.UUID
    project_id: uuid.UUID
    path: str
    created_by: uuid.UUID | None
    created_at: datetime
    updated_at: datetime
    last_seq: int
    """The seq of its latest update (0: none yet)."""
    snapshot_seq: int
    """The seq its snapshot holds everything up to (0: no snapshot)."""
    byte_size: int
    """Bytes stored: the snapshot plus the updates after it."""
    last_edited_by: uuid.UUID | None = None
    """Who made its latest update that a user made (None: nobody yet, or gone)."""

    @property
    def ref(self) -> DocumentRef:
        return DocumentRef(self.id, self.project_id, self.path)


@dataclass(frozen=True, slots=True)
class StoredUpdate:
    seq: int
    update: bytes
    user_id: uuid.UUID | None


@dataclass(frozen=True, slots=True)
class Loaded:
    """What a document is made of now: its row, its snapshot (None: none yet) and the
    updates after ``row.snapshot_seq``, in seq order."""

    row: DocumentRow
    snapshot: bytes | None
    updates: list[StoredUpdate]


def _row(record: asyncpg.Record) -> DocumentRow:
    return DocumentRow(
        id=record["id"],
        project_id=record["project_id"],
        path=record["path"],
        created_by=record["created_by"],
        created_at=record["created_at"],
        updated_at=record["updated_at"],
        last_seq=int(record["last_seq"]),
        snapshot_seq=int(record["snapshot_seq"]),
        byte_size=int(record["byte_size"]),
        last_edited_by=record["last_edited_by"],
    )


async def open_document(
    db: Database, project_id: uuid.UUID, path: str, created_by: uuid.UUID | None = None
) -> DocumentRow:
    """The document of ``project_id`` at ``path``, created (empty) if there is none.

    Two callers opening the same new path at once get the same row. Raises
    DocumentNotFound when the project does not exist or is deleted.
    """

    async def run(conn: asyncpg.Connection) -> DocumentRow:
        found = await conn.fetchrow(
            f"SELECT {_COLUMNS} FROM documents WHERE project_id = $1 AND path = $2",
            project_id,
            path,
        )
        if found is not None:
            return _row(found)
        created = await conn.fetchrow(
            f"INSERT INTO documents (id, project_id, path, created_by)"
            f" SELECT $1, p.id, $3, $4 FROM projects p WHERE p.id = $2 AND p.deleted_at IS NULL"
            f" ON CONFLICT (project_id, path) DO NOTHING RETURNING {_COLUMNS}",
            uuid.uuid4(),
            project_id,
            path,
            created_by,
        )
        if created is None:
            # Another writer created it first (or the project is gone): read what is there.
            created = await conn.fetchrow(
                f"SELECT {_COLUMNS} FROM documents WHERE project_id = $1 AND path = $2",
                project_id,
                path,
            )
        if created is None:
            raise DocumentNotFound()
        return _row(created)

    return await db.transaction(run)


async def find_document(db: Database, document_id: uuid.UUID) -> DocumentRow | None:
    """The document's row, or None when there is no such document."""
    record = await db.fetchrow(f"SELECT {_COLUMNS} FROM documents WHERE id = $1", document_id)
    return None if record is None else _row(record)


async def find_document_at(db: Database, project_id: uuid.UUID, path: str) -> DocumentRow | None:
    """The project's document at ``path``, or None."""
    record = await db.fetchrow(
        f"SELECT {_COLUMNS} FROM documents WHERE project_id = $1 AND path = $2", project_id, path
    )
    return None if record is None else _row(record)


async def page_documents(
    db: Database, project_id: uuid.UUID, *, limit: int, offset: int
) -> tuple[list[DocumentRow], int]:
    """One page of the project's documents by path, and how many it has (one snapshot)."""

    async def read(conn: asyncpg.Connection) -> tuple[list[DocumentRow], int]:
        await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
        total = await conn.fetchval(
            "SELECT count(*) FROM documents WHERE project_id = $1", project_id
        )
        records = await conn.fetch(
            f"SELECT {_COLUMNS} FROM documents WHERE project_id = $1"
            " ORDER BY path LIMIT $2 OFFSET $3",
            project_id,
            limit,
            offset,
        )
        return [_row(r) for r in records], int(total)

    return await db.transaction(read)


async def list_documents(db: Database, project_id: uuid.UUID) -> list[DocumentRow]:
    """The project's documents, by path."""
    records = await db.fetch(
        f"SELECT {_COLUMNS} FROM documents WHERE project_id = $1 ORDER BY path", project_id
    )
    return [_row(r) for r in records]


async def append_updates(
    db: Database,
    document_id: uuid.UUID,
    updates: Sequence[tuple[bytes, uuid.UUID | None]],
    *,
    notify: bool = False,
) -> int:
    """Append ``updates`` (each its bytes and the user who made it) in one statement (one
    round trip, its own transaction), with consecutive seqs taken from the document's
    counter; returns the last seq. With ``notify``, NOTIFY ``LOG_CHANNEL`` on commit that
    the document reached that seq (``parse_reached`` reads it): the other processes'
    replicas read what they lack.

    The counter's row stays locked until the statement commits, so seqs are gapless and commit in
    order with writers in other processes. Raises DocumentNotFound when the document or
    its project was deleted (a replica that missed the deletion stores nothing more),
    ValueError for an empty batch.
    """
    if not updates:
        raise ValueError("nothing to append")
    args = (
        document_id,
        len(updates),
        sum(len(data) for data, _ in updates),
        next((user for _, user in reversed(updates) if user is not None), None),
        [data for data, _ in updates],
        [user_id for _, user_id in updates],
    )
    if notify:
        prefix = f"{_REACHED}{document_id}:"  # the seq is the statement's: ``_reached``
        last = await db.fetchval(_APPEND_AND_NOTIFY, *args, LOG_CHANNEL, prefix)
    else:
        last = await db.fetchval(_APPEND, *args)
    if last is None:
        raise DocumentNotFound(project_deleted=await _project_deleted(db, document_id))
    return int(last)


# One statement, so one round trip and its own transaction: the counter's row is
# updated (and locked until the statement commits), then the batch is inserted with the
# seqs it took, in one INSERT (executemany costs a round of binds per row).
_APPEND_CTE = (
    "WITH counter AS ("
    " UPDATE documents SET last_seq = last_seq + $2, byte_size = byte_size + $3,"
    " updated_at = now(), last_edited_by = coalesce($4, last_edited_by)"
    " WHERE id = $1 AND EXISTS (SELECT 1 FROM projects p"
    " WHERE p.id = documents.project_id AND p.deleted_at IS NULL)"
    " RETURNING last_seq),"
    " stored AS ("
    " INSERT INTO document_updates (document_id, seq, update, user_id)"
    " SELECT $1, c.last_seq - $2 + u.n, u.data, u.user_id"
    " FROM counter c, unnest($5::bytea[], $6::uuid[]) WITH ORDINALITY AS u(data, user_id, n))"
)
_APPEND = f"{_APPEND_CTE} SELECT last_seq FROM counter"
_APPEND_AND_NOTIFY = (
    f"{_APPEND_CTE} SELECT last_seq FROM counter, pg_notify($7, $8 || last_seq::text) AS n"
)


async def _project_deleted(db: Database, document_id: uuid.UUID) -> bool:
    """Whether the document's row is there and its project deleted."""
    deleted = await db.fetchval(
        "SELECT p.deleted_at IS NOT NULL FROM documents d JOIN projects p ON p.id = d.project_id"
        " WHERE d.id = $1",
        document_id,
    )
    return bool(deleted)


_REACHED = "doc:"
_GONE_NOTICE = "SELECT pg_notify($1, 'doc:' || id::text || ':') FROM documents"


def _reached(document_id: uuid.UUID, seq: int) -> str:
    return f"{_REACHED}{document_id}:{seq}"


def parse_reached(payload: str) -> tuple[uuid.UUID, int | None] | None:
    """The document and seq of a ``LOG_CHANNEL`` payload saying "the document's updates
    reached seq N" (``append_updates`` with ``notify``), or None if it is not one. The seq
    is None for "read the document's row" (it was deleted, or its project was:
    ``delete_document``, ``announce_deleted``)."""
    if not payload.startswith(_REACHED):
        return None
    document, _, seq = payload[len(_REACHED) :].partition(":")
    try:
        return uuid.UUID(document), int(seq) if seq else None
    except ValueError:
        return None


async def announce_deleted(db: Database, project_id: uuid.UUID) -> None:
    """Tell every process (NOTIFY ``LOG_CHANNEL``) to read the rows of the project's
    documents again: the project was deleted, and their replicas close their peers."""
    await db.execute(f"{_GONE_NOTICE} WHERE project_id = $2", LOG_CHANNEL, project_id)


async def find_live_document(db: Database, document_id: uuid.UUID) -> DocumentRow:
    """The document's row while it and its project exist. Raises DocumentNotFound
    (``project_deleted`` when its project was deleted)."""
    return _row(_live(await db.fetchrow(_live_query(""), document_id)))


def _live_query(extra: str) -> str:
    """The document's row (and ``extra`` columns) with whether its project was deleted."""
    return (
        f"SELECT {_COLUMNS}{extra}, (SELECT p.deleted_at IS NOT NULL FROM projects p"
        " WHERE p.id = documents.project_id) AS project_deleted FROM documents WHERE id = $1"
    )


def _live(record: asyncpg.Record | None) -> asyncpg.Record:
    """``record`` of ``_live_query``; raises DocumentNotFound when there was none or its
    project was deleted (``project_deleted``)."""
    if record is None:
        raise DocumentNotFound()
    if record["project_deleted"]:
        raise DocumentNotFound(project_deleted=True)
    return record


async def load_document(db: Database, document_id: uuid.UUID) -> Loaded:
    """The document's latest snapshot and every update after it, read in one transaction
    (a consistent view while others append or compact). Raises DocumentNotFound (also
    when its project was deleted: ``project_deleted``)."""

    async def run(conn: asyncpg.Connection) -> Loaded:
        record = _live(await conn.fetchrow(_live_query(", snapshot"), document_id))
        row = _row(record)
        updates = await conn.fetch(
            "SELECT seq, update, user_id FROM document_updates"
            " WHERE document_id = $1 AND seq > $2 AND seq <= $3 ORDER BY seq",
            document_id,
            row.snapshot_seq,
            row.last_seq,
        )
        return Loaded(
            row,
            None if record["snapshot"] is None else bytes(record["snapshot"]),
            [StoredUpdate(int(u["seq"]), bytes(u["update"]), u["user_id"]) for u in updates],
        )

    return await db.transaction(run)


async def updates_between(
    db: Database, document_id: uuid.UUID, after: int, until: int
) -> list[StoredUpdate]:
    """The updates with ``after < seq <= until``, in seq order (fewer when compaction
    folded some into the snapshot meanwhile)."""
    records = await db.fetch(
        "SELECT seq, update, user_id FROM document_updates"
        " WHERE document_id = $1 AND seq > $2 AND seq <= $3 ORDER BY seq",
        document_id,
        after,
        until,
    )
    return [StoredUpdate(int(r["seq"]), bytes(r["update"]), r["user_id"]) for r in records]


async def compact(db: Database, document_id: uuid.UUID, snapshot: bytes, seq: int) -> bool:
    """Store ``snapshot`` as holding everything up to ``seq`` and delete the updates it
    holds, in one transaction. Returns False (and changes nothing) when the stored
    snapshot is already at ``seq`` or later, or ``seq`` is past the last update.
    Raises DocumentNotFound."""

    async def run(conn: asyncpg.Connection) -> bool:
        record = await conn.fetchrow(
            "SELECT snapshot_seq, last_seq FROM documents WHERE id = $1 FOR UPDATE", document_id
        )
        if record is None:
            raise DocumentNotFound()
        if seq <= int(record["snapshot_seq"]) or seq > int(record["last_seq"]):
            return False
        await conn.execute(
            "DELETE FROM document_updates WHERE document_id = $1 AND seq <= $2",
            document_id,
            seq,
        )
        after = await conn.fetchval(
            "SELECT coalesce(sum(octet_length(update)), 0) FROM document_updates"
            " WHERE document_id = $1",
            document_id,
        )
        await conn.execute(
            "UPDATE documents SET snapshot = $2, snapshot_seq = $3, byte_size = $4 WHERE id = $1",
            document_id,
            snapshot,
            seq,
            len(snapshot) + int(after),
        )
        return True

    return await db.transaction(run)


async def delete_document(db: Database, document_id: uuid.UUID) -> bool:
    """Delete the document and its updates, and tell every process on commit (NOTIFY
    ``LOG_CHANNEL``: their replicas close their peers); False when there was none."""

    async def run(conn: asyncpg.Connection) -> bool:
        await conn.execute(f"{_GONE_NOTICE} WHERE id = $2", LOG_CHANNEL, document_id)
        status: str = await conn.execute("DELETE FROM documents WHERE id = $1", document_id)
        return status.endswith(" 1")

    return await db.transaction(run)
