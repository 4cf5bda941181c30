"""The circuit breaker on trio's MockClock (no real waiting): failures open it, an open one
refuses at once and probes at least once a second, and the first probe that succeeds
closes it, however long the service was away."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from atrium.core.breaker import BreakerSettings, BreakerState, CircuitBreaker
from atrium.core.config import ConfigError, load_settings

SECRET = "test-secret-key-with-enough-length-0123456789"


def no_jitter() -> float:
    return 1.0  # the whole wait: 50 % + 1.0 / 2


async def test_opens_after_failures_in_a_row_and_refuses_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    breaker = CircuitBreaker(BreakerSettings(failures=5))
    for _ in range(4):
        breaker.failure()
    breaker.success()  # a success in between clears the count
    for _ in range(4):
        breaker.failure()
        assert breaker.allow()
    breaker.failure()
    assert breaker.state is BreakerState.OPEN
    assert not breaker.allow()
    assert breaker.opens == 1 and breaker.opened_at == trio.current_time()
    breaker.failure()  # a call that began before it opened changes nothing
    breaker.success()  # nor does one that answers late: probes close it
    await trio.sleep(3600)  # no probe: it stays open, however long
    assert not breaker.allow()


async def test_probes_back_off_to_once_a_second_and_the_first_answer_closes_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    breaker = CircuitBreaker(BreakerSettings(failures=2), jitter=no_jitter)
    probed_at: list[float] = []
    answers_from = 4.0  # the service is back at t = 4 s

    async def probe() -> bool:
        probed_at.append(trio.current_time())
        assert not breaker.allow()  # probes run while calls are refused ...
        return trio.current_time() >= answers_from

    async with trio.open_nursery() as nursery:
        nursery.start_soon(breaker.run, probe)
        await trio.sleep(1)
        assert probed_at == []  # closed: nothing to probe
        breaker.failure()
        breaker.failure()
        opened = trio.current_time()
        await breaker.wait_state(BreakerState.CLOSED)
        closed = trio.current_time()
        # 0.25, doubling, at most 1 s apart; closed by the first probe after t = 4 s.
        gaps = [b - a for a, b in zip([opened, *probed_at], probed_at, strict=False)]
        assert gaps == pytest.approx([0.25, 0.5, 1.0, 1.0, 1.0])
        assert closed == probed_at[-1] and closed - answers_from < 1.0
        assert breaker.allow() and breaker.closed_at == closed and breaker.probes == 5
        # Open again: the backoff starts over at 0.25 s.
        for _ in range(2):
            breaker.failure()
        reopened = trio.current_time()
        await breaker.wait_state(BreakerState.CLOSED)
        assert trio.current_time() - reopened == pytest.approx(0.25)
        nursery.cancel_scope.cancel()


async def test_jitter_spreads_probes_and_no_wait_passes_the_cap() -> None:
    for jitter, expected in ((0.0, 0.5), (0.5, 0.75), (0.999, 0.9995)):
        breaker = CircuitBreaker(BreakerSettings(failures=1), jitter=lambda j=jitter: j)
        breaker.failure()
        for _ in range(10):
            breaker.probed(False)
        assert breaker.next_probe_in() == pytest.approx(expected)  # of the 1 s cap
    tight = CircuitBreaker(BreakerSettings(failures=1, reset_seconds=0.0), jitter=no_jitter)
    tight.failure()
    assert tight.next_probe_in() == 0.01  # reset 0 (tests): fast, never a busy loop


async def test_successes_probes_in_a_row_close_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    breaker = CircuitBreaker(BreakerSettings(failures=1, successes=3))
    breaker.failure()
    for ok in (True, True, False, True, True):  # a failed probe starts the count over
        breaker.probed(ok)
        assert breaker.state is BreakerState.OPEN
    breaker.probed(True)
    assert breaker.state is BreakerState.CLOSED


async def test_a_hanging_probe_never_holds_up_calls(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # A probe that hangs (a frozen server: it bounds its own time) leaves calls refused at
    # once, without waiting; a closed breaker lets calls through while nothing probes.
    breaker = CircuitBreaker(BreakerSettings(failures=1))
    release = trio.Event()

    async def probe() -> bool:
        await release.wait()
        return True

    async with trio.open_nursery() as nursery:
        nursery.start_soon(breaker.run, probe)
        breaker.failure()
        await trio.sleep(30)
        assert not breaker.allow() and breaker.probes == 0
        release.set()
        await breaker.wait_state(BreakerState.CLOSED)
        assert breaker.allow()
        nursery.cancel_scope.cancel()


def test_settings_are_checked() -> None:
    with pytest.raises(ValueError):
        BreakerSettings(failures=0)
    with pytest.raises(ValueError):
        BreakerSettings(reset_seconds=-1)
    with pytest.raises(ValueError):
        BreakerSettings(first_probe_seconds=0)


def test_the_settings_keep_their_names_with_their_new_meaning() -> None:
    # REDIS_BREAKER_RESET_SECONDS is the longest wait between probes (was: how long an
    # open breaker refused everything); REDIS_BREAKER_SUCCESSES counts probes.
    env = {"ENVIRONMENT": "test", "SECRET_KEY": SECRET}
    defaults = load_settings(env)
    assert (
        defaults.redis_breaker_failures,
        defaults.redis_breaker_reset_seconds,
        defaults.redis_breaker_successes,
    ) == (5, 1.0, 1)
    assert (
        load_settings({**env, "REDIS_BREAKER_RESET_SECONDS": "2.5"}).redis_breaker_reset_seconds
        == 2.5
    )
    with pytest.raises(ConfigError, match="longest wait between two probes"):
        load_settings({**env, "REDIS_BREAKER_RESET_SECONDS": "60"})  # test_config: the rest
