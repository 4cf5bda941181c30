"""Event-log retention: delete each project's oldest events, never its seq counter.

A project's log keeps a suffix of its seqs: pruning deletes every event up to a bound
(by age, by count or both), oldest first, so the retained events stay gapless and
``projects.last_seq`` (the counter new events continue from) is never touched. Readers
tell a pruned gap from the oldest retained seq.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

from .database import Database


@dataclass(frozen=True, slots=True)
class RetentionPolicy:
    """What a project's log keeps: events younger than ``max_age`` (None: any age) and at
    most its newest ``max_events`` (None: any number)."""

    max_age: timedelta | None = None
    max_events: int | None = None

    @property
    def keeps_everything(self) -> bool:
        return self.max_age is None and self.max_events is None


# Per project: its oldest retained seq and the highest seq to delete (0: none). An event
# is deleted when it is older than the cutoff, or when max_events newer ones exist; every
# event before a deleted one goes too (created_at follows seq only roughly: it is the time
# its transaction started), which keeps the retained seqs a gapless suffix.
_BOUNDS = """
SELECT p.id,
       (SELECT min(e.seq) FROM project_events e WHERE e.project_id = p.id) AS oldest,
       GREATEST(
           COALESCE(
               (SELECT max(e.seq) FROM project_events e
                WHERE e.project_id = p.id AND e.created_at < $2),
               0),
           p.last_seq - $3::bigint) AS bound
FROM projects p
WHERE p.id > $1
ORDER BY p.id
LIMIT $4
"""

_ZERO_UUID = uuid.UUID(int=0)


async def prune_events(
    db: Database,
    policy: RetentionPolicy,
    *,
    now: datetime,
    projects_per_query: int = 500,
    batch: int = 1000,
) -> int:
    """Delete what ``policy`` does not keep as of ``now``; return how many events went.

    Each DELETE removes at most ``batch`` events of one project and commits on its own,
    so no lock is held for long and writers to the project are never blocked.
    """
    if policy.keeps_everything:
        return 0
    cutoff = None if policy.max_age is None else now - policy.max_age
    deleted = 0
    after = _ZERO_UUID
    while True:
        rows = await db.fetch(_BOUNDS, after, cutoff, policy.max_events, projects_per_query)
        for row in rows:
            oldest, bound = row["oldest"], int(row["bound"] or 0)
            if oldest is None or bound < oldest:
                continue
            deleted += await _delete_through(db, row["id"], int(oldest), bound, batch)
        if len(rows) < projects_per_query:
            return deleted
        after = rows[-1]["id"]


async def _delete_through(
    db: Database, project_id: uuid.UUID, oldest: int, bound: int, batch: int
) -> int:
    """Delete the project's events with ``oldest <= seq <= bound``, ``batch`` at a time."""
    deleted = 0
    low = oldest
    while low <= bound:
        high = min(bound, low + batch - 1)
        status = await db.execute(
            "DELETE FROM project_events WHERE project_id = $1 AND seq BETWEEN $2 AND $3",
            project_id,
            low,
            high,
        )
        deleted += int(status.rsplit(" ", 1)[-1])
        low = high + 1
    return deleted
