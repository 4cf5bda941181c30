"""What a replica of a live document costs a process (issue 23, item 1).

    python bench/document_replicas.py [--keys 3000] [--documents 50] [--kb 10] [--repeat 3]
                                      [--database-url URL]

Every process serving a document's peers holds a replica (a DocumentActor of its own).
This measures, in one process against a real PostgreSQL:

- CPU per update where it is typed (the origin: apply, append to PostgreSQL, broadcast,
  hand to the relay), and CPU per update at a replica (apply a relayed update in seq order
  and broadcast it to one peer of its own), for ``--keys`` one-character updates typed by
  one pycrdt editor as fast as the actor takes them. The Redis hop (one PUBLISH per
  update, one message parsed per receiving process) is not in these figures.
- Memory per replica: ``--documents`` documents of ``--kb`` KB of text each, typed as
  one-character updates and compacted, are opened as actors at once; the process's
  VmRSS grows by this much per document (pycrdt's Rust heap included, which tracemalloc
  does not see).

Without ``--database-url`` an embedded PostgreSQL runs in a temporary directory.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

import pycrdt
import trio

# Run as a script this directory would come first on sys.path, and bench/http.py would
# shadow the standard library's http: the repository root (and tests/) instead.
sys.path[0] = str(Path(__file__).resolve().parent.parent)
sys.path.insert(1, str(Path(__file__).resolve().parent.parent / "tests"))

from docclient import DocClient, settle  # noqa: E402

from atrium.actors.document import (  # noqa: E402
    DocumentActor,
    DocumentSettings,
    ReadText,
    Replicated,
)
from atrium.persistence import documents as store  # noqa: E402
from atrium.persistence.database import Database, open_database  # noqa: E402
from atrium.persistence.migrate import migrate  # noqa: E402
from atrium.seams.aio_loop import open_loop  # noqa: E402
from bench._load import bench_database, bench_project  # noqa: E402

SETTINGS = DocumentSettings(idle_timeout=3600, compact_after=10**9)


class Recorder:
    """A relay that keeps what the origin relays, for the replica to be handed."""

    connected = True

    def __init__(self) -> None:
        self.updates: list[Replicated] = []

    def document_updates(
        self, document_id: uuid.UUID, first_seq: int, updates: Sequence[bytes]
    ) -> None:
        self.updates.append(Replicated(first_seq, list(updates)))

    def document_awareness(self, document_id: uuid.UUID, payload: bytes) -> None:
        pass


def trimmed_rss_kb() -> int:
    """VmRSS after giving freed heap back to the system (else memory freed by building the
    documents would be reused by the replicas, and they would seem to cost nothing)."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    return rss_kb()


def rss_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


async def cpu_per_update(
    db: Database, ref: store.DocumentRef, owner: uuid.UUID, keys: int, paced: bool
) -> tuple[float, float, int]:
    """Microseconds of CPU per keystroke at the origin and at a replica, and the updates
    stored (relayed) for them. ``paced``: each keystroke is stored before the next is
    typed (a typist, one row and one relayed message each); else as fast as the actor
    takes them (a burst, merged into a few rows)."""
    recorder = Recorder()
    async with trio.open_nursery() as nursery:
        origin = DocumentActor(ref, db, SETTINGS, relay=recorder)
        replica = DocumentActor(ref, db, SETTINGS)
        await nursery.start(origin.run)
        await nursery.start(replica.run)
        editor = DocClient(origin, owner, "bench@example.com")
        reader = DocClient(replica, owner, "bench@example.com")
        for client in (editor, reader):
            await client.connect()
            await settle(client)
        started = time.process_time()
        for i in range(keys):
            editor.type(len(editor.text), "abcdefghij"[i % 10])
            await editor.send()
            editor.inbox.clear()
            if paced:
                await origin.ask(ReadText(), timeout=None)
        await origin.ask(ReadText(), timeout=None)
        at_origin = time.process_time() - started
        started = time.process_time()
        for message in recorder.updates:
            await replica.tell(message)
        text = await replica.ask(ReadText(), timeout=None)
        at_replica = time.process_time() - started
        assert len(text) == keys, len(text)
        reader.inbox.clear()
        nursery.cancel_scope.cancel()
    stored = sum(len(m.updates) for m in recorder.updates)
    return at_origin * 1e6 / keys, at_replica * 1e6 / keys, stored


async def typed_document(
    db: Database, owner: uuid.UUID, project: uuid.UUID, kb: int
) -> store.DocumentRef:
    """A document of ``kb`` KB typed one character per update, then compacted."""
    row = await store.open_document(db, project, f"/bench/{uuid.uuid4().hex}.txt", owner)
    doc: pycrdt.Doc[object] = pycrdt.Doc()
    text = doc.get("content", type=pycrdt.Text)
    updates: list[bytes] = []
    doc.observe(lambda event: updates.append(event.update))
    for i in range(kb * 1024):
        text.insert(len(text), "abcdefghij\n"[i % 11])
    for start in range(0, len(updates), 1000):
        await store.append_updates(db, row.id, [(u, owner) for u in updates[start : start + 1000]])
    await store.compact(db, row.id, doc.get_update(), len(updates))
    return row.ref


async def memory_per_replica(
    db: Database, owner: uuid.UUID, project: uuid.UUID, documents: int, kb: int
) -> float:
    refs = [await typed_document(db, owner, project, kb) for _ in range(documents)]
    async with trio.open_nursery() as nursery:
        before = trimmed_rss_kb()
        actors = []
        for ref in refs:
            actor = DocumentActor(ref, db, SETTINGS)
            await nursery.start(actor.run)
            actors.append(actor)
        for actor in actors:
            assert len(await actor.ask(ReadText(), timeout=None)) == kb * 1024
        grown = trimmed_rss_kb() - before
        nursery.cancel_scope.cancel()
    return grown / documents


async def bench(args: argparse.Namespace, url: str) -> None:
    async with open_loop(), open_database(url, pool_size=8) as db:
        await migrate(db)
        user_id, project = await bench_project(db)
        print(f"CPU per keystroke ({args.keys} one-character updates, best of {args.repeat}):")
        for paced in (True, False):
            origin, replica, stored = float("inf"), float("inf"), 0
            for _ in range(args.repeat):
                row = await store.open_document(db, project, f"/b/{uuid.uuid4().hex}", user_id)
                o, r, stored = await cpu_per_update(db, row.ref, user_id, args.keys, paced)
                origin, replica = min(origin, o), min(replica, r)
            kind = "typed one at a time" if paced else "typed in a burst"
            print(f"  {kind} ({stored} updates stored and relayed):")
            print(f"    where it is typed (apply, append, broadcast, relay): {origin:.0f} us")
            print(f"    at a replica (apply in seq order, broadcast):        {replica:.0f} us")
        per = await memory_per_replica(db, user_id, project, args.documents, args.kb)
        print(
            f"memory per replica of a {args.kb} KB document ({args.documents} open): {per:.0f} KB"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", type=int, default=3000)
    parser.add_argument("--documents", type=int, default=50)
    parser.add_argument("--kb", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--database-url")
    args = parser.parse_args()
    with bench_database(args.database_url) as (url, _):
        trio.run(bench, args, url)


if __name__ == "__main__":
    main()
