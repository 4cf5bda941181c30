"""Job lifecycle events in the project's log and live workspace (jobs tied to a project).

Every state change is appended to the project's event log (JOB_QUEUED, JOB_STARTED,
JOB_COMPLETED, JOB_FAILED, JOB_DEAD; a cancelled job ends with JOB_FAILED and status
``cancelled``) and published to the workspace like any other log event. Progress is
ephemeral: sent to the open workspace, coalesced per job like cursors, never stored.
The job row stays the truth: an event that cannot be written (the project was deleted,
the database is away) is logged and skipped, never a failure of the job.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from typing import Any, Protocol

from ..events import Event, EventPublisher, EventType, NewEvent
from ..persistence import events as event_log
from ..persistence.database import Database, DatabaseUnavailable
from ..persistence.errors import ProjectNotFound
from ..persistence.jobs import Job, JobStatus, Submitted, event_payload
from ..timestamps import utc_now_iso

log = logging.getLogger("atrium.jobs")

_TYPES = {
    JobStatus.QUEUED: EventType.JOB_QUEUED,
    JobStatus.RUNNING: EventType.JOB_STARTED,
    JobStatus.COMPLETED: EventType.JOB_COMPLETED,
    JobStatus.FAILED: EventType.JOB_FAILED,
    JobStatus.DEAD: EventType.JOB_DEAD,
    JobStatus.CANCELLED: EventType.JOB_FAILED,
}


class LiveProgress(Protocol):
    """Sends an ephemeral frame to a project's open workspace (``Workspaces``)."""

    async def progress(
        self, project_id: uuid.UUID, key: uuid.UUID, frame: dict[str, Any]
    ) -> None: ...


class JobEvents:
    """A ``JobObserver`` that writes job events into projects' logs and workspaces."""

    def __init__(self, db: Database, publisher: EventPublisher, live: LiveProgress) -> None:
        self._db = db
        self._publisher = publisher
        self._live = live

    async def job_changed(self, job: Job, previous: JobStatus | None) -> None:
        project_id = job.project_id
        if project_id is None or job.status is previous or previous is None:
            return  # a new job's JOB_QUEUED was written with it (``submitted``)
        event = NewEvent(_TYPES[job.status], job.user_id, event_payload(job))
        try:
            appended = await event_log.append(self._db, project_id, [event])
        except (ProjectNotFound, DatabaseUnavailable) as error:
            log.warning(
                "job %s: no %s event in project %s: %s", job.id, event.type, project_id, error
            )
            return
        await self._publish(project_id, [stored for stored, _ in appended])

    async def submitted(self, submitted: Submitted) -> None:
        """Publish the JOB_QUEUED that the submission appended in its transaction."""
        job = submitted.job
        if job.project_id is not None and submitted.events:
            await self._publish(job.project_id, submitted.events)

    async def _publish(self, project_id: uuid.UUID, events: Sequence[Event]) -> None:
        try:
            await self._publisher.publish(project_id, events)
        except Exception:  # the events are durable; live clients catch up from the log
            log.exception("publishing job events of project %s failed", project_id)

    async def job_progress(self, job: Job, percent: int, message: str | None) -> None:
        if job.project_id is None:
            return
        frame = {
            "type": "JOB_PROGRESS",
            "project_id": str(job.project_id),
            "user_id": str(job.user_id),
            "job_id": f"job_{job.id}",
            "task_name": job.task_name,
            "progress": percent,
            "message": message,
            "timestamp": utc_now_iso(),
        }
        await self._live.progress(job.project_id, job.id, frame)
