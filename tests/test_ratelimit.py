"""The in-process rate limiter and login backoff on a clock moved by hand.

(The backoff's doubling, cap and clearing are in test_login_limits.py, with the server.)
"""

from __future__ import annotations

import pytest
from conftest import FakeClock

from atrium.identity.ratelimit import MemoryLoginBackoff, MemoryRateLimiter, RateDecision

START = 1_800_000_000.0


async def test_a_window_allows_the_limit_then_refuses_until_it_resets() -> None:
    clock = FakeClock(START)
    limiter = MemoryRateLimiter(clock)
    decisions = [await limiter.hit("k", 3, 60) for _ in range(3)]
    assert [d.allowed for d in decisions] == [True] * 3
    assert [d.remaining for d in decisions] == [2, 1, 0]
    assert {d.reset_at for d in decisions} == {int(START) + 60}
    assert {d.retry_after for d in decisions} == {0}

    clock.advance(20)
    refused = await limiter.hit("k", 3, 60)
    assert refused == RateDecision(
        allowed=False, limit=3, remaining=0, reset_at=int(START) + 60, retry_after=40
    )
    # Refusals do not move the window: it still ends 60 s after its first hit.
    clock.advance(39)
    assert (await limiter.hit("k", 3, 60)).retry_after == 1
    clock.advance(1)
    fresh = await limiter.hit("k", 3, 60)
    assert (fresh.allowed, fresh.remaining, fresh.reset_at) == (True, 2, int(START) + 120)


async def test_the_window_is_anchored_at_the_first_hit() -> None:
    clock = FakeClock(START)
    limiter = MemoryRateLimiter(clock)
    assert (await limiter.hit("k", 2, 60)).allowed
    clock.advance(59.5)
    assert (await limiter.hit("k", 2, 60)).allowed
    # Half a second left: the client is told to wait a whole second, never 0.
    refused = await limiter.hit("k", 2, 60)
    assert not refused.allowed and refused.retry_after == 1
    clock.advance(0.5)
    assert (await limiter.hit("k", 2, 60)).allowed


async def test_keys_and_limits_are_separate() -> None:
    limiter = MemoryRateLimiter(FakeClock(START))
    assert (await limiter.hit("a", 1)).allowed
    assert not (await limiter.hit("a", 1)).allowed
    assert (await limiter.hit("b", 1)).allowed
    # The limit is the caller's: a larger one for the same key lets more through.
    assert (await limiter.hit("a", 5)).remaining == 3


async def test_a_fractional_window_reports_whole_seconds() -> None:
    clock = FakeClock(START + 0.25)
    limiter = MemoryRateLimiter(clock)
    decision = await limiter.hit("k", 1, 10)
    assert decision.reset_at == int(START) + 11  # rounded up: never before the reset
    refused = await limiter.hit("k", 1, 10)
    assert refused.retry_after == 10


async def test_finished_windows_are_swept(monkeypatch: pytest.MonkeyPatch) -> None:
    # Idle keys must not pile up for ever (one per client address): memory is the point.
    clock = FakeClock(START)
    limiter = MemoryRateLimiter(clock)
    monkeypatch.setattr(limiter, "_SWEEP_EVERY", 5)
    for n in range(3):
        await limiter.hit(f"old-{n}", 10)
    clock.advance(3601)
    await limiter.hit("new", 10)
    assert len(limiter._windows) == 4
    await limiter.hit("new", 10)  # the fifth hit sweeps
    assert set(limiter._windows) == {"new"}
    assert (await limiter.hit("new", 10)).remaining == 7  # live windows keep their count


def test_headers_report_the_decision() -> None:
    allowed = RateDecision(allowed=True, limit=10, remaining=4, reset_at=123, retry_after=0)
    assert allowed.headers() == {
        "X-RateLimit-Limit": "10",
        "X-RateLimit-Remaining": "4",
        "X-RateLimit-Reset": "123",
    }
    refused = RateDecision(allowed=False, limit=10, remaining=0, reset_at=123, retry_after=7)
    assert refused.headers()["Retry-After"] == "7"
    assert refused.headers()["X-RateLimit-Remaining"] == "0"


async def test_backoff_waits_from_the_latest_failure() -> None:
    clock = FakeClock(START)
    backoff = MemoryLoginBackoff(2, 60, clock)
    await backoff.failed("k")
    await backoff.failed("k")
    assert await backoff.retry_after("k") == 1  # 2 ** 0 after the threshold
    clock.advance(0.4)
    assert await backoff.retry_after("k") == 1  # rounded up
    clock.advance(0.6)
    assert await backoff.retry_after("k") == 0
    await backoff.failed("k")
    assert await backoff.retry_after("k") == 2
    clock.advance(1.5)
    assert await backoff.retry_after("k") == 1
    await backoff.succeeded("k")  # the password was right: no wait, and the count starts over
    assert await backoff.retry_after("k") == 0
    await backoff.failed("k")
    assert await backoff.retry_after("k") == 0


async def test_backoff_forgets_quiet_keys_and_sweeps_them(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeClock(START)
    backoff = MemoryLoginBackoff(1, 60, clock, forget_after=100)
    monkeypatch.setattr(backoff, "_SWEEP_EVERY", 5)
    for key in ("a", "b", "c"):
        await backoff.failed(key)
    assert await backoff.retry_after("a") == 1
    clock.advance(99)
    await backoff.failed("a")  # still remembered: the count goes on
    assert await backoff.retry_after("a") == 2
    clock.advance(100)
    assert await backoff.retry_after("a") == 0  # forgotten after 100 quiet seconds
    await backoff.failed("a")  # a fresh count; this fifth change sweeps "b" and "c"
    assert await backoff.retry_after("a") == 1
    assert set(backoff._failures) == {"a"}
