"""The circuit breaker: the seed's thresholds, on trio's MockClock (no real waiting)."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from atrium.breaker import BreakerSettings, BreakerState, CircuitBreaker


async def test_opens_after_failures_in_a_row_and_refuses(
    autojump_clock: trio.testing.MockClock,
) -> None:
    breaker = CircuitBreaker(BreakerSettings(failures=5, reset_seconds=60, successes=3))
    for _ in range(4):
        breaker.failure()
    breaker.success()  # a success in between clears the count
    for _ in range(4):
        breaker.failure()
        assert breaker.allow()
    breaker.failure()
    assert breaker.state is BreakerState.OPEN
    assert not breaker.allow()
    assert breaker.opens == 1
    assert breaker.retry_in() == pytest.approx(60)
    breaker.failure()  # a call that began before it opened changes nothing
    await trio.sleep(59.9)
    assert not breaker.allow()


async def test_half_open_after_the_reset_then_closes_after_successes(
    autojump_clock: trio.testing.MockClock,
) -> None:
    breaker = CircuitBreaker(BreakerSettings(failures=2, reset_seconds=60, successes=3))
    breaker.failure()
    breaker.failure()
    await trio.sleep(60)
    assert breaker.state is BreakerState.HALF_OPEN
    assert breaker.allow()
    assert breaker.retry_in() == 0
    breaker.success()
    breaker.success()
    assert breaker.state is BreakerState.HALF_OPEN
    breaker.success()
    assert breaker.state is BreakerState.CLOSED


async def test_a_failure_while_half_open_opens_it_again(
    autojump_clock: trio.testing.MockClock,
) -> None:
    breaker = CircuitBreaker(BreakerSettings(failures=5, reset_seconds=10, successes=3))
    for _ in range(5):
        breaker.failure()
    await trio.sleep(10)
    breaker.success()
    breaker.failure()
    assert breaker.state is BreakerState.OPEN
    assert breaker.opens == 2
    await trio.sleep(9)
    assert not breaker.allow()
    await trio.sleep(1)
    assert breaker.state is BreakerState.HALF_OPEN


def test_settings_are_checked() -> None:
    with pytest.raises(ValueError):
        BreakerSettings(failures=0)
    with pytest.raises(ValueError):
        BreakerSettings(reset_seconds=-1)
