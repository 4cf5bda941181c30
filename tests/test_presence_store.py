"""The presence scripts against a real Redis: totals across instances, one first join and
one last leave per user, and a dead instance reaped by exactly one process."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
import trio
import trio_asyncio

from atrium.persistence.presence import Copy, Entry, PresenceStore, Someone, Totals, View
from atrium.persistence.redis import BreakerSettings, Redis, RedisUnavailable, open_redis

PROJECT = uuid.uuid4()
ANN, BOB = uuid.uuid4(), uuid.uuid4()


@pytest.fixture
async def redis(aio_loop: None, redis_url: str) -> AsyncIterator[Redis]:
    async with open_redis(redis_url, BreakerSettings()) as client:
        yield client


def entry(user: uuid.UUID, count: int, project: uuid.UUID = PROJECT, seen_ms: int = 1) -> Entry:
    return Entry(project, user, count, f"{user.hex[:6]}@example.com", seen_ms)


async def set_count(store: PresenceStore, one: Entry) -> Totals | None:
    """``set_counts`` of one entry: its totals, or None when Redis lost this instance's
    writes."""
    totals = await store.set_counts([one])
    return None if totals is None else totals[0]


async def expire(redis: Redis, store: PresenceStore) -> None:
    """What a TTL running out does: the instance's alive key is gone."""
    await redis.call(lambda client: client.delete(f"atrium:presence:alive:{store.instance}"))


async def test_a_user_on_two_instances_comes_online_once_and_goes_offline_once(
    redis: Redis,
) -> None:
    a, b = PresenceStore(redis, "a"), PresenceStore(redis, "b")
    assert (await set_count(a, entry(ANN, 1))).came_online
    second_tab = await set_count(a, entry(ANN, 2))
    assert (second_tab.before, second_tab.after) == (1, 2)
    other_process = await set_count(b, entry(ANN, 1))
    assert not other_process.came_online and other_process.after == 3
    assert not (await set_count(a, entry(ANN, 0))).went_offline
    members = await a.members(PROJECT)
    assert [(m.user_id, m.connections) for m in members] == [(ANN, 1)]
    assert (await set_count(b, entry(ANN, 0))).went_offline
    assert await a.members(PROJECT) == []


async def test_members_are_the_union_with_the_latest_time_seen(redis: Redis) -> None:
    a, b = PresenceStore(redis, "a"), PresenceStore(redis, "b")
    await set_count(a, entry(ANN, 2, seen_ms=1000))
    await set_count(b, entry(BOB, 1, seen_ms=2000))
    await set_count(b, entry(ANN, 1, seen_ms=3000))
    members = {m.user_id: (m.connections, m.seen_ms) for m in await b.members(PROJECT)}
    assert members == {ANN: (3, 3000), BOB: (1, 2000)}
    assert await b.members(uuid.uuid4()) == []


async def test_a_dead_instance_is_reaped_by_exactly_one_process(redis: Redis) -> None:
    dead, live = PresenceStore(redis, "dead"), PresenceStore(redis, "live")
    other = PresenceStore(redis, "other")
    for store in (dead, live, other):
        assert (await store.heartbeat(60_000)).was_alive is False  # a first heartbeat
    await set_count(dead, entry(ANN, 2))
    await set_count(dead, entry(BOB, 1))
    await set_count(live, entry(BOB, 1))  # Bob is also connected elsewhere: he stays
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
    await set_count(cut_off, entry(ANN, 1))
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
    await set_count(b, entry(ANN, 1))
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
    versions = [(await set_count(a, entry(ANN, 1, project))).version]
    assert (await set_count(a, entry(ANN, 2, project))).version == 0  # no transition
    assert (await set_count(b, entry(ANN, 1, project))).version == 0
    assert (await set_count(a, entry(ANN, 0, project))).version == 0
    versions.append((await set_count(b, entry(ANN, 0, project))).version)  # went offline
    await b.heartbeat(60_000)
    versions.append((await set_count(b, entry(ANN, 1, project))).version)
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
    versions.append((await set_count(a, entry(ANN, 1, project))).version)
    assert versions == sorted(versions) and len(set(versions)) == len(versions) == 7
    # Bob's versions are his own; another project's too.
    assert 0 < (await set_count(a, entry(BOB, 1, project))).version
    # The versions are kept for a day after the project's last transition; a Redis that
    # lost them (a restart, or that day passed) still hands out newer ones.
    key = f"atrium:presence:version:{project}"
    assert 0 < await redis.call(lambda client: client.pttl(key)) <= 86_400_000
    await redis.call(lambda client: client.delete(key))
    assert (await set_count(a, entry(ANN, 0, project))).version > versions[-1]


async def test_a_view_reads_what_changed_since_the_copy_it_holds(redis: Redis) -> None:
    # A process's copy of another's entries is kept up to date at every heartbeat. In a
    # join storm thousands of entries change between two beats of a process holding tens
    # of thousands: a view reads the changed ones (counts, removals, sync's and
    # set_counts' alike), not all of them again; and after a rewrite of everything (a
    # full sync, as after Redis lost the entries), all of them.
    writer, reader = PresenceStore(redis, "writer"), PresenceStore(redis, "reader")
    users = [uuid.uuid4() for _ in range(300)]
    await writer.heartbeat(60_000)
    await writer.sync([entry(u, 1) for u in users], full=True)

    async def entries_in_redis() -> dict[str, bytes]:
        stored = await redis.call(lambda c: c.hgetall("atrium:presence:instance:writer"))
        return {k.decode(): v for k, v in stored.items()}

    async def changes_read(held: dict[str, Copy]) -> dict[str, Copy]:
        view = await reader.view(held)
        assert view.lost == [] and view.gone == []
        return {**held, **view.changed}

    copies = await changes_read({})
    assert copies["writer"].entries == await entries_in_redis()  # first sight: everything
    await writer.set_counts([entry(users[0], 2), entry(users[1], 0), entry(ANN, 1)])
    await writer.sync([entry(users[2], 0), entry(users[3], 1, seen_ms=99)], full=False)
    answers: list[Any] = []
    run = reader._run

    async def kept(*args: Any) -> Any:  # the script's answer, as Redis sent it
        answers.append(await run(*args))
        return answers[-1]

    reader._run = kept  # type: ignore[method-assign]
    copies = await changes_read(copies)
    assert copies["writer"].entries == await entries_in_redis()
    assert len(copies["writer"].entries) == 299  # 300, less users[1] and [2], and Ann
    [(_, _, whole, flat)], _, _ = answers[0]
    # Two counts changed (one new), two removed; users[3] was only seen (not a change of
    # its entry): 4 entries, not all 300 again.
    assert not whole and len(flat) == 2 * 4
    await writer.sync([entry(u, 1) for u in users[:10]], full=True)  # everything rewritten
    copies = await changes_read(copies)
    assert copies["writer"].entries == await entries_in_redis()
    assert len(copies["writer"].entries) == 10
    assert await reader.view(copies) == View({}, [], [])  # nothing changed since


async def test_a_view_too_far_behind_the_changes_kept_reads_everything(
    redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    import atrium.persistence.presence as presence

    monkeypatch.setattr(presence, "_CHANGES_KEPT", 2)
    writer, reader = PresenceStore(redis, "writer"), PresenceStore(redis, "reader")
    await writer.heartbeat(60_000)
    await writer.sync([entry(ANN, 1), entry(BOB, 1)], full=True)
    old = (await reader.view({})).changed
    for n in range(2, 6):  # four generations on: the two kept do not reach back to it
        await writer.set_counts([entry(ANN, n)])
    await writer.set_counts([entry(BOB, 0)])
    await writer.heartbeat(60_000)  # drops the changes older than two generations
    answers: list[Any] = []
    run = reader._run

    async def kept(*args: Any) -> Any:
        answers.append(await run(*args))
        return answers[-1]

    reader._run = kept  # type: ignore[method-assign]
    copy = (await reader.view(old)).changed["writer"]
    [(_, _, whole, _)], _, _ = answers[0]
    assert whole and [orjson.loads(raw)["n"] for raw in copy.entries.values()] == [5]


class _AnswerLost(Redis):
    """Runs each call, then loses its answer: a call that timed out after Redis ran it."""

    async def call(self, fn: Any) -> Any:
        await super().call(fn)
        raise RedisUnavailable("the answer was lost")


async def test_writes_whose_answers_were_lost_are_trusted_to_have_run_or_not(
    aio_loop: None, redis_url: str
) -> None:
    # A loaded process's short calls time out now and then, having run or not. Redis then
    # holds one of the generations the process may have written: the next write and the
    # heartbeat trust it, rather than rewriting every entry (which every other process
    # would then read whole).
    import redis.asyncio

    from atrium.core.breaker import CircuitBreaker

    client = redis.asyncio.Redis.from_url(redis_url)
    breaker = CircuitBreaker(BreakerSettings())
    store = PresenceStore(Redis(client, breaker, timeout=2.0), "loaded")
    lossy = PresenceStore(
        _AnswerLost(client, breaker, timeout=2.0), "loaded", _written=store._written
    )
    try:
        await store.heartbeat(60_000)
        assert await store.set_counts([entry(ANN, 1)]) is not None
        for write in (lossy.set_counts([entry(ANN, 2)]), lossy.sync([entry(BOB, 1)], full=False)):
            with pytest.raises(RedisUnavailable):
                await write  # it ran; its answer was lost
        assert (await store.heartbeat(60_000)).current
        totals = await store.set_counts([entry(ANN, 3), entry(BOB, 0)])
        assert totals is not None  # trusted: None would mean "rewrite everything first"
        assert [(t.before, t.after) for t in totals] == [(2, 3), (1, 0)]
        assert totals[1].went_offline
    finally:
        await trio_asyncio.aio_as_trio(client.aclose)()
