"""Durable events: the one record of the project event log, from the row to the wire.

Every event a project's log holds is an ``Event`` of one ``EventType``: the REST API's
project and membership changes, the live workspace's joins, leaves and file changes, and
the job lifecycle. ``persistence/events.py`` converts rows to ``Event`` and ``NewEvent`` to
rows; ``protocol.event_frame`` turns an ``Event`` into the frame clients see; HTTP
serialises it as is. Cursor moves are not events: they are never stored.
"""

from __future__ import annotations

import enum
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol


class EventType(enum.StrEnum):
    """Every durable event type (stored and sent as its name)."""

    PROJECT_CREATED = "PROJECT_CREATED"
    PROJECT_UPDATED = "PROJECT_UPDATED"
    PROJECT_DELETED = "PROJECT_DELETED"
    MEMBER_ADDED = "MEMBER_ADDED"
    MEMBER_ROLE_CHANGED = "MEMBER_ROLE_CHANGED"
    MEMBER_REMOVED = "MEMBER_REMOVED"
    USER_JOIN = "USER_JOIN"
    USER_LEAVE = "USER_LEAVE"
    FILE_CHANGE = "FILE_CHANGE"
    JOB_QUEUED = "JOB_QUEUED"
    JOB_STARTED = "JOB_STARTED"
    JOB_PROGRESS = "JOB_PROGRESS"
    JOB_COMPLETED = "JOB_COMPLETED"
    JOB_FAILED = "JOB_FAILED"
    JOB_DEAD = "JOB_DEAD"
    DOCUMENT_EDITED = "DOCUMENT_EDITED"
    """Live documents edited: who edited which, coalesced per document (never the bytes)."""


@dataclass(frozen=True, slots=True)
class Event:
    """One stored event. ``seq`` is gapless per project; ``payload`` is plain JSON values
    (as read back from the log); ``actor_id`` is None for events no user caused."""

    project_id: uuid.UUID
    seq: int
    type: EventType
    actor_id: uuid.UUID | None
    payload: dict[str, Any]
    created_at: datetime


@dataclass(frozen=True, slots=True)
class NewEvent:
    """An event to append. With ``client_id`` it is stored at most once per
    (project, actor, client_id): a client's retry finds the first one. With
    ``presence_version`` (a USER_JOIN or USER_LEAVE the cluster's presence decided), it
    is stored only if newer than the actor's last one stored (``append_presence``);
    clients never see the version."""

    type: EventType
    actor_id: uuid.UUID | None
    payload: dict[str, Any]
    client_id: str | None = None
    presence_version: int | None = None


class EventPublisher(Protocol):
    """Where events go once their transaction has committed (live workspaces)."""

    async def publish(self, project_id: uuid.UUID, events: Sequence[Event]) -> None:
        """Deliver ``events`` (in ``seq`` order) to whoever follows ``project_id``."""
        ...
