"""The presence scripts against a real Redis: totals across instances, one first join and
one last leave per user, and a dead instance reaped by exactly one process."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest
import trio

from atrium.persistence.presence import Entry, PresenceStore, Someone
from atrium.persistence.redis import BreakerSettings, Redis, open_redis

PROJECT = uuid.uuid4()
ANN, BOB = uuid.uuid4(), uuid.uuid4()


@pytest.fixture
async def redis(aio_loop: None, redis_url: str) -> AsyncIterator[Redis]:
    async with open_redis(redis_url, BreakerSettings()) as client:
        yield client


def entry(user: uuid.UUID, count: int, project: uuid.UUID = PROJECT, seen_ms: int = 1) -> Entry:
    return Entry(project, user, count, f"{user.hex[:6]}@example.com", seen_ms)


async def expire(redis: Redis, store: PresenceStore) -> None:
    """What a TTL running out does: the instance's alive key is gone."""
    await redis.call(lambda client: client.delete(f"atrium:presence:alive:{store.instance}"))


async def test_a_user_on_two_instances_comes_online_once_and_goes_offline_once(
    redis: Redis,
) -> None:
    a, b = PresenceStore(redis, "a"), PresenceStore(redis, "b")
    assert (await a.set_count(entry(ANN, 1))).came_online
    second_tab = await a.set_count(entry(ANN, 2))
    assert (second_tab.before, second_tab.after) == (1, 2)
    other_process = await b.set_count(entry(ANN, 1))
    assert not other_process.came_online and other_process.after == 3
    assert not (await a.set_count(entry(ANN, 0))).went_offline
    members = await a.members(PROJECT)
    assert [(m.user_id, m.connections) for m in members] == [(ANN, 1)]
    assert (await b.set_count(entry(ANN, 0))).went_offline
    assert await a.members(PROJECT) == []


async def test_members_are_the_union_with_the_latest_time_seen(redis: Redis) -> None:
    a, b = PresenceStore(redis, "a"), PresenceStore(redis, "b")
    await a.set_count(entry(ANN, 2, seen_ms=1000))
    await b.set_count(entry(BOB, 1, seen_ms=2000))
    await b.set_count(entry(ANN, 1, seen_ms=3000))
    members = {m.user_id: (m.connections, m.seen_ms) for m in await b.members(PROJECT)}
    assert members == {ANN: (3, 3000), BOB: (1, 2000)}
    assert await b.members(uuid.uuid4()) == []


async def test_a_dead_instance_is_reaped_by_exactly_one_process(redis: Redis) -> None:
    dead, live = PresenceStore(redis, "dead"), PresenceStore(redis, "live")
    other = PresenceStore(redis, "other")
    for store in (dead, live, other):
        assert (await store.heartbeat(60_000)).was_alive is False  # a first heartbeat
    await dead.set_count(entry(ANN, 2))
    await dead.set_count(entry(BOB, 1))
    await live.set_count(entry(BOB, 1))  # Bob is also connected elsewhere: he stays
    assert await live.reap() == []  # everyone is alive

    await expire(redis, dead)
    claims: list[list[Someone]] = []

    async def reap(store: PresenceStore) -> None:
        claims.append(await store.reap())

    async with trio.open_nursery() as nursery:
        for store in (live, other, live, other):
            nursery.start_soon(reap, store)
    left = [someone for claim in claims for someone in claim]
    assert [(s.project_id, s.user_id, s.email) for s in left] == [
        (PROJECT, ANN, entry(ANN, 1).email)
    ]
    members = {m.user_id: m.connections for m in await live.members(PROJECT)}
    assert members == {BOB: 1}
    assert await live.reap() == []


async def test_a_reaped_instance_that_returns_writes_its_users_back(redis: Redis) -> None:
    cut_off = PresenceStore(redis, "cut-off")
    assert (await cut_off.heartbeat(60_000)).was_alive is False
    await cut_off.set_count(entry(ANN, 1))
    await expire(redis, cut_off)
    assert [s.user_id for s in await PresenceStore(redis, "reaper").reap()] == [ANN]

    back = await cut_off.heartbeat(60_000)
    assert (back.was_alive, back.was_reaped) == (False, True)
    came = await cut_off.sync([entry(ANN, 1), entry(BOB, 2)], full=True)
    assert {s.user_id for s in came} == {ANN, BOB}
    assert (await cut_off.heartbeat(60_000)).was_reaped is False  # told once
    members = {m.user_id: m.connections for m in await cut_off.members(PROJECT)}
    assert members == {ANN: 1, BOB: 2}


async def test_sync_sets_counts_and_a_full_sync_removes_the_rest(redis: Redis) -> None:
    a, b = PresenceStore(redis, "a"), PresenceStore(redis, "b")
    other_project = uuid.uuid4()
    await b.set_count(entry(ANN, 1))
    came = await a.sync([entry(ANN, 2), entry(BOB, 1, other_project)], full=False)
    assert [(s.project_id, s.user_id, s.email) for s in came] == [
        (other_project, BOB, entry(BOB, 1).email)
    ]
    # A partial sync leaves what it does not list; a count of 0 removes an entry.
    assert await a.sync([entry(BOB, 0, other_project)], full=False) == []
    assert {m.user_id: m.connections for m in await a.members(PROJECT)} == {ANN: 3}
    assert await a.members(other_project) == []
    # A full sync lists everything the instance holds: Ann's entry here is gone.
    assert await a.sync([], full=True) == []
    assert {m.user_id: m.connections for m in await a.members(PROJECT)} == {ANN: 1}
    # Seen times only move forward.
    await a.sync([entry(ANN, 1, seen_ms=5000)], full=False)
    await a.sync([entry(ANN, 1, seen_ms=4000)], full=False)
    assert [m.seen_ms for m in await a.members(PROJECT)] == [5000]


async def test_every_transition_of_a_user_gets_a_newer_version(redis: Redis) -> None:
    # The version is the order Redis decided a user's transitions in, whichever script
    # decided them: a join, a leave, a reap, a reaped instance's users coming back.
    project = uuid.uuid4()
    a, b, reaper = (
        PresenceStore(redis, "va"),
        PresenceStore(redis, "vb"),
        PresenceStore(redis, "vr"),
    )
    versions = [(await a.set_count(entry(ANN, 1, project))).version]
    assert (await a.set_count(entry(ANN, 2, project))).version == 0  # no transition
    assert (await b.set_count(entry(ANN, 1, project))).version == 0
    assert (await a.set_count(entry(ANN, 0, project))).version == 0
    versions.append((await b.set_count(entry(ANN, 0, project))).version)  # went offline
    await b.heartbeat(60_000)
    versions.append((await b.set_count(entry(ANN, 1, project))).version)
    await expire(redis, b)
    (reaped,) = await reaper.reap()
    versions.append(reaped.version)
    await b.heartbeat(60_000)
    (back,) = await b.sync([entry(ANN, 1, project)], full=True)
    versions.append(back.version)
    await b.sync([], full=True)  # offline without a USER_LEAVE: still a transition
    silent = await redis.call(
        lambda client: client.hget(f"atrium:presence:version:{project}", str(ANN))
    )
    versions.append(int(silent))
    versions.append((await a.set_count(entry(ANN, 1, project))).version)
    assert versions == sorted(versions) and len(set(versions)) == len(versions) == 7
    # Bob's versions are his own; another project's too.
    assert 0 < (await a.set_count(entry(BOB, 1, project))).version
    # The versions are kept for a day after the project's last transition; a Redis that
    # lost them (a restart, or that day passed) still hands out newer ones.
    key = f"atrium:presence:version:{project}"
    assert 0 < await redis.call(lambda client: client.pttl(key)) <= 86_400_000
    await redis.call(lambda client: client.delete(key))
    assert (await a.set_count(entry(ANN, 0, project))).version > versions[-1]
