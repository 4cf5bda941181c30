"""Two servers, one PostgreSQL, and no Redis between them (none configured, or Redis away):
the events each commits are announced on the log (PostgreSQL NOTIFY), so a client on the
other server sees them at once, not at the next poll. While the bridge is connected,
nothing is announced: the commits of NOTIFYing transactions queue behind one lock.

The servers here poll the log once a minute while degraded (``DEGRADED_POLL_SECONDS``),
so only a notification can deliver within the tests' caps.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio
import trio.lowlevel
import trio.testing
from conftest import Running, StartServer
from redis_server import RedisServer
from test_bridge import FAST_BREAKER, Pair, edit, make_pair, wait_connected
from wsclient import Client, connect

from atrium.actors.workspace import WorkspaceSettings
from atrium.domain.workspaces import PEER_SECONDS, Workspaces
from atrium.persistence import events as event_log
from atrium.persistence.database import open_database

SLOW_POLL = {"DEGRADED_POLL_SECONDS": "60"}
# An edit that crosses within this came by a notification, not by the poll (a minute away
# under SLOW_POLL): far over a notification's round trip on a busy 2-core machine, with a
# neighbouring test running (so no test here needs the machine to itself).
PROMPT = 5.0


def workspaces_of(server: Running) -> Workspaces:
    assert server.bound.services is not None
    return server.bound.services.value.workspaces


async def wait_peers(*servers: Running) -> None:
    """Return once each server has heard another on the log. The greetings are real
    PostgreSQL I/O, which ``wait_all_tasks_blocked`` takes for blocked tasks: so watch
    what each has heard, one pass of the loop at a time."""
    with trio.fail_after(10):
        for server in servers:
            while not workspaces_of(server).peers:
                await trio.lowlevel.checkpoint()


async def crosses(sender: Client, receiver: Client, path: str) -> float:
    """Send an edit of ``path``; seconds until ``receiver`` sees it (capped at 2 * PROMPT)."""
    start = trio.current_time()
    await sender.send(edit(path, f"id{path}"))
    with trio.fail_after(2 * PROMPT):
        while (await receiver.until("FILE_CHANGE"))["file_path"] != path:
            pass  # an edit seen before (its own, or one already crossed)
    return trio.current_time() - start


@asynccontextmanager
async def clients(pair: Pair) -> AsyncIterator[tuple[Client, Client]]:
    """The owner on A and the collaborator on B, each having seen the other join."""
    async with (
        connect(pair.url(pair.a, "main"), pair.owner.token) as on_a,
        connect(pair.url(pair.b, "main"), pair.collaborator.token) as on_b,
    ):
        with trio.fail_after(5):
            while (await on_a.until("USER_JOIN"))["user_id"] != pair.collaborator.user_id:
                pass
        yield on_a, on_b


async def test_without_redis_edits_and_rest_events_cross_servers_at_once(
    start_server: StartServer,
) -> None:
    async with start_server(**SLOW_POLL) as a, start_server(**SLOW_POLL) as b:
        await wait_peers(a, b)
        assert workspaces_of(a).notifies() and workspaces_of(b).notifies()
        pair = await make_pair(a, b)
        async with clients(pair) as (on_a, on_b):
            assert await crosses(on_a, on_b, "/from-a") < PROMPT
            assert await crosses(on_b, on_a, "/from-b") < PROMPT
            # A REST write on A (no workspace path at all) reaches B's client too.
            start = trio.current_time()
            r = await a.client.patch(
                f"/api/v1/projects/{pair.project_id}",
                json={"name": "Renamed"},
                headers=pair.owner.auth,
            )
            assert r.status_code == 200, r.text
            with trio.fail_after(2 * PROMPT):
                updated = await on_b.until("PROJECT_UPDATED")
            assert trio.current_time() - start < PROMPT  # the request included
            assert updated["project_id"] == pair.project_id
            # Several edits in a row arrive in seq order, none missing.
            for n in range(5):
                await on_a.send(edit(f"/burst{n}", f"burst{n}"))
            burst = []
            with trio.fail_after(5):
                while len(burst) < 5:
                    message = await on_b.until("FILE_CHANGE")
                    if message["file_path"].startswith("/burst"):
                        burst.append(message)
            assert [m["file_path"] for m in burst] == [f"/burst{n}" for n in range(5)]
            seqs = [m["seq"] for m in burst]
            assert seqs == list(range(seqs[0], seqs[0] + 5))


async def test_a_server_alone_announces_nothing(start_server: StartServer) -> None:
    async with start_server(**SLOW_POLL) as a:
        with trio.move_on_after(0.3):
            await wait_peers(a)
        assert not workspaces_of(a).peers and not workspaces_of(a).notifies()


async def test_degraded_servers_announce_on_the_log_and_connected_ones_do_not(
    start_server: StartServer, own_redis: RedisServer, database_url: str
) -> None:
    env = {"REDIS_URL": own_redis.url, **FAST_BREAKER, **SLOW_POLL}
    async with (
        start_server(**env) as a,
        start_server(**env) as b,
        open_database(database_url, pool_size=2) as db,
    ):
        await wait_connected(a, b)
        await wait_peers(a, b)
        pair = await make_pair(a, b)
        project = uuid.UUID(pair.project_id)
        announced: list[int] = []
        two_announced = trio.Event()

        def heard(payload: str) -> None:
            parsed = event_log.parse_appended(payload)
            if parsed is not None and parsed[0] == project:
                announced.append(parsed[1])
                if len(announced) >= 2:
                    two_announced.set()

        async with db.listening(event_log.LOG_CHANNEL, heard), clients(pair) as (on_a, on_b):
            # Through Redis: nothing announced on the log.
            assert not workspaces_of(a).notifies()
            await crosses(on_a, on_b, "/through-redis")
            own_redis.stop(kill=True)
            await wait_connected(a, b, connected=False)
            assert workspaces_of(a).notifies()
            assert await crosses(on_a, on_b, "/degraded-a") < PROMPT
            assert await crosses(on_b, on_a, "/degraded-b") < PROMPT
            with trio.fail_after(5):
                await two_announced.wait()
            # Notifications arrive in commit order: had the edit through Redis been
            # announced, its seq would come first.
            last = await event_log.last_seq(db, project)
            assert announced[:2] == [last - 1, last]


async def test_a_connected_server_announces_for_one_whose_redis_is_away(
    start_server: StartServer, own_redis: RedisServer
) -> None:
    # A reaches Redis, B does not (its own Redis is down): A's bridge relays, but B
    # hears nothing from Redis, so A announces its events on the log too.
    away = RedisServer()  # never started
    try:
        async with (
            start_server(REDIS_URL=own_redis.url, **SLOW_POLL) as a,
            start_server(REDIS_URL=away.url, **FAST_BREAKER, **SLOW_POLL) as b,
        ):
            await wait_connected(a)
            await wait_peers(a, b)
            assert workspaces_of(a).notifies()  # B's greeting said its relay is cut off
            pair = await make_pair(a, b)
            async with clients(pair) as (on_a, on_b):
                assert await crosses(on_a, on_b, "/to-the-cut-off") < PROMPT
                assert await crosses(on_b, on_a, "/from-the-cut-off") < PROMPT
    finally:
        away.close()


async def test_a_peer_that_goes_quiet_is_forgotten(autojump_clock: trio.testing.MockClock) -> None:
    del autojump_clock
    no_database: Any = None  # greetings are only queued here, never sent
    workspaces = Workspaces(no_database, WorkspaceSettings())
    workspaces._heard("another", "hello", connected=True)
    assert workspaces.notifies()  # this relay (none) does not reach it
    async with trio.open_nursery() as nursery:
        nursery.start_soon(workspaces._tell_state_forever)
        await trio.sleep(2 * PEER_SECONDS)
        workspaces._heard("another", "state", connected=True)
        await trio.sleep(2.5 * PEER_SECONDS)
        assert workspaces.notifies()  # heard within three periods
        await trio.sleep(2 * PEER_SECONDS)
        assert not workspaces.notifies()  # not for more than three: gone
        nursery.cancel_scope.cancel()
