"""One open live document: an actor owning its pycrdt ``Doc``, its peers and awareness.

Durable before it is shared: an update a peer sends is applied to the document in memory
(that is how it is validated, and how what it really changed is learnt: a duplicate
changes nothing and stores nothing), then appended to PostgreSQL, and only then broadcast
to the other peers or shown to anyone (every message is handled to the end before the
next, so no peer reads an update that is not stored). When the append fails the document
in memory holds what PostgreSQL does not: the actor closes every peer (1013 when the
database is away) and stops, and the next ``Documents.get`` loads it again from
PostgreSQL. Clients resend what the server lacks when they sync again.

A crash (an exception in a handler) closes every peer with 1012 (their providers
reconnect) and the supervisor restarts the actor, which loads the document from its
snapshot plus the updates after it: nothing appended is lost.

Across processes every process with a peer on the document holds a replica (an actor of
its own). What one stores goes to the others through the relay with its seq
(``Replicated``); a replica applies the updates in seq order, skips what it has, and
reads what it lacks from PostgreSQL first (a dropped or late message). A notice that the
document reached a seq (``Reached``: a NOTIFY on the log, or the bridge catching up after
Redis was away) makes it read up to there. Awareness crosses the same way, lossy.
"""

from __future__ import annotations

import logging
import math
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Self

import pycrdt
import trio

from ..core.config import DEFAULTS
from ..persistence import documents as store
from ..persistence.database import Database, DatabaseUnavailable
from ..persistence.documents import DocumentNotFound, DocumentRef
from ..realtime import yjs
from ..realtime.protocol import CloseCode
from ..realtime.relay import DocumentRelay, NoRelay
from ._actor import Actor
from ._errors import ActorStopped

log = logging.getLogger("atrium.documents")

TEXT = "content"
"""The name of the ``Y.Text`` that holds a document's text."""


@dataclass(eq=False, slots=True)
class Peer:
    """One WebSocket connection to the document; the connection owns the socket.

    ``deliver`` queues one binary frame for the connection: it never blocks and never
    raises (the connection's own bounded queue closes it with 4008 when full). ``close``
    asks the connection to close with a code and a reason; it never blocks.
    """

    user_id: uuid.UUID
    email: str
    can_edit: bool
    deliver: Callable[[bytes], object]
    close: Callable[[int, str], None]
    clients: set[int] = field(default_factory=set)
    """The awareness client ids this peer speaks for (the actor's, set on first use)."""


# -- messages ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Attach:
    """Ask: add the peer; it then receives our sync step 1 and the awareness states."""

    peer: Peer


@dataclass(frozen=True, slots=True)
class Incoming:
    """Tell: one binary y-websocket message from ``peer``."""

    peer: Peer
    data: bytes


@dataclass(frozen=True, slots=True)
class Detach:
    """Tell: the peer's connection ended; its awareness clients are removed."""

    peer: Peer


@dataclass(frozen=True, slots=True)
class DropUser:
    """Tell: close every peer of the user (removed from the project, say)."""

    user_id: uuid.UUID
    code: int
    reason: str


@dataclass(frozen=True, slots=True)
class ReadText:
    """Ask: the document's text (the ``Y.Text`` named ``content``)."""


@dataclass(frozen=True, slots=True)
class ReadState:
    """Ask: the whole document as one Yjs update."""


@dataclass(frozen=True, slots=True)
class ReplaceText:
    """Ask: make the text ``text``, as an update by ``user_id`` (stored, then broadcast)."""

    text: str
    user_id: uuid.UUID | None


@dataclass(frozen=True, slots=True)
class CloseAll:
    """Tell: close every peer with ``code`` and stop (the document was deleted, say)."""

    code: int
    reason: str


@dataclass(frozen=True, slots=True)
class Replicated:
    """Tell: updates another process stored, with seqs ``first_seq``, ``first_seq + 1``,
    ... (relayed: may come late, twice, or never)."""

    first_seq: int
    updates: Sequence[bytes]


@dataclass(frozen=True, slots=True)
class Reached:
    """Tell: the document's stored updates reached ``seq`` (None: read it from the row);
    apply what this replica lacks, read from PostgreSQL."""

    seq: int | None = None


@dataclass(frozen=True, slots=True)
class RemoteAwareness:
    """Tell: an awareness update relayed from another process (already stamped)."""

    payload: bytes


@dataclass(frozen=True, slots=True)
class Compact:
    """Ask: fold the updates since the last snapshot into a new one now; replies whether
    a snapshot was stored."""


Message = (
    Attach
    | Incoming
    | Detach
    | DropUser
    | ReadText
    | ReadState
    | ReplaceText
    | CloseAll
    | Compact
    | Replicated
    | Reached
    | RemoteAwareness
)


@dataclass(frozen=True, slots=True)
class DocumentSettings:
    max_update_bytes: int = DEFAULTS.doc_max_update_bytes
    max_document_bytes: int = DEFAULTS.doc_max_bytes
    idle_timeout: float = DEFAULTS.doc_idle_seconds
    compact_after: int = DEFAULTS.doc_compact_after
    mailbox_size: int = 4096
    update_batch: int = 64
    """At most this many queued updates are appended in one transaction."""
    append_interval: float = 0.004
    """Seconds from the start of one append of peers' updates to the next, at the least:
    while a document is busy, what its peers send meanwhile waits (at most this long) and
    is appended as one batch, so a burst costs one commit and one frame to each peer
    rather than one per update. An update that finds the document quiet waits not at all.
    0: append whatever is queued at once."""
    max_clients_per_peer: int = 8
    """Awareness client ids one connection may speak for (a provider uses one)."""
    remote_awareness_seconds: float = 30.0
    """How long another process's awareness state is shown to peers that attach here
    without being renewed (y-protocols' clients renew theirs every 15 s and drop one not
    renewed for 30 s)."""


def _never() -> bool:
    return False


def _no_activity(user_id: uuid.UUID, ref: DocumentRef) -> None:
    pass


def _is_incoming(message: Message) -> bool:
    return isinstance(message, Incoming)


@dataclass(slots=True)
class _Client:
    """An awareness client: who speaks for it, its clock and its (stamped) state."""

    peer: Peer
    clock: int
    state: dict[str, Any]


class DocumentTooLarge(Exception):
    """The change would take the document past its size limit (DOC_MAX_BYTES)."""

    code = "document_too_large"

    def __init__(self) -> None:
        super().__init__("The document would exceed its size limit")


class _Tainted(Exception):
    """The document in memory holds updates PostgreSQL does not: it must not be shown."""


class DocumentActor(Actor[Message, Any]):
    """The single owner of one open document.

    ``on_edit(user_id, ref)`` is called once for each update a user made that changed the
    document (a run of one peer's queued updates is one), after it is stored (the
    workspace's activity feed hangs off it); it must not block or raise.
    """

    expected_errors = (DatabaseUnavailable, DocumentNotFound, DocumentTooLarge, ActorStopped)

    __slots__ = (
        "ref",
        "_db",
        "_settings",
        "_on_edit",
        "_doc",
        "_text",
        "_captured",
        "_peers",
        "_clients",
        "_last_seq",
        "_snapshot_seq",
        "_stored_bytes",
        "_since_snapshot",
        "_updates_applied",
        "_tainted",
        "_batch_bytes",
        "_relay",
        "_notify_log",
        "_remote",
        "_used",
        "_next_append",
    )

    def __init__(
        self,
        ref: DocumentRef,
        db: Database,
        settings: DocumentSettings,
        *,
        on_edit: Callable[[uuid.UUID, DocumentRef], None] | None = None,
        relay: DocumentRelay | None = None,
        notify_log: Callable[[], bool] | None = None,
    ) -> None:
        """``relay`` passes what is stored or said here on to the other processes'
        replicas; while ``notify_log()`` is true (they cannot be reached through it), each
        append is also announced on the log (PostgreSQL NOTIFY)."""
        super().__init__(
            name=f"document:{ref.id}",
            mailbox_size=settings.mailbox_size,
            idle_timeout=settings.idle_timeout,
        )
        self.ref = ref
        self._db = db
        self._settings = settings
        self._on_edit = on_edit or _no_activity
        self._doc: pycrdt.Doc[Any] = pycrdt.Doc()
        self._text = self._doc.get(TEXT, type=pycrdt.Text)
        # What each transaction on the document really changed (pycrdt's observer).
        self._captured: list[bytes] = []
        self._doc.observe(lambda event: self._captured.append(event.update))
        self._peers: set[Peer] = set()
        self._clients: dict[int, _Client] = {}
        self._last_seq = 0
        self._snapshot_seq = 0
        self._stored_bytes = 0
        self._since_snapshot = 0
        self._updates_applied = 0
        self._tainted = False
        self._batch_bytes = 0  # of the updates applied and not yet appended
        self._relay: DocumentRelay = relay or NoRelay()
        self._notify_log = notify_log or _never
        # Awareness clients of other processes: client id -> (clock, state, when seen).
        self._remote: dict[int, tuple[int, dict[str, Any], float]] = {}
        # When anything of this process last used the document (trio clock): relayed
        # traffic alone must not keep a replica with no peers open.
        self._used = trio.current_time()
        # When the next batch of peers' updates may be appended (``append_interval``).
        self._next_append = -math.inf

    # -- lifecycle --------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[Self] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            await super().run(task_status=task_status)
        finally:
            # Whatever ended the actor, its peers must not hang on a document that is no
            # longer served: their providers reconnect and sync with the next actor.
            self._close_all(CloseCode.SERVICE_RESTART, "document_restarted")

    async def on_start(self) -> None:
        loaded = await store.load_document(self._db, self.ref.id)
        if loaded.snapshot is not None:
            self._doc.apply_update(loaded.snapshot)
        for update in loaded.updates:
            self._doc.apply_update(update.update)
        self._captured.clear()
        self._last_seq = loaded.row.last_seq
        self._snapshot_seq = loaded.row.snapshot_seq
        self._stored_bytes = loaded.row.byte_size
        self._since_snapshot = len(loaded.updates)

    async def on_stop(self) -> None:
        # A graceful stop with peers is the process shutting down; without, it is idle.
        self._close_all(CloseCode.GOING_AWAY, "server_shutdown")
        if self._since_snapshot and not self._tainted:
            try:
                await self._compact()
            except (DatabaseUnavailable, DocumentNotFound) as error:
                log.info("%r not compacted at stop: %r", self, error)

    def is_idle(self) -> bool:
        return not self._peers

    async def handle(self, message: Message) -> Any:
        try:
            return await self._handle(message)
        except _Tainted as tainted:
            # Closed and stopped, not crashed: an outage or a deleted document spends
            # none of the supervisor's restart budget. The next get loads it again.
            self._tainted = True
            cause = tainted.__cause__
            if isinstance(cause, DocumentNotFound) and cause.project_deleted:
                self._close_all(CloseCode.PROJECT_DELETED, "project_deleted")
            elif isinstance(cause, DocumentNotFound):
                self._close_all(CloseCode.DOCUMENT_DELETED, "document_deleted")
            elif isinstance(cause, DatabaseUnavailable):
                self._close_all(CloseCode.TRY_AGAIN_LATER, "database_unavailable")
            else:
                self._close_all(CloseCode.SERVICE_RESTART, "document_restarted")
            self.request_stop()
            if isinstance(cause, DatabaseUnavailable | DocumentNotFound):
                raise cause from None
            raise ActorStopped(f"{self!r} is reloading") from None

    async def _handle(self, message: Message) -> Any:
        if self._tainted:
            # Stopping: what is still queued must not see the document in memory.
            if isinstance(
                message,
                Incoming | Detach | DropUser | CloseAll | Replicated | Reached | RemoteAwareness,
            ):
                return None
            raise ActorStopped(f"{self!r} is reloading")
        if isinstance(message, Replicated | Reached | RemoteAwareness):
            return await self._from_elsewhere(message)
        self._used = trio.current_time()
        if isinstance(message, Incoming):
            return await self._incoming(message)
        if isinstance(message, Attach):
            return self._attach(message.peer)
        if isinstance(message, Detach):
            return self._detach(message.peer)
        if isinstance(message, DropUser):
            return self._drop_user(message)
        if isinstance(message, ReadText):
            return str(self._text)
        if isinstance(message, ReadState):
            return self._doc.get_update()
        if isinstance(message, ReplaceText):
            return await self._replace_text(message)
        if isinstance(message, Compact):
            return await self._compact()
        if isinstance(message, CloseAll):
            self._close_all(message.code, message.reason)
            self.request_stop()
            return None
        raise TypeError(f"{self!r} does not handle {type(message).__name__}")

    # -- peers ------------------------------------------------------------------------------

    def _attach(self, peer: Peer) -> None:
        self._peers.add(peer)
        peer.deliver(yjs.sync_step1(self._doc.get_state()))
        states = [
            yjs.AwarenessEntry(client_id, client.clock, client.state)
            for client_id, client in self._clients.items()
        ]
        fresh = trio.current_time() - self._settings.remote_awareness_seconds
        for client_id, (clock, state, seen) in list(self._remote.items()):
            if seen < fresh:
                del self._remote[client_id]  # its process stopped renewing it: gone
            else:
                states.append(yjs.AwarenessEntry(client_id, clock, state))
        if states:
            peer.deliver(yjs.awareness_message(yjs.encode_awareness(states)))

    def _detach(self, peer: Peer) -> None:
        if peer not in self._peers:
            return
        self._peers.discard(peer)
        gone = []
        for client_id in sorted(peer.clients):
            client = self._clients.pop(client_id, None)
            if client is not None:
                gone.append(yjs.AwarenessEntry(client_id, client.clock + 1, None))
        peer.clients.clear()
        if gone:
            encoded = yjs.encode_awareness(gone)
            self._broadcast(yjs.awareness_message(encoded), None)
            self._relay.document_awareness(self.ref.id, encoded)

    def _refuse(self, peer: Peer, code: int, reason: str) -> None:
        peer.close(code, reason)
        self._detach(peer)

    def _drop_user(self, message: DropUser) -> None:
        for peer in [p for p in self._peers if p.user_id == message.user_id]:
            self._refuse(peer, message.code, message.reason)

    def _close_all(self, code: int, reason: str) -> None:
        for peer in self._peers:
            peer.close(code, reason)
        self._peers.clear()
        self._clients.clear()

    def _broadcast(self, frame: bytes, origin: Peer | None) -> None:
        for peer in self._peers:
            if peer is not origin:
                peer.deliver(frame)

    # -- messages from peers ----------------------------------------------------------------

    async def _incoming(self, first: Incoming) -> None:
        """Handle the peers' messages queued now, in order (at most four batches' worth):
        the updates among them (up to ``update_batch``) are appended in one transaction,
        before any other message is answered. While the document is busy, the updates
        that arrive before ``append_interval`` has passed since the last append began
        join the batch."""
        batch: list[tuple[Peer, bytes]] = []
        handled = 0
        message: Incoming | None = first
        while message is not None:
            peer = message.peer
            if peer in self._peers:
                try:
                    parsed = yjs.parse_message(message.data)
                except yjs.MalformedMessage as error:
                    log.info("%r refused a message: %s", self, error)
                    self._refuse(peer, CloseCode.INVALID_PAYLOAD, "malformed_message")
                    parsed = None
                if isinstance(parsed, yjs.SyncStep2 | yjs.SyncUpdate):
                    if peer.can_edit and self._too_large(len(parsed.update)):
                        # Compaction may bring it under the limit: store what is
                        # pending (the snapshot must hold only what is stored) first.
                        await self._store(batch)
                        await self._compact_to_fit()
                    self._take_update(peer, parsed.update, batch)
                elif parsed is not None:
                    await self._store(batch)
                    self._other(peer, parsed)
            handled += 1
            limit = self._settings.update_batch
            if len(batch) >= limit or handled >= 4 * limit:
                break
            taken = self.take_nowait(_is_incoming)
            if taken is None and batch and trio.current_time() < self._next_append:
                # Busy: the last append began less than ``append_interval`` ago. Wait for
                # the rest of it, so that what arrives meanwhile joins this batch.
                await trio.sleep_until(self._next_append)
                taken = self.take_nowait(_is_incoming)
            message = taken if isinstance(taken, Incoming) else None
        await self._store(batch)

    def _other(self, peer: Peer, message: yjs.YMessage) -> None:
        if isinstance(message, yjs.SyncStep1):
            try:
                missing = self._doc.get_update(message.state_vector)
            except ValueError:
                self._refuse(peer, CloseCode.INVALID_PAYLOAD, "malformed_message")
                return
            peer.deliver(yjs.sync_step2(missing))
        elif isinstance(message, yjs.AwarenessUpdate):
            self._awareness(peer, message.payload)

    def _take_update(self, peer: Peer, update: bytes, batch: list[tuple[Peer, bytes]]) -> None:
        """Apply one peer's update to the document if it may make it, and queue what it
        changed for ``_store``. A viewer's update is dropped; a too large one closes its
        peer."""
        if not peer.can_edit:
            return
        if len(update) > self._settings.max_update_bytes:
            self._refuse(peer, CloseCode.MESSAGE_TOO_BIG, "update_too_large")
            return
        if self._too_large(len(update)):
            self._refuse(peer, CloseCode.DOCUMENT_TOO_LARGE, "document_too_large")
            return
        self._captured.clear()
        try:
            yjs.apply_update(self._doc, update)
        except yjs.MalformedMessage:
            self._refuse(peer, CloseCode.INVALID_PAYLOAD, "malformed_message")
            return
        except yjs.YrsPanic as panic:
            # Yrs gave up half way: what the document holds now is not to be trusted.
            log.warning("%r: an update made Yrs panic: %s", self, panic)
            self._refuse(peer, CloseCode.INVALID_PAYLOAD, "malformed_message")
            raise _Tainted() from panic
        for changed in self._captured:
            batch.append((peer, changed))
            self._batch_bytes += len(changed)
        self._captured.clear()

    async def _store(self, batch: list[tuple[Peer, bytes]]) -> None:
        """Append the applied updates in one transaction, then share them. Consecutive
        updates of one peer are merged into one (one row: a burst of keystrokes is one
        message). Updates of one peer go to the peers but that one; updates of several
        go as one merged frame to every peer (one frame per receiver, not one per update:
        a peer's own updates come back with it, and Yjs ignores what it holds).
        Raises _Tainted when the append failed."""
        if not batch:
            return
        self._next_append = trio.current_time() + self._settings.append_interval
        runs: list[tuple[Peer, list[bytes]]] = []
        for peer, data in batch:
            if runs and runs[-1][0] is peer:
                runs[-1][1].append(data)
            else:
                runs.append((peer, [data]))
        batch.clear()
        self._batch_bytes = 0
        merged = [
            (peer, updates[0] if len(updates) == 1 else pycrdt.merge_updates(*updates))
            for peer, updates in runs
        ]
        await self._append([(data, peer.user_id) for peer, data in merged])
        if len(merged) == 1:
            self._broadcast(yjs.sync_update(merged[0][1]), merged[0][0])
        else:
            self._broadcast(yjs.sync_update(pycrdt.merge_updates(*(d for _, d in merged))), None)
        for peer, _ in merged:
            self._on_edit(peer.user_id, self.ref)
        await self._maybe_compact()

    async def _append(self, updates: list[tuple[bytes, uuid.UUID | None]]) -> None:
        try:
            last = await store.append_updates(
                self._db, self.ref.id, updates, notify=self._notify_log()
            )
        except (DatabaseUnavailable, DocumentNotFound) as error:
            raise _Tainted() from error
        first = last - len(updates) + 1
        self._updates_applied += len(updates)
        self._relay.document_updates(self.ref.id, first, [data for data, _ in updates])
        if first == self._last_seq + 1:
            self._last_seq = last
            self._stored_bytes += sum(len(data) for data, _ in updates)
            self._since_snapshot += len(updates)
            return
        # Another process appended in between: take what it wrote too, then the row's
        # figures (it may have compacted as well).
        await self._fill(self._last_seq, first - 1)
        self._last_seq = last
        await self._read_figures()

    async def _read_figures(self) -> None:
        """Take the stored size and snapshot from the row (another process may have
        appended or compacted)."""
        row = await store.find_document(self._db, self.ref.id)
        if row is not None:
            self._snapshot_seq = row.snapshot_seq
            self._stored_bytes = row.byte_size
            self._since_snapshot = max(0, self._last_seq - row.snapshot_seq)

    # -- replicas in other processes --------------------------------------------------------

    async def _from_elsewhere(self, message: Replicated | Reached | RemoteAwareness) -> None:
        """Another process's traffic. A replica with no peers that nothing here used for
        its idle timeout stops (the idle timer alone would never fire while others type)."""
        idle = self._settings.idle_timeout
        if not self._peers and trio.current_time() - self._used > idle:
            self.request_stop()
            return
        if isinstance(message, Replicated):
            await self._replicated(message)
        elif isinstance(message, Reached):
            await self._reached(message.seq)
        else:
            self._remote_awareness(message.payload)

    async def _replicated(self, message: Replicated) -> None:
        """Apply another process's stored updates in seq order: what this replica has is
        skipped, and a gap before them is read from PostgreSQL first."""
        first, updates = message.first_seq, message.updates
        last = first + len(updates) - 1
        if last <= self._last_seq:
            return  # a duplicate, or late: applied already
        try:
            if first > self._last_seq + 1:
                await self._fill(self._last_seq, first - 1)
                self._last_seq = first - 1
                await self._read_figures()
        except DocumentNotFound as gone:
            raise _Tainted() from gone
        except DatabaseUnavailable as error:
            # Still behind, never ahead of what is stored: the next message or notice
            # fills the gap.
            log.info("%r could not read the updates it missed: %r", self, error)
            return
        fresh = updates[self._last_seq + 1 - first :]
        for update in fresh:
            self._apply_and_broadcast(update)
        self._last_seq = last
        self._stored_bytes += sum(len(update) for update in fresh)
        self._since_snapshot += len(fresh)
        await self._maybe_compact()

    async def _reached(self, seq: int | None) -> None:
        """Read and apply the stored updates after this replica's last seq, up to ``seq``
        (None: up to the row's last one). A document (or project) deleted meanwhile,
        by any process, closes the peers here and stops this replica."""
        try:
            if seq is None:
                seq = (await store.find_live_document(self._db, self.ref.id)).last_seq
            if seq <= self._last_seq:
                return
            await self._fill(self._last_seq, seq)
            self._last_seq = seq
            await self._read_figures()
        except DocumentNotFound as gone:
            raise _Tainted() from gone
        except DatabaseUnavailable as error:
            log.info("%r could not catch up: %r", self, error)
            return
        await self._maybe_compact()

    def _remote_awareness(self, payload: bytes) -> None:
        """Show another process's awareness entries to the peers here, and keep them for
        peers that attach later. A client id a peer here speaks for is this replica's."""
        try:
            entries = yjs.parse_awareness(payload)
        except yjs.MalformedMessage:
            return
        now = trio.current_time()
        accepted = []
        for entry in entries:
            if entry.client_id in self._clients:
                continue
            known = self._remote.get(entry.client_id)
            if known is not None and entry.clock < known[0]:
                continue
            if entry.state is None:
                self._remote.pop(entry.client_id, None)
            else:
                self._remote[entry.client_id] = (entry.clock, entry.state, now)
            accepted.append(entry)
        if accepted:
            self._broadcast(yjs.awareness_message(yjs.encode_awareness(accepted)), None)

    async def _fill(self, after: int, until: int) -> None:
        """Apply and broadcast the updates another writer appended after ``after``."""
        missing = await store.updates_between(self._db, self.ref.id, after, until)
        if len(missing) != until - after:
            # Compacted meanwhile: the snapshot holds the rest (applying it again is a no-op
            # for what this document already has).
            loaded = await store.load_document(self._db, self.ref.id)
            if loaded.snapshot is not None:
                self._apply_and_broadcast(loaded.snapshot)
        for update in missing:
            self._apply_and_broadcast(update.update)

    def _apply_and_broadcast(self, update: bytes) -> None:
        self._captured.clear()
        self._doc.apply_update(update)
        for changed in self._captured:
            self._broadcast(yjs.sync_update(changed), None)
        self._captured.clear()

    # -- awareness --------------------------------------------------------------------------

    def _awareness(self, peer: Peer, payload: bytes) -> None:
        """Take the entries of the peer's awareness update that it may speak for, stamp
        them with its user, and broadcast them. A client id belongs to the first peer that
        uses it until that peer detaches; another connection of the same user may take it
        over (a provider that reconnected before its old socket was seen to close), no
        other user's."""
        try:
            entries = yjs.parse_awareness(payload)
        except yjs.MalformedMessage:
            self._refuse(peer, CloseCode.INVALID_PAYLOAD, "malformed_message")
            return
        accepted = []
        for entry in entries:
            client = self._clients.get(entry.client_id)
            if client is not None and client.peer is not peer:
                if client.peer.user_id != peer.user_id:
                    continue  # another user's client: nobody else may speak for it
            if client is None or client.peer is not peer:
                if entry.state is None or len(peer.clients) >= self._settings.max_clients_per_peer:
                    continue
            if client is not None and (
                entry.clock < client.clock
                or (entry.clock == client.clock and entry.state is not None)
            ):
                continue  # stale
            if client is not None:
                client.peer.clients.discard(entry.client_id)
            if entry.state is None:
                self._clients.pop(entry.client_id, None)
                accepted.append(entry)
                continue
            state = yjs.stamped(entry.state, str(peer.user_id), peer.email)
            self._clients[entry.client_id] = _Client(peer, entry.clock, state)
            self._remote.pop(entry.client_id, None)
            peer.clients.add(entry.client_id)
            accepted.append(yjs.AwarenessEntry(entry.client_id, entry.clock, state))
        if accepted:
            encoded = yjs.encode_awareness(accepted)
            self._broadcast(yjs.awareness_message(encoded), peer)
            self._relay.document_awareness(self.ref.id, encoded)

    # -- text from REST ---------------------------------------------------------------------

    async def _replace_text(self, message: ReplaceText) -> None:
        """Edit the text into ``message.text`` with the smallest change at one place (the
        common start and end are kept), so live clients' edits elsewhere merge."""
        current = str(self._text)
        new = message.text
        if current == new:
            return
        start = 0
        limit = min(len(current), len(new))
        while start < limit and current[start] == new[start]:
            start += 1
        end_old, end_new = len(current), len(new)
        while end_old > start and end_new > start and current[end_old - 1] == new[end_new - 1]:
            end_old -= 1
            end_new -= 1
        size = len(new[start:end_new].encode())
        if self._too_large(size):
            await self._compact_to_fit()
            if self._too_large(size):
                raise DocumentTooLarge()
        # pycrdt's Text counts UTF-8 bytes (Yjs clients count UTF-16 units; the update
        # itself carries no offsets, so each side keeps its own).
        at = len(current[:start].encode())
        removed = len(current[start:end_old].encode())
        self._captured.clear()
        with self._doc.transaction():
            if removed:
                del self._text[at : at + removed]
            if end_new > start:
                self._text.insert(at, new[start:end_new])
        changed = list(self._captured)
        self._captured.clear()
        if not changed:
            return
        await self._append([(data, message.user_id) for data in changed])
        for data in changed:
            self._broadcast(yjs.sync_update(data), None)
            if message.user_id is not None:
                self._on_edit(message.user_id, self.ref)
        await self._maybe_compact()

    # -- compaction -------------------------------------------------------------------------

    def _too_large(self, size: int) -> bool:
        """Whether ``size`` more bytes would take the stored document past its limit
        (counting the updates applied and not yet appended)."""
        stored = self._stored_bytes + self._batch_bytes
        return stored + size > self._settings.max_document_bytes

    async def _compact_to_fit(self) -> None:
        """Compact if there is anything to fold (a snapshot is usually much smaller than
        the updates it replaces); an outage leaves the document as it is."""
        if self._since_snapshot:
            try:
                await self._compact()
            except (DatabaseUnavailable, DocumentNotFound) as error:
                log.info("%r not compacted: %r", self, error)

    async def _maybe_compact(self) -> None:
        if self._since_snapshot >= self._settings.compact_after:
            try:
                await self._compact()
            except (DatabaseUnavailable, DocumentNotFound) as error:
                log.info("%r not compacted: %r", self, error)

    async def _compact(self) -> bool:
        """Store the document as a snapshot at the last seq and delete the updates it
        holds. Every update up to that seq is applied here, so the snapshot holds them."""
        if self._last_seq <= self._snapshot_seq:
            return False
        snapshot = self._doc.get_update()
        stored = await store.compact(self._db, self.ref.id, snapshot, self._last_seq)
        if stored:
            self._snapshot_seq = self._last_seq
            self._stored_bytes = len(snapshot)
            self._since_snapshot = 0
        else:
            # Another replica compacted as far or further: take its figures, or this one
            # would try again after every update.
            await self._read_figures()
        return stored

    # -- for operators ----------------------------------------------------------------------

    def overview(self) -> dict[str, Any]:
        """The document for operators (JSON-ready), read from outside the actor's task like
        ``statistics()``: ``document_id``, ``project_id``, ``path``, ``peers``, ``users``
        (distinct), ``seq``, ``snapshot_seq``, ``stored_bytes``, ``updates_applied``."""
        return {
            "document_id": str(self.ref.id),
            "project_id": str(self.ref.project_id),
            "path": self.ref.path,
            "peers": len(self._peers),
            "users": len({peer.user_id for peer in self._peers}),
            "seq": self._last_seq,
            "snapshot_seq": self._snapshot_seq,
            "stored_bytes": self._stored_bytes,
            "updates_applied": self._updates_applied,
        }


__all__ = [
    "TEXT",
    "Attach",
    "CloseAll",
    "Compact",
    "Detach",
    "DocumentActor",
    "DocumentSettings",
    "DocumentTooLarge",
    "DropUser",
    "Incoming",
    "Message",
    "Peer",
    "ReadState",
    "Reached",
    "ReadText",
    "RemoteAwareness",
    "ReplaceText",
    "Replicated",
]
