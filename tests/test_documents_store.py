"""The live documents' tables (atrium/persistence/documents.py) on real PostgreSQL, and
compaction keeping content identical (hypothesis)."""

from __future__ import annotations

import uuid
from typing import Any

import pycrdt
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_document_actor import add_user

from atrium.persistence import documents as store
from atrium.persistence import projects
from atrium.persistence.database import Database
from atrium.persistence.documents import DocumentNotFound
from atrium.persistence.events import LOG_CHANNEL


async def new_project(db: Database) -> tuple[uuid.UUID, uuid.UUID]:
    owner = await add_user(db, f"{uuid.uuid4().hex[:8]}@example.com")
    created = await projects.create_project(
        db, owner, name="Docs", description=None, visibility="private"
    )
    return owner, created.value.id


def update_typing(doc: pycrdt.Doc[Any], chars: str) -> bytes:
    before = doc.get_state()
    text = doc.get("content", type=pycrdt.Text)
    text += chars
    return doc.get_update(before)


def text_of(*updates: bytes) -> str:
    doc: pycrdt.Doc[Any] = pycrdt.Doc()
    for update in updates:
        doc.apply_update(update)
    return str(doc.get("content", type=pycrdt.Text))


def loaded_text(loaded: store.Loaded) -> str:
    """The text a document loads as: its snapshot (if any), then the updates after it."""
    snapshot = [] if loaded.snapshot is None else [loaded.snapshot]
    return text_of(*snapshot, *(u.update for u in loaded.updates))


async def test_open_finds_or_creates_one_row_per_path(db: Database) -> None:
    owner, project = await new_project(db)
    results: list[store.DocumentRow] = []

    async def open_it() -> None:
        results.append(await store.open_document(db, project, "/a.py", owner))

    async with trio.open_nursery() as nursery:
        for _ in range(6):
            nursery.start_soon(open_it)
    assert len({row.id for row in results}) == 1
    row = results[0]
    assert (row.project_id, row.path, row.created_by, row.last_seq) == (project, "/a.py", owner, 0)
    other = await store.open_document(db, project, "/b.py")
    assert other.id != row.id
    assert [r.path for r in await store.list_documents(db, project)] == ["/a.py", "/b.py"]
    assert await store.find_document(db, row.id) == row
    assert await store.find_document(db, uuid.uuid4()) is None


async def test_open_in_a_missing_or_deleted_project_is_refused(db: Database) -> None:
    owner, project = await new_project(db)
    with pytest.raises(DocumentNotFound):
        await store.open_document(db, uuid.uuid4(), "/a.py")
    await db.execute("UPDATE projects SET deleted_at = now() WHERE id = $1", project)
    with pytest.raises(DocumentNotFound):
        await store.open_document(db, project, "/a.py")


async def test_concurrent_appends_get_one_gapless_sequence(db: Database) -> None:
    owner, project = await new_project(db)
    row = await store.open_document(db, project, "/a.py")
    lasts: list[int] = []

    async def writer(n: int) -> None:
        for i in range(5):
            batch = [(f"{n}:{i}:{k}".encode(), owner) for k in range(1 + (i % 3))]
            lasts.append(await store.append_updates(db, row.id, batch))

    async with trio.open_nursery() as nursery:
        for n in range(4):
            nursery.start_soon(writer, n)
    loaded = await store.load_document(db, row.id)
    seqs = [u.seq for u in loaded.updates]
    assert seqs == list(range(1, len(seqs) + 1)) and max(lasts) == len(seqs)
    assert loaded.row.last_seq == len(seqs)
    assert loaded.row.byte_size == sum(len(u.update) for u in loaded.updates)
    # Each batch is contiguous: a transaction's updates are never interleaved.
    by_seq = {u.seq: u.update.decode() for u in loaded.updates}
    for seq, label in by_seq.items():
        n, i, k = label.split(":")
        if k != "0":
            assert by_seq[seq - 1] == f"{n}:{i}:{int(k) - 1}"


async def test_an_append_with_notify_announces_the_seq_it_reached_on_commit(
    db: Database,
) -> None:
    owner, project = await new_project(db)
    row = await store.open_document(db, project, "/a.py")
    heard: list[tuple[uuid.UUID, int] | None] = []
    arrived = trio.Event()

    def notified(payload: str) -> None:
        heard.append(store.parse_reached(payload))
        arrived.set()

    async with db.listening(LOG_CHANNEL, notified):
        await store.append_updates(db, row.id, [(b"a", owner)])  # no notice
        last = await store.append_updates(db, row.id, [(b"b", owner), (b"c", None)], notify=True)
        with trio.fail_after(5):
            await arrived.wait()
    assert last == 3 and heard == [(row.id, 3)]
    loaded = await store.load_document(db, row.id)
    assert [(u.seq, u.update, u.user_id) for u in loaded.updates] == [
        (1, b"a", owner),
        (2, b"b", owner),
        (3, b"c", None),
    ]
    assert loaded.row.last_edited_by == owner and loaded.row.byte_size == 3
    with pytest.raises(DocumentNotFound):
        await store.append_updates(db, uuid.uuid4(), [(b"x", owner)], notify=True)


async def test_append_to_a_deleted_document_is_refused(db: Database) -> None:
    owner, project = await new_project(db)
    row = await store.open_document(db, project, "/a.py")
    assert await store.delete_document(db, row.id) is True
    assert await store.delete_document(db, row.id) is False
    with pytest.raises(DocumentNotFound):
        await store.append_updates(db, row.id, [(b"x", owner)])
    with pytest.raises(DocumentNotFound):
        await store.load_document(db, row.id)
    with pytest.raises(ValueError):
        await store.append_updates(db, row.id, [])


async def test_load_is_the_snapshot_plus_the_updates_after_it(db: Database) -> None:
    owner, project = await new_project(db)
    row = await store.open_document(db, project, "/a.py")
    doc: pycrdt.Doc[Any] = pycrdt.Doc()
    for chars in ["ab", "cd", "ef"]:
        await store.append_updates(db, row.id, [(update_typing(doc, chars), owner)])
    assert await store.compact(db, row.id, doc.get_update(), 2) is True
    await store.append_updates(db, row.id, [(update_typing(doc, "gh"), None)])
    loaded = await store.load_document(db, row.id)
    assert loaded.row.snapshot_seq == 2 and [u.seq for u in loaded.updates] == [3, 4]
    assert loaded.updates[1].user_id is None
    assert loaded_text(loaded) == "abcdefgh"
    assert loaded.row.byte_size == len(loaded.snapshot or b"") + sum(
        len(u.update) for u in loaded.updates
    )
    # A snapshot at or before the stored one, or past the last update, changes nothing.
    assert await store.compact(db, row.id, b"older", 1) is False
    assert await store.compact(db, row.id, b"ahead", 9) is False
    assert (await store.load_document(db, row.id)).snapshot == loaded.snapshot
    with pytest.raises(DocumentNotFound):
        await store.compact(db, uuid.uuid4(), b"", 1)


async def test_deleting_the_project_deletes_its_documents(db: Database) -> None:
    owner, project = await new_project(db)
    row = await store.open_document(db, project, "/a.py")
    await store.append_updates(db, row.id, [(b"x", owner)])
    await db.execute("DELETE FROM projects WHERE id = $1", project)
    assert await store.find_document(db, row.id) is None
    assert await db.fetchval("SELECT count(*) FROM document_updates") == 0


# -- compaction keeps content identical ---------------------------------------------------

# One edit: (client, position as a fraction of the text, text to insert, chars to delete).
edits = st.lists(
    st.tuples(
        st.integers(0, 2),
        st.floats(0, 1),
        st.text(alphabet="abcxyz é\n", max_size=6),
        st.integers(0, 4),
        st.booleans(),  # compact after this edit
    ),
    min_size=1,
    max_size=25,
)


async def test_compacting_at_random_points_keeps_the_content(db: Database) -> None:
    """Three clients edit (each update appended as it is made, clients merging one
    another's now and then); the document is compacted at random points, the way the
    actor does (the merged state at the last seq). Loading it at any point gives the
    merged text, and at the end every client's text, the same as replaying every update
    ever made. Hypothesis runs in a worker thread and calls back into this test's trio
    loop for each example (the pattern of test_fuzz.py), so one database serves them all.
    """
    owner, project = await new_project(db)

    async def example(script: list[tuple[int, float, str, int, bool]]) -> None:
        row = await store.open_document(db, project, f"/{uuid.uuid4().hex}")
        clients: list[pycrdt.Doc[Any]] = [pycrdt.Doc() for _ in range(3)]
        server: pycrdt.Doc[Any] = pycrdt.Doc()
        every: list[bytes] = []
        for n, (who, where, chars, cut, compact_now) in enumerate(script):
            doc = clients[who]
            text = doc.get("content", type=pycrdt.Text)
            before = doc.get_state()
            # pycrdt's Text counts UTF-8 bytes: cut and insert at character boundaries.
            current = str(text)
            at = int(where * len(current))
            start = len(current[:at].encode())
            with doc.transaction():
                if cut and at < len(current):
                    del text[start : start + len(current[at : at + cut].encode())]
                if chars:
                    text.insert(start, chars)
            update = doc.get_update(before)
            every.append(update)
            server.apply_update(update)
            last = await store.append_updates(db, row.id, [(update, owner)])
            if n % 4 == 3:  # a client catches up now and then: edits interleave
                clients[(who + 1) % 3].apply_update(server.get_update())
            if compact_now:
                assert await store.compact(db, row.id, server.get_update(), last)
            loaded = await store.load_document(db, row.id)
            assert loaded_text(loaded) == str(server.get("content", type=pycrdt.Text))
        expected = text_of(*every)
        for doc in clients:
            doc.apply_update(server.get_update())
            assert str(doc.get("content", type=pycrdt.Text)) == expected
        loaded = await store.load_document(db, row.id)
        assert loaded_text(loaded) == expected

    @settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(script=edits)
    def run(script: list[tuple[int, float, str, int, bool]]) -> None:
        trio.from_thread.run(example, script)

    await trio.to_thread.run_sync(run)
