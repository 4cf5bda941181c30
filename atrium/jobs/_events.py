"""Job lifecycle events in the project's live workspace (jobs tied to a project).

Every state change is appended to the project's event log by ``atrium.persistence`` in the
transaction that makes it (JOB_QUEUED, JOB_STARTED, JOB_COMPLETED, JOB_FAILED, JOB_DEAD;
a cancelled job ends with JOB_FAILED and status ``cancelled``); this observer publishes
those events to the workspace once committed, as the domain services do. Progress is
ephemeral: sent to the open workspace, coalesced per job like cursors, never stored.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from typing import Any, Protocol

from ..core.events import Event, EventPublisher
from ..core.jobs import Job
from ..core.timestamps import utc_now_iso

log = logging.getLogger("atrium.jobs")


class LiveProgress(Protocol):
    """Sends an ephemeral frame to a project's open workspace (``Workspaces``)."""

    async def progress(
        self, project_id: uuid.UUID, key: uuid.UUID, frame: dict[str, Any]
    ) -> None: ...


class JobEvents:
    """A ``JobObserver`` that delivers job events to projects' live workspaces."""

    def __init__(self, publisher: EventPublisher, live: LiveProgress) -> None:
        self._publisher = publisher
        self._live = live

    async def job_changed(self, job: Job, events: Sequence[Event]) -> None:
        """Publish the committed ``events`` of the job's change. Publishing may fail
        without failing anything: the events are durable, and live clients catch up from
        the log."""
        if job.project_id is None or not events:
            return
        try:
            await self._publisher.publish(job.project_id, events)
        except Exception:
            log.exception("publishing job events of project %s failed", job.project_id)

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
