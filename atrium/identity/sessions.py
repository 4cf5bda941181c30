"""Ending a login session's live sockets: in this process, or on every process.

A revocation (logout, a refresh-token reuse) is committed to PostgreSQL first; then the
session's open WebSockets must close with 4001 ``session_revoked`` wherever they are.
``LocalSessionEnds`` closes this process's. ``SharedSessionEnds`` (with REDIS_URL) also
publishes the session id on a Redis channel that every process listens to (``run``).
Pub/sub drops what is published while a listener is cut off, so each time listening
(re)starts a process asks PostgreSQL which of its open sessions were revoked meanwhile and
closes those too; a revocation that could not be published is published again later.
"""

from __future__ import annotations

import logging
import uuid
from typing import Protocol

import trio

from ..persistence import accounts
from ..persistence import shared as shared_state
from ..persistence.database import Database, DatabaseUnavailable
from ..persistence.redis import Redis, RedisUnavailable

log = logging.getLogger("atrium.sessions")

_RETRY_SECONDS = (0.1, 5.0)  # the first and the longest wait before listening again


class SessionIndex(Protocol):
    def sessions(self) -> list[uuid.UUID]:
        """The login sessions that hold connections in this process now."""
        ...


class LiveSessions(Protocol):
    """What ending a session needs of this process's live connections: the domain's
    ``Realtime`` (a Protocol here, so identity does not import the layer above it)."""

    @property
    def connections(self) -> SessionIndex: ...

    def revoke_session(self, session_id: uuid.UUID) -> int:
        """Close the session's WebSockets here with 4001; how many there were."""
        ...


class SessionEnds(Protocol):
    async def ended(self, session_id: uuid.UUID) -> None:
        """``session_id`` was revoked (committed): close its WebSockets with 4001, here at
        once and, with a shared implementation, on every other process."""
        ...


class LocalSessionEnds:
    """Closes this process's WebSockets of a revoked session."""

    def __init__(self, realtime: LiveSessions) -> None:
        self._realtime = realtime

    async def ended(self, session_id: uuid.UUID) -> None:
        self._realtime.revoke_session(session_id)


class SharedSessionEnds:
    """Closes a revoked session's WebSockets on every process sharing ``redis``."""

    def __init__(self, redis: Redis, db: Database, realtime: LiveSessions) -> None:
        self._redis = redis
        self._db = db
        self._realtime = realtime
        self._unpublished: set[uuid.UUID] = set()
        self._catch_up = trio.Event()  # set when listening (re)started
        self.listening = False

    async def ended(self, session_id: uuid.UUID) -> None:
        self._realtime.revoke_session(session_id)
        self._unpublished.add(session_id)
        await self._publish()

    async def _publish(self) -> None:
        for session_id in list(self._unpublished):
            try:
                await shared_state.publish_revoked(self._redis, session_id)
            except RedisUnavailable as error:
                log.warning("revocation of a session kept for when Redis answers: %s", error)
                return
            self._unpublished.discard(session_id)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen for revocations until cancelled, again after every lost subscription
        (waiting 0.1 s, doubling up to 5 s); after each (re)subscription, close the
        sockets of sessions revoked meanwhile and publish what could not be."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._catch_up_each_time)
            task_status.started()
            delay = _RETRY_SECONDS[0]
            while True:
                try:
                    await shared_state.listen_revoked(
                        self._redis, self._received, on_subscribed=self._subscribed
                    )
                except RedisUnavailable as error:
                    if self.listening:
                        delay = _RETRY_SECONDS[0]
                        log.warning("revocations: %s; listening again", error)
                    self.listening = False
                    await trio.sleep(delay)
                    delay = min(_RETRY_SECONDS[1], delay * 2)

    def _received(self, session_id: uuid.UUID) -> None:
        self._realtime.revoke_session(session_id)

    def _subscribed(self) -> None:
        self.listening = True
        self._catch_up.set()

    async def _catch_up_each_time(self) -> None:
        while True:
            await self._catch_up.wait()
            self._catch_up = trio.Event()
            await self._publish()
            try:
                revoked = await accounts.revoked_among(
                    self._db, self._realtime.connections.sessions()
                )
            except DatabaseUnavailable as error:
                log.warning("revocations: checking open sessions: %s", error)
                self._catch_up.set()
                await trio.sleep(_RETRY_SECONDS[1])
                continue
            for session_id in revoked:
                self._realtime.revoke_session(session_id)
