"""Where a process's live workspace traffic goes besides its own connections.

With REDIS_URL set, the bridge (``atrium.actors.bridge``) relays every durable event and
every ephemeral frame committed or sent here to the other processes that serve the same
project; without it, nothing is relayed (``NoRelay``). A relay never blocks and never
raises: what it cannot pass on is dropped (durable events are in the log, and the other
processes catch up from it; ephemeral frames are lossy by design). While a relay is not
``connected``, the workspaces announce their durable events on the log instead
(PostgreSQL NOTIFY; see ``domain.workspaces.Workspaces``).

Live documents ride the same relay (``DocumentRelay``): each update stored here, with its
seq, and each awareness change. A process that misses updates fills the gap from the
document's stored updates by seq, as a workspace does from its log.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Protocol

import trio

from ..core.events import Event


class Relay(Protocol):
    """Passes a project's live traffic on to other processes (see the module docstring)."""

    @property
    def connected(self) -> bool:
        """True while what is relayed reaches the other processes."""
        ...

    async def wait_connected(self, connected: bool = True) -> None:
        """Return once ``connected`` is as asked."""
        ...

    def events(self, project_id: uuid.UUID, events: Sequence[Event]) -> None:
        """Relay durable events that have committed to the project's log (in seq order)."""
        ...

    def ephemeral(self, project_id: uuid.UUID, key: uuid.UUID, frame: str) -> None:
        """Relay an encoded frame that is never stored (a cursor move, a job's progress);
        ``key`` coalesces frames for a connection that falls behind (a user, a job)."""
        ...


class DocumentRelay(Protocol):
    """Passes a live document's traffic on to the other processes that hold a replica of
    it (see the module docstring); never blocks, never raises."""

    @property
    def connected(self) -> bool:
        """True while what is relayed reaches the other processes."""
        ...

    def document_updates(
        self, document_id: uuid.UUID, first_seq: int, updates: Sequence[bytes]
    ) -> None:
        """Relay Yjs updates stored with seqs ``first_seq``, ``first_seq + 1``, ..."""
        ...

    def document_awareness(self, document_id: uuid.UUID, payload: bytes) -> None:
        """Relay an encoded awareness update (entries already stamped with their user);
        lossy, like cursor moves."""
        ...


class NoRelay:
    """A ``Relay`` (and ``DocumentRelay``) for a single process: nothing to pass on."""

    @property
    def connected(self) -> bool:
        return False

    async def wait_connected(self, connected: bool = True) -> None:
        if connected:
            await trio.sleep_forever()

    def events(self, project_id: uuid.UUID, events: Sequence[Event]) -> None:
        return None

    def ephemeral(self, project_id: uuid.UUID, key: uuid.UUID, frame: str) -> None:
        return None

    def document_updates(
        self, document_id: uuid.UUID, first_seq: int, updates: Sequence[bytes]
    ) -> None:
        return None

    def document_awareness(self, document_id: uuid.UUID, payload: bytes) -> None:
        return None
