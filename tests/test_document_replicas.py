"""Replicas of one live document in several processes converge whatever the relay loses.

Two ``Documents`` registries on one database stand for two processes; what one relays is
recorded, and the test delivers it, drops it, repeats it or reorders it. Then two real
servers in one trio run, bridged by a real Redis that is killed and started again: the
replicas converge through Redis, and through the log while Redis is away.
tests/test_documents_node.py runs real processes and real Yjs clients.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import redis.asyncio
import trio
import trio.testing
from conftest import Running, StartServer
from docclient import DocClient, settle
from redis_server import RedisServer
from test_bridge import FAST_BREAKER, FakeWorkspace, Pair, make_pair, wait_connected
from test_document_actor import add_user

from atrium.actors import ActorStopped
from atrium.actors.bridge import Bridge
from atrium.actors.document import (
    Compact,
    DocumentActor,
    DocumentSettings,
    Reached,
    ReadText,
    RemoteAwareness,
    Replicated,
)
from atrium.core.breaker import BreakerSettings, CircuitBreaker
from atrium.core.metrics import Metrics
from atrium.domain.documents import Documents
from atrium.persistence import documents as store
from atrium.persistence import projects
from atrium.persistence.database import Database
from atrium.persistence.documents import DocumentRef
from atrium.persistence.redis import Redis

WAIT = 20.0


@dataclass
class Wire:
    """A ``DocumentRelay`` that records what a replica relays, for the test to deliver."""

    connected: bool = True
    sent: list[Replicated | RemoteAwareness] = field(default_factory=list)

    def document_updates(
        self, document_id: uuid.UUID, first_seq: int, updates: Sequence[bytes]
    ) -> None:
        self.sent.append(Replicated(first_seq, list(updates)))

    def document_awareness(self, document_id: uuid.UUID, payload: bytes) -> None:
        self.sent.append(RemoteAwareness(payload))

    def take(self) -> list[Replicated]:
        """The updates relayed since the last take, one message per seq."""
        updates = [m for m in self.sent if isinstance(m, Replicated)]
        self.sent.clear()
        return [Replicated(m.first_seq + i, [u]) for m in updates for i, u in enumerate(m.updates)]


@dataclass
class Replica:
    """One process's registry, its relay, and one client attached to its actor."""

    documents: Documents
    wire: Wire
    actor: DocumentActor
    client: DocClient

    async def deliver(self, *messages: Replicated | Reached | RemoteAwareness) -> None:
        """Hand relayed messages to this replica and let its client take what it sent."""
        for message in messages:
            await self.actor.tell(message)
        await settle(self.client)

    @property
    def text(self) -> str:
        return str(self.client.text)


async def two_replicas(
    db: Database, nursery: trio.Nursery, settings: DocumentSettings | None = None
) -> tuple[Replica, Replica, DocumentRef]:
    owner = await add_user(db, f"owner-{uuid.uuid4()}@example.com")
    created = await projects.create_project(
        db, owner, name="Replicas", description=None, visibility="private"
    )
    replicas = []
    ref = None
    for client_id in (1, 2):
        wire = Wire()
        documents = Documents(db, settings or DocumentSettings(idle_timeout=3600), relay=wire)
        await nursery.start(documents.run)
        ref = await documents.open(created.value.id, "/shared.md", owner)
        actor = await documents.get(ref.id)
        client = DocClient(actor, owner, "owner@example.com", client_id=client_id)
        await client.connect()
        await settle(client)
        replicas.append(Replica(documents, wire, actor, client))
    assert ref is not None
    return replicas[0], replicas[1], ref


async def type_on(replica: Replica, index: int, chars: str) -> None:
    replica.client.type(index, chars)
    await settle(replica.client)


async def test_relayed_updates_apply_once_in_seq_order(db: Database, nursery: trio.Nursery) -> None:
    a, b, _ = await two_replicas(db, nursery)
    await type_on(a, 0, "one ")
    await type_on(a, 4, "two ")
    first, second = a.wire.take()
    assert (first.first_seq, second.first_seq) == (1, 2)
    await b.deliver(first, second)
    assert b.text == a.text == "one two "
    # A duplicate and a late one change nothing, and reach no client again.
    b.client.inbox.clear()
    await b.deliver(second, first, second)
    assert b.client.inbox == [] and b.text == "one two "
    assert await b.actor.ask(ReadText()) == "one two "


async def test_a_dropped_update_is_read_from_postgresql_before_the_next(
    db: Database, nursery: trio.Nursery
) -> None:
    a, b, _ = await two_replicas(db, nursery)
    await type_on(a, 0, "lost ")
    await type_on(a, 5, "then ")
    await type_on(a, 10, "more")
    dropped, late, last = a.wire.take()
    # Seq 1 never arrives; seq 3 overtakes seq 2: B reads 1 and 2 from PostgreSQL first.
    await b.deliver(last)
    assert b.text == "lost then more"
    await b.deliver(late)
    assert b.text == "lost then more"
    # Meanwhile B's own edits took the seqs after them, and crossed the other way.
    await type_on(b, 0, ">")
    (mine,) = b.wire.take()
    assert mine.first_seq == 4
    await a.deliver(mine)
    assert a.text == b.text == ">lost then more"


async def test_a_replica_that_missed_the_last_update_catches_up_on_a_notice(
    db: Database, nursery: trio.Nursery
) -> None:
    a, b, ref = await two_replicas(db, nursery)
    await type_on(a, 0, "only")
    a.wire.take()  # dropped, and nothing follows it
    await b.deliver(Reached(1))  # the NOTIFY on the log while the relay is away
    assert b.text == "only"
    await type_on(a, 4, "!")
    a.wire.take()
    await b.deliver(Reached())  # the bridge subscribed again: read the row's last seq
    assert b.text == "only!"
    row = await store.find_document(db, ref.id)
    assert row is not None and b.actor.overview()["seq"] == row.last_seq == 2


async def test_a_replica_behind_a_compaction_reads_the_snapshot(
    db: Database, nursery: trio.Nursery
) -> None:
    a, b, ref = await two_replicas(db, nursery)
    for i in range(5):
        await type_on(a, 0, f"{i}")
    a.wire.take()  # B missed all five
    assert await a.actor.ask(Compact()) is True  # ...and A folded them into a snapshot
    await type_on(a, 0, "x")
    await b.deliver(*a.wire.take())
    assert b.text == a.text == "x43210"
    # B read A's figures as it filled the gap; after B compacts, A finds nothing new to
    # fold and takes B's snapshot as its own (it does not try again after every update).
    assert b.actor.overview()["snapshot_seq"] == 5
    assert await b.actor.ask(Compact()) is True
    assert await a.actor.ask(Compact()) is False
    assert a.actor.overview()["snapshot_seq"] == 6
    row = await store.find_document(db, ref.id)
    assert row is not None and row.snapshot_seq == 6


async def test_a_replica_nobody_here_uses_stops_though_others_keep_typing(
    db: Database, nursery: trio.Nursery
) -> None:
    _, _, ref = await two_replicas(db, nursery)
    documents = Documents(db, DocumentSettings(idle_timeout=0.3))
    await nursery.start(documents.run)
    actor = await documents.get(ref.id)
    assert await actor.ask(ReadText()) == ""  # a REST read opened it here, then nothing
    with trio.fail_after(10):
        while actor.alive:
            # A steady stream of another process's traffic, faster than the idle timeout.
            with contextlib.suppress(ActorStopped):
                await actor.tell(Reached(0))
            await trio.sleep(0.02)
    assert documents.find(ref.id) is None


# -- two servers, a real Redis ----------------------------------------------------------


async def replica_client(server: Running, room: uuid.UUID, user: str) -> DocClient:
    assert server.bound.services is not None
    actor = await server.bound.services.value.documents.get(room)
    client = DocClient(actor, uuid.UUID(user), f"{user}@example.com")
    await client.connect()
    await settle(client)
    return client


async def open_on_both(
    a: Running, b: Running, path: str
) -> tuple[Pair, DocumentRef, DocClient, DocClient]:
    """A pair's project (owner on A, collaborator on B), its document at ``path`` opened
    on A, and a client of it on each server: the owner's on A, the collaborator's on B."""
    pair = await make_pair(a, b)
    assert a.bound.services is not None
    ref = await a.bound.services.value.documents.open(uuid.UUID(pair.project_id), path)
    on_a = await replica_client(a, ref.id, pair.owner.user_id)
    on_b = await replica_client(b, ref.id, pair.collaborator.user_id)
    return pair, ref, on_a, on_b


async def wait_text(client: DocClient, text: str) -> None:
    """Let ``client`` take what its server sends until it holds ``text`` (at most WAIT)."""
    with trio.fail_after(WAIT):
        while str(client.text) != text:
            await settle(client)
            await trio.sleep(0.01)  # what crosses processes comes in its own time


async def test_replicas_on_two_servers_converge_through_redis_and_while_it_is_away(
    start_server: StartServer, own_redis: RedisServer
) -> None:
    # No poll within the test: while Redis is away, updates must cross through NOTIFY.
    env = {"REDIS_URL": own_redis.url, "DEGRADED_POLL_SECONDS": "300", **FAST_BREAKER}
    async with start_server(**env) as a, start_server(**env) as b:
        await wait_connected(a, b)
        _, _, on_a, on_b = await open_on_both(a, b, "/x.md")
        on_a.type(0, "bridged ")
        await settle(on_a)
        await wait_text(on_b, "bridged ")
        on_a.set_awareness(on_a.doc.client_id, 1, {"name": "a"})
        await settle(on_a)
        with trio.fail_after(WAIT):
            while on_b.awareness.get(on_a.doc.client_id) is None:
                await settle(on_b)
                await trio.sleep(0.01)
        # Redis goes away: updates cross through the log (NOTIFY; a poll every second by
        # default, in case a notification is lost).
        own_redis.stop(kill=True)
        await wait_connected(a, b, connected=False)
        on_b.type(0, "away ")
        await settle(on_b)
        await wait_text(on_a, "away bridged ")
        on_a.type(len(on_a.text), "both")
        await settle(on_a)
        await wait_text(on_b, "away bridged both")
        own_redis.start()
        await wait_connected(a, b)
        on_b.type(0, "back ")
        await settle(on_b)
        await wait_text(on_a, "back away bridged both")
        # Before and after the outage, the updates crossed through Redis both ways.
        for server in (a, b):
            assert server.bound.services is not None
            received = server.bound.services.value.metrics.registry.get_sample_value(
                "atrium_bridge_messages_received_total", {"kind": "document_updates"}
            )
            assert received is not None and received >= 1
        assert str(on_a.text) == str(on_b.text) == await on_b.actor.ask(ReadText())


async def test_replicas_on_two_servers_without_redis_converge_through_postgresql(
    start_server: StartServer,
) -> None:
    env = {"DEGRADED_POLL_SECONDS": "300"}
    async with start_server(**env) as a, start_server(**env) as b:
        assert a.bound.services is not None and b.bound.services is not None
        heard = [server.bound.services.value.workspaces for server in (a, b)]
        with trio.fail_after(WAIT):  # each has heard the other greet on the log
            while not all(w.peers for w in heard):  # noqa: ASYNC110 (greetings set no event)
                await trio.sleep(0.02)
        _, _, on_a, on_b = await open_on_both(a, b, "/y.md")
        on_a.type(0, "no redis")
        await settle(on_a)
        await wait_text(on_b, "no redis")
        on_b.type(0, "still ")
        await settle(on_b)
        await wait_text(on_a, "still no redis")


# -- the bridge's side, without Redis -----------------------------------------------------


class Found:
    """The registry of one open document (or of one open workspace: none here)."""

    def __init__(self, actor: FakeWorkspace, document_id: uuid.UUID | None = None) -> None:
        self.actor = actor
        self.document_id = document_id

    def find(self, some_id: uuid.UUID) -> Any:
        return self.actor if some_id == self.document_id else None

    def running(self) -> list[Any]:
        return [self.actor] if self.document_id is not None else []


async def test_the_bridge_relays_what_it_could_not_publish_and_a_busy_document_catches_up(
    autojump_clock: trio.testing.MockClock,
) -> None:
    document = uuid.uuid4()
    actor = FakeWorkspace()  # a full mailbox at first
    documents, workspaces = Found(actor, document), Found(FakeWorkspace())
    client = redis.asyncio.Redis()  # never connected: the bridge's encoding and receiving
    bridge = Bridge(Redis(client, CircuitBreaker(BreakerSettings()), timeout=1.0), Metrics())
    bridge._set_connected(True)
    # Updates 7 and 8 could not be published: once Redis takes messages, the others are
    # told the document reached 8, and read 7 and 8 from PostgreSQL.
    bridge._not_relayed([(document, b"u", 7, b"x"), (document, b"u", 8, b"y")])
    ((owner, kind), seq), *_ = bridge._unsent.items()
    channel, data, confirm = bridge._logged(owner, seq, kind)
    assert (owner, seq, confirm) == (document, 8, True)
    receive = partial(bridge._received_message, workspaces, documents=documents)
    receive(channel.encode(), data)  # the mailbox is full: caught up within a second
    assert bridge._missed_documents == {document}
    update = bridge._encode((document, b"u", 9, b"\x00|\x01"))
    awareness = bridge._encode((document, b"w", None, b"\x02"))
    assert (update[2], awareness[2]) == (True, False)  # awareness is lossy, unconfirmed
    actor.full = False
    receive(update[0].encode(), update[1])
    receive(awareness[0].encode(), awareness[1])
    receive(channel.encode(), data.replace(b"|8", b"|eight"))  # does not parse: dropped
    assert actor.told == [Replicated(9, [b"\x00|\x01"]), RemoteAwareness(b"\x02")]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(bridge._poll_while_degraded, workspaces, documents)
        await trio.sleep(1.5)
        assert actor.told[2:] == [Reached()]
        bridge._set_connected(False)  # degraded: every open document reads what it lacks
        await trio.sleep(1.0)
        assert actor.told[2:] == [Reached(), Reached()]
        nursery.cancel_scope.cancel()
