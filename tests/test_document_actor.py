"""The live document actor against real PostgreSQL, with pycrdt clients as its peers."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pycrdt
import pytest
import trio
import trio.lowlevel
import trio.testing
from conftest import Running
from docclient import DocClient, settle
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_workspace import make_team

from atrium.actors import ActorStopped
from atrium.actors.document import (
    Compact,
    DocumentActor,
    DocumentSettings,
    DocumentTooLarge,
    DropUser,
    Incoming,
    ReadState,
    ReadText,
    ReplaceText,
)
from atrium.domain.documents import Documents
from atrium.persistence import documents as store
from atrium.persistence import projects
from atrium.persistence.database import Database, DatabaseUnavailable
from atrium.persistence.documents import DocumentNotFound, DocumentRef
from atrium.realtime import yjs


async def add_user(db: Database, email: str) -> uuid.UUID:
    user_id = uuid.uuid4()
    await db.execute(
        "INSERT INTO users (id, email, email_normalised, password_hash) VALUES ($1, $2, $2, 'x')",
        user_id,
        email,
    )
    return user_id


@dataclass
class Setup:
    db: Database
    documents: Documents
    owner: uuid.UUID
    editor: uuid.UUID
    viewer: uuid.UUID
    project_id: uuid.UUID
    ref: DocumentRef
    edits: list[tuple[uuid.UUID, DocumentRef]]

    async def actor(self) -> DocumentActor:
        return await self.documents.get(self.ref.id)

    async def client(self, user: uuid.UUID | None = None, **kwargs: Any) -> DocClient:
        user = self.owner if user is None else user
        client = DocClient(await self.actor(), user, f"{user}@example.com", **kwargs)
        await client.connect()
        return client


async def open_setup(db: Database, nursery: trio.Nursery, settings: DocumentSettings) -> Setup:
    owner = await add_user(db, "owner@example.com")
    editor = await add_user(db, "editor@example.com")
    viewer = await add_user(db, "viewer@example.com")
    created = await projects.create_project(
        db, owner, name="Docs", description=None, visibility="private"
    )
    edits: list[tuple[uuid.UUID, DocumentRef]] = []
    documents = Documents(
        db, settings, on_edit=lambda user, ref: edits.append((user, ref)), period=1.0
    )
    await nursery.start(documents.run)
    ref = await documents.open(created.value.id, "/src/app.py", owner)
    return Setup(db, documents, owner, editor, viewer, created.value.id, ref, edits)


@pytest.fixture
async def setup(db: Database, nursery: trio.Nursery) -> AsyncIterator[Setup]:
    yield await open_setup(db, nursery, DocumentSettings(idle_timeout=3600))


def text_of(update: bytes) -> str:
    doc: pycrdt.Doc[Any] = pycrdt.Doc()
    doc.apply_update(update)
    return str(doc.get("content", type=pycrdt.Text))


async def stop(actor: DocumentActor) -> None:
    """Stop the actor gracefully, as idle or shutdown does (``Documents.get`` then waits
    for it to end before it starts the next one)."""
    actor.request_stop()
    await trio.lowlevel.checkpoint()


# -- convergence ------------------------------------------------------------------------


async def test_two_editors_converge_and_a_fresh_client_and_a_reload_agree(setup: Setup) -> None:
    a = await setup.client(setup.owner, client_id=1)
    b = await setup.client(setup.editor, client_id=2)
    await settle(a, b)
    for i in range(20):
        a.type(i % 5, f"a{i}")
        b.type(0, f"b{i}")
        if i % 3 == 0:
            b.delete(2, 1)
        await settle(a, b)
    assert str(a.text) == str(b.text) != ""
    text = str(a.text)
    actor = await setup.actor()
    assert await actor.ask(ReadText()) == text
    fresh = await setup.client(setup.viewer, can_edit=False)
    await settle(fresh)
    assert str(fresh.text) == text
    # Everything was appended before anyone saw it: a reload from PostgreSQL agrees.
    await stop(actor)
    reloaded = await setup.actor()
    assert reloaded is not actor
    assert await reloaded.ask(ReadText()) == text
    assert {user for user, _ in setup.edits} == {setup.owner, setup.editor}


async def test_a_duplicate_update_stores_nothing(setup: Setup) -> None:
    a = await setup.client()
    a.type(0, "hello")
    await settle(a)
    before = await store.find_document(setup.db, setup.ref.id)
    assert before is not None and before.last_seq == 1
    # A provider that reconnects sends its whole state again (sync step 2).
    a.send_raw(yjs.sync_update(a.doc.get_update()))
    a.send_raw(yjs.sync_step2(a.doc.get_update()))
    await settle(a)
    after = await store.find_document(setup.db, setup.ref.id)
    assert after is not None and after.last_seq == 1


# -- roles and limits -------------------------------------------------------------------


async def test_a_viewers_update_is_not_applied(setup: Setup) -> None:
    owner = await setup.client(setup.owner)
    viewer = await setup.client(setup.viewer, can_edit=False)
    owner.type(0, "shared")
    await settle(owner, viewer)
    viewer.type(0, "VIEWER")
    await settle(owner, viewer)
    assert str(viewer.text) == "VIEWERshared"  # its own copy, never the document's
    assert str(owner.text) == "shared"
    assert await (await setup.actor()).ask(ReadText()) == "shared"
    assert viewer.closed is None  # it keeps reading
    owner.type(6, "!")
    await settle(owner, viewer)
    assert str(viewer.text).endswith("shared!")
    row = await store.find_document(setup.db, setup.ref.id)
    assert row is not None and row.last_seq == 2


async def test_an_update_over_the_limit_closes_its_peer_and_is_not_applied(
    db: Database, nursery: trio.Nursery
) -> None:
    setup = await open_setup(db, nursery, DocumentSettings(max_update_bytes=2000))
    big = await setup.client(setup.owner)
    other = await setup.client(setup.editor)
    big.type(0, "x" * 5000)
    await settle(big, other)
    assert big.closed == (1009, "update_too_large")
    assert str(other.text) == ""
    assert await (await setup.actor()).ask(ReadText()) == ""
    other.type(0, "small")
    await settle(other)
    assert await (await setup.actor()).ask(ReadText()) == "small"


async def test_the_document_size_limit_compacts_first_then_refuses(
    db: Database, nursery: trio.Nursery
) -> None:
    setup = await open_setup(
        db, nursery, DocumentSettings(max_document_bytes=3000, compact_after=10_000)
    )
    a = await setup.client()
    for i in range(100):  # about 25 bytes stored per keystroke; their snapshot is ~130
        a.type(len(a.text), "abcdefghij"[i % 10])
        await settle(a)
    before = await store.find_document(setup.db, setup.ref.id)
    assert before is not None and before.byte_size > 2000 and before.snapshot_seq == 0
    a.type(0, "y" * 1000)  # over the limit as stored, under it once compacted
    await settle(a)
    assert a.closed is None
    actor = await setup.actor()
    assert (await actor.ask(ReadText())).startswith("y" * 1000)
    after = await store.find_document(setup.db, setup.ref.id)
    assert after is not None and after.snapshot_seq == 100 and after.byte_size < 1500
    a.type(0, "z" * 2000)  # over it even compacted
    await settle(a)
    assert a.closed == (4012, "document_too_large")
    assert "z" not in await actor.ask(ReadText())
    with pytest.raises(DocumentTooLarge):
        await actor.ask(ReplaceText("w" * 4000, setup.owner))
    assert actor.alive
    await actor.ask(ReplaceText("short", setup.owner))
    assert await actor.ask(ReadText()) == "short"


# -- bad input --------------------------------------------------------------------------

MALFORMED = [
    b"",
    b"\x00",
    b"\x00\x00\x05ab",  # a step 1 whose payload is cut short
    b"\x00\x07\x00",  # an unknown sync type
    b"\x00\x02\x03\xff\xff\xff",  # an update that is not a Yjs update
    b"\x00\x00\x02\xff\xff",  # a state vector that is not one
    b"\x01\x05\x01\x01\x01\x01{",  # awareness whose JSON is cut short
    b"\x01\x08\x01\x01\x01\x04[1]",  # awareness state that is not an object
    b"\x00" + b"\xff" * 12,  # a number that never ends
]


@pytest.mark.parametrize("data", MALFORMED)
async def test_malformed_bytes_close_the_peer_and_the_actor_carries_on(
    setup: Setup, data: bytes
) -> None:
    bad = await setup.client(setup.editor)
    good = await setup.client(setup.owner)
    good.type(0, "kept")
    await settle(bad, good)
    actor = await setup.actor()
    bad.send_raw(data)
    await settle(bad, good)
    assert bad.closed == (1007, "malformed_message")
    good.type(4, "!")
    await settle(good)
    assert actor.alive and await actor.ask(ReadText()) == "kept!"


async def test_unknown_message_types_are_ignored(setup: Setup) -> None:
    a = await setup.client()
    a.send_raw(b"\x02\x00")  # y-websocket's auth message
    a.send_raw(b"\x03")  # an awareness query
    await settle(a)
    assert a.closed is None


# -- awareness --------------------------------------------------------------------------


async def test_awareness_is_stamped_and_a_client_id_belongs_to_its_peer(setup: Setup) -> None:
    a = await setup.client(setup.owner)
    b = await setup.client(setup.editor)
    await settle(a, b)
    a.set_awareness(11, 1, {"user": {"name": "Mallory", "id": "x", "color": "#f00"}, "c": 1})
    await settle(a, b)
    assert b.awareness[11] == {
        "user": {"name": f"{setup.owner}@example.com", "id": str(setup.owner), "color": "#f00"},
        "c": 1,
    }
    # b cannot speak for a's client id, even with a newer clock, nor remove it.
    b.set_awareness(11, 5, {"user": {"name": "impostor"}})
    b.set_awareness(11, 6, None)
    await settle(a, b)
    assert 11 not in a.awareness
    assert b.awareness[11] is not None and b.awareness[11]["c"] == 1
    # A stale clock from a itself changes nothing either.
    a.set_awareness(11, 1, {"c": 2})
    await settle(a, b)
    assert b.awareness[11]["c"] == 1  # type: ignore[index]
    # A new peer hears the current states when it attaches.
    c = await setup.client(setup.viewer, can_edit=False)
    await settle(c)
    assert c.awareness[11]["user"]["id"] == str(setup.owner)  # type: ignore[index]
    # When a detaches, the others hear its client leave.
    await a.detach()
    await settle(b, c)
    assert b.awareness[11] is None and c.awareness[11] is None


async def test_a_peer_speaks_for_a_bounded_number_of_client_ids(setup: Setup) -> None:
    a = await setup.client(setup.owner)
    b = await setup.client(setup.editor)
    for client_id in range(100, 120):
        a.set_awareness(client_id, 1, {"n": client_id})
    await settle(a, b)
    assert len(b.awareness) == DocumentSettings().max_clients_per_peer


# -- removal, REST, compaction ------------------------------------------------------------


async def test_drop_user_closes_every_peer_of_that_user(setup: Setup) -> None:
    first = await setup.client(setup.editor)
    second = await setup.client(setup.editor)
    owner = await setup.client(setup.owner)
    first.set_awareness(7, 1, {"here": True})
    await settle(first, second, owner)
    await (await setup.actor()).tell(DropUser(setup.editor, 4005, "member_removed"))
    await settle(owner)
    assert first.closed == second.closed == (4005, "member_removed")
    assert owner.closed is None
    assert owner.awareness[7] is None
    first.type(0, "late")
    await settle(first, owner)
    assert str(owner.text) == ""


async def test_replace_text_merges_with_live_peers(setup: Setup) -> None:
    a = await setup.client()
    a.type(0, "hello world")
    await settle(a)
    actor = await setup.actor()
    await actor.ask(ReplaceText("hello brave world", setup.editor))
    await settle(a)
    assert str(a.text) == "hello brave world"
    # A live edit and a REST replace at different places both survive.
    a.type(0, ">> ")
    await actor.ask(ReplaceText("hello brave new world", setup.editor))
    await settle(a)
    assert str(a.text) == ">> hello brave new world"
    assert await actor.ask(ReadText()) == ">> hello brave new world"
    assert text_of(await actor.ask(ReadState())) == ">> hello brave new world"
    assert (setup.editor, setup.ref) in setup.edits


async def test_compaction_keeps_the_content_and_deletes_the_updates(setup: Setup) -> None:
    a = await setup.client()
    for i in range(10):
        a.type(0, str(i))
        await settle(a)
    actor = await setup.actor()
    assert await actor.ask(Compact()) is True
    assert await actor.ask(Compact()) is False  # nothing new since
    a.type(0, "after")
    await settle(a)
    loaded = await store.load_document(setup.db, setup.ref.id)
    assert loaded.row.snapshot_seq == 10 and [u.seq for u in loaded.updates] == [11]
    await stop(actor)
    reloaded = await setup.actor()
    assert await reloaded.ask(ReadText()) == "after9876543210"
    # The idle stop compacted what was left.
    assert (await store.load_document(setup.db, setup.ref.id)).updates == []


async def test_compaction_after_the_threshold(db: Database, nursery: trio.Nursery) -> None:
    setup = await open_setup(db, nursery, DocumentSettings(compact_after=5))
    a = await setup.client()
    for i in range(12):
        a.type(0, str(i % 10))
        await settle(a)
    loaded = await store.load_document(setup.db, setup.ref.id)
    assert loaded.row.snapshot_seq == 10 and len(loaded.updates) == 2
    assert text_of(loaded.snapshot or b"") == "9876543210"


# -- failures ---------------------------------------------------------------------------


class InjectedFault(RuntimeError):
    pass


class CrashingDocumentActor(DocumentActor):
    """A document actor whose next message raises InjectedFault, as a bug in ``handle``
    would (set an actor's class to it, as conftest's ``crash_workspace`` does)."""

    __slots__ = ()

    async def handle(self, message: Any) -> Any:
        self.__class__ = DocumentActor
        raise InjectedFault(f"crash requested for {self.name}")


async def test_a_crash_closes_peers_with_1012_and_loses_nothing_appended(setup: Setup) -> None:
    a = await setup.client(setup.owner)
    b = await setup.client(setup.editor)
    for i in range(5):
        a.type(0, f"a{i}")
        b.type(0, f"b{i}")
        await settle(a, b)
    text = str(a.text)
    actor = await setup.actor()
    # Updates queued behind the crash are lost with the actor, as a socket's would be.
    a.type(0, "queued")
    actor.__class__ = CrashingDocumentActor
    actor.tell_nowait(ReadText())
    for message in a.outbox:
        actor.tell_nowait(Incoming(a.peer, message))
    a.outbox.clear()
    with pytest.raises(ActorStopped):  # answered when the crashed actor closes its mailbox
        await actor.ask(ReadText())
    with trio.fail_after(5):
        restarted = await setup.actor()
    assert restarted is not actor
    assert a.closed == b.closed == (1012, "document_restarted")
    assert await restarted.ask(ReadText()) == text
    # The providers reconnect, sync, and what the server lacked comes back from them.
    a2 = DocClient(restarted, setup.owner, "o", client_id=a.doc.client_id)
    a2.doc.apply_update(a.doc.get_update())
    await a2.connect()
    await settle(a2)
    assert await restarted.ask(ReadText()) == "queued" + text


async def test_the_database_away_closes_peers_with_1013_and_applies_nothing(
    setup: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    a = await setup.client(setup.owner)
    b = await setup.client(setup.editor)
    a.type(0, "stored")
    await settle(a, b)
    actor = await setup.actor()

    async def away(*args: Any, **kwargs: Any) -> int:
        raise DatabaseUnavailable("injected")

    monkeypatch.setattr(store, "append_updates", away)
    a.type(0, "lost ")
    await settle(a, b)
    assert a.closed == b.closed == (1013, "database_unavailable")
    assert str(b.text) == "stored"  # never shown before it is stored
    with pytest.raises(ActorStopped):
        await actor.ask(ReadText())
    monkeypatch.undo()
    reloaded = await setup.actor()
    assert await reloaded.ask(ReadText()) == "stored"
    # The provider reconnects and syncs: the server gets what it lacked.
    again = DocClient(reloaded, setup.owner, "o")
    again.doc.apply_update(a.doc.get_update())
    await again.connect()
    await settle(again)
    assert await reloaded.ask(ReadText()) == "lost stored"


async def test_a_deleted_document_closes_its_peers(setup: Setup) -> None:
    a = await setup.client()
    a.type(0, "x")
    await settle(a)
    assert await setup.documents.delete(setup.ref.id) is True
    await settle(a)
    assert a.closed == (4013, "document_deleted")
    with pytest.raises(DocumentNotFound):
        await setup.documents.get(setup.ref.id)


async def test_updates_sent_while_the_document_is_busy_are_stored_and_sent_together(
    db: Database, nursery: trio.Nursery, mock_clock: trio.testing.MockClock
) -> None:
    setup = await open_setup(db, nursery, DocumentSettings(idle_timeout=3600, append_interval=1))
    a = await setup.client(setup.owner, client_id=1)
    b = await setup.client(setup.editor, client_id=2)
    await settle(a, b)
    a.type(0, "x")  # the document is quiet: stored and sent at once
    await settle(a, b)
    assert str(b.text) == "x"
    # Within a second of that append: what both send waits for the rest of the second.
    a.type(1, "y")
    await a.send()
    b.type(0, "z")
    await b.send()
    await trio.testing.wait_all_tasks_blocked()
    assert not a.inbox and not b.inbox
    stored = await store.find_document(setup.db, setup.ref.id)
    assert stored is not None and stored.last_seq == 1
    mock_clock.jump(1)
    while not (a.inbox and b.inbox):
        await trio.testing.wait_all_tasks_blocked()
    # One frame to each peer, holding both updates; both stored (one row each) before it.
    assert len(a.inbox) == len(b.inbox) == 1
    stored = await store.find_document(setup.db, setup.ref.id)
    assert stored is not None and stored.last_seq == 3
    await settle(a, b)
    assert str(a.text) == str(b.text) == "zxy"


async def test_an_idle_document_stops_and_the_next_get_loads_it(
    db: Database, nursery: trio.Nursery, mock_clock: trio.testing.MockClock
) -> None:
    setup = await open_setup(db, nursery, DocumentSettings(idle_timeout=30))
    a = await setup.client()
    a.type(0, "idle")
    await settle(a)
    actor = await setup.actor()
    await a.detach()
    await trio.testing.wait_all_tasks_blocked()
    mock_clock.jump(29)
    await trio.testing.wait_all_tasks_blocked()
    assert actor.alive
    mock_clock.jump(2)
    with trio.fail_after(5):
        while setup.documents.find(setup.ref.id) is not None:
            await trio.testing.wait_all_tasks_blocked()
    again = await setup.actor()  # waits for the stopping one to end (compacted)
    assert again is not actor and await again.ask(ReadText()) == "idle"
    assert (await store.load_document(setup.db, setup.ref.id)).updates == []
    assert setup.documents.overview(10)[0] == 1


async def test_replace_text_counts_characters_not_bytes(setup: Setup) -> None:
    a = await setup.client()
    a.type(0, "héllo wörld 😀")
    await settle(a)
    actor = await setup.actor()
    await actor.ask(ReplaceText("héllo, wörld 😀!", setup.owner))
    await settle(a)
    assert str(a.text) == await actor.ask(ReadText()) == "héllo, wörld 😀!"
    await actor.ask(ReplaceText("", setup.owner))
    await settle(a)
    assert str(a.text) == ""


class PanicException(BaseException):
    """What pyo3 raises when Yrs panics (its name is what atrium recognises)."""


async def test_a_yrs_panic_refuses_the_peer_and_reloads_the_document(
    setup: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    a = await setup.client(setup.owner)
    b = await setup.client(setup.editor)
    a.type(0, "safe")
    await settle(a, b)
    actor = await setup.actor()
    real = pycrdt.Doc.apply_update

    def panic(self: pycrdt.Doc[Any], update: bytes) -> None:
        real(self, update)  # applied, then Yrs gives up: the document is not to be trusted
        raise PanicException("index out of bounds")

    monkeypatch.setattr(pycrdt.Doc, "apply_update", panic)
    b.type(0, "boom ")
    await settle(a, b)
    monkeypatch.undo()
    assert b.closed == (1007, "malformed_message")
    assert a.closed == (1012, "document_restarted")
    assert str(a.text) == "safe"
    reloaded = await setup.actor()
    assert reloaded is not actor and await reloaded.ask(ReadText()) == "safe"


# -- membership, through the project service on a real server -----------------------------


async def test_membership_events_reach_open_documents(server: Running) -> None:
    """Through the project service: a removed member's document peers close with 4005
    and what they send after is not applied; a deleted project closes every peer with
    4006."""
    team = await make_team(server, "main")
    assert server.bound.services is not None
    documents = server.bound.services.value.documents
    ref = await documents.open(uuid.UUID(team.project_id), "/a.md")

    async def peer(member: Any, can_edit: bool) -> DocClient:
        client = DocClient(
            await documents.get(ref.id), uuid.UUID(member.user_id), member.email, can_edit=can_edit
        )
        await client.connect()
        return client

    owner = await peer(team.owner, True)
    collaborator = await peer(team.collaborator, True)
    viewer = await peer(team.viewer, False)
    await settle(owner, collaborator, viewer)
    members = f"/api/v1/projects/{team.project_id}/collaborators"
    r = await server.client.delete(
        f"{members}/{team.collaborator.user_id}", headers=team.owner.auth
    )
    assert r.status_code in (200, 204), r.text
    await settle(owner, viewer)
    assert collaborator.closed == (4005, "member_removed")
    collaborator.closed = None  # as if its socket were still sending
    collaborator.type(0, "after removal")
    await settle(owner, collaborator, viewer)
    assert str(owner.text) == ""
    r = await server.client.delete(f"/api/v1/projects/{team.project_id}", headers=team.owner.auth)
    assert r.status_code in (200, 204), r.text
    await settle(owner)
    assert owner.closed == viewer.closed == (4006, "project_deleted")


@pytest.mark.parametrize(
    ("a_id", "b_id", "expected"), [(1, 2, "one two three>"), (2, 1, ">one two three")]
)
async def test_two_actors_on_one_document_fill_each_others_updates(
    setup: Setup, nursery: trio.Nursery, a_id: int, b_id: int, expected: str
) -> None:
    """As two processes would: each stores with the next seq of the one counter, and an
    actor whose append finds that seqs were taken meanwhile reads those updates first
    (also once the other compacted them into its snapshot)."""
    first = await setup.actor()
    second = DocumentActor(setup.ref, setup.db, DocumentSettings(idle_timeout=3600))
    await nursery.start(second.run)
    # Fixed client ids: ">" and "one " both go in at 0 concurrently, and Yjs puts the
    # lower client id first. With random ids the text was either, by chance.
    a = await setup.client(setup.owner, client_id=a_id)
    b = DocClient(second, setup.editor, "e", client_id=b_id)
    await b.connect()
    a.type(0, "one ")
    await settle(a)
    a.type(4, "two ")
    await settle(a)
    assert await first.ask(Compact()) is True
    a.type(8, "three")
    await settle(a)
    b.type(0, ">")
    await settle(b)
    assert str(b.text) == expected == await second.ask(ReadText())
    overview = second.overview()
    assert (overview["seq"], overview["snapshot_seq"]) == (4, 2)
    loaded = await store.load_document(setup.db, setup.ref.id)
    assert overview["stored_bytes"] == loaded.row.byte_size
    # What is stored holds the same updates: a reload reads the same text.
    assert loaded.snapshot is not None
    stored = pycrdt.merge_updates(loaded.snapshot, *(u.update for u in loaded.updates))
    assert text_of(stored) == expected
    second.request_stop()


async def test_the_registry_starts_one_actor_per_document(setup: Setup) -> None:
    got: list[DocumentActor] = []

    async def get() -> None:
        got.append(await setup.documents.get(setup.ref.id))

    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(get)
    assert len({id(actor) for actor in got}) == 1
    assert setup.documents.running() == got[:1]
    with pytest.raises(DocumentNotFound):
        await setup.documents.get(uuid.uuid4())
    other = await setup.documents.open(setup.project_id, "/b.md")
    assert other == await setup.documents.open(setup.project_id, "/b.md")
    listed = await setup.documents.of_project(setup.project_id)
    assert [row.path for row in listed] == ["/b.md", "/src/app.py"]
    described = await setup.documents.describe(setup.ref.id)
    assert described is not None and described.ref == setup.ref
    assert setup.documents.find(other.id) is None


async def test_a_users_new_connection_takes_over_its_awareness_client(setup: Setup) -> None:
    """A provider that reconnects keeps its client id; its new socket may speak for it
    before the old one is seen to close (the same user), and the old one's detach then
    removes nothing."""
    old = await setup.client(setup.owner)
    other = await setup.client(setup.editor)
    old.set_awareness(21, 1, {"v": "old"})
    await settle(old, other)
    new = await setup.client(setup.owner)
    new.set_awareness(21, 2, {"v": "new"})
    await settle(new, other)
    assert other.awareness[21] is not None and other.awareness[21]["v"] == "new"
    await old.detach()
    await settle(new, other)
    assert other.awareness[21] is not None and other.awareness[21]["v"] == "new"
    await new.detach()
    await settle(other)
    assert other.awareness[21] is None


async def test_a_load_that_fails_is_the_callers_error_not_a_restart(
    setup: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def away(*args: Any, **kwargs: Any) -> Any:
        raise DatabaseUnavailable("injected")

    monkeypatch.setattr(store, "load_document", away)
    with pytest.raises(DatabaseUnavailable):
        await setup.documents.get(setup.ref.id)
    assert setup.documents.running() == []
    monkeypatch.undo()
    actor = await setup.actor()
    assert actor.alive and await actor.ask(ReadText()) == ""
    # Deleted while its actor stops: the next get hears DocumentNotFound.
    await store.delete_document(setup.db, setup.ref.id)
    actor.request_stop()
    with pytest.raises(DocumentNotFound):
        await setup.documents.get(setup.ref.id)


async def test_a_burst_of_one_peers_updates_is_one_row_and_one_frame(setup: Setup) -> None:
    a = await setup.client(setup.owner)
    b = await setup.client(setup.editor)
    await settle(a, b)
    b.inbox.clear()
    for ch in "burst":
        a.type(len(a.text), ch)
    actor = await setup.actor()
    for message in a.outbox:  # queued together, as a socket's reader would
        actor.tell_nowait(Incoming(a.peer, message))
    a.outbox.clear()
    await actor.ask(ReadText())
    assert len(b.inbox) == 1
    await settle(a, b)
    assert str(b.text) == "burst"
    row = await store.find_document(setup.db, setup.ref.id)
    assert row is not None and row.last_seq == 1


async def test_a_batch_of_several_peers_updates_is_one_merged_frame_to_every_peer(
    setup: Setup,
) -> None:
    a = await setup.client(setup.owner, client_id=1)
    b = await setup.client(setup.editor, client_id=2)
    c = await setup.client(setup.owner, client_id=3)
    viewer = await setup.client(setup.viewer, can_edit=False)
    everyone = (a, b, c, viewer)
    await settle(*everyone)
    for client in everyone:
        client.inbox.clear()
    for i in range(3):
        for name, client in (("a", a), ("b", b), ("c", c)):
            client.type(0, f"{name}{i}")
    actor = await setup.actor()
    # Interleaved, as three sockets' readers would queue them: nine updates in one batch.
    for queued in zip(a.outbox, b.outbox, c.outbox, strict=True):
        for client, message in zip((a, b, c), queued, strict=True):
            actor.tell_nowait(Incoming(client.peer, message))
    for client in (a, b, c):
        client.outbox.clear()
    await actor.ask(ReadText())
    # One frame each (the writers' own updates come back in it), not one per update.
    assert [len(client.inbox) for client in everyone] == [1, 1, 1, 1]
    await settle(*everyone)
    text = await actor.ask(ReadText())
    assert len(text) == 18
    assert all(str(client.text) == text for client in everyone)
    # Stored before shared, one row per peer's run, attributed to its user.
    row = await store.find_document(setup.db, setup.ref.id)
    assert row is not None and row.last_seq == 9


# -- compaction through the actor (hypothesis) -------------------------------------------

# One step: (editor, position as a fraction, text to insert, chars to delete, then compact).
STEPS = st.lists(
    st.tuples(
        st.integers(0, 2),
        st.floats(0, 1),
        st.text(alphabet="ab é😀\n", max_size=5),
        st.integers(0, 3),
        st.booleans(),
    ),
    min_size=1,
    max_size=15,
)


async def test_compacting_through_the_actor_at_random_points_keeps_the_content(
    setup: Setup,
) -> None:
    """Three live editors make random edits, settling now and then; the actor compacts at
    random points. Every editor, the actor and a reload from PostgreSQL end with the same
    text. Hypothesis runs in a worker thread and calls back into this test's trio loop
    (as in test_fuzz.py)."""

    async def example(steps: list[tuple[int, float, str, int, bool]]) -> None:
        ref = await setup.documents.open(setup.project_id, f"/h/{uuid.uuid4().hex}")
        actor = await setup.documents.get(ref.id)
        editors = [DocClient(actor, setup.owner, "o") for _ in range(3)]
        for editor in editors:
            await editor.connect()
        await settle(*editors)
        for n, (who, where, chars, cut, compact_now) in enumerate(steps):
            editor = editors[who]
            current = str(editor.text)
            at = int(where * len(current))
            if cut:
                editor.delete(len(current[:at].encode()), len(current[at : at + cut].encode()))
            if chars:
                editor.type(len(str(editor.text)[:at].encode()), chars)
            await editor.send()
            if n % 3 == 2:
                await settle(*editors)
            if compact_now:
                await actor.ask(Compact())
        await settle(*editors)
        texts = {str(editor.text) for editor in editors}
        assert len(texts) == 1
        (text,) = texts
        assert await actor.ask(ReadText()) == text
        await stop(actor)
        reloaded = await setup.documents.get(ref.id)
        assert await reloaded.ask(ReadText()) == text
        await stop(reloaded)

    @settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(steps=STEPS)
    def run(steps: list[tuple[int, float, str, int, bool]]) -> None:
        trio.from_thread.run(example, steps)

    await trio.to_thread.run_sync(run)
