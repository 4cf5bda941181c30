"""This process's live workspace connections, by login session and by user, with the
per-user bounds: how many connections a user may hold open and how fast they may edit.

Free of I/O: a connection is its ``Outbox``, and revoking a session closes the outboxes
indexed under it (their send tasks then close the sockets). One process only: a
revocation on another process reaches this index through ``atrium.identity.sessions``.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from .outbox import Outbox
from .protocol import CloseCode


@dataclass(slots=True)
class _User:
    """One user's open connections and their shared edit budget (a token bucket)."""

    connections: set[Outbox[Any]] = field(default_factory=set)
    edit_tokens: float = 0.0
    edit_tokens_at: float = 0.0


class ConnectionIndex:
    """Live connections by the login session (``Claims.session_id``) of their current
    token and by user.

    ``max_per_user`` bounds the connections one user holds open at once; ``edits_per_second``
    (bursts of ``edit_burst``) bounds the FILE_CHANGEs one user sends across all of them.
    """

    __slots__ = ("max_per_user", "edits_per_second", "edit_burst", "_users", "_sessions", "_of")

    def __init__(self, *, max_per_user: int, edits_per_second: float, edit_burst: int) -> None:
        self.max_per_user = max_per_user
        self.edits_per_second = edits_per_second
        self.edit_burst = edit_burst
        self._users: dict[uuid.UUID, _User] = {}
        self._sessions: dict[uuid.UUID, set[Outbox[Any]]] = {}
        self._of: dict[Outbox[Any], tuple[uuid.UUID, uuid.UUID]] = {}  # -> (user, session)

    def __len__(self) -> int:
        return len(self._of)

    def outboxes(self) -> Iterator[Outbox[Any]]:
        """The admitted connections' outboxes."""
        return iter(self._of)

    def admit(
        self, outbox: Outbox[Any], user_id: uuid.UUID, session_id: uuid.UUID, now: float
    ) -> bool:
        """Index a new connection; False (and nothing indexed) when its user already holds
        ``max_per_user`` connections. ``now`` is the trio clock."""
        user = self._users.get(user_id)
        if user is None:
            user = self._users[user_id] = _User(
                edit_tokens=float(self.edit_burst), edit_tokens_at=now
            )
        if len(user.connections) >= self.max_per_user:
            return False
        user.connections.add(outbox)
        self._sessions.setdefault(session_id, set()).add(outbox)
        self._of[outbox] = (user_id, session_id)
        return True

    def renew(self, outbox: Outbox[Any], session_id: uuid.UUID) -> None:
        """The connection now holds a token of ``session_id`` (a renewal over the socket,
        possibly from another login of the same user): revoking that session reaches it,
        revoking the old one no longer does."""
        user_id, old = self._of[outbox]
        if old == session_id:
            return
        self._unlink_session(outbox, old)
        self._sessions.setdefault(session_id, set()).add(outbox)
        self._of[outbox] = (user_id, session_id)

    def release(self, outbox: Outbox[Any]) -> None:
        """Forget a connection that ended (no-op when it was never admitted)."""
        entry = self._of.pop(outbox, None)
        if entry is None:
            return
        user_id, session_id = entry
        self._unlink_session(outbox, session_id)
        user = self._users[user_id]
        user.connections.discard(outbox)
        if not user.connections:
            del self._users[user_id]

    def _unlink_session(self, outbox: Outbox[Any], session_id: uuid.UUID) -> None:
        members = self._sessions[session_id]
        members.discard(outbox)
        if not members:
            del self._sessions[session_id]

    def revoke_session(self, session_id: uuid.UUID) -> int:
        """Close every connection of ``session_id`` with 4001 ``session_revoked``, at once
        (nothing more is sent to them, nothing more they send is stored). Returns how many."""
        outboxes = self._sessions.get(session_id, ())
        for outbox in outboxes:
            outbox.close(CloseCode.UNAUTHORIZED, "session_revoked", flush=False)
        return len(outboxes)

    def sessions(self) -> list[uuid.UUID]:
        """The login sessions that hold connections here now."""
        return list(self._sessions)

    def allow_edit(self, user_id: uuid.UUID, now: float) -> bool:
        """Spend one of the user's edit tokens; False when they are out of them (the edit
        must then be refused). ``now`` is the trio clock."""
        user = self._users.get(user_id)
        if user is None:
            return False
        user.edit_tokens = min(
            float(self.edit_burst),
            user.edit_tokens + (now - user.edit_tokens_at) * self.edits_per_second,
        )
        user.edit_tokens_at = now
        if user.edit_tokens < 1:
            return False
        user.edit_tokens -= 1
        return True
