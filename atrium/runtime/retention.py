"""The event-log pruner: a supervised child that applies the retention policy once at
start and then every ``interval`` seconds (``persistence.retention`` does the deleting).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Self

import trio

from ..core.config import Settings
from ..persistence.database import Database
from ..persistence.retention import RetentionPolicy, prune_events

log = logging.getLogger("atrium.retention")

PRUNE_INTERVAL = 600.0


def retention_policy(settings: Settings) -> RetentionPolicy:
    """EVENT_LOG_RETENTION_DAYS and EVENT_LOG_MAX_EVENTS_PER_PROJECT (0: no bound)."""
    days, cap = settings.event_log_retention_days, settings.event_log_max_events_per_project
    return RetentionPolicy(max_age=timedelta(days=days) if days else None, max_events=cap or None)


@dataclass(frozen=True, slots=True)
class PrunerStatistics:
    passes: int  # passes finished (failed ones included)
    deleted: int  # events deleted by all of them
    failures: int  # passes that raised (logged; the next pass tries again)


class EventPruner:
    """Prunes the event log periodically; ``clock`` (wall-clock seconds) is "now"."""

    def __init__(
        self,
        db: Database,
        policy: RetentionPolicy,
        *,
        clock: Callable[[], float],
        interval: float = PRUNE_INTERVAL,
    ) -> None:
        self._db = db
        self._policy = policy
        self._clock = clock
        self._interval = interval
        self._passes = 0
        self._deleted = 0
        self._failures = 0

    async def run(self, *, task_status: trio.TaskStatus[Self] = trio.TASK_STATUS_IGNORED) -> None:
        """Report started at once, then prune now and every ``interval`` seconds.

        A failed pass (the database away, a statement timing out) is logged and retried
        at the next interval: pruning can wait, and its failures are not this child's
        fault, so they must not count against the root supervisor's restart budget.
        """
        task_status.started(self)
        while True:
            await self.prune_once()
            await trio.sleep(self._interval)

    async def prune_once(self) -> int:
        """One pass; returns the events deleted (0 when it failed)."""
        deleted = 0
        try:
            now = datetime.fromtimestamp(self._clock(), UTC)
            deleted = await prune_events(self._db, self._policy, now=now)
        except Exception:
            self._failures += 1
            log.exception("pruning the event log failed; retrying in %.0f s", self._interval)
        else:
            if deleted:
                log.info("pruned %d events from the event log", deleted)
        self._deleted += deleted
        self._passes += 1
        return deleted

    def statistics(self) -> PrunerStatistics:
        return PrunerStatistics(self._passes, self._deleted, self._failures)
