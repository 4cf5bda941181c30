"""A Yjs client at the actor's level, for tests: a pycrdt ``Doc`` speaking y-websocket
messages to a ``DocumentActor`` through a ``Peer``, as a provider does over a socket.

pycrdt is Yrs, the Rust port of Yjs, so at this level it stands in for the npm client
(the Node tests drive the real one over real sockets).
"""

from __future__ import annotations

import uuid
from typing import Any

import pycrdt

from atrium.actors import ActorStopped
from atrium.actors.document import Attach, Detach, DocumentActor, Incoming, Peer, ReadText
from atrium.realtime import yjs


class DocClient:
    def __init__(
        self,
        actor: DocumentActor,
        user_id: uuid.UUID,
        email: str,
        *,
        can_edit: bool = True,
        client_id: int | None = None,
    ) -> None:
        self.actor = actor
        self.doc: pycrdt.Doc[Any] = pycrdt.Doc(client_id=client_id)
        self.text = self.doc.get("content", type=pycrdt.Text)
        self.inbox: list[bytes] = []
        self.outbox: list[bytes] = []
        self.closed: tuple[int, str] | None = None
        self.awareness: dict[int, dict[str, Any] | None] = {}
        self.peer = Peer(user_id, email, can_edit, self.inbox.append, self._close)
        self._applying = False
        self.doc.observe(self._local)

    def _close(self, code: int, reason: str) -> None:
        if self.closed is None:
            self.closed = (code, reason)

    def _local(self, event: Any) -> None:
        if not self._applying:
            self.outbox.append(yjs.sync_update(event.update))

    async def connect(self) -> None:
        """Attach, and send our sync step 1 as a provider does when it opens."""
        await self.actor.ask(Attach(self.peer))
        self.outbox.append(yjs.sync_step1(self.doc.get_state()))

    async def detach(self) -> None:
        await self.actor.tell(Detach(self.peer))

    def type(self, index: int, chars: str) -> None:
        self.text.insert(min(index, len(self.text)), chars)

    def delete(self, index: int, length: int) -> None:
        end = min(len(self.text), index + length)
        if index < end:
            del self.text[index:end]

    def send_raw(self, data: bytes) -> None:
        self.outbox.append(data)

    def set_awareness(self, client_id: int, clock: int, state: dict[str, Any] | None) -> None:
        entry = yjs.AwarenessEntry(client_id, clock, state)
        self.outbox.append(yjs.awareness_message(yjs.encode_awareness([entry])))

    def receive(self) -> bool:
        """Handle what the server delivered; True if there was anything."""
        frames, self.inbox[:] = list(self.inbox), []
        for frame in frames:
            message = yjs.parse_message(frame)
            if isinstance(message, yjs.SyncStep1):
                self.outbox.append(yjs.sync_step2(self.doc.get_update(message.state_vector)))
            elif isinstance(message, yjs.SyncStep2 | yjs.SyncUpdate):
                self._applying = True
                try:
                    self.doc.apply_update(message.update)
                finally:
                    self._applying = False
            elif isinstance(message, yjs.AwarenessUpdate):
                for entry in yjs.parse_awareness(message.payload):
                    self.awareness[entry.client_id] = entry.state
        return bool(frames)

    async def send(self) -> bool:
        """Send what is queued (unless closed); True if there was anything."""
        messages, self.outbox[:] = list(self.outbox), []
        if self.closed is not None:
            return False
        for message in messages:
            await self.actor.tell(Incoming(self.peer, message))
        return bool(messages)


async def settle(*clients: DocClient) -> None:
    """Exchange messages until nobody has anything left to say. The actor answers asks
    in mailbox order, so a ReadText after the tells is a barrier: they are handled."""
    while True:
        busy = False
        for client in clients:
            busy = client.receive() | busy
            busy = await client.send() | busy
        try:
            await clients[0].actor.ask(ReadText())
        except ActorStopped:
            return
        if not busy and not any(c.inbox for c in clients):
            return


async def reconnect(client: DocClient, actor: DocumentActor) -> None:
    """Connect ``client`` again (to ``actor``, a new one after a restart, say) as a
    provider does after a close: a new peer, then sync steps 1 and 2 both ways, so each
    side sends what the other lacks. What the client queued while closed was dropped."""
    old = client.peer
    client.actor = actor
    client.closed = None
    client.inbox.clear()
    client.outbox.clear()
    client.peer = Peer(old.user_id, old.email, old.can_edit, client.inbox.append, client._close)
    await client.connect()
