"""What ties one process to the others sharing Redis, beyond the bridge: the ``cluster``
child of the root runs the presence heartbeat and reaper (``ClusterPresence``) and the
revocation listener (``SharedSessionEnds``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import trio

from ..identity.sessions import SharedSessionEnds
from .presence import ClusterPresence


@dataclass(frozen=True, slots=True)
class Cluster:
    presence: ClusterPresence
    session_ends: SharedSessionEnds

    def snapshot_detail(self) -> dict[str, Any]:
        """For ``/health/supervisor``: presence and whether revocations are heard."""
        return {**self.presence.snapshot_detail(), "revocations_heard": self.session_ends.listening}

    async def run(
        self, *, task_status: trio.TaskStatus[Cluster] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Run both until cancelled; neither fails for want of Redis or PostgreSQL."""
        async with trio.open_nursery() as nursery:
            await nursery.start(self.presence.run)
            await nursery.start(self.session_ends.run)
            task_status.started(self)
