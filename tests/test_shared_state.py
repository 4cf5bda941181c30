"""Shared state across processes (REDIS_URL): rate limits, login backoff, the project-list
and session caches, and session revocation hold on every process at once, and each falls
back to the process's own state while Redis is away. Real servers, real PostgreSQL, real
Redis (one of the test's own where it is stopped and started)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
from conftest import FakeClock, Running, StartServer
from redis_server import RedisServer, free_port
from test_auth import bearer, error_code
from test_presence import joined, ws_url
from test_workspace import Member, make_member, project_with

from atrium.identity.cache import SharedUserCache
from atrium.identity.ratelimit import (
    MemoryLoginBackoff,
    MemoryRateLimiter,
    SharedLoginBackoff,
    SharedRateLimiter,
)
from atrium.persistence.redis import BreakerSettings, Redis, open_redis
from atrium.persistence.shared import Generations, LoginFailures, RateWindows, Scripts

LOGIN = "/api/v1/auth/login"
PASSWORD = "correct horse"
BREAKER = BreakerSettings(failures=1, reset_seconds=0.0, successes=1)


@pytest.fixture
async def redis(aio_loop: None, redis_url: str) -> AsyncIterator[Redis]:
    async with open_redis(redis_url, BreakerSettings()) as client:
        yield client


@asynccontextmanager
async def two(start_server: StartServer, redis_url: str, **env: Any) -> AsyncIterator[Any]:
    async with (
        start_server(REDIS_URL=redis_url, **env) as a,
        start_server(REDIS_URL=redis_url, **env) as b,
    ):
        yield a, b


async def login(server: Running, email: str, password: str) -> Any:
    return await server.client.post(LOGIN, json={"email": email, "password": password})


async def signup(server: Running, email: str) -> None:
    r = await server.client.post("/api/v1/auth/signup", json={"email": email, "password": PASSWORD})
    assert r.status_code == 201, r.text


# -- rate limits and login backoff ------------------------------------------------------------


async def test_the_login_rate_limit_holds_across_two_processes(
    start_server: StartServer, redis_url: str
) -> None:
    async with two(start_server, redis_url, AUTH_RATE_LIMIT_PER_MINUTE=3) as (a, b):
        await signup(a, "ann@example.com")
        outcomes = [
            (await login(server, "ann@example.com", "wrong password")).status_code
            for server in (a, b, a, b)
        ]
        assert outcomes == [401, 401, 401, 429]
        refused = await login(a, "ann@example.com", PASSWORD)
        assert refused.status_code == 429 and error_code(refused) == "rate_limited"
        assert refused.headers["X-RateLimit-Remaining"] == "0"
        assert int(refused.headers["Retry-After"]) >= 1


async def test_the_login_backoff_adds_up_failures_on_every_process(
    start_server: StartServer, redis_url: str
) -> None:
    async with two(start_server, redis_url, LOGIN_BACKOFF_AFTER_FAILURES=2) as (a, b):
        await signup(a, "ann@example.com")
        assert (await login(a, "ann@example.com", "wrong")).status_code == 401
        assert (await login(b, "ann@example.com", "wrong")).status_code == 401
        slowed = await login(a, "ann@example.com", PASSWORD)
        assert slowed.status_code == 429 and int(slowed.headers["Retry-After"]) >= 1


async def test_shared_windows_follow_the_in_process_rule(redis: Redis) -> None:
    clock = FakeClock()
    limiter = SharedRateLimiter(RateWindows(Scripts(redis)), MemoryRateLimiter(clock), clock)
    other = SharedRateLimiter(RateWindows(Scripts(redis)), MemoryRateLimiter(clock), clock)
    first = await limiter.hit("k", 2, 60)
    assert (first.allowed, first.remaining, first.reset_at) == (True, 1, int(clock.now) + 60)
    assert (await other.hit("k", 2, 60)).remaining == 0  # another process, same window
    clock.advance(59)
    refused = await limiter.hit("k", 2, 60)
    assert (refused.allowed, refused.retry_after) == (False, 1)
    clock.advance(1)
    assert (await other.hit("k", 2, 60)).allowed  # a new window, anchored now
    assert (await limiter.hit("other", 1, 0.5)).allowed
    clock.advance(0.25)
    assert not (await limiter.hit("other", 1, 0.5)).allowed


async def test_shared_backoff_follows_the_in_process_rule(redis: Redis) -> None:
    clock = FakeClock()

    def backoff() -> SharedLoginBackoff:
        return SharedLoginBackoff(
            LoginFailures(Scripts(redis)),
            MemoryLoginBackoff(2, 30, clock),
            2,
            30,
            clock,
            forget_after=100,
        )

    a, b = backoff(), backoff()
    await a.failed("k")
    assert await b.retry_after("k") == 0
    await b.failed("k")
    assert await a.retry_after("k") == 1  # 2 ** 0 after the threshold
    await a.failed("k")
    assert await b.retry_after("k") == 2
    clock.advance(2)
    assert await b.retry_after("k") == 0
    await b.succeeded("k")
    await a.failed("k")
    assert await a.retry_after("k") == 0  # the success started the count over
    await a.failed("k")
    assert await b.retry_after("k") == 1
    clock.advance(100)
    assert await b.retry_after("k") == 0  # forgotten after 100 quiet seconds
    await b.failed("k")
    assert await a.retry_after("k") == 0


async def test_without_redis_limits_are_counted_in_each_process(aio_loop: None) -> None:
    clock = FakeClock()
    async with open_redis(f"redis://127.0.0.1:{free_port()}/0", BREAKER) as nowhere:
        limiter = SharedRateLimiter(RateWindows(Scripts(nowhere)), MemoryRateLimiter(clock), clock)
        assert [(await limiter.hit("k", 2, 60)).allowed for _ in range(3)] == [True, True, False]
        backoff = SharedLoginBackoff(
            LoginFailures(Scripts(nowhere)), MemoryLoginBackoff(1, 30, clock), 1, 30, clock
        )
        await backoff.failed("k")
        assert await backoff.retry_after("k") == 1
        await backoff.succeeded("k")
        assert await backoff.retry_after("k") == 0


# -- caches -------------------------------------------------------------------------------


async def list_page(server: Running, member: Member) -> dict[str, Any]:
    r = await server.client.get("/api/v1/projects/", headers=member.auth)
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


async def test_a_project_created_on_one_process_is_at_once_in_the_other_cached_list(
    start_server: StartServer, redis_url: str
) -> None:
    async with two(start_server, redis_url, PROJECT_CACHE_TTL_SECONDS=3600) as (a, b):
        ann = await make_member(a, "ann@example.com")
        assert (await list_page(b, ann))["cached"] is False
        assert (await list_page(b, ann))["cached"] is True
        assert (await list_page(a, ann))["cached"] is False
        project = await project_with(a.client, ann)
        page = await list_page(b, ann)
        assert page["cached"] is False
        assert [p["id"] for p in page["projects"]] == [project]
        assert (await list_page(b, ann))["cached"] is True
        # And the other way round: a rename on B reaches A's cached page.
        assert (await list_page(a, ann))["cached"] is False
        assert (await list_page(a, ann))["cached"] is True
        r = await b.client.patch(
            f"/api/v1/projects/{project}", json={"name": "Renamed"}, headers=ann.auth
        )
        assert r.status_code == 200, r.text
        page = await list_page(a, ann)
        assert (page["cached"], page["projects"][0]["name"]) == (False, "Renamed")


async def test_an_invalidation_elsewhere_refuses_a_fill_in_flight(redis: Redis) -> None:
    clock = FakeClock()
    here = SharedUserCache(Generations(Scripts(redis), "t", 60), 60, clock)
    there = SharedUserCache(Generations(Scripts(redis), "t", 60), 60, clock)
    user = uuid.uuid4()
    generation = await here.generation(user)
    await there.invalidate([user])  # a write committed on another process meanwhile
    assert await here.set(user, "k", "stale", generation) is None
    stored = await here.set(user, "k", "fresh", await here.generation(user))
    assert stored is not None and stored.value == "fresh"
    hit = await here.get(user, "k")
    assert hit is not None and hit.value == "fresh"
    assert len(here) == 1
    clock.advance(60)
    assert await here.get(user, "k") is None  # expired
    disabled = SharedUserCache(Generations(Scripts(redis), "t", 0), 0, clock)
    calls = []

    async def fill() -> str:
        calls.append(1)
        return "read"

    assert (await disabled.get_or_fill(user, "k", fill)).value == "read"
    assert (await disabled.get_or_fill(user, "k", fill)).hit is None and len(calls) == 2


async def test_while_redis_is_away_nothing_cached_is_trusted_and_invalidations_wait(
    aio_loop: None, own_redis: RedisServer
) -> None:
    clock = FakeClock()
    async with (
        open_redis(own_redis.url, BREAKER) as here_redis,
        open_redis(own_redis.url, BREAKER) as there_redis,
    ):
        here = SharedUserCache(Generations(Scripts(here_redis), "t", 60), 60, clock)
        there = SharedUserCache(Generations(Scripts(there_redis), "t", 60), 60, clock)
        user = uuid.uuid4()
        await there.set(user, "k", "before", await there.generation(user))
        assert await there.get(user, "k") is not None
        own_redis.stop()
        await here.invalidate([user])  # cannot be recorded now
        assert await there.get(user, "k") is None  # nothing is trusted without Redis
        assert await there.set(user, "k", "x", await there.generation(user)) is None
        own_redis.start()  # (the same dataset: nothing was persisted, so a new epoch)
        with trio.fail_after(5):
            await there_redis.wait_available()  # the breakers' probes found it
            await here_redis.wait_available()
        await there.set(user, "k", "again", await there.generation(user))
        assert await there.get(user, "k") is not None
        await here.generation(user)  # here's next use records what it could not
        assert await there.get(user, "k") is None


# -- sessions -----------------------------------------------------------------------------


async def test_logout_on_one_process_closes_sockets_and_refuses_rest_on_the_other(
    start_server: StartServer, redis_url: str
) -> None:
    async with two(start_server, redis_url, SESSION_CACHE_SECONDS=3600) as (a, b):
        ann = await make_member(a, "ann@example.com")
        project = await project_with(a.client, ann)
        assert (await b.client.get("/api/v1/auth/me", headers=ann.auth)).status_code == 200
        async with (
            joined(ws_url(b, project), ann) as (on_b, _),
            joined(f"ws://127.0.0.1:{b.bound.ws_port}/ws/{project}", ann) as (listener_b, _),
        ):
            r = await a.client.post("/api/v1/auth/logout", headers=ann.auth)
            assert r.status_code == 200, r.text
            r = await b.client.get("/api/v1/auth/me", headers=ann.auth)
            assert r.status_code == 401 and error_code(r) == "session_revoked"
            assert await on_b.closed() == (4001, "session_revoked")
            assert await listener_b.closed() == (4001, "session_revoked")


async def test_a_revocation_missed_while_redis_was_away_still_closes_the_socket(
    start_server: StartServer, own_redis: RedisServer
) -> None:
    # The revocation is published while B's subscription is down (Redis restarting): B
    # asks PostgreSQL about its open sessions once it listens again.
    env = {"REDIS_BREAKER_FAILURES": "1", "REDIS_BREAKER_RESET_SECONDS": "0.1"}
    async with two(start_server, own_redis.url, **env) as (a, b):
        ann = await make_member(a, "ann@example.com")
        project = await project_with(a.client, ann)
        async with joined(ws_url(b, project), ann) as (on_b, _):
            own_redis.stop()
            r = await a.client.post("/api/v1/auth/logout", headers=ann.auth)
            assert r.status_code == 200, r.text
            own_redis.start()
            with trio.fail_after(20):
                assert await on_b.closed() == (4001, "session_revoked")


async def test_with_redis_down_everything_still_works_in_the_process(
    start_server: StartServer,
) -> None:
    nowhere = f"redis://127.0.0.1:{free_port()}/0"
    async with start_server(REDIS_URL=nowhere, AUTH_RATE_LIMIT_PER_MINUTE=2) as server:
        await signup(server, "ann@example.com")
        assert (await login(server, "ann@example.com", "wrong")).status_code == 401
        tokens = (await login(server, "ann@example.com", PASSWORD)).json()
        assert (await login(server, "ann@example.com", PASSWORD)).status_code == 429
        ann = Member("ann@example.com", tokens["user_id"], tokens["access_token"])
        project = await project_with(server.client, ann)
        page = await list_page(server, ann)
        assert [p["id"] for p in page["projects"]] == [project]
        assert page["cached"] is False  # without Redis, nothing cached is trusted
        async with joined(ws_url(server, project), ann) as (client, _):
            r = await server.client.post("/api/v1/auth/logout", headers=ann.auth)
            assert r.status_code == 200
            assert await client.closed() == (4001, "session_revoked")
        r = await server.client.get("/api/v1/auth/me", headers=bearer(ann.token))
        assert r.status_code == 401 and error_code(r) == "session_revoked"


async def test_concurrent_hits_share_round_trips_and_each_is_counted_once(redis: Redis) -> None:
    scripts = Scripts(redis)
    windows = RateWindows(scripts)
    counts: list[int] = []

    async def hit() -> None:
        counts.append((await windows.hit("busy", 1000, 60, 1_800_000_000.0)).count)

    async with trio.open_nursery() as nursery:
        for _ in range(50):
            nursery.start_soon(hit)
    assert sorted(counts) == list(range(1, 51))
    # After a Redis restart its scripts are gone: they are loaded again and the calls that
    # found them missing (and ran nothing) are sent again, once.
    await redis.call(lambda client: client.script_flush())
    async with trio.open_nursery() as nursery:
        for _ in range(10):
            nursery.start_soon(hit)
    assert sorted(counts)[-10:] == list(range(51, 61))


async def test_a_cancelled_caller_leaves_the_others_served(redis: Redis) -> None:
    generations = Generations(Scripts(redis), "t", 60)
    users = [uuid.uuid4() for _ in range(5)]
    await generations.bump(users[1:])
    found: dict[uuid.UUID, int] = {}

    async def current(user: uuid.UUID) -> None:
        found[user] = await generations.current(user)

    async with trio.open_nursery() as nursery:
        with trio.CancelScope() as doomed:
            doomed.cancel()  # the first caller (the one that flushes) is cancelled at once
            await current(users[0])
        for user in users[1:]:
            nursery.start_soon(current, user)
    assert set(found) == set(users[1:])
    assert len({value & 0xFFFFFFFFFF for value in found.values()}) == 1  # each bumped once
