"""Cluster presence: two real servers sharing one PostgreSQL and one Redis show the union
of their users, a user with tabs on both joins once and leaves once, and a process that
dies has its users leave without anyone closing anything."""

from __future__ import annotations

import signal
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
from conftest import FakeClock, Running, StartServer
from redis_server import RedisServer, free_port
from served import SECRET, run_py_env, start_serving
from test_presence_store import set_count
from test_workspace import Member, make_member, project_with
from wsclient import Client, connect

from atrium.core.events import EventType
from atrium.persistence.redis import BreakerSettings, open_redis
from atrium.realtime.presence import ClusterPresence, PresenceSettings

FAST = {"PRESENCE_HEARTBEAT_SECONDS": "0.2", "PRESENCE_TTL_SECONDS": "1"}


def settings(heartbeat_seconds: float, ttl_seconds: float) -> PresenceSettings:
    """A board's settings for the tests that read the cluster's answers: a loaded test
    machine can take longer than the shipped 0.25 s to hear a healthy Redis, and the
    board would then answer from its own view (the fallback a hanging Redis gets, tested
    on its own below), which is not what these tests look at."""
    return PresenceSettings(heartbeat_seconds, ttl_seconds, answer_seconds=5.0)


def ws_url(server: Running, project_id: str) -> str:
    return f"ws://127.0.0.1:{server.bound.port}/ws/{project_id}"


@asynccontextmanager
async def joined(url: str, member: Member) -> AsyncIterator[tuple[Client, dict[str, Any]]]:
    """A connection whose join is done (its PRESENCE_STATE read, its Join handled)."""
    async with connect(url, member.token) as client:
        state = await client.recv()
        assert state["type"] == "PRESENCE_STATE"
        yield client, state


async def status(server: Running, project_id: str, member: Member) -> dict[str, Any]:
    r = await server.client.get(
        f"/api/v1/projects/{project_id}/workspace/status", headers=member.auth
    )
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


async def settled(server: Running, project_id: str, member: Member) -> dict[str, Any]:
    """The status once every connection ``server`` served has ended and been handled: the
    status is asked of the workspace after the Leaves its connections sent."""
    assert server.bound.services is not None
    with trio.fail_after(10):
        await server.bound.services.value.realtime.wait_drained()
    return await status(server, project_id, member)


async def presence_events(server: Running, project_id: str, member: Member) -> list[Any]:
    r = await server.client.get(f"/api/v1/projects/{project_id}/events", headers=member.auth)
    assert r.status_code == 200, r.text
    return [
        (e["type"], e["actor_id"])
        for e in r.json()["events"]
        if e["type"] in ("USER_JOIN", "USER_LEAVE")
    ]


def online(state: dict[str, Any], key: str = "users") -> dict[str, int]:
    return {u["user_id"]: u["connections"] for u in state[key]}


async def test_presence_is_the_union_and_a_user_on_both_joins_and_leaves_once(
    start_server: StartServer, redis_url: str
) -> None:
    async with (
        start_server(REDIS_URL=redis_url) as a,
        start_server(REDIS_URL=redis_url) as b,
    ):
        ann = await make_member(a, "ann@example.com")
        bob = await make_member(b, "bob@example.com")
        project = await project_with(a.client, ann, bob)
        async with joined(ws_url(a, project), ann) as (ann_a, first):
            assert first["users"] == []
            async with joined(ws_url(b, project), bob) as (bob_b, state):
                assert online(state) == {ann.user_id: 1}  # Ann is on the other process
                async with joined(ws_url(b, project), ann) as (ann_b, state):
                    assert online(state) == {ann.user_id: 1, bob.user_id: 1}
                    for server in (a, b):
                        seen = await status(server, project, bob)
                        assert online(seen, "online_users") == {ann.user_id: 2, bob.user_id: 1}
                        assert (seen["active_collaborators"], seen["connections"]) == (2, 3)
                        assert {u["status"] for u in seen["online_users"]} == {"active"}
                    await ann_a.ws.aclose()  # her tab on A closes: she is still on B
                    after = await settled(a, project, ann)
                    assert online(after, "online_users") == {ann.user_id: 1, bob.user_id: 1}
                # Her last tab closed: Bob, on the process where it was, sees her leave.
                left = await bob_b.until("USER_LEAVE")
                assert left["user_id"] == ann.user_id
            assert (await settled(b, project, ann))["online_users"] == []
        events = await presence_events(a, project, ann)
        assert events == [
            ("USER_JOIN", ann.user_id),
            ("USER_JOIN", bob.user_id),
            ("USER_LEAVE", ann.user_id),
            ("USER_LEAVE", bob.user_id),
        ]


@pytest.mark.long
async def test_a_killed_process_users_leave_on_another_within_15_seconds(
    start_server: StartServer, database_url: str, redis_url: str, tmp_path: Any
) -> None:
    env = run_py_env(tmp_path / "b", database_url, REDIS_URL=redis_url, **FAST)
    async with start_server(REDIS_URL=redis_url, **FAST) as a, trio.open_nursery() as nursery:
        with open(tmp_path / "b.log", "wb") as errors:  # noqa: ASYNC230 - a local file
            b = await start_serving(nursery, env, stderr=errors)
        ann = await make_member(a, "ann@example.com")
        bob = await make_member(a, "bob@example.com")
        project = await project_with(a.client, ann, bob)
        async with joined(ws_url(a, project), ann) as (ann_a, _):
            await ann_a.until("USER_JOIN")
            b_url = f"ws://127.0.0.1:{b.ws_port}/ws/{project}"
            async with joined(b_url, bob) as (bob_b, _):
                mine = await bob_b.until("USER_JOIN")
                assert mine["user_id"] == bob.user_id
                seen = await status(a, project, ann)
                assert online(seen, "online_users") == {ann.user_id: 1, bob.user_id: 1}
                b.process.send_signal(signal.SIGKILL)
                killed_at = time.monotonic()
                with trio.fail_after(15):
                    while (message := await ann_a.recv())["type"] != "USER_LEAVE":
                        pass
                took = time.monotonic() - killed_at
                assert message["user_id"] == bob.user_id, message
                await bob_b.release()
        assert took < 15
        assert await b.process.wait() == -signal.SIGKILL
        assert online(await status(a, project, ann), "online_users") == {}
        assert (await presence_events(a, project, ann)).count(("USER_LEAVE", bob.user_id)) == 1


async def test_with_redis_down_presence_is_this_process_alone(start_server: StartServer) -> None:
    nowhere = f"redis://127.0.0.1:{free_port()}/0"
    async with start_server(REDIS_URL=nowhere, **FAST) as server:
        ann = await make_member(server, "ann@example.com")
        bob = await make_member(server, "bob@example.com")
        project = await project_with(server.client, ann, bob)
        async with joined(ws_url(server, project), ann) as (ann_1, _):
            assert (await ann_1.until("USER_JOIN"))["user_id"] == ann.user_id
            async with joined(ws_url(server, project), ann), joined(ws_url(server, project), bob):
                join = await ann_1.until("USER_JOIN")
                assert join["user_id"] == bob.user_id  # her second tab was no join
                seen = await status(server, project, ann)
                assert online(seen, "online_users") == {ann.user_id: 2, bob.user_id: 1}
            assert (await ann_1.until("USER_LEAVE"))["user_id"] == bob.user_id
        assert server.bound.supervisor is not None
        snapshot = server.bound.supervisor.snapshot()
        cluster = next(c for c in snapshot.children if c.name == "cluster")
        assert cluster.state == "running" and cluster.restart_count == 0
        assert cluster.detail is not None and cluster.detail["redis"] == "unreachable"


async def test_a_process_cut_off_while_reaped_announces_its_users_again(
    aio_loop: None, db: Any, redis_url: str
) -> None:
    # A process whose heartbeat stopped (cut off from Redis) is reaped: its users got a
    # USER_LEAVE. When it is back, its next heartbeat finds that out and joins them again.
    from atrium.persistence import accounts, projects
    from atrium.persistence import events as event_log

    user = await accounts.create_user(db, "ann@example.com", "x")
    assert user is not None
    created = await projects.create_project(
        db, user.id, name="Cut off", description=None, visibility="private"
    )
    project_id = created.value.id
    async with open_redis(redis_url, BreakerSettings()) as redis:
        cut_off = ClusterPresence(redis, db, settings(1.0, 60.0))
        await cut_off.beat()
        assert (
            await cut_off.joined(project_id, user.id, user.email, 1)
        ).transition.value == "joined"
        await redis.call(lambda c: c.delete(f"atrium:presence:alive:{cut_off.instance}"))
        reaper = ClusterPresence(redis, db, settings(1.0, 60.0))
        await reaper.beat()
        await cut_off.beat()
    stored = await event_log.events_between(db, project_id, 0, 100)
    assert [(e.type, e.actor_id) for e in stored if e.type.startswith("USER_")] == [
        ("USER_LEAVE", user.id),
        ("USER_JOIN", user.id),
    ]


@pytest.mark.parametrize("connections", [1, 3])
async def test_local_presence_decides_from_this_process_counts(connections: int) -> None:
    from atrium.realtime.presence import LocalPresence, Transition

    board = LocalPresence()
    project, user = uuid.uuid4(), uuid.uuid4()
    joined_as = await board.joined(project, user, "a@example.com", connections)
    left_as = await board.left(project, user, "a@example.com", connections - 1)
    first = connections == 1
    assert joined_as.transition is (Transition.JOINED if first else Transition.NONE)
    assert left_as.transition is (Transition.LEFT if first else Transition.NONE)
    assert joined_as.version is None and left_as.version is None  # no cluster order


def test_presence_settings_are_validated() -> None:
    from atrium.core.config import ConfigError, load_settings

    defaults = load_settings({"ENVIRONMENT": "test", "SECRET_KEY": SECRET})
    assert (defaults.presence_heartbeat_seconds, defaults.presence_ttl_seconds) == (2.0, 8.0)
    fast = load_settings({"ENVIRONMENT": "test", "SECRET_KEY": SECRET, **FAST})
    assert (fast.presence_heartbeat_seconds, fast.presence_ttl_seconds) == (0.2, 1.0)
    env = {"ENVIRONMENT": "test", "SECRET_KEY": SECRET, "PRESENCE_HEARTBEAT_SECONDS": "5"}
    with pytest.raises(ConfigError) as error:
        load_settings({**env, "PRESENCE_TTL_SECONDS": "5"})
    assert error.value.variable == "PRESENCE_TTL_SECONDS"
    with pytest.raises(ConfigError, match="PRESENCE_HEARTBEAT_SECONDS"):
        load_settings({**env, "PRESENCE_HEARTBEAT_SECONDS": "0"})


async def two_users(db: Any) -> tuple[uuid.UUID, uuid.UUID, uuid.UUID]:
    from atrium.persistence import accounts, projects

    ann = await accounts.create_user(db, "ann@example.com", "x")
    bob = await accounts.create_user(db, "bob@example.com", "x")
    assert ann is not None and bob is not None
    created = await projects.create_project(
        db, ann.id, name="Board", description=None, visibility="private"
    )
    return created.value.id, ann.id, bob.id


async def test_the_board_writes_activity_and_silent_drops_at_its_next_beat(
    aio_loop: None, db: Any, redis_url: str
) -> None:
    project, ann, bob = await two_users(db)
    clock = FakeClock()
    async with open_redis(redis_url, BreakerSettings()) as redis:
        board = ClusterPresence(redis, db, settings(1.0, 60.0), clock=clock)
        elsewhere = ClusterPresence(redis, db, settings(1.0, 60.0))
        await board.beat()
        await board.joined(project, ann, "ann@example.com", 1)
        await board.joined(project, bob, "bob@example.com", 2)
        clock.advance(30)
        board.seen(project, ann)
        board.seen(project, uuid.uuid4())  # not here: nothing to write
        await board.beat()
        seen = await elsewhere.online(project, {})
        assert seen[ann].last_seen == clock.now and seen[bob].connections == 2
        board.dropped(project, bob, 0)  # removed from the project: no USER_LEAVE
        await board.beat()
        assert set(await elsewhere.online(project, {})) == {ann}
        board.vacate(project)  # the workspace stopped here
        await board.beat()
        assert await elsewhere.online(project, {}) == {}
        assert board.snapshot_detail()["users_here"] == 0


async def test_a_board_cut_off_from_redis_decides_alone_and_rewrites_everything_on_return(
    aio_loop: None, db: Any, own_redis: RedisServer
) -> None:
    from atrium.realtime.presence import OnlineUser, Transition

    project, ann, bob = await two_users(db)
    breaker = BreakerSettings(failures=1, reset_seconds=0.0, successes=1)
    async with open_redis(own_redis.url, breaker) as redis:
        board = ClusterPresence(redis, db, settings(1.0, 60.0))
        await board.beat()
        assert (
            await board.joined(project, ann, "ann@example.com", 1)
        ).transition is Transition.JOINED
        own_redis.stop()
        assert (
            await board.joined(project, bob, "bob@example.com", 1)
        ).transition is Transition.JOINED
        assert (
            await board.joined(project, bob, "bob@example.com", 2)
        ).transition is Transition.NONE
        here = {bob: OnlineUser(2, 1.0)}
        assert await board.online(project, here) == here  # what this process knows
        await board.beat()
        assert board.snapshot_detail()["redis"] == "unreachable"
        own_redis.start()  # empty: a Redis restart loses what it held
        with trio.fail_after(5):
            await redis.wait_available()  # the breaker's probe found it
        await board.beat()
        assert board.snapshot_detail()["redis"] == "reachable"
        online_now = await ClusterPresence(redis, db, settings(1.0, 60.0)).online(project, {})
        assert {user: u.connections for user, u in online_now.items()} == {ann: 1, bob: 2}
        assert (await board.left(project, bob, "bob@example.com", 1)).transition is Transition.NONE
        assert (await board.left(project, bob, "bob@example.com", 0)).transition is Transition.LEFT


async def test_the_heartbeat_runs_until_cancelled_and_wakes_for_a_silent_drop(
    aio_loop: None, db: Any, redis_url: str
) -> None:
    project, ann, _ = await two_users(db)
    async with open_redis(redis_url, BreakerSettings()) as redis:
        board = ClusterPresence(redis, db, settings(3600.0, 7200.0))
        elsewhere = ClusterPresence(redis, db, settings(1.0, 60.0))
        async with trio.open_nursery() as nursery:
            assert await nursery.start(board.run) is board
            await board.joined(project, ann, "ann@example.com", 1)
            assert set(await elsewhere.online(project, {})) == {ann}
            board.vacate(project)  # written at once, not at the next beat an hour away
            for _ in range(1000):  # read Redis until the woken beat has written (<= 10 s)
                if not await elsewhere.online(project, {}):
                    break
                await trio.sleep(0.01)
            assert await elsewhere.online(project, {}) == {}
            nursery.cancel_scope.cancel()


async def test_a_hanging_redis_stalls_no_workspace_beyond_a_fraction_of_a_second(
    start_server: StartServer, own_redis: RedisServer
) -> None:
    # Redis stops answering (SIGSTOP) while Cat comes and goes: her joins and leaves ask
    # the cluster board, and Ann's edits must keep reaching Bob meanwhile. Redis's own
    # call timeout (2 s) would hold the workspace that long per join and per leave.
    async with start_server(REDIS_URL=own_redis.url) as server:
        ann = await make_member(server, "ann@example.com")
        bob = await make_member(server, "bob@example.com")
        cat = await make_member(server, "cat@example.com")
        project = await project_with(server.client, ann, bob, cat)
        url = ws_url(server, project)
        async with joined(url, ann) as (ann_ws, _), joined(url, bob) as (bob_ws, _):
            own_redis.pause()
            try:
                latencies: list[float] = []
                async with trio.open_nursery() as nursery:

                    async def cat_comes_and_goes() -> None:
                        for _ in range(3):
                            async with joined(url, cat):
                                pass

                    nursery.start_soon(cat_comes_and_goes)
                    for n in range(12):
                        start = trio.current_time()
                        await ann_ws.send(
                            {
                                "type": "FILE_CHANGE",
                                "file_path": f"/during{n}",
                                "changes": {"lines_added": 1},
                            }
                        )
                        with trio.fail_after(10):
                            while (await bob_ws.until("FILE_CHANGE"))["file_path"] != (
                                f"/during{n}"
                            ):
                                pass
                        latencies.append(trio.current_time() - start)
                        await trio.sleep(0.1)
            finally:
                own_redis.resume()
        # A join asks Redis twice (who is online, then the count), each within 0.25 s,
        # and may wait 0.25 s more for the heartbeat to let go of the board: 0.75 s. A
        # workspace that waited on Redis's own call timeout (2 s) would hold an edit that
        # long at least; under it, with room for a neighbouring test on the cores.
        assert max(latencies) < 2.0, latencies


async def test_a_join_on_a_reaped_process_before_its_heartbeat_is_reaped_if_it_dies(
    aio_loop: None, db: Any, redis_url: str
) -> None:
    # A process presumed dead (its heartbeat stopped) is reaped; it comes back and a user
    # joins there before its next heartbeat, and then it dies for good. The user must
    # leave when it dies, as everyone else on a dead process does, and must not go
    # through a leave while the process lives.
    from atrium.persistence import events as event_log
    from atrium.realtime.presence import Transition

    project, ann, bob = await two_users(db)
    async with open_redis(redis_url, BreakerSettings()) as redis:
        back = ClusterPresence(redis, db, settings(1.0, 2.0))
        reaper = ClusterPresence(redis, db, settings(1.0, 60.0))
        await back.beat()
        assert (
            await back.joined(project, ann, "ann@example.com", 1)
        ).transition is Transition.JOINED
        await redis.call(lambda c: c.delete(f"atrium:presence:alive:{back.instance}"))
        await reaper.beat()  # Ann leaves: her process is presumed dead
        assert (
            await back.joined(project, bob, "bob@example.com", 1)
        ).transition is Transition.JOINED
        # Bob's join found the process reaped: it re-asserted everything it holds first,
        # so Ann, still connected there, is back at once (her USER_JOIN is stored by its
        # next heartbeat), and the process is alive again: nobody leaves.
        await reaper.beat()
        assert set(await reaper.online(project, {})) == {ann, bob}
        await back.beat()
        assert set(await reaper.online(project, {})) == {ann, bob}
        # Presumed dead again (both leave), back again (Ann's join revives it), and dead
        # for good before its next heartbeat: they must leave once its TTL runs out.
        await redis.call(lambda c: c.delete(f"atrium:presence:alive:{back.instance}"))
        await reaper.beat()
        assert await reaper.online(project, {}) == {}
        assert (
            await back.joined(project, ann, "ann@example.com", 2)
        ).transition is Transition.JOINED
        assert set(await reaper.online(project, {})) == {ann, bob}
        await redis.call(lambda c: c.delete(f"atrium:presence:alive:{back.instance}"))
        await reaper.beat()
        assert await reaper.online(project, {}) == {}
    stored = await event_log.events_between(db, project, 0, 100)
    presence = [(e.type, e.actor_id) for e in stored if e.type.startswith("USER_")]
    assert presence[:2] == [("USER_LEAVE", ann), ("USER_JOIN", ann)]
    assert sorted(presence[2:4]) == sorted([("USER_LEAVE", ann), ("USER_LEAVE", bob)])
    # Her JOIN was the workspace's to store, Bob's the heartbeat's that never came.
    assert sorted(presence[4:]) == sorted([("USER_LEAVE", ann), ("USER_LEAVE", bob)])


async def presence_log(db: Any, project: uuid.UUID) -> list[tuple[str, uuid.UUID | None]]:
    from atrium.persistence import events as event_log

    stored = await event_log.events_between(db, project, 0, 1000)
    return [(e.type, e.actor_id) for e in stored if e.type in ("USER_JOIN", "USER_LEAVE")]


async def test_presence_decided_here_takes_the_next_seqs_or_fails_on_a_deleted_project(
    aio_loop: None, db: Any
) -> None:
    # Unversioned (one process's presence): stored in one statement, after what the log
    # holds, in order; a deleted project stores nothing.
    from atrium.core.projects import ProjectNotFound
    from atrium.persistence.events import append_presence, last_seq
    from atrium.realtime.presence import presence_event

    project, ann, bob = await two_users(db)
    join, leave = EventType.USER_JOIN, EventType.USER_LEAVE
    before = await last_seq(db, project)
    stored = await append_presence(
        db, project, [presence_event(join, ann, "ann"), presence_event(join, bob, "bob")],
        notify=False,
    )  # fmt: skip
    assert [(e.seq, e.type, e.actor_id) for e in stored] == [
        (before + 1, join, ann),
        (before + 2, join, bob),
    ]
    assert await last_seq(db, project) == before + 2
    await db.execute("UPDATE projects SET deleted_at = now() WHERE id = $1", project)
    with pytest.raises(ProjectNotFound):
        await append_presence(db, project, [presence_event(leave, ann, "ann")], notify=False)
    assert await presence_log(db, project) == [(join, ann), (join, bob)]


async def test_a_leave_the_reaper_stores_after_the_users_next_join_is_dropped(
    aio_loop: None, db: Any, redis_url: str
) -> None:
    # P dies; the reaper decides Ann went offline; she comes back on Q, whose JOIN is
    # stored first; the reaper's LEAVE, stored after it, would say she left while online.
    from atrium.persistence.events import append_presence
    from atrium.persistence.presence import Entry, PresenceStore
    from atrium.realtime.presence import presence_event

    project, ann, bob = await two_users(db)
    join, leave = EventType.USER_JOIN, EventType.USER_LEAVE
    async with open_redis(redis_url, BreakerSettings()) as redis:
        dead, q, reaper = (PresenceStore(redis, uuid.uuid4().hex) for _ in range(3))
        await dead.heartbeat(60_000)
        first = await set_count(dead, Entry(project, ann, 1, "ann@example.com", 1))
        stored = await append_presence(
            db, project, [presence_event(join, ann, "ann", first.version)], notify=False
        )
        assert [e.type for e in stored] == [join]
        await redis.call(lambda c: c.delete(f"atrium:presence:alive:{dead.instance}"))
        (gone,) = await reaper.reap()  # decided first ...
        back = await set_count(q, Entry(project, ann, 1, "ann@example.com", 2))
        assert back.came_online and back.version > gone.version
        stored = await append_presence(
            db, project, [presence_event(join, ann, "ann", back.version)], notify=False
        )
        assert [e.type for e in stored] == [join]
        # ... stored last: dropped, and nothing for a workspace to deliver.
        late = presence_event(leave, ann, "ann", gone.version)
        assert await append_presence(db, project, [late], notify=True) == []
        assert await presence_log(db, project) == [(join, ann), (join, ann)]
        # Stored in the order decided, both stay; Bob's versions are his own, and an event
        # decided by one process alone (Redis away) has no version and is always stored.
        offline = await set_count(q, Entry(project, ann, 0, "ann@example.com", 3))
        bob_on = await set_count(q, Entry(project, bob, 1, "bob@example.com", 3))
        stored = await append_presence(
            db,
            project,
            [
                presence_event(leave, ann, "ann", offline.version),
                presence_event(join, bob, "bob", bob_on.version),
                presence_event(join, ann, "ann"),
                presence_event(join, ann, "ann", back.version),  # stale even in one batch
            ],
            notify=False,
        )
        assert [(e.type, e.actor_id) for e in stored] == [(leave, ann), (join, bob), (join, ann)]
        assert [e.seq - stored[0].seq for e in stored] == [0, 1, 2]  # no gap in the log
        assert "presence_version" not in stored[0].payload  # clients see the same frame
        assert stored[0].payload == {"email": "ann", "message": "User ann left the workspace"}


async def test_a_leave_on_one_process_committed_after_a_join_on_another_is_dropped(
    aio_loop: None, db: Any, redis_url: str
) -> None:
    # Ann leaves on P1 and joins on P2 at once: P2's JOIN commits before P1's LEAVE.
    from atrium.persistence.events import append_presence
    from atrium.realtime.presence import Transition, presence_event

    project, ann, _ = await two_users(db)
    join, leave = EventType.USER_JOIN, EventType.USER_LEAVE
    async with open_redis(redis_url, BreakerSettings()) as redis:
        p1 = ClusterPresence(redis, db, settings(1.0, 60.0))
        p2 = ClusterPresence(redis, db, settings(1.0, 60.0))
        on = await p1.joined(project, ann, "ann@example.com", 1)
        off = await p1.left(project, ann, "ann@example.com", 0)
        again = await p2.joined(project, ann, "ann@example.com", 1)
        assert (on.transition, off.transition, again.transition) == (
            Transition.JOINED,
            Transition.LEFT,
            Transition.JOINED,
        )
        for decision, kind in ((on, join), (again, join), (off, leave)):
            await append_presence(
                db, project, [presence_event(kind, ann, "ann", decision.version)], notify=False
            )
    assert await presence_log(db, project) == [(join, ann), (join, ann)]


async def test_workspaces_on_two_processes_store_and_deliver_no_stale_leave(
    aio_loop: None, db: Any, redis_url: str
) -> None:
    # End to end through two workspaces (two processes' actors sharing Redis and the
    # log): Ann's LEAVE on P1 is decided, then P1 is held up before storing it while she
    # joins on P2, whose JOIN is stored first. P1 must neither store nor deliver its LEAVE.
    import orjson

    from atrium.actors.workspace import (
        Join,
        Leave,
        Status,
        Subscriber,
        WorkspaceActor,
        WorkspaceSettings,
    )
    from atrium.core.roles import Role
    from atrium.realtime.outbox import Outbox
    from atrium.realtime.presence import Decision

    class SlowToStore(ClusterPresence):
        """Holds a leave between Redis deciding it and the workspace storing it."""

        decided = trio.Event()
        release = trio.Event()

        async def left(self, *args: Any) -> Decision:
            decision = await super().left(*args)
            self.decided.set()
            await self.release.wait()
            return decision

    project, ann, bob = await two_users(db)
    join, leave = EventType.USER_JOIN, EventType.USER_LEAVE

    def subscriber(user: uuid.UUID, email: str) -> Subscriber:
        return Subscriber(user, email, Role.COLLABORATOR, Outbox(100))

    def seen(who: Subscriber) -> list[tuple[str, str]]:
        frames = [orjson.loads(frame) for frame in who.outbox.take()]
        return [(f["type"], f["user_id"]) for f in frames if f["type"] in (join, leave)]

    async with open_redis(redis_url, BreakerSettings()) as redis:
        p1 = SlowToStore(redis, db, settings(1.0, 60.0))
        p2 = ClusterPresence(redis, db, settings(1.0, 60.0))
        one = WorkspaceActor(project, db, WorkspaceSettings(), presence=p1)
        two = WorkspaceActor(project, db, WorkspaceSettings(), presence=p2)
        async with trio.open_nursery() as nursery:
            await nursery.start(one.run)
            await nursery.start(two.run)
            bob_on_one, ann_on_one = subscriber(bob, "bob"), subscriber(ann, "ann")
            ann_on_two = subscriber(ann, "ann")
            await one.ask(Join(bob_on_one, None))
            await one.ask(Join(ann_on_one, None))
            assert seen(bob_on_one) == [(join, str(bob)), (join, str(ann))]
            await one.tell(Leave(ann_on_one))
            await p1.decided.wait()  # Redis: Ann went offline ...
            await two.ask(Join(ann_on_two, None))  # ... and came back, stored first
            p1.release.set()
            await one.ask(Status())  # the Leave is handled
            assert seen(bob_on_one) == []  # no USER_LEAVE while she is online
            assert (join, str(ann)) in seen(ann_on_two)
            assert set(await p1.online(project, {})) == {ann, bob}
            nursery.cancel_scope.cancel()
    assert await presence_log(db, project) == [(join, bob), (join, ann), (join, ann)]


async def test_the_reaper_stores_no_leave_decided_before_the_users_return(
    aio_loop: None, db: Any, redis_url: str
) -> None:
    # Through the heartbeat's own reaping: the reaper decides Ann left with her dead
    # process, and is held up before storing it while she joins on another process.
    from atrium.persistence.events import append_presence
    from atrium.realtime.presence import Transition, presence_event

    class HeldReaper(ClusterPresence):
        """Holds the events its heartbeat reaped between deciding and storing them."""

        reaped = trio.Event()
        release = trio.Event()

        async def _announce(self) -> None:
            if self.snapshot_detail()["events_to_store"]:
                self.reaped.set()
                await self.release.wait()
            await super()._announce()

    project, ann, _ = await two_users(db)
    join = EventType.USER_JOIN
    async with open_redis(redis_url, BreakerSettings()) as redis:
        dead = ClusterPresence(redis, db, settings(1.0, 60.0))
        elsewhere = ClusterPresence(redis, db, settings(1.0, 60.0))
        reaper = HeldReaper(redis, db, settings(1.0, 60.0))
        await dead.beat()
        first = await dead.joined(project, ann, "ann@example.com", 1)
        await append_presence(
            db, project, [presence_event(join, ann, "ann", first.version)], notify=False
        )
        await redis.call(lambda c: c.delete(f"atrium:presence:alive:{dead.instance}"))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reaper.beat)
            await reaper.reaped.wait()
            back = await elsewhere.joined(project, ann, "ann@example.com", 1)
            assert back.transition is Transition.JOINED
            await append_presence(
                db, project, [presence_event(join, ann, "ann", back.version)], notify=False
            )
            reaper.release.set()
        assert reaper.snapshot_detail()["events_to_store"] == 0  # dropped, not retried
    assert await presence_log(db, project) == [(join, ann), (join, ann)]


async def test_after_redis_lost_its_data_a_process_re_asserts_before_it_trusts_a_total(
    aio_loop: None, db: Any, redis_url: str
) -> None:
    # Redis restarted empty (FLUSHDB here), then failed over to a replica that missed the
    # last write (its keys put back as they were before it): the totals Redis gives the
    # next join or leave would be wrong (a second tab taken for a first join, a last
    # leave for nothing), unless the process writes everything it holds first.
    from atrium.realtime.presence import Transition

    project, ann, bob = await two_users(db)
    cat = uuid.uuid4()
    async with open_redis(redis_url, BreakerSettings()) as redis:
        board = ClusterPresence(redis, db, settings(1.0, 60.0))
        other = ClusterPresence(redis, db, settings(1.0, 60.0))
        await board.beat()
        for user in (ann, bob):
            assert (await board.joined(project, user, "u@example.com", 1)).transition is (
                Transition.JOINED
            )
        await redis.call(lambda c: c.flushdb())
        second_tab = await board.joined(project, ann, "ann@example.com", 2)
        assert second_tab.transition is Transition.NONE  # she was online all along
        assert {u: o.connections for u, o in (await other.online(project, {})).items()} == {
            ann: 2,
            bob: 1,
        }
        assert (await board.left(project, bob, "bob@example.com", 0)).transition is (
            Transition.LEFT
        )

        keys = await redis.call(lambda c: c.keys("atrium:presence:*"))
        dumped = {k: await redis.call(lambda c, k=k: c.dump(k)) for k in keys}
        assert (await board.joined(project, cat, "cat@example.com", 1)).transition is (
            Transition.JOINED
        )

        async def failover(client: Any) -> None:  # the replica never got Cat's join
            await client.flushdb()
            for key, value in dumped.items():
                await client.restore(key, 0, value)

        await redis.call(failover)
        assert (await board.joined(project, cat, "cat@example.com", 2)).transition is (
            Transition.NONE
        )
        assert set(await other.online(project, {})) == {ann, cat}


async def test_a_tab_joining_as_redis_comes_back_empty_is_shown_everyone_online(
    aio_loop: None, db: Any, redis_url: str
) -> None:
    # Two processes' workspaces share Redis and the log. Ann is online on C only, Bob on
    # A and C. Redis comes back empty (FLUSHDB here) and, before C re-asserts anything, a
    # tab of Cat connects to A, then Bob's tab on A closes. Cat's tab must see what a user
    # would: Ann and Bob online (no USER_JOIN ever comes for them: when C re-asserts, it
    # is no transition), and no USER_LEAVE for Bob, who is still on C.
    import orjson

    from atrium.actors.workspace import Join, Leave, Status, Subscriber, WorkspaceActor
    from atrium.actors.workspace import WorkspaceSettings as Settings
    from atrium.core.roles import Role
    from atrium.persistence import accounts
    from atrium.realtime.outbox import Outbox

    project, ann, bob = await two_users(db)
    made = await accounts.create_user(db, "cat@example.com", "x")
    assert made is not None
    cat = made.id
    join, leave = EventType.USER_JOIN, EventType.USER_LEAVE

    def subscriber(user: uuid.UUID, email: str) -> Subscriber:
        return Subscriber(user, email, Role.COLLABORATOR, Outbox(100))

    view: set[str] = set()  # who is online as Cat's tab shows it

    def follow(tab: Subscriber) -> None:
        for frame in map(orjson.loads, tab.outbox.take()):
            if frame["type"] == "PRESENCE_STATE":
                view.clear()
                view.update(u["user_id"] for u in frame["users"])
            elif frame["type"] == join:
                view.add(frame["user_id"])
            elif frame["type"] == leave:
                view.discard(frame["user_id"])

    async with open_redis(redis_url, BreakerSettings()) as redis:
        on_a = ClusterPresence(redis, db, settings(1.0, 60.0))
        on_c = ClusterPresence(redis, db, settings(1.0, 60.0))
        a = WorkspaceActor(project, db, Settings(), presence=on_a)
        c = WorkspaceActor(project, db, Settings(), presence=on_c)
        async with trio.open_nursery() as nursery:
            await nursery.start(a.run)
            await nursery.start(c.run)
            bob_on_a = subscriber(bob, "bob@example.com")
            await c.ask(Join(subscriber(ann, "ann@example.com"), None))
            await c.ask(Join(subscriber(bob, "bob@example.com"), None))
            await a.ask(Join(bob_on_a, None))
            for board in (on_c, on_a):  # each has a copy of the other's entries
                await board.beat()

            await redis.call(lambda client: client.flushdb())
            cat_on_a = subscriber(cat, "cat@example.com")
            await a.ask(Join(cat_on_a, None))
            follow(cat_on_a)
            assert view == {str(ann), str(bob), str(cat)}
            await a.tell(Leave(bob_on_a))
            await a.ask(Status())  # the Leave is handled
            for board in (on_c, on_a, on_c):  # C re-asserts; nothing changes for A
                await board.beat()
            await a.ask(Status())
            follow(cat_on_a)
            assert view == {str(ann), str(bob), str(cat)}
            status = await a.ask(Status())
            assert {u["user_id"] for u in status["online_users"]} == view
            nursery.cancel_scope.cancel()
    assert await presence_log(db, project) == [(join, ann), (join, bob), (join, cat)]


async def test_a_join_storm_on_two_processes_is_decided_in_redis_a_batch_at_a_time(
    aio_loop: None, db: Any, own_redis: RedisServer
) -> None:
    # 300 users join 100 projects at once on two processes, each asking who is online
    # first, through pools of 6 connections (2 calls at a time after the subscriptions'
    # share). Every user comes online exactly once across the two, decided in Redis (a
    # version, never a process's own guess), Redis never looks away (the breaker stays
    # closed), and the workspaces' questions and counts go a batch per round trip.
    from atrium.core.breaker import BreakerState
    from atrium.realtime.presence import Decision, Transition

    seats = [(uuid.uuid4(), uuid.uuid4()) for _ in range(100) for _ in range(3)]
    async with open_redis(own_redis.url, BreakerSettings(), max_connections=6) as redis:
        boards = [ClusterPresence(redis, db, settings(60.0, 120.0)) for _ in range(2)]
        for board in boards:
            await board.beat()
        before = scripts_run(own_redis)
        decisions: dict[tuple[str, uuid.UUID], Decision] = {}

        async def join(board: ClusterPresence, project: uuid.UUID, user: uuid.UUID) -> None:
            await board.online(project, {})  # as a join asks first
            decision = await board.joined(project, user, f"{user}@example.com", 1)
            decisions[board.instance, user] = decision

        async with trio.open_nursery() as nursery:
            for project, user in seats:
                for board in boards:
                    nursery.start_soon(join, board, project, user)
        calls = scripts_run(own_redis) - before
        for _, user in seats:
            mine = [decisions[board.instance, user] for board in boards]
            assert [d.transition for d in mine].count(Transition.JOINED) == 1, mine
            assert all(d.version for d in mine if d.transition is Transition.JOINED), mine
        assert redis.breaker.state is BreakerState.CLOSED
        for project, user in seats[:3]:
            assert (await boards[0].online(project, {}))[user].connections == 2
        assert calls < len(seats), calls  # 1,200 questions and counts, batched


def scripts_run(server: RedisServer) -> int:
    """How many scripts (EVALSHA) ``server`` has been asked to run."""
    import redis

    with redis.Redis.from_url(server.url) as client:
        stats = client.info("commandstats").get("cmdstat_evalsha", {})
    return int(stats.get("calls", 0))
