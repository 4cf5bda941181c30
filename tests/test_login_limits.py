"""Login throttling that cannot lock a victim out, and client addresses behind trusted
proxies: through the real server, addresses given by X-Forwarded-For, time on a FakeClock."""

from __future__ import annotations

import ipaddress

import httpx
import pytest
from conftest import FakeClock, Running, StartServer

from atrium.identity.proxies import client_address
from atrium.identity.ratelimit import MemoryLoginBackoff

LOGIN = "/api/v1/auth/login"
VICTIM = "victim@example.com"
PASSWORD = "the-right-password"


def code(response: httpx.Response) -> str:
    return response.json()["error"]["code"]  # type: ignore[no-any-return]


async def login(srv: Running, address: str, email: str, password: str) -> httpx.Response:
    return await srv.client.post(
        LOGIN, json={"email": email, "password": password}, headers={"X-Forwarded-For": address}
    )


async def signup(srv: Running, email: str = VICTIM, password: str = PASSWORD) -> None:
    r = await srv.client.post(
        "/api/v1/auth/signup",
        json={"email": email, "password": password},
        headers={"X-Forwarded-For": "203.0.113.200"},
    )
    assert r.status_code == 201, r.text


NETS = (ipaddress.ip_network("127.0.0.1/32"), ipaddress.ip_network("10.0.0.0/8"))


@pytest.mark.parametrize(
    ("peer", "headers", "expected"),
    [
        ("127.0.0.1", ["198.51.100.7"], "198.51.100.7"),
        ("127.0.0.1", ["198.51.100.7, 10.1.2.3"], "198.51.100.7"),  # trusted hops skipped
        ("127.0.0.1", ["6.6.6.6, 198.51.100.7, 10.1.2.3"], "198.51.100.7"),  # spoofed left part
        ("127.0.0.1", ["6.6.6.6", "198.51.100.7"], "198.51.100.7"),  # several headers
        ("127.0.0.1", [], "127.0.0.1"),
        ("127.0.0.1", ["not-an-ip, 10.0.0.9"], "10.0.0.9"),  # garbage ends the walk
        ("127.0.0.1", ["10.0.0.1, 10.0.0.2"], "10.0.0.1"),  # every hop trusted: leftmost
        ("127.0.0.1", ["[2001:db8::1]"], "2001:db8::1"),
        ("192.0.2.1", ["198.51.100.7"], "192.0.2.1"),  # untrusted peer: header ignored
    ],
)
def test_client_address_walks_forwarded_for_from_the_right(
    peer: str, headers: list[str], expected: str
) -> None:
    assert client_address(peer, headers, NETS) == expected


def test_without_trusted_proxies_the_header_is_ignored() -> None:
    assert client_address("127.0.0.1", ["198.51.100.7"], ()) == "127.0.0.1"


async def test_backoff_doubles_caps_and_clears() -> None:
    clock = FakeClock()
    backoff = MemoryLoginBackoff(3, 30, clock)
    for _ in range(3):
        assert await backoff.retry_after("k") == 0
        await backoff.failed("k")
    waits = []
    for _ in range(8):
        waits.append(await backoff.retry_after("k"))
        clock.advance(waits[-1])
        await backoff.failed("k")
    assert waits == [1, 2, 4, 8, 16, 30, 30, 30]
    assert await backoff.retry_after("other") == 0
    await backoff.succeeded("k")
    assert await backoff.retry_after("k") == 0
    for _ in range(4):
        await backoff.failed("k")
    assert await backoff.retry_after("k") == 2
    clock.advance(900)
    assert await backoff.retry_after("k") == 0  # failures are forgotten after 15 quiet minutes


async def test_forwarded_for_is_trusted_only_from_trusted_proxies(
    start_server: StartServer,
) -> None:
    # Two different "clients" behind the trusted loopback proxy have separate budgets;
    # without TRUSTED_PROXIES the same header changes nothing.
    for trusted, second_status in (("127.0.0.1", 401), ("", 429)):
        async with start_server(
            clock=FakeClock(), TRUSTED_PROXIES=trusted, AUTH_RATE_LIMIT_PER_MINUTE=1
        ) as srv:
            first = await login(srv, "198.51.100.1", VICTIM, "wrong-password")
            assert first.status_code == 401
            second = await login(srv, "198.51.100.2", VICTIM, "wrong-password")
            assert second.status_code == second_status


async def test_an_attacker_cannot_lock_the_victim_out(start_server: StartServer) -> None:
    clock = FakeClock()
    async with start_server(
        clock=clock,
        TRUSTED_PROXIES="127.0.0.1",
        AUTH_RATE_LIMIT_PER_MINUTE=5,
        AUTH_ADDRESS_RATE_LIMIT_PER_MINUTE=20,
        LOGIN_BACKOFF_AFTER_FAILURES=5,
        LOGIN_BACKOFF_MAX_SECONDS=30,
    ) as srv:
        await signup(srv)
        # Address A fails as often as it is let through, for five minutes.
        refused = 0
        for _ in range(300):
            r = await login(srv, "198.51.100.66", VICTIM, "guess")
            assert r.status_code in (401, 429)
            refused += r.status_code == 429
            clock.advance(1)
        assert refused > 250  # the pair limit and the backoff held the attacker back

        # Address B, with the password, gets in within the capped delay.
        r = await login(srv, "203.0.113.5", VICTIM, PASSWORD)
        if r.status_code == 429:
            assert int(r.headers["Retry-After"]) <= 30
            clock.advance(int(r.headers["Retry-After"]))
            r = await login(srv, "203.0.113.5", VICTIM, PASSWORD)
        assert r.status_code == 200, r.text

        # The success cleared the backoff: B logs in again at once.
        r = await login(srv, "203.0.113.5", VICTIM, PASSWORD)
        assert r.status_code == 200


async def test_the_backoff_counts_failures_from_every_address(
    start_server: StartServer,
) -> None:
    clock = FakeClock()
    async with start_server(
        clock=clock,
        TRUSTED_PROXIES="127.0.0.1",
        AUTH_RATE_LIMIT_PER_MINUTE=5,
        LOGIN_BACKOFF_AFTER_FAILURES=3,
        LOGIN_BACKOFF_MAX_SECONDS=30,
    ) as srv:
        await signup(srv)
        # A botnet: each address tries once, within every per-address budget.
        for n in range(3):
            assert (await login(srv, f"198.51.100.{n}", VICTIM, "guess")).status_code == 401
        r = await login(srv, "198.51.100.50", VICTIM, "guess")
        assert r.status_code == 429 and code(r) == "rate_limited"
        assert r.headers["Retry-After"] == "1"
        # Even the right password waits: the refusal checks nothing, so it reveals nothing.
        r = await login(srv, "203.0.113.5", VICTIM, PASSWORD)
        assert r.status_code == 429
        clock.advance(1)
        assert (await login(srv, "198.51.100.51", VICTIM, "guess")).status_code == 401
        r = await login(srv, "198.51.100.52", VICTIM, "guess")
        assert r.headers["Retry-After"] == "2"
        # Another account is not slowed at all.
        await signup(srv, "other@example.com")
        r = await login(srv, "198.51.100.52", "other@example.com", PASSWORD)
        assert r.status_code == 200
        clock.advance(2)
        assert (await login(srv, "203.0.113.5", VICTIM, PASSWORD)).status_code == 200


async def test_the_attacker_stays_limited_per_pair_and_per_address(
    start_server: StartServer,
) -> None:
    clock = FakeClock()
    async with start_server(
        clock=clock,
        TRUSTED_PROXIES="127.0.0.1",
        AUTH_RATE_LIMIT_PER_MINUTE=3,
        AUTH_ADDRESS_RATE_LIMIT_PER_MINUTE=5,
        LOGIN_BACKOFF_AFTER_FAILURES=1000,
    ) as srv:
        attacker = "198.51.100.66"
        for remaining in (2, 1, 0):
            r = await login(srv, attacker, VICTIM, "guess")
            assert r.status_code == 401
            assert r.headers["X-RateLimit-Remaining"] == str(remaining)
        r = await login(srv, attacker, VICTIM, "guess")
        assert r.status_code == 429 and r.headers["Retry-After"] == "60"
        # Other emails from the same address: the address budget (5) runs out after one.
        assert (await login(srv, attacker, "a@example.com", "guess")).status_code == 401
        r = await login(srv, attacker, "b@example.com", "guess")
        assert r.status_code == 429 and code(r) == "rate_limited"
        assert r.headers["X-RateLimit-Limit"] == "5"
        # Another address is not affected by either.
        assert (await login(srv, "203.0.113.5", VICTIM, "guess")).status_code == 401
        clock.advance(60)
        assert (await login(srv, attacker, VICTIM, "guess")).status_code == 401
