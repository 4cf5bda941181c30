"""No cache stampede: concurrent misses of one key share one fill, a failed or cancelled
fill never leaves its followers waiting, and an invalidation during a fill still keeps
its value from anyone whose request began after the write."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import conftest
import pytest
import trio
import trio.testing
from conftest import FakeClock
from test_projects import API, make_accounts

from atrium.domain import accounts as account_service
from atrium.domain import projects as project_service
from atrium.domain.services import build_services
from atrium.http.app import create_app
from atrium.identity.cache import Filled, MemoryUserCache
from atrium.persistence.database import Database

USER = uuid.uuid4()


class HeldSource:
    """A fill function that counts its calls and waits until released: a slow database."""

    def __init__(self, *values: Any) -> None:
        self.calls = 0
        self.release = trio.Event()
        self._values = list(values)  # one per call; an Exception instance is raised

    async def fill(self) -> Any:
        self.calls += 1
        value = self._values[min(self.calls, len(self._values)) - 1]
        await self.release.wait()
        if isinstance(value, Exception):
            raise value
        return value


async def _ask_concurrently(
    cache: MemoryUserCache, source: HeldSource, n: int, key: str = "k"
) -> list[Filled | BaseException]:
    """``n`` tasks call ``get_or_fill`` at once; returns each one's result or error, once
    every task is blocked (``source.release`` is left to the caller's ``before_release``)."""
    results: list[Filled | BaseException] = []

    async def ask() -> None:
        try:
            results.append(await cache.get_or_fill(USER, key, source.fill))
        except Exception as error:
            results.append(error)

    async with trio.open_nursery() as nursery:
        for _ in range(n):
            nursery.start_soon(ask)
        await trio.testing.wait_all_tasks_blocked()
        source.release.set()
    return results


async def test_concurrent_misses_share_one_fill_and_expiry_costs_one_more() -> None:
    clock = FakeClock()
    cache = MemoryUserCache(5, clock)
    source = HeldSource({"n": 1})
    results = await _ask_concurrently(cache, source, 50)
    assert source.calls == 1
    assert len(results) == 50
    assert all(isinstance(r, Filled) and r.value == {"n": 1} for r in results)
    # The one that read the source says so; the others got the entry it stored.
    assert [r.hit is None for r in results if isinstance(r, Filled)].count(True) == 1
    assert len(cache.flights) == 0

    clock.advance(5)  # every request in flight misses at once: still one read
    source = HeldSource({"n": 2})
    results = await _ask_concurrently(cache, source, 50)
    assert source.calls == 1
    assert {r.value["n"] for r in results if isinstance(r, Filled)} == {2}

    hit = await cache.get(USER, "k")
    assert hit is not None and hit.value == {"n": 2}


async def test_keys_and_users_fill_apart() -> None:
    cache = MemoryUserCache(5, FakeClock())
    source = HeldSource("v")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(cache.get_or_fill, USER, "a", source.fill)
        nursery.start_soon(cache.get_or_fill, USER, "b", source.fill)
        nursery.start_soon(cache.get_or_fill, uuid.uuid4(), "a", source.fill)
        await trio.testing.wait_all_tasks_blocked()
        assert source.calls == 3
        source.release.set()


async def test_a_failing_fill_releases_its_followers_who_fill_again() -> None:
    cache = MemoryUserCache(5, FakeClock())
    source = HeldSource(RuntimeError("database away"), "fresh")
    with trio.fail_after(5):  # a hang fails the test instead of stalling the suite
        results = await _ask_concurrently(cache, source, 10)
    errors = [r for r in results if isinstance(r, BaseException)]
    assert [str(e) for e in errors] == ["database away"]  # only the caller whose fill it was
    assert source.calls == 2  # one follower took over; the rest followed it
    assert {r.value for r in results if isinstance(r, Filled)} == {"fresh"}


async def test_a_source_that_keeps_failing_fails_every_caller_without_a_hang() -> None:
    cache = MemoryUserCache(5, FakeClock())
    source = HeldSource(RuntimeError("database away"))
    with trio.fail_after(5):
        results = await _ask_concurrently(cache, source, 10)
    assert len(results) == 10
    assert all(isinstance(r, RuntimeError) for r in results)
    assert source.calls <= 10
    assert len(cache.flights) == 0


async def test_a_cancelled_fill_hands_over_to_a_follower() -> None:
    cache = MemoryUserCache(5, FakeClock())
    source = HeldSource("v")
    got: list[Filled] = []
    leader_scope = trio.CancelScope()

    async def leader() -> None:
        with leader_scope:
            await cache.get_or_fill(USER, "k", source.fill)

    async def follower() -> None:
        got.append(await cache.get_or_fill(USER, "k", source.fill))

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(leader)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(follower)
            nursery.start_soon(follower)
            await trio.testing.wait_all_tasks_blocked()
            assert source.calls == 1
            leader_scope.cancel()  # the leader's client went away mid-fill
            await trio.testing.wait_all_tasks_blocked()
            assert source.calls == 2  # one follower took over; the other follows it
            source.release.set()
    assert leader_scope.cancelled_caught
    assert [f.value for f in got] == ["v", "v"]


async def test_an_invalidation_during_a_fill_keeps_its_value_from_followers() -> None:
    cache = MemoryUserCache(3600, FakeClock())
    source = HeldSource("before the write", "after the write")
    results: list[Filled] = []

    async def ask() -> None:
        results.append(await cache.get_or_fill(USER, "k", source.fill))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ask)  # the leader: its read begins before the write
        await trio.testing.wait_all_tasks_blocked()
        await cache.invalidate([USER])  # a write commits and invalidates
        nursery.start_soon(ask)  # a request that began after the write follows the fill
        await trio.testing.wait_all_tasks_blocked()
        assert source.calls == 1
        source.release.set()

    assert results[0].value == "before the write"  # began before the write: fine
    assert results[1].value == "after the write"  # never the value from before the write
    assert source.calls == 2
    hit = await cache.get(USER, "k")
    assert hit is not None and hit.value == "after the write"


async def test_a_fill_of_none_is_shared_but_not_stored() -> None:
    cache = MemoryUserCache(5, FakeClock())
    source = HeldSource(None)
    results = await _ask_concurrently(cache, source, 10)
    assert source.calls == 1
    assert all(isinstance(r, Filled) and r.value is None for r in results)
    assert await cache.get(USER, "k") is None


async def test_a_disabled_cache_shares_nothing() -> None:
    cache = MemoryUserCache(0)
    source = HeldSource("v")
    results = await _ask_concurrently(cache, source, 5)
    assert source.calls == 5  # 0 means every request reads the database
    assert all(isinstance(r, Filled) and r.hit is None for r in results)


@pytest.mark.parametrize("route", ["session", "project list"])
async def test_an_expiry_under_load_costs_one_query_per_route(
    db: Database, data_dir: Path, monkeypatch: pytest.MonkeyPatch, route: str
) -> None:
    settings = conftest.test_settings(
        data_dir, SESSION_CACHE_SECONDS=5, PROJECT_CACHE_TTL_SECONDS=5
    )
    clock = FakeClock()
    client = create_app(build_services(settings, db, clock=clock)).test_client()
    (ann,) = await make_accounts(settings, db, "ann")
    module: Any = account_service.accounts if route == "session" else project_service.projects
    name = "find_session_user" if route == "session" else "list_projects"
    path = "/api/v1/auth/me" if route == "session" else f"{API}/"
    real = getattr(module, name)
    calls = 0
    release = trio.Event()

    async def slow_query(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        await release.wait()
        return await real(*args, **kwargs)

    assert (await client.get(path, headers=ann.headers)).status_code == 200
    monkeypatch.setattr(module, name, slow_query)
    clock.advance(5)  # the entry expires with 20 requests arriving together
    statuses: list[int] = []

    async def request() -> None:
        statuses.append((await client.get(path, headers=ann.headers)).status_code)

    async with trio.open_nursery() as nursery:
        for _ in range(20):
            nursery.start_soon(request)
        await trio.testing.wait_all_tasks_blocked()
        release.set()
    assert statuses == [200] * 20
    assert calls == 1
