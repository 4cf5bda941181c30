"""Live document figures: keystroke updates per second one DocumentActor stores and
broadcasts, and the time to load a document from its updates and from a snapshot.

    python bench/document_actor.py [--editors 1,4,16] [--keys 2000] [--history 5000] [--repeat 3]
                              [--database-url URL]

Each editor is a pycrdt client (tests/docclient.py) typing one character per update, as
a Yjs editor sends keystrokes, into one document; every update is appended to
PostgreSQL before it is broadcast to the other editors. Editors type as fast as the
actor takes their messages (each ``tell`` waits for mailbox room), so the figure is the
actor's ceiling: it appends the updates queued together in one transaction (up to 64).
The actor stores a run of one editor's updates that queued together as one merged row.
Then a document of ``--history`` one-keystroke rows (a slow typist's) is loaded, compacted,
and loaded again. Rates are the best of ``--repeat`` runs. Without ``--database-url`` an
embedded PostgreSQL (pgserver, fsync and synchronous_commit on) runs in a temporary
directory.
"""

from __future__ import annotations

import argparse
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pycrdt
import trio

# Run as a script this directory would come first on sys.path, and bench/http.py would
# shadow the standard library's http: the repository root (and tests/) instead.
sys.path[0] = str(Path(__file__).resolve().parent.parent)
sys.path.insert(1, str(Path(__file__).resolve().parent.parent / "tests"))

from docclient import DocClient, settle  # noqa: E402

from atrium.actors.document import Compact, DocumentActor, DocumentSettings, ReadText  # noqa: E402
from atrium.persistence import documents as store  # noqa: E402
from atrium.persistence.database import Database, open_database  # noqa: E402
from atrium.persistence.migrate import migrate  # noqa: E402
from atrium.seams.aio_loop import open_loop  # noqa: E402
from bench._load import bench_database, bench_project  # noqa: E402

# Thresholds out of the way: this measures appends, then compaction on its own.
SETTINGS = DocumentSettings(idle_timeout=3600, compact_after=10**9)

# Append transactions, counted around the store's one append function.
_appends = [0]
_append_updates = store.append_updates


async def _counted(*args: object, **kwargs: object) -> int:
    _appends[0] += 1
    return await _append_updates(*args, **kwargs)  # type: ignore[arg-type]


store.append_updates = _counted  # type: ignore[assignment]


async def new_document(db: Database, owner: uuid.UUID, project: uuid.UUID) -> store.DocumentRef:
    row = await store.open_document(db, project, f"/bench/{uuid.uuid4().hex}.txt", owner)
    return row.ref


async def keystrokes(
    db: Database, ref: store.DocumentRef, owner: uuid.UUID, editors: int, keys: int
) -> tuple[float, float]:
    """Keystroke updates stored per second, and the rows they were stored as."""
    async with trio.open_nursery() as nursery:
        actor = DocumentActor(ref, db, SETTINGS)
        await nursery.start(actor.run)
        clients = [DocClient(actor, owner, "bench@example.com") for _ in range(editors)]
        for client in clients:
            await client.connect()
        await settle(*clients)
        each = keys // editors
        before = await store.find_document(db, ref.id)
        assert before is not None

        async def type_all(client: DocClient) -> None:
            for i in range(each):
                client.type(len(client.text), "abcdefghij"[i % 10])
                await client.send()
                client.inbox.clear()  # what the others typed: reading it is not measured

        started = time.perf_counter()
        async with trio.open_nursery() as typing:
            for client in clients:
                typing.start_soon(type_all, client)
        text = await actor.ask(ReadText(), timeout=None)
        elapsed = time.perf_counter() - started
        after = await store.find_document(db, ref.id)
        assert after is not None and len(text) == each * editors
        rows = after.last_seq - before.last_seq
        nursery.cancel_scope.cancel()
    return each * editors / elapsed, rows


async def history(db: Database, ref: store.DocumentRef, owner: uuid.UUID, updates: int) -> None:
    """One row per keystroke, as a slow typist's document stores them (the actor merges
    only the updates that queue up together)."""
    doc: pycrdt.Doc[Any] = pycrdt.Doc()
    text = doc.get("content", type=pycrdt.Text)
    rows: list[tuple[bytes, uuid.UUID | None]] = []
    for i in range(updates):
        before = doc.get_state()
        text.insert(len(text), "0123456789"[i % 10])
        rows.append((doc.get_update(before), owner))
    for start in range(0, updates, 500):
        await store.append_updates(db, ref.id, rows[start : start + 500])


async def load_seconds(db: Database, ref: store.DocumentRef, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        async with trio.open_nursery() as nursery:
            started = time.perf_counter()
            actor = DocumentActor(ref, db, SETTINGS)
            await nursery.start(actor.run)
            best = min(best, time.perf_counter() - started)
            nursery.cancel_scope.cancel()
    return best


async def bench(args: argparse.Namespace, url: str) -> None:
    async with open_loop(), open_database(url, pool_size=8) as db:
        await migrate(db)
        user_id, project = await bench_project(db)
        print(f"keystroke updates stored/s ({args.keys} updates, best of {args.repeat}):")
        for editors in args.editors:
            best, batch, stored = 0.0, 0.0, 0
            for _ in range(args.repeat):
                ref = await new_document(db, user_id, project)
                _appends[0] = 0
                rate, rows = await keystrokes(db, ref, user_id, editors, args.keys)
                if rate > best:
                    best, batch, stored = rate, args.keys / max(1, _appends[0]), rows
            print(
                f"  {editors:>3} editor(s): {best:>8.0f} updates/s,"
                f" {batch:.1f} updates per append transaction, stored as {stored} rows"
            )
        ref = await new_document(db, user_id, project)
        await history(db, ref, user_id, args.history)
        loaded = await store.load_document(db, ref.id)
        stored_bytes = loaded.row.byte_size
        cold = await load_seconds(db, ref, args.repeat)
        async with trio.open_nursery() as nursery:
            actor = DocumentActor(ref, db, SETTINGS)
            await nursery.start(actor.run)
            started = time.perf_counter()
            assert await actor.ask(Compact(), timeout=None)
            compact = time.perf_counter() - started
            nursery.cancel_scope.cancel()
        compacted = (await store.load_document(db, ref.id)).row.byte_size
        warm = await load_seconds(db, ref, args.repeat)
        print(f"a document of {args.history} one-character updates:")
        print(f"  stored: {stored_bytes} bytes as updates, {compacted} bytes as a snapshot")
        print(f"  load from the updates: {cold * 1000:.1f} ms")
        print(f"  compact: {compact * 1000:.1f} ms")
        print(f"  load from the snapshot: {warm * 1000:.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--editors", default="1,4,16", type=lambda s: [int(x) for x in s.split(",")]
    )
    parser.add_argument("--keys", type=int, default=2000)
    parser.add_argument("--history", type=int, default=5000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--database-url")
    args = parser.parse_args()
    with bench_database(args.database_url) as (url, _):
        trio.run(bench, args, url)


if __name__ == "__main__":
    main()
