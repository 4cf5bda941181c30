"""Admitting an authenticated request with REDIS_URL: a session cached here and the
user's rate limit cost one Redis round trip together (one script), and every rule of the
two still holds: a read after an invalidation anywhere is never stale, a session that is
not live is not counted, misses are filled once, and while Redis is away nothing cached
is served and each process counts alone. Real Redis servers (a private one where its
command statistics are read, or where it is stopped and started)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import redis as redis_py
import trio
import trio.testing
from conftest import FakeClock, StartServer
from redis_server import RedisServer
from test_shared_state import BREAKER
from test_workspace import make_member

from atrium.identity.admission import Admitted, SharedAdmission
from atrium.identity.cache import SharedUserCache
from atrium.identity.ratelimit import MemoryRateLimiter, SharedRateLimiter
from atrium.persistence.redis import Redis, open_redis
from atrium.persistence.shared import Generations, RateWindows, Scripts

# The revocation listener PINGs its subscription; the test resets and reads the statistics.
_NOT_REQUESTS = {"ping", "info", "config"}


class CommandStats:
    """The commands a Redis runs, by name, counted from ``reset()`` (on a connection
    opened before, so that its own handshake is not counted)."""

    def __init__(self, url: str) -> None:
        self._client = redis_py.Redis.from_url(url)

    def reset(self) -> None:
        self._client.config_resetstat()

    def read(self) -> dict[str, int]:
        stats = self._client.info("commandstats")
        calls = {name.removeprefix("cmdstat_"): int(s["calls"]) for name, s in stats.items()}
        return {name: n for name, n in calls.items() if name not in _NOT_REQUESTS}

    def close(self) -> None:
        self._client.close()


async def test_an_authenticated_request_costs_one_redis_round_trip(
    start_server: StartServer, own_redis: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    round_trips = 0
    call = Redis.call

    async def counted(self: Redis, fn: Callable[[Any], Awaitable[Any]]) -> Any:
        nonlocal round_trips
        round_trips += 1
        return await call(self, fn)

    env = {"SESSION_CACHE_SECONDS": 3600, "PROJECT_CACHE_TTL_SECONDS": 3600}
    async with start_server(REDIS_URL=own_redis.url, PRESENCE_HEARTBEAT_SECONDS=3600, **env) as s:
        ann = await make_member(s, "ann@example.com")
        for path in ("/api/v1/auth/me", "/api/v1/projects/"):  # cached from now on
            assert (await s.client.get(path, headers=ann.auth)).status_code == 200
        monkeypatch.setattr(Redis, "call", counted)
        stats = CommandStats(own_redis.url)
        stats.reset()
        remaining = []
        for _ in range(10):
            r = await s.client.get("/api/v1/auth/me", headers=ann.auth)
            assert r.status_code == 200, r.text
            remaining.append(int(r.headers["X-RateLimit-Remaining"]))
        # One script per request (the commands it runs are counted too: two GETs for
        # the generation, the rate window's HGETs, HSET and PEXPIRE), and nothing else.
        assert stats.read() == {
            "evalsha": 10,
            **{"get": 20, "hget": 20, "hset": 10, "pexpire": 10},
        }
        assert round_trips == 10
        assert remaining == sorted(remaining, reverse=True) and len(set(remaining)) == 10
        # A cached project list asks Redis once more, for its own cache.
        stats.reset()
        r = await s.client.get("/api/v1/projects/", headers=ann.auth)
        assert r.status_code == 200 and r.json()["cached"] is True
        assert stats.read()["evalsha"] == 2
        assert round_trips == 12
        stats.close()


def process(redis: Redis, clock: FakeClock) -> tuple[SharedAdmission, SharedUserCache]:
    """The admission of one process sharing ``redis`` (as ``build_services`` makes it)."""
    scripts = Scripts(redis)
    sessions = SharedUserCache(Generations(scripts, "sessions", 60), 60, clock)
    limiter = SharedRateLimiter(RateWindows(scripts), MemoryRateLimiter(clock), clock)
    return SharedAdmission(sessions, limiter), sessions


class Source:
    """The database's view of one session: live (a value per read) or revoked (None)."""

    def __init__(self) -> None:
        self.reads = 0
        self.live = True

    async def fill(self) -> dict[str, int] | None:
        self.reads += 1
        return {"read": self.reads} if self.live else None


async def admit(admission: SharedAdmission, user: uuid.UUID, source: Source) -> Admitted | None:
    return await admission.admit(user, "session", source.fill, rate_key=f"u:{user}", limit=3)


@pytest.fixture
async def shared(aio_loop: None, redis_url: str) -> AsyncIterator[Redis]:
    async with open_redis(redis_url, BREAKER) as client:
        yield client


async def test_an_invalidation_elsewhere_is_seen_by_the_next_request_counted_once(
    shared: Redis,
) -> None:
    clock = FakeClock()
    (here, _), (_, there) = process(shared, clock), process(shared, clock)
    user, source = uuid.uuid4(), Source()
    first = await admit(here, user, source)
    assert first is not None and (first.value, first.rate.remaining) == ({"read": 1}, 2)
    cached = await admit(here, user, source)
    assert cached is not None and (cached.value, cached.rate.remaining) == ({"read": 1}, 1)
    await there.invalidate([user])  # a write (a role change, a revocation) elsewhere
    fresh = await admit(here, user, source)
    assert fresh is not None and fresh.value == {"read": 2}  # not the value from before
    assert fresh.rate.remaining == 0  # counted once, though Redis was asked twice
    refused = await admit(here, user, source)
    assert refused is not None and not refused.rate.allowed
    assert (refused.value, refused.rate.retry_after, source.reads) == ({"read": 2}, 60, 2)
    assert refused.rate.reset_at == int(clock.now) + 60  # the same window as ever
    clock.advance(60)
    again = await admit(here, user, source)
    assert again is not None and again.rate.remaining == 2  # a new window, anchored now


async def test_a_session_revoked_elsewhere_is_refused_and_not_counted(shared: Redis) -> None:
    clock = FakeClock()
    (here, _), (_, there) = process(shared, clock), process(shared, clock)
    user, source = uuid.uuid4(), Source()
    assert await admit(here, user, source) is not None  # cached here, one hit counted
    source.live = False
    await there.invalidate([user])  # the revocation, on another process
    assert await admit(here, user, source) is None
    assert await admit(here, user, source) is None  # a revoked session is not cached
    source.live = True  # (a new session of the same user: the same rate key)
    counted = [await admit(here, user, source) for _ in range(2)]
    assert [a.rate.remaining for a in counted if a is not None] == [1, 0]


async def test_concurrent_requests_share_one_fill_and_each_is_counted(shared: Redis) -> None:
    clock = FakeClock()
    admission, _ = process(shared, clock)
    user, release, reads = uuid.uuid4(), trio.Event(), []

    async def slow_fill() -> dict[str, int]:
        reads.append(1)
        await release.wait()
        return {"read": len(reads)}

    remaining: list[int] = []

    async def request() -> None:
        admitted = await admission.admit(user, "s", slow_fill, rate_key=f"u:{user}", limit=100)
        assert admitted is not None and admitted.value == {"read": 1}
        remaining.append(admitted.rate.remaining)

    for _ in range(2):  # a cold cache, then a warm one
        async with trio.open_nursery() as nursery:
            for _ in range(20):
                nursery.start_soon(request)
            await trio.testing.wait_all_tasks_blocked()
            release.set()
    assert len(reads) == 1
    assert sorted(remaining, reverse=True) == list(range(99, 59, -1))


async def test_while_redis_is_away_nothing_cached_is_served_and_limits_count_here(
    aio_loop: None, own_redis: RedisServer
) -> None:
    clock = FakeClock()
    async with open_redis(own_redis.url, BREAKER) as redis:
        admission, _ = process(redis, clock)
        user, source = uuid.uuid4(), Source()
        assert await admit(admission, user, source) is not None
        cached = await admit(admission, user, source)
        assert cached is not None and cached.value == {"read": 1}
        own_redis.stop()
        away = [await admit(admission, user, source) for _ in range(4)]
        assert [a.value for a in away if a is not None] == [{"read": n} for n in (2, 3, 4, 5)]
        # This process's own window, from nothing: three allowed, then refused.
        assert [a.rate.allowed for a in away if a is not None] == [True, True, True, False]
        own_redis.start()  # (its data is gone: a new epoch, a new window)
        with trio.fail_after(5):
            await redis.wait_available()  # the breaker's probe found it
        back = [await admit(admission, user, source) for _ in range(2)]
        assert [a.value for a in back if a is not None] == [{"read": 6}, {"read": 6}]
        assert [a.rate.remaining for a in back if a is not None] == [2, 1]
