"""Password hashing is bounded process-wide: at most PASSWORD_HASH_CONCURRENCY argon2
computations in flight; callers that wait longer than PASSWORD_HASH_QUEUE_SECONDS get
503 server_busy with Retry-After, never a 500 and never an unbounded pile of threads."""

from __future__ import annotations

import threading

import httpx
import pytest
import trio
import trio.testing
from argon2 import PasswordHasher
from conftest import CLIENT_TLS, StartServer

from atrium.identity import passwords
from atrium.identity.passwords import HashingBusy, Passwords

# Cheap parameters: the bound is under test here, not argon2's cost.
_FAST = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)


class CountingHasher:
    """A real argon2 hasher that counts computations in flight and can be held shut."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.gate.set()
        self._lock = threading.Lock()
        self.in_flight = 0
        self.most = 0
        self.calls = 0

    def _enter(self) -> None:
        with self._lock:
            self.in_flight += 1
            self.calls += 1
            self.most = max(self.most, self.in_flight)

    def _leave(self) -> None:
        with self._lock:
            self.in_flight -= 1

    def hash(self, password: str) -> str:
        self._enter()
        try:
            self.gate.wait()
            return _FAST.hash(password)
        finally:
            self._leave()

    def verify(self, hash: str, password: str) -> bool:
        self._enter()
        try:
            self.gate.wait()
            return _FAST.verify(hash, password)
        finally:
            self._leave()


async def test_at_most_concurrency_run_and_the_rest_give_up_after_the_queue_time(
    autojump_clock: trio.testing.MockClock,
) -> None:
    hasher = CountingHasher()
    stored = hasher.hash("secret-password")
    hasher.gate.clear()
    pw = Passwords(2, 2.0, hasher)
    outcomes: list[object] = []
    four_busy = trio.Event()

    async def attempt() -> None:
        try:
            outcomes.append(await pw.verify(stored, "secret-password"))
        except HashingBusy as busy:
            outcomes.append(busy)
            if sum(isinstance(o, HashingBusy) for o in outcomes) == 4:
                four_busy.set()

    async with trio.open_nursery() as nursery:
        for _ in range(6):
            nursery.start_soon(attempt)
        await trio.testing.wait_all_tasks_blocked()
        assert pw.statistics().in_flight == 2 and pw.statistics().waiting == 4
        started = trio.current_time()
        await four_busy.wait()
        assert trio.current_time() - started == pytest.approx(2.0)
        hasher.gate.set()
    assert outcomes.count(True) == 2
    assert [o.retry_after for o in outcomes if isinstance(o, HashingBusy)] == [2, 2, 2, 2]
    # Two ran at once by the limiter's count; the threads themselves may start late on a
    # loaded machine, so only the bound is certain on their side.
    assert hasher.most <= 2 and hasher.calls == 3
    assert pw.statistics().in_flight == 0


async def test_a_cancelled_caller_keeps_its_slot_until_the_thread_ends(
    autojump_clock: trio.testing.MockClock,
) -> None:
    hasher = CountingHasher()
    hasher.gate.clear()
    pw = Passwords(1, 60.0, hasher)
    caller = trio.CancelScope()

    async def hash_then_go_away() -> None:
        with caller:
            await pw.hash("one")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(hash_then_go_away)
        await trio.testing.wait_all_tasks_blocked()
        caller.cancel()  # the caller goes away; its thread cannot
        await trio.testing.wait_all_tasks_blocked()
        assert pw.statistics().in_flight == 1
        with pytest.raises(HashingBusy):  # the slot is still taken, for the whole minute
            await pw.hash("two")
        hasher.gate.set()
    assert pw.statistics().in_flight == 0 and hasher.most == 1


async def test_unknown_email_costs_one_verification_too() -> None:
    hasher = CountingHasher()
    pw = Passwords(1, 1.0, hasher)
    assert await pw.verify(None, "whatever") is False
    assert hasher.calls == 1


async def test_concurrent_logins_get_503_server_busy_not_500(
    start_server: StartServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    hasher = CountingHasher()
    monkeypatch.setattr(passwords, "_hasher", hasher)
    async with start_server(PASSWORD_HASH_CONCURRENCY=1, PASSWORD_HASH_QUEUE_SECONDS=0.2) as srv:
        await srv.signup_login("many@example.com")
        body = {"email": "many@example.com", "password": "correct horse"}
        limits = httpx.Limits(max_connections=50)
        async with httpx.AsyncClient(
            base_url=srv.bound.url, limits=limits, verify=CLIENT_TLS
        ) as client:
            # Held shut: one login holds the only slot, every other one must give up.
            hasher.gate.clear()
            statuses: list[httpx.Response] = []
            nine_refused = trio.Event()

            async def login() -> None:
                r = await client.post("/api/v1/auth/login", json=body)
                statuses.append(r)
                if sum(s.status_code == 503 for s in statuses) == 9:
                    nine_refused.set()

            async with trio.open_nursery() as nursery:
                for _ in range(10):
                    nursery.start_soon(login)
                with trio.fail_after(30):
                    await nine_refused.wait()
                hasher.gate.set()
            assert sorted(r.status_code for r in statuses) == [200] + [503] * 9
            for r in statuses:
                if r.status_code == 503:
                    assert r.json()["error"]["code"] == "server_busy"
                    assert r.headers["Retry-After"] == "1"

            # Open: real argon2 work, 30 logins at once, still never more than one.
            statuses.clear()
            async with trio.open_nursery() as nursery:
                for _ in range(30):
                    nursery.start_soon(login)
            assert {r.status_code for r in statuses} <= {200, 503}
            assert 200 in {r.status_code for r in statuses}
        # The server still answers the rest of the API meanwhile and after.
        assert (await srv.client.get("/health")).status_code == 200
    assert hasher.most == 1
