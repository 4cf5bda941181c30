"""Two servers, one PostgreSQL, one Redis: the bridge relays workspace traffic between
processes (here two servers in one trio run; tests/test_cluster.py runs real processes).

Durable events also reach another process through the log (PostgreSQL NOTIFY), so these
tests check what only the bridge carries (cursors, job progress), that events crossed
through Redis (the bridge's counters), and that no client ever sees a gap, a duplicate or
a reordering, whatever Redis does.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio
import trio
import trio.testing
from conftest import Running, StartServer
from conftest import test_settings as make_settings
from redis_server import RedisServer
from test_workspace import edit
from wsclient import Client, connect

from atrium.actors import MailboxFull
from atrium.actors.bridge import (
    Bridge,
    channel_of,
    patterns_of,
)
from atrium.core.breaker import BreakerSettings, CircuitBreaker
from atrium.core.metrics import Metrics
from atrium.persistence.redis import Redis, open_redis
from atrium.runtime.root import Bound, serve_worker
from atrium.seams.redis_wire import publish_all, replies_can_be_skipped

# Small breaker: a Redis restart must not keep the servers apart for a minute.
FAST_BREAKER = {"REDIS_BREAKER_RESET_SECONDS": "0.3", "REDIS_BREAKER_FAILURES": "2"}
WAIT = 20.0


@dataclass
class User:
    user_id: str
    token: str

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


@dataclass
class Pair:
    a: Running
    b: Running
    project_id: str
    owner: User  # connects to A
    collaborator: User  # connects to B

    def url(self, server: Running, transport: str) -> str:
        port = server.bound.port if transport == "main" else server.bound.ws_port
        return f"ws://127.0.0.1:{port}/ws/{self.project_id}"

    def owner_on_a(self, transport: str) -> AbstractAsyncContextManager[Client]:
        """The owner's WebSocket to the project on server A."""
        return connect(self.url(self.a, transport), self.owner.token)

    def collaborator_on_b(self, transport: str) -> AbstractAsyncContextManager[Client]:
        """The collaborator's WebSocket to the project on server B."""
        return connect(self.url(self.b, transport), self.collaborator.token)


def bridge_of(server: Running) -> Bridge:
    assert server.bound.services is not None
    bridge = server.bound.services.value.bridge
    assert bridge is not None
    return bridge


def counter(server: Running, name: str, **labels: str) -> float:
    assert server.bound.services is not None
    value = server.bound.services.value.metrics.registry.get_sample_value(name, labels)
    return value or 0.0


async def wait_connected(*servers: Running, connected: bool = True) -> None:
    """Wait (at most WAIT s) until every server's bridge is ``connected`` (subscribed), or
    is not."""
    with trio.fail_after(WAIT):
        for server in servers:
            await bridge_of(server).wait_connected(connected)


async def make_pair(a: Running, b: Running) -> Pair:
    owner_tokens = await a.signup_login("owner@example.com")
    collab_tokens = await b.signup_login("collab@example.com")
    owner = User(owner_tokens["user_id"], owner_tokens["access_token"])
    collaborator = User(collab_tokens["user_id"], collab_tokens["access_token"])
    r = await a.client.post("/api/v1/projects/", json={"name": "Shared"}, headers=owner.auth)
    assert r.status_code == 201, r.text
    project_id = r.json()["id"]
    r = await a.client.post(
        f"/api/v1/projects/{project_id}/collaborators",
        json={"user_id": collaborator.user_id, "role": "collaborator"},
        headers=owner.auth,
    )
    assert r.status_code == 201, r.text
    return Pair(a, b, project_id, owner, collaborator)


async def submit_job(server: Running, pair: Pair, csv: str) -> str:
    """The owner submits a data_processing job of ``csv`` for the pair's project on
    ``server``; its id."""
    r = await server.client.post(
        "/api/v1/jobs/run",
        json={
            "task_name": "data_processing",
            "payload": {"csv": csv},
            "project_id": pair.project_id,
        },
        headers=pair.owner.auth,
    )
    assert r.status_code in (200, 202), r.text
    job_id: str = r.json()["job_id"]
    return job_id


@asynccontextmanager
async def bridged_pair(
    start_server: StartServer, redis_url: str, **env: Any
) -> AsyncIterator[tuple[Running, Running, Pair]]:
    """Two servers on ``redis_url`` (``env`` for both), both bridges connected, and a
    project shared by a user of each."""
    async with (
        start_server(REDIS_URL=redis_url, **env) as a,
        start_server(REDIS_URL=redis_url, **env) as b,
    ):
        await wait_connected(a, b)
        yield a, b, await make_pair(a, b)


def cursor(line: int) -> dict[str, Any]:
    return {"type": "CURSOR_UPDATE", "position": {"file": "/a.py", "line": line, "column": 1}}


async def cursor_crosses(sender: Client, receiver: Client) -> dict[str, Any]:
    """Move ``sender``'s cursor until ``receiver`` sees a move (at most WAIT s): the first
    publish after a Redis restart may find a dead pooled connection, and cursors are
    ephemeral (one may be lost, never delayed)."""
    with trio.fail_after(WAIT):
        while True:
            await sender.send(cursor(3))
            with trio.move_on_after(0.25):
                return await receiver.until("CURSOR_UPDATE")


class Seen:
    """What one client received: durable events in arrival order, and the rest."""

    def __init__(self) -> None:
        self.durable: list[dict[str, Any]] = []
        self.other: list[dict[str, Any]] = []

    async def read_until(self, client: Client, done: Any) -> None:
        with trio.fail_after(WAIT):
            while not done(self):
                message = await client.recv()
                durable = "seq" in message and message["type"] not in ("ACK", "PRESENCE_STATE")
                (self.durable if durable else self.other).append(message)

    def file_changes(self) -> list[str]:
        return [m["file_path"] for m in self.durable if m["type"] == "FILE_CHANGE"]

    def assert_gapless(self) -> None:
        seqs = [m["seq"] for m in self.durable]
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), seqs


@pytest.mark.parametrize("transport", ["main", "listener"])
async def test_clients_on_two_servers_see_each_others_joins_edits_and_cursors(
    start_server: StartServer, redis_url: str, transport: str
) -> None:
    async with bridged_pair(start_server, redis_url) as (a, b, pair):
        async with pair.owner_on_a(transport) as on_a:
            assert (await on_a.recv())["type"] == "PRESENCE_STATE"
            await on_a.until("USER_JOIN")
            async with pair.collaborator_on_b(transport) as on_b:
                state = await on_b.recv()
                assert state["type"] == "PRESENCE_STATE"
                assert (await on_b.until("USER_JOIN"))["user_id"] == pair.collaborator.user_id
                # A sees B's join (committed on B).
                joined = await on_a.until("USER_JOIN")
                assert joined["user_id"] == pair.collaborator.user_id
                for n in range(10):
                    await on_a.send(edit(f"/a{n}", f"a{n}"))
                    await on_b.send(edit(f"/b{n}", f"b{n}"))
                await on_a.send(cursor(7))
                await on_b.send(cursor(9))
                seen_a, seen_b = Seen(), Seen()

                def complete(seen: Seen) -> bool:
                    return len(seen.file_changes()) == 20 and any(
                        m["type"] == "CURSOR_UPDATE" for m in seen.other
                    )

                await seen_a.read_until(on_a, complete)
                await seen_b.read_until(on_b, complete)
        # The same events in the same order on both servers, nothing missing or twice.
        changes_a = [m for m in seen_a.durable if m["type"] == "FILE_CHANGE"]
        changes_b = [m for m in seen_b.durable if m["type"] == "FILE_CHANGE"]
        assert changes_a == changes_b
        assert sorted(m["file_path"] for m in changes_a) == sorted(
            [f"/a{n}" for n in range(10)] + [f"/b{n}" for n in range(10)]
        )
        seen_a.assert_gapless()
        seen_b.assert_gapless()
        # Cursors are never stored: only the bridge carries them across.
        (cursor_on_b,) = [m for m in seen_b.other if m["type"] == "CURSOR_UPDATE"]
        assert cursor_on_b["user_id"] == pair.owner.user_id
        assert cursor_on_b["position"] == {"file": "/a.py", "line": 7, "column": 1}
        (cursor_on_a,) = [m for m in seen_a.other if m["type"] == "CURSOR_UPDATE"]
        assert cursor_on_a["user_id"] == pair.collaborator.user_id
        # The events crossed through Redis (not only through the log).
        assert counter(b, "atrium_bridge_messages_received_total", kind="events") > 0
        assert counter(a, "atrium_bridge_messages_received_total", kind="events") > 0
        assert counter(a, "atrium_bridge_messages_published_total", kind="ephemeral") >= 1


async def test_the_bridge_is_a_child_of_the_root_and_ready_reports_it(
    start_server: StartServer, redis_url: str
) -> None:
    token = "operator-token-0123456789"
    async with start_server(REDIS_URL=redis_url, ADMIN_TOKEN=token) as a:
        await wait_connected(a)
        r = await a.client.get("/ready")
        assert r.status_code == 200
        body = r.json()
        assert body["status"] == "ready"
        assert body["checks"]["redis"] == {"ok": True, "state": "connected", "breaker": "closed"}
        r = await a.client.get("/health/supervisor", headers={"Authorization": f"Bearer {token}"})
        children = r.json()["supervisor"]["children"]
        assert [c["name"] for c in children][-1] == "bridge"
        (bridge,) = [c for c in children if c["name"] == "bridge"]
        assert bridge["state"] == "running"
        assert bridge["detail"]["connected"] is True
        assert bridge["detail"]["instance"] == bridge_of(a).instance
        assert counter(a, "atrium_bridge_connected") == 1
        assert counter(a, "atrium_redis_breaker_state", state="closed") == 1


async def test_a_bridge_restart_restarts_nothing_else(
    start_server: StartServer, redis_url: str
) -> None:
    async with bridged_pair(start_server, redis_url) as (a, b, pair):
        root = a.bound.supervisor
        assert root is not None
        before = {c.name: c.restart_count for c in root.which_children()}
        # A fault in the bridge (a bug: Redis outages never end it) restarts it alone.
        bridge = bridge_of(a)

        def broken(*_: object) -> None:
            del bridge._encode  # once: the restarted child relays again
            raise RuntimeError("injected bridge fault")

        bridge._encode = broken  # type: ignore[method-assign]
        async with (
            pair.collaborator_on_b("main") as on_b,
            pair.owner_on_a("main") as on_a,
        ):
            await on_a.until("USER_JOIN")  # relaying it is what trips the fault
            # A cursor crosses from A again: the bridge was restarted (only it).
            assert (await cursor_crosses(on_a, on_b))["user_id"] == pair.owner.user_id
        after = {c.name: c.restart_count for c in root.which_children()}
        assert after["bridge"] == before["bridge"] + 1
        assert {k: v for k, v in after.items() if k != "bridge"} == {
            k: v for k, v in before.items() if k != "bridge"
        }


async def test_a_redis_restart_mid_stream_loses_duplicates_and_reorders_nothing(
    start_server: StartServer, own_redis: RedisServer
) -> None:
    async with bridged_pair(start_server, own_redis.url, **FAST_BREAKER) as (a, b, pair):
        async with (
            pair.owner_on_a("main") as on_a,
            pair.collaborator_on_b("listener") as on_b,
        ):
            await on_a.until("USER_JOIN")
            await on_b.until("USER_JOIN")
            seen_a, seen_b = Seen(), Seen()
            total = 60
            for n in range(total):
                if n == 20:
                    own_redis.stop(kill=True)
                if n == 40:
                    own_redis.start()
                writer = on_a if n % 2 else on_b
                await writer.send(edit(f"/e{n}", f"e{n}"))
                await trio.sleep(0.01)  # a stream over time, not one burst

            def complete(seen: Seen) -> bool:
                return len(seen.file_changes()) == total

            await seen_a.read_until(on_a, complete)
            await seen_b.read_until(on_b, complete)
            await wait_connected(a, b)
            # Delivery through Redis resumed: a cursor crosses again.
            await cursor_crosses(on_a, on_b)
        for seen in (seen_a, seen_b):
            seen.assert_gapless()
            assert sorted(seen.file_changes()) == sorted(f"/e{n}" for n in range(total))
        assert seen_a.file_changes() == seen_b.file_changes()
        assert counter(a, "atrium_bridge_catch_ups_total") >= 1


async def test_redis_down_at_start_is_degraded_then_the_server_rejoins(
    start_server: StartServer, redis_url: str
) -> None:
    away = RedisServer()  # not started yet
    try:
        async with (
            start_server(REDIS_URL=redis_url) as a,
            start_server(REDIS_URL=away.url, **FAST_BREAKER) as b,
        ):
            await wait_connected(a)
            r = await b.client.get("/ready")
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["ready"] is True and body["status"] == "degraded"
            assert body["checks"]["redis"]["state"] == "degraded"
            pair = await make_pair(a, b)
            # Degraded, B still serves its own clients.
            async with pair.collaborator_on_b("main") as on_b:
                await on_b.until("USER_JOIN")
                await on_b.send(edit("/alone", "alone"))
                assert (await on_b.until("ACK"))["id"] == "alone"
            # Redis arrives (the test's own Redis on the port B was given): B rejoins.
            away.start()
            await wait_connected(b)
            r = await b.client.get("/ready")
            assert r.json()["status"] == "ready"
            redis = r.json()["checks"]["redis"]
            assert redis == {"ok": True, "state": "connected", "breaker": "closed"}
    finally:
        away.close()


async def test_degraded_servers_rejoin_and_relay_cursors_again(
    start_server: StartServer, own_redis: RedisServer
) -> None:
    async with bridged_pair(start_server, own_redis.url, **FAST_BREAKER) as (a, b, pair):
        own_redis.stop(kill=True)
        await wait_connected(a, b, connected=False)
        r = await a.client.get("/ready")
        assert r.status_code == 200 and r.json()["status"] == "degraded"
        async with (
            pair.owner_on_a("main") as on_a,
            pair.collaborator_on_b("main") as on_b,
        ):
            await on_a.until("USER_JOIN")
            await on_b.until("USER_JOIN")
            # Degraded: A's edits still reach B (through the log), nothing through Redis.
            await on_a.send(edit("/degraded", "d1"))
            assert (await on_b.until("FILE_CHANGE"))["file_path"] == "/degraded"
            own_redis.start()
            await wait_connected(a, b)
            assert (await cursor_crosses(on_a, on_b))["user_id"] == pair.owner.user_id
        assert counter(a, "atrium_bridge_messages_dropped_total", reason="unavailable") >= 1


async def test_job_progress_on_one_server_reaches_a_client_on_the_other(
    start_server: StartServer, redis_url: str
) -> None:
    async with (
        start_server(REDIS_URL=redis_url, WORKER_CONCURRENCY=2) as a,
        start_server(REDIS_URL=redis_url, WORKER_CONCURRENCY=0) as b,
    ):
        await wait_connected(a, b)
        pair = await make_pair(a, b)
        async with pair.collaborator_on_b("listener") as on_b:
            await on_b.until("USER_JOIN")
            # Submitted on A and run by A's job actors: no workspace is open on A.
            job_id = await submit_job(a, pair, "name,score\nann,3\nbob,5\n")
            seen: list[dict[str, Any]] = []
            with trio.fail_after(WAIT):
                while not seen or seen[-1]["type"] != "JOB_COMPLETED":
                    message = await on_b.recv()
                    if message["type"].startswith("JOB_"):
                        seen.append(message)
        progress = [m for m in seen if m["type"] == "JOB_PROGRESS"]
        assert progress and all(m["job_id"] == job_id for m in progress)
        assert [m["type"] for m in seen if m["type"] != "JOB_PROGRESS"] == [
            "JOB_QUEUED",
            "JOB_STARTED",
            "JOB_COMPLETED",
        ]


async def test_messages_that_do_not_parse_are_dropped_and_counted(
    start_server: StartServer, redis_url: str
) -> None:
    async with bridged_pair(start_server, redis_url) as (a, b, pair):
        bridge = bridge_of(a)
        async with pair.owner_on_a("main") as on_a:
            await on_a.until("USER_JOIN")
            project = uuid.UUID(pair.project_id)
            for data in (
                b"garbage",
                b"other|e||not json",
                b"other|e||[{}]",
                b"other|x||",
                b"other|p|nothex|{}",
            ):
                await bridge.redis.call(
                    lambda r, d=data: r.publish(channel_of("other", project), d)
                )
            await bridge.redis.call(lambda r: r.publish("atrium:ws:not-a-uuid", b"x"))
            # Still relaying: B's cursor reaches A, after the garbage (published first).
            async with pair.collaborator_on_b("main") as on_b:
                await on_b.until("USER_JOIN")
                await on_b.send(cursor(2))
                assert (await on_a.until("CURSOR_UPDATE"))["user_id"] == pair.collaborator.user_id
        assert counter(a, "atrium_bridge_messages_dropped_total", reason="invalid") == 6
        root = a.bound.supervisor
        assert root is not None and root.child("bridge").restart_count == 0


async def test_progress_of_a_job_run_by_a_worker_process_reaches_a_server(
    start_server: StartServer,
    redis_url: str,
    database_url: str,
    data_dir: Path,
    nursery: trio.Nursery,
) -> None:
    async with start_server(REDIS_URL=redis_url, WORKER_CONCURRENCY=0) as b:
        # A worker (``run.py worker``'s tree): its bridge only publishes.
        settings = make_settings(data_dir, REDIS_URL=redis_url, WORKER_CONCURRENCY=1)
        worker: Bound = await nursery.start(
            lambda task_status: serve_worker(settings, database_url, task_status=task_status)
        )
        assert worker.supervisor is not None
        assert worker.supervisor.child("bridge").value.alive
        await wait_connected(b)
        pair = await make_pair(b, b)
        async with pair.collaborator_on_b("main") as on_b:
            await on_b.until("USER_JOIN")
            job_id = await submit_job(b, pair, "name,score\nann,3\n")
            with trio.fail_after(WAIT):
                progress = await on_b.until("JOB_PROGRESS")
            assert progress["job_id"] == job_id


class FakeWorkspace:
    """Stands in for a WorkspaceActor: records what it is told, or has a full mailbox."""

    def __init__(self) -> None:
        self.full = True
        self.told: list[object] = []

    def tell_nowait(self, message: object) -> None:
        if self.full:
            raise MailboxFull("full")
        self.told.append(message)


async def test_a_workspace_too_busy_for_a_relayed_event_catches_up_within_a_second(
    autojump_clock: trio.testing.MockClock,
) -> None:
    project = uuid.uuid4()
    workspace = FakeWorkspace()

    class Local:
        def find(self, project_id: uuid.UUID) -> Any:
            return workspace if project_id == project else None

        def running(self) -> list[Any]:
            return [workspace]

    client = redis.asyncio.Redis()  # never connected: only the relay's receiving side runs
    bridge = Bridge(Redis(client, CircuitBreaker(BreakerSettings()), timeout=1.0), Metrics())
    bridge._set_connected(True)
    channel = channel_of("other", project).encode()
    bridge._received_message(Local(), channel, b"other|p|" + uuid.uuid4().hex.encode() + b"|{}")
    assert not bridge._missed  # a lost cursor is no loss
    bridge._received_message(Local(), channel, b"other|s||7")
    assert bridge._missed == {project}
    workspace.full = False
    async with trio.open_nursery() as nursery:
        nursery.start_soon(bridge._poll_while_degraded, Local())
        await trio.sleep(1.5)
        assert [type(m).__name__ for m in workspace.told] == ["CatchUp"]
        bridge._set_connected(False)  # degraded: every open workspace polls the log
        await trio.sleep(1.0)
        assert [type(m).__name__ for m in workspace.told] == ["CatchUp", "CatchUp"]
        nursery.cancel_scope.cancel()


class Inbox:
    """Stands in for a WorkspaceActor that takes every message, and can be waited on."""

    def __init__(self) -> None:
        self.frames: list[str] = []
        self._changed = trio.Event()

    def tell_nowait(self, message: Any) -> None:
        self.frames.append(message.frame)
        self._changed.set()
        self._changed = trio.Event()

    async def wait_for(self, count: int) -> None:
        while len(self.frames) < count:
            await self._changed.wait()


class Recording:
    """Stands in for the workspaces open in a process: one project, and every project the
    bridge looked up (which it does for each message it receives)."""

    def __init__(self, project: uuid.UUID) -> None:
        self.project = project
        self.workspace = Inbox()
        self.looked_up: list[uuid.UUID] = []

    def find(self, project_id: uuid.UUID) -> Any:
        self.looked_up.append(project_id)
        return self.workspace if project_id == self.project else None

    def running(self) -> list[Any]:
        return []


@asynccontextmanager
async def two_bridges(url: str) -> AsyncIterator[tuple[Bridge, Bridge, Recording, Recording]]:
    """Bridges ``a`` and ``b`` on ``url``, subscribed, each relaying one project to its
    recorded local workspace. Their instance ids share all but the last digit, so the
    patterns must tell them apart there."""
    project = uuid.uuid4()
    a_local, b_local = Recording(project), Recording(project)
    async with (
        open_redis(url, BreakerSettings()) as a_redis,
        open_redis(url, BreakerSettings()) as b_redis,
        trio.open_nursery() as nursery,
    ):
        a = Bridge(a_redis, Metrics(), instance="0" * 15 + "a")
        b = Bridge(b_redis, Metrics(), instance="0" * 15 + "b")
        await nursery.start(a.run, a_local)
        await nursery.start(b.run, b_local)
        with trio.fail_after(WAIT):
            await a.wait_connected()
            await b.wait_connected()
        yield a, b, a_local, b_local
        nursery.cancel_scope.cancel()


async def test_redis_never_sends_a_process_its_own_messages(aio_loop: None, redis_url: str) -> None:
    async with two_bridges(redis_url) as (a, b, a_local, b_local):
        project = a_local.project
        with trio.fail_after(WAIT):
            for n in range(3):
                a.ephemeral(project, uuid.uuid4(), f'{{"from":"a","n":{n}}}')
            await b_local.workspace.wait_for(3)
            # Redis delivers in order on a connection: had a's own messages come back, they
            # would have reached it before this one from b.
            b.ephemeral(project, uuid.uuid4(), '{"from":"b"}')
            await a_local.workspace.wait_for(1)
            # Cursors are published without answers (CLIENT REPLY SKIP): the pool's
            # connections still answer each command with its own reply.
            assert await a.redis.call(lambda r: r.echo("in step")) == b"in step"
    assert b_local.workspace.frames == [f'{{"from":"a","n":{n}}}' for n in range(3)]
    assert a_local.workspace.frames == ['{"from":"b"}']
    assert a_local.looked_up == [project]  # b's message only: none of its own came back
    assert b_local.looked_up == [project] * 3


async def test_a_batch_of_events_and_cursors_is_published_in_order_in_one_write(
    aio_loop: None, redis_url: str
) -> None:
    project = uuid.uuid4()
    async with open_redis(redis_url, BreakerSettings()) as redis_a:
        other = Bridge(redis_a, Metrics(), instance="f" * 16)
        received: list[bytes] = []
        subscribed, all_four = trio.Event(), trio.Event()

        def on_message(channel: bytes, data: bytes) -> None:
            received.append(data.split(b"|", 3)[3])
            if len(received) == 4:
                all_four.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                partial(
                    redis_a.listen,
                    on_message,
                    patterns=patterns_of(other.instance),
                    on_subscribed=subscribed.set,
                )
            )
            with trio.fail_after(WAIT):
                await subscribed.wait()
                bridge = Bridge(redis_a, Metrics(), instance="0" * 16)
                # Events wait for Redis's answer, cursors do not: one write, in order.
                batch = [
                    bridge._encode((project, b"p", uuid.uuid4(), '"cursor 1"')),
                    bridge._encode((project, b"e", None, [])),
                    bridge._encode((project, b"p", uuid.uuid4(), '"cursor 2"')),
                    bridge._logged(project, 7),
                ]
                assert [confirm for _, _, confirm in batch] == [False, True, False, True]
                connection = await redis_a.call(lambda r: r.client_id())
                await redis_a.call(partial(publish_all, batch, True))
                await all_four.wait()
                # Exactly the answers asked for were read: the connection went back to
                # the pool clean (one with unread answers would be replaced), and the
                # next command gets its own answer.
                assert await redis_a.call(lambda r: r.client_id()) == connection
                assert await redis_a.call(lambda r: r.echo("next")) == b"next"
            nursery.cancel_scope.cancel()
    assert received == [b'"cursor 1"', b"[]", b'"cursor 2"', b"7"]


async def test_a_redis_that_refuses_client_commands_still_relays_cursors(
    aio_loop: None, own_redis: RedisServer
) -> None:
    # A managed Redis, or an ACL, may refuse CLIENT commands (CLIENT REPLY SKIP): the
    # bridge then publishes cursor moves with answers instead of crash-looping on them.
    async with open_redis(own_redis.url, BreakerSettings()) as admin:
        assert await admin.call(replies_can_be_skipped) is True
        await admin.call(
            lambda r: r.execute_command(
                "ACL", "SETUSER", "limited", "on", "nopass", "~*", "&*", "+@all", "-client"
            )
        )
    limited = own_redis.url.replace("redis://", "redis://limited:any@")
    async with two_bridges(limited) as (a, _, _, b_local):
        assert await a.redis.call(replies_can_be_skipped) is False
        with trio.fail_after(WAIT):
            for n in range(3):
                a.ephemeral(b_local.project, uuid.uuid4(), f'{{"n":{n}}}')
            await b_local.workspace.wait_for(3)
            # Every answer was read: the pool's connections still answer in step.
            assert await a.redis.call(lambda r: r.echo("in step")) == b"in step"
    assert b_local.workspace.frames == [f'{{"n":{n}}}' for n in range(3)]
