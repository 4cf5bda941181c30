"""Live documents on two servers under the faults hostile testers make: Redis frozen
(SIGSTOP), PostgreSQL taken away in the middle of appends, an update over the size
limit that a provider would resend on every reconnect, and a document deleted (or its
project) on one server while the other has it open.

Two real servers in one trio run share PostgreSQL (and Redis where it matters), as in
tests/test_document_replicas.py; clients are ``DocClient``s (pycrdt speaking the
y-websocket messages to each server's document actor). What a user would notice is
asserted: close codes, every replica's text, and the text stored in PostgreSQL.
"""

from __future__ import annotations

import os
import signal
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import conftest
import httpx
import pycrdt
import pytest
import trio
from conftest import CLIENT_TLS, FakeClock, Running, StartServer
from docclient import DocClient, reconnect, settle
from node_clients import node_modules, open_yclient
from redis_server import RedisServer
from test_bridge import FAST_BREAKER, wait_connected
from test_document_replicas import open_on_both, two_replicas, wait_text
from test_documents_node import CAP, FAST, server_text, ticket, url_for
from test_workspace import make_team
from wsclient import connect

from atrium.actors.document import ReadText
from atrium.domain.document_sessions import FailedUploads
from atrium.persistence import documents as store
from atrium.persistence import projects
from atrium.persistence.database import Database
from atrium.persistence.embedded import EmbeddedPostgres
from atrium.realtime import yjs
from atrium.runtime.root import Bound, serve
from atrium.supervision import Supervisor

WAIT = 20.0

__all__ = ["node_modules"]  # the session fixture the Node test uses


def services(server: Running) -> Any:
    assert server.bound.services is not None
    return server.bound.services.value


async def stored_text(db: Database, document_id: uuid.UUID) -> str:
    """The text a fresh load from PostgreSQL gives (snapshot, then the updates)."""
    loaded = await store.load_document(db, document_id)
    doc: pycrdt.Doc[Any] = pycrdt.Doc()
    text = doc.get("content", type=pycrdt.Text)
    if loaded.snapshot is not None:
        doc.apply_update(loaded.snapshot)
    for update in loaded.updates:
        doc.apply_update(update.update)
    return str(text)


async def keep_typing(client: DocClient, word: str, times: int) -> None:
    """Type ``word`` ``times`` times at the end, letting the client exchange after each."""
    for _ in range(times):
        client.type(len(client.text), word)
        await settle(client)


# -- Redis frozen -----------------------------------------------------------------------


async def test_replicas_converge_while_redis_is_frozen_and_after_it_thaws(
    start_server: StartServer, own_redis: RedisServer
) -> None:
    env = {"REDIS_URL": own_redis.url, **FAST_BREAKER}
    async with start_server(**env) as a, start_server(**env) as b:
        await wait_connected(a, b)
        _, ref, on_a, on_b = await open_on_both(a, b, "/frozen.md")
        await keep_typing(on_a, "a", 3)
        await wait_text(on_b, "aaa")
        own_redis.pause()  # calls hang rather than fail
        try:
            # Both keep typing through the freeze, before and after the bridges notice.
            async with trio.open_nursery() as nursery:
                nursery.start_soon(keep_typing, on_a, "A", 5)
                nursery.start_soon(keep_typing, on_b, "B", 5)
            await wait_connected(a, b, connected=False)
            await keep_typing(on_a, "x", 2)
            await keep_typing(on_b, "y", 2)
            # Redis never answered: every replica converged through PostgreSQL.
            with trio.fail_after(WAIT):
                while str(on_a.text) != str(on_b.text):
                    await settle(on_a)
                    await settle(on_b)
                    await trio.sleep(0.02)
            frozen = str(on_a.text)
            assert sorted(frozen) == sorted("aaa" + "A" * 5 + "B" * 5 + "xx" + "yy")
        finally:
            own_redis.resume()
        # Thawed: what Redis held back arrives late (seqs a replica has: skipped), and
        # the bridges subscribe again.
        await wait_connected(a, b)
        await keep_typing(on_b, "!", 1)
        await wait_text(on_a, str(on_b.text))
        await keep_typing(on_a, "?", 1)
        await wait_text(on_b, str(on_a.text))
        final = str(on_a.text)
        assert sorted(final) == sorted(frozen + "!?")
        for server in (a, b):
            actor = await services(server).documents.get(ref.id)
            assert (
                actor.overview()["seq"]
                == (await store.find_document(services(a).db, ref.id)).last_seq
            )
        assert await stored_text(services(a).db, ref.id) == final


# -- PostgreSQL away in the middle of appends ----------------------------------------------


@pytest.fixture
def pg_dirs() -> Iterator[Path]:
    """Data directories outside pytest's tmp_path (as root, PostgreSQL runs as another
    user who must reach its own; see tests/test_outage.py)."""
    with tempfile.TemporaryDirectory(prefix="atrium-docpg-") as tmp:
        yield Path(tmp)


@asynccontextmanager
async def serving(
    nursery: trio.Nursery, data_dir: Path, database_url: str | None, **env: Any
) -> AsyncIterator[Running]:
    """A real server in this trio run; with ``database_url`` None, with an embedded
    PostgreSQL of its own (in ``data_dir``) that the test may take away."""
    settings = conftest.test_settings(data_dir, **env)
    bound: Bound = await nursery.start(
        lambda task_status: serve(settings, database_url, task_status=task_status)
    )
    async with httpx.AsyncClient(base_url=bound.url, verify=CLIENT_TLS) as client:
        yield Running(bound, client, settings)


def postgres_of(server: Running) -> Supervisor:
    assert server.bound.supervisor is not None
    sup: Supervisor = server.bound.supervisor.child("postgres").value
    return sup


async def wait_ready(*servers: Running) -> None:
    with trio.fail_after(WAIT):
        for server in servers:
            while (await server.client.get("/ready")).status_code != 200:  # noqa: ASYNC110 (another process)
                await trio.sleep(0.05)


async def type_until_closed(client: DocClient, word: str) -> None:
    """Type ``word`` at the end again and again until the server closes the client."""
    with trio.fail_after(WAIT):
        while client.closed is None:  # noqa: ASYNC110 (set by the actor)
            client.type(len(client.text), word)
            await settle(client)
            await trio.sleep(0.005)


async def test_postgresql_away_mid_append_closes_1013_and_the_resync_converges(
    aio_loop: None, nursery: trio.Nursery, pg_dirs: Path, own_redis: RedisServer
) -> None:
    env = {"REDIS_URL": own_redis.url, **FAST_BREAKER}
    async with serving(nursery, pg_dirs / "a", None, **env) as a:
        url = EmbeddedPostgres(pg_dirs / "a").url  # a short path: the socket is in pgdata
        async with serving(nursery, pg_dirs / "b", url, **env) as b:
            await wait_connected(a, b)
            _, ref, on_a, on_b = await open_on_both(a, b, "/pg.md")
            await keep_typing(on_a, "a", 2)
            await wait_text(on_b, "aa")
            cluster = EmbeddedPostgres(pg_dirs / "a")
            # Both keep typing; PostgreSQL is killed in the middle of their appends.
            async with trio.open_nursery() as typing:
                typing.start_soon(type_until_closed, on_a, "A")
                typing.start_soon(type_until_closed, on_b, "B")
                await trio.sleep(0.2)
                pid = cluster.postmaster_pid()
                assert pid is not None
                os.kill(pid, signal.SIGKILL)
            # An update that could not be appended is not shown to anyone: each client
            # is closed with 1013 and told to come back later.
            assert on_a.closed == on_b.closed == (1013, "database_unavailable")
            await wait_ready(a, b)  # the postmaster is restarted by its supervisor
            stored = await stored_text(services(a).db, ref.id)
            # What a client received from the other was stored before it was sent.
            assert str(on_b.text).count("A") <= stored.count("A")
            assert str(on_a.text).count("B") <= stored.count("B")
            # The providers reconnect (each to its own server) and resync.
            typed_a, typed_b = str(on_a.text).count("A"), str(on_b.text).count("B")
            await reconnect(on_a, await services(a).documents.get(ref.id))
            await reconnect(on_b, await services(b).documents.get(ref.id))
            with trio.fail_after(WAIT):
                while str(on_a.text) != str(on_b.text) or str(on_a.text).count("B") < typed_b:
                    await settle(on_a)
                    await settle(on_b)
                    await trio.sleep(0.02)
            final = str(on_a.text)
            assert (final.count("A"), final.count("B"), final.count("a")) == (typed_a, typed_b, 2)
            assert await stored_text(services(b).db, ref.id) == final
            for server in (a, b):
                actor = await services(server).documents.get(ref.id)
                assert await actor.ask(ReadText()) == final
            # Weather, not a crash: the postmaster restarted, nothing else did.
            for server in (a, b):
                assert server.bound.supervisor is not None
                root = server.bound.supervisor
                assert root.child("documents").restart_count == 0
                assert root.child("database").restart_count == 0
            assert postgres_of(a).child("postmaster").restart_count == 1
            nursery.cancel_scope.cancel()


# -- the document (or its project) deleted on another server -----------------------------


async def wait_closed(client: DocClient) -> tuple[int, str]:
    with trio.fail_after(WAIT):
        while client.closed is None:  # noqa: ASYNC110 (set by the actor)
            await trio.sleep(0.01)  # the notice crosses through PostgreSQL
    return client.closed


async def wait_stopped(server: Running, document_id: uuid.UUID) -> None:
    """Wait until ``server`` has no replica of the document open (at most WAIT)."""
    with trio.fail_after(WAIT):
        while services(server).documents.find(document_id) is not None:  # noqa: ASYNC110
            await trio.sleep(0.01)


async def test_a_document_deleted_on_one_server_closes_its_replica_on_the_other(
    start_server: StartServer,
) -> None:
    async with start_server() as a, start_server() as b:
        pair, ref, on_a, on_b = await open_on_both(a, b, "/gone.md")
        await keep_typing(on_a, "a", 1)
        await wait_text(on_b, "a")
        r = await a.client.delete(
            f"/api/v1/projects/{pair.project_id}/documents/{ref.id}", headers=pair.owner.auth
        )
        assert r.status_code == 204, r.text
        assert await wait_closed(on_a) == (4013, "document_deleted")
        # B's client typed nothing since: it is closed all the same, and B's replica stops.
        assert await wait_closed(on_b) == (4013, "document_deleted")
        await wait_stopped(b, ref.id)


async def test_a_project_deleted_on_one_server_closes_its_documents_on_the_other(
    start_server: StartServer,
) -> None:
    async with start_server() as a, start_server() as b:
        pair, ref, on_a, on_b = await open_on_both(a, b, "/p.md")
        await keep_typing(on_b, "b", 1)
        await wait_text(on_a, "b")
        r = await a.client.delete(f"/api/v1/projects/{pair.project_id}", headers=pair.owner.auth)
        assert r.status_code == 204, r.text
        assert await wait_closed(on_a) == (4006, "project_deleted")
        assert await wait_closed(on_b) == (4006, "project_deleted")
        row = await store.find_document(services(b).db, ref.id)
        assert row is not None and row.last_seq == 1  # nothing stored after "b"
        await wait_stopped(b, ref.id)


async def test_a_replica_that_missed_the_deletion_stores_nothing_more(
    db: Database, nursery: trio.Nursery
) -> None:
    # The notice never came (PostgreSQL away as it was sent, say): the replica finds out
    # at its client's next edit, which is not stored, and closes everyone.
    a, b, ref = await two_replicas(db, nursery)
    await a.client.detach()
    owner = b.client.peer.user_id
    deleted = await projects.delete_project(db, ref.project_id, owner)
    assert deleted.events
    b.client.type(0, "after")
    await settle(b.client)
    assert b.client.closed == (4006, "project_deleted")
    row = await store.find_document(db, ref.id)
    assert row is not None and row.last_seq == 0
    with trio.fail_after(WAIT):
        while b.actor.alive:  # noqa: ASYNC110
            await trio.sleep(0.01)
    with pytest.raises(store.DocumentNotFound):
        await b.documents.get(ref.id)


# -- an update over DOC_MAX_UPDATE_BYTES from an unmodified provider ------------------------


@pytest.mark.parametrize("transport", ["main", "listener"])
async def test_an_oversized_paste_is_refused_and_the_providers_retries_are_held_off(
    transport: str, start_server: StartServer, nursery: trio.Nursery, node_modules: None
) -> None:
    limit = 4096
    async with start_server(DOC_MAX_UPDATE_BYTES=str(limit), **FAST) as server:
        team = await make_team(server, transport)
        issued = await ticket(server.client, team.project_id, team.owner, "/big.md")
        other = await ticket(server.client, team.project_id, team.collaborator, "/big.md")
        room = issued["room"]
        with trio.fail_after(CAP):
            async with (
                open_yclient(
                    nursery, url_for(team, issued), room, issued["ticket"], "paster"
                ) as paster,
                open_yclient(
                    nursery, url_for(team, other), room, other["ticket"], "typist"
                ) as typist,
            ):
                await paster.wait_synced()
                await typist.wait_synced()
                await paster.type("ok")
                await typist.wait_contains("ok")
                await paster.ask("paste", "pasted", chars="x", count=2 * limit)
                # The provider reconnects after every close and offers the paste again.
                await trio.sleep(4)
                closes = paster.closes()
                # Refused every time, never stored or shown to anyone.
                assert closes and all(code == 1009 for code, _ in closes), closes
                # Without a hold it reconnects about every 0.1 s and uploads the paste
                # each time: the server holds each retry open longer (1 s, 2 s, 4 s...).
                assert len(closes) <= 5, closes
                typist_text = await typist.text()
                assert "x" not in typist_text and "x" not in await server_text(server, room)
                # The document goes on for everyone else.
                await typist.type("go")
                while sorted(await server_text(server, room)) != sorted("okgo"):  # noqa: ASYNC110
                    await trio.sleep(0.02)


async def test_a_client_held_after_a_failed_upload_is_served_with_what_it_sent_meanwhile(
    start_server: StartServer,
) -> None:
    # A client whose connection ended before its sync step 2 arrived (a network cut, not
    # a refusal) offers the same again: held for a second, then served as usual.
    async with start_server() as server:
        team = await make_team(server, "listener")
        issued = await ticket(server.client, team.project_id, team.owner, "/held.md")
        url = f"{url_for(team, issued)}/{issued['room']}?ticket={issued['ticket']}"
        doc: pycrdt.Doc[Any] = pycrdt.Doc()
        doc.get("content", type=pycrdt.Text).insert(0, "mine")
        hello = yjs.sync_step1(doc.get_state())
        with trio.fail_after(WAIT):
            async with connect(url) as cut:
                await cut.ws.get_message()  # the server's sync step 1
                await cut.ws.send_message(hello)
                await cut.ws.get_message()  # its answer: the client goes before its own
            async with connect(url) as again:
                opened = trio.current_time()
                await again.ws.send_message(hello)
                await again.ws.send_message(yjs.sync_step2(doc.get_update()))
                first = yjs.parse_message(await again.ws.get_message())
                assert isinstance(first, yjs.SyncStep1)
                assert trio.current_time() - opened >= 1.0  # held a second, then served
                while await server_text(server, issued["room"]) != "mine":  # noqa: ASYNC110
                    await trio.sleep(0.01)
            # It uploaded what it held: the next connection is not held.
            async with connect(url) as third:
                opened = trio.current_time()
                await third.ws.send_message(hello)
                await third.ws.get_message()
                assert trio.current_time() - opened < 1.0


def test_failed_uploads_hold_a_client_longer_each_time_and_forget_it() -> None:
    clock = FakeClock(0.0)
    failed = FailedUploads(clock, max_keys=2, max_clients=2)
    key, other_key = (uuid.uuid4(), uuid.uuid4()), (uuid.uuid4(), uuid.uuid4())
    assert not failed and failed.hold_for(key, b"hello") == 0.0
    holds = []
    for _ in range(7):
        failed.failed(key, b"hello")
        holds.append(failed.hold_for(key, b"hello"))
        clock.advance(holds[-1] + 0.1)  # the provider comes back after each hold
    assert holds == [1.0, 2.0, 4.0, 8.0, 16.0, 20.0, 20.0]
    # Only that client: one that typed since (another state), or another user, is not held.
    assert failed.hold_for(key, b"typed since") == 0.0
    assert other_key not in failed and failed.hold_for(other_key, b"hello") == 0.0
    # Its upload arrived: forgotten.
    failed.succeeded(key, b"hello")
    assert failed.hold_for(key, b"hello") == 0.0 and key not in failed
    # Not seen failing for a minute: forgotten, and a new failure starts again at 1 s.
    failed.failed(key, b"hello")
    failed.failed(key, b"hello")
    clock.advance(FailedUploads.FORGOTTEN + 1)
    assert failed.hold_for(key, b"hello") == 0.0
    failed.failed(key, b"hello")
    assert failed.hold_for(key, b"hello") == 1.0
    # Bounded: the least recently failed clients, and users' documents, go first.
    failed.failed(key, b"two")
    failed.failed(key, b"three")
    assert failed.hold_for(key, b"hello") == 0.0 and failed.hold_for(key, b"three") == 1.0
    failed.failed(other_key, b"x")
    failed.failed((uuid.uuid4(), uuid.uuid4()), b"y")
    assert key not in failed and other_key in failed
