"""The per-user project-list cache: TTL, truthful ``cached`` flags, read-after-write from
every affected user's view, and a fill that loses the race with an invalidation."""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import conftest
import trio
from conftest import FakeClock, Running, StartServer
from test_projects import API, add, make_accounts, new_project, sign_up

from atrium.domain.services import build_services
from atrium.http.app import create_app
from atrium.identity.cache import CacheHit, Fill, Filled, MemoryUserCache, SingleFlight
from atrium.persistence.database import Database


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat().replace("+00:00", "Z")


async def _list(server: Running, headers: dict[str, str], query: str = "") -> dict[str, Any]:
    r = await server.client.get(f"{API}/{query}", headers=headers)
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


async def test_repeat_reads_are_cached_until_the_ttl(
    start_server: StartServer, db: Database
) -> None:
    clock = FakeClock()
    async with start_server(clock=clock, PROJECT_CACHE_TTL_SECONDS=60) as server:
        (ann,) = await sign_up(server, db, "ann")
        await new_project(server, ann, name="one")
        first = await _list(server, ann.headers)
        assert (first["cached"], first["cache_expires_at"]) == (False, None)
        filled_at = clock.now

        clock.advance(59.5)
        second = await _list(server, ann.headers)
        assert second["cached"] is True
        assert second["cache_expires_at"] == _iso(filled_at + 60) == "2027-01-15T08:01:00Z"
        assert second["projects"] == first["projects"]
        assert second["total"] == first["total"] == 1

        clock.advance(0.5)  # the entry expires at exactly fill + TTL
        third = await _list(server, ann.headers)
        assert (third["cached"], third["cache_expires_at"]) == (False, None)
        fourth = await _list(server, ann.headers)
        assert fourth["cache_expires_at"] == _iso(clock.now + 60)

        # Pages are cached apart; limit and offset are echoed.
        page = await _list(server, ann.headers, "?limit=1&offset=0")
        assert (page["cached"], page["limit"], page["offset"]) == (False, 1, 0)
        page = await _list(server, ann.headers, "?limit=1&offset=0")
        assert page["cached"] is True
        assert (await _list(server, ann.headers, "?limit=1&offset=1"))["cached"] is False


async def test_a_disabled_cache_never_claims_a_hit(start_server: StartServer, db: Database) -> None:
    async with start_server(PROJECT_CACHE_TTL_SECONDS=0) as server:
        (ann,) = await sign_up(server, db, "ann")
        await new_project(server, ann)
        for _ in range(3):
            body = await _list(server, ann.headers)
            assert (body["cached"], body["cache_expires_at"], body["total"]) == (False, None, 1)


async def test_every_write_shows_at_once_in_every_affected_view(
    start_server: StartServer, db: Database
) -> None:
    clock = FakeClock()
    async with start_server(clock=clock, PROJECT_CACHE_TTL_SECONDS=3600) as server:
        ann, bob = await sign_up(server, db, "ann", "bob")
        c = server.client

        async def warm(*headers: dict[str, str]) -> None:
            for h in headers:
                await _list(server, h)
                assert (await _list(server, h))["cached"] is True

        async def fresh(headers: dict[str, str]) -> dict[str, Any]:
            body = await _list(server, headers)
            assert body["cached"] is False  # the write dropped this view's entry
            return body

        await warm(ann.headers, bob.headers)
        pid = (await new_project(server, ann, name="Apollo"))["id"]
        assert [p["name"] for p in (await fresh(ann.headers))["projects"]] == ["Apollo"]

        await warm(ann.headers, bob.headers)
        await add(server, ann, pid, bob, "viewer")
        seen = (await fresh(bob.headers))["projects"]
        assert [(p["id"], p["role"]) for p in seen] == [(pid, "viewer")]
        assert (await fresh(ann.headers))["projects"][0]["collaborator_count"] == 2

        await warm(ann.headers, bob.headers)
        r = await c.patch(f"{API}/{pid}", json={"name": "Artemis"}, headers=ann.headers)
        assert r.status_code == 200
        for h in (ann.headers, bob.headers):
            assert (await fresh(h))["projects"][0]["name"] == "Artemis"

        await warm(ann.headers, bob.headers)
        r = await c.patch(
            f"{API}/{pid}/collaborators/{bob.id}",
            json={"role": "collaborator"},
            headers=ann.headers,
        )
        assert r.status_code == 200
        assert (await fresh(bob.headers))["projects"][0]["role"] == "collaborator"

        await warm(ann.headers, bob.headers)
        r = await c.patch(f"{API}/{pid}", json={"description": "by bob"}, headers=bob.headers)
        assert r.status_code == 200
        assert (await fresh(ann.headers))["projects"][0]["description"] == "by bob"

        await warm(ann.headers, bob.headers)
        r = await c.delete(f"{API}/{pid}/collaborators/{bob.id}", headers=ann.headers)
        assert r.status_code == 204
        assert (await fresh(bob.headers))["total"] == 0
        assert (await fresh(ann.headers))["projects"][0]["collaborator_count"] == 1

        await warm(ann.headers)
        await _list(server, ann.headers, "?limit=1&offset=1")
        r = await c.delete(f"{API}/{pid}", headers=ann.headers)
        assert r.status_code == 204
        assert (await fresh(ann.headers))["total"] == 0
        body = await _list(server, ann.headers, "?limit=1&offset=1")  # every page was dropped
        assert (body["cached"], body["total"]) == (False, 0)

        # A refused write leaves caches alone.
        await warm(ann.headers)
        r = await c.patch(f"{API}/{uuid.uuid4()}", json={"name": "x"}, headers=ann.headers)
        assert r.status_code == 404
        assert (await _list(server, ann.headers))["cached"] is True


class _HeldFills:
    """A cache whose ``set`` waits until released: a fill caught in flight."""

    def __init__(self, inner: MemoryUserCache) -> None:
        self.inner = inner
        self.reached = trio.Event()
        self.release = trio.Event()
        self.stored: list[CacheHit | None] = []
        self.flights = SingleFlight()

    async def generation(self, user_id: uuid.UUID) -> int:
        return await self.inner.generation(user_id)

    async def get(self, user_id: uuid.UUID, key: str) -> CacheHit | None:
        return await self.inner.get(user_id, key)

    async def set(
        self, user_id: uuid.UUID, key: str, value: Any, generation: int
    ) -> CacheHit | None:
        self.reached.set()
        await self.release.wait()
        hit = await self.inner.set(user_id, key, value, generation)
        self.stored.append(hit)
        return hit

    async def invalidate(self, user_ids: Iterable[uuid.UUID]) -> None:
        await self.inner.invalidate(user_ids)

    async def get_or_fill(self, user_id: uuid.UUID, key: str, fill: Fill) -> Filled:
        return await self.flights.get_or_fill(self, user_id, key, fill)


async def test_a_fill_that_raced_an_invalidation_is_not_stored(
    db: Database, data_dir: Path
) -> None:
    settings = conftest.test_settings(data_dir, PROJECT_CACHE_TTL_SECONDS=3600)
    held = _HeldFills(MemoryUserCache(3600))
    services = build_services(settings, db, project_cache=held)
    client = create_app(services).test_client()
    ann, bob = await make_accounts(settings, db, "ann", "bob")

    r = await client.post(API, json={"name": "Apollo"}, headers=ann.headers)
    pid = (await r.get_json())["id"]

    bob_sees: list[dict[str, Any]] = []

    async def bob_lists() -> None:
        r = await client.get(API, headers=bob.headers)
        bob_sees.append(await r.get_json())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(bob_lists)
        await held.reached.wait()  # bob read "no projects" and is about to cache it
        r = await client.post(
            f"{API}/{pid}/collaborators", json={"user_id": bob.id}, headers=ann.headers
        )
        assert r.status_code == 201
        held.release.set()
    assert bob_sees[0]["total"] == 0  # the read began before the write: fine to be old
    assert held.stored == [None]  # ... but its result was not kept

    r = await client.get(API, headers=bob.headers)
    body = await r.get_json()
    assert (body["cached"], body["total"]) == (False, 1)


async def test_memory_cache_generations_and_expiry() -> None:
    clock = FakeClock()
    cache = MemoryUserCache(10, clock)
    ann, bob = uuid.uuid4(), uuid.uuid4()

    token = await cache.generation(ann)
    await cache.invalidate([bob])  # someone else's invalidation does not refuse ann's fill
    hit = await cache.set(ann, "k", [1], token)
    assert hit == CacheHit([1], clock.now + 10)
    assert await cache.get(ann, "k") == hit
    assert await cache.get(bob, "k") is None

    token = await cache.generation(ann)
    await cache.invalidate([ann])
    assert await cache.get(ann, "k") is None
    assert await cache.set(ann, "k", [2], token) is None  # stale fill refused
    assert await cache.set(ann, "k", [3], await cache.generation(ann)) is not None

    clock.advance(10)
    assert await cache.get(ann, "k") is None
    assert len(cache) == 0


async def test_memory_cache_stays_bounded() -> None:
    clock = FakeClock()
    cache = MemoryUserCache(10, clock, max_entries=3)
    users = [uuid.uuid4() for _ in range(5)]
    for user in users:
        await cache.set(user, "k", 1, await cache.generation(user))
    assert len(cache) == 3
    assert await cache.get(users[0], "k") is None  # the oldest went first
    assert await cache.get(users[4], "k") is not None

    cache._MAX_STAMPS = 2  # forgetting invalidation stamps must fail fills in flight
    token = await cache.generation(users[0])
    await cache.invalidate([users[1]])
    await cache.invalidate([users[2]])
    await cache.invalidate([users[3]])
    assert await cache.set(users[0], "k", 1, token) is None
    assert await cache.set(users[0], "k", 1, await cache.generation(users[0])) is not None


async def test_memory_cache_disabled() -> None:
    cache = MemoryUserCache(0)
    user = uuid.uuid4()
    assert await cache.set(user, "k", 1, await cache.generation(user)) is None
    assert await cache.get(user, "k") is None
