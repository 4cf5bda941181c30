"""The Redis wrapper against a real redis-server: calls, pub/sub, and a Redis that is
down (at start, or taken away mid-subscription) is RedisUnavailable, never a crash."""

from __future__ import annotations

import os
import signal
import uuid

import pytest
import redis.exceptions
import trio
from redis_server import RedisServer, free_port

from atrium.core.breaker import BreakerSettings
from atrium.persistence.redis import Redis, RedisUnavailable, open_redis

BREAKER = BreakerSettings(failures=2, reset_seconds=0.5, successes=1)


async def test_calls_run_on_redis(aio_loop: None, redis_url: str) -> None:
    async with open_redis(redis_url, BreakerSettings()) as client:
        assert await client.ping()
        await client.call(lambda r: r.set("atrium:test", b"1"))
        assert await client.call(lambda r: r.get("atrium:test")) == b"1"
        with pytest.raises(redis.exceptions.ResponseError):  # an answer, not an outage
            await client.call(lambda r: r.execute_command("NO-SUCH-COMMAND"))
        assert client.state == "closed" and client.available


async def test_a_unix_socket_url_works(aio_loop: None, own_redis: RedisServer) -> None:
    async with open_redis(own_redis.unix_url, BreakerSettings()) as client:
        await client.call(lambda r: r.set("atrium:unix", b"1"))
        assert await client.call(lambda r: r.get("atrium:unix")) == b"1"


async def test_down_at_start_then_the_breaker_opens_and_recovers(aio_loop: None) -> None:
    server = RedisServer(free_port())
    async with open_redis(server.url, BREAKER, call_timeout=1.0) as client:
        for _ in range(2):
            with pytest.raises(RedisUnavailable) as raised:
                await client.ping()
            assert raised.value.__cause__ is not None
        assert client.state == "open" and not client.available
        with pytest.raises(RedisUnavailable, match="breaker is open"):
            await client.ping()  # refused without trying
        server.start()
        try:
            answering = trio.current_time()
            with trio.fail_after(5):
                await client.wait_available()  # a probe's PING closed it
            assert trio.current_time() - answering < 1.0  # probes at most 0.5 s apart
            assert client.state == "closed"
            assert await client.ping()
        finally:
            server.close()


async def test_a_call_that_does_not_answer_times_out(aio_loop: None, redis_url: str) -> None:
    async with open_redis(redis_url, BREAKER, call_timeout=0.2) as client:
        with pytest.raises(RedisUnavailable, match="did not answer"):
            await client.call(lambda r: r.execute_command("DEBUG", "SLEEP", "3"))


async def _publish(redis: Redis, channel: str, data: bytes) -> int:
    return int(await redis.call(lambda r: r.publish(channel, data)))


async def test_a_call_past_a_short_bound_of_its_callers_does_not_open_the_breaker(
    aio_loop: None, redis_url: str
) -> None:
    # A workspace waits 0.25 s for presence; a loaded process can take longer than that
    # to hear a healthy Redis. Past its caller's bound a call gives up, but the breaker
    # (two failures here) stays closed: Redis's health is judged at its own timeout.
    async with open_redis(redis_url, BREAKER, call_timeout=2.0) as client:
        quick = client.answering_within(0.05)
        for _ in range(3):
            with pytest.raises(RedisUnavailable, match="did not answer"):
                await quick.call(lambda r: r.blpop(["atrium:empty"], 0.2))
        assert client.state == "closed" and await quick.ping()


async def test_a_burst_of_calls_waits_for_the_pool_instead_of_failing(
    aio_loop: None, redis_url: str
) -> None:
    # 20 calls at once, each holding a connection 50-100 ms (Redis wakes a blocked client
    # at its 10 Hz tick), through a pool of 6 (2 for calls):
    # redis-py would refuse the third "Too many connections" and the breaker count Redis
    # as away. They take turns, all answer, and the breaker stays closed.
    async with open_redis(redis_url, BREAKER, max_connections=6) as client:
        answered: list[object] = []

        async def call(n: int) -> None:
            answered.append(await client.call(lambda r: r.blpop([f"atrium:empty:{n}"], 0.05)))

        async with trio.open_nursery() as nursery:
            for n in range(20):
                nursery.start_soon(call, n)
        assert answered == [None] * 20
        assert client.state == "closed"


async def test_a_call_that_finds_the_pool_busy_too_long_does_not_open_the_breaker(
    aio_loop: None, redis_url: str
) -> None:
    # BREAKER opens after two failures: three calls that find the one connection for calls
    # held (1 s) past their 0.2 s each are not Redis failing.
    async with open_redis(redis_url, BREAKER, max_connections=5) as client:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.call, lambda r: r.blpop(["atrium:empty"], 1.0))
            await trio.sleep(0.05)
            waiting = [client.answering_within(0.2) for _ in range(3)]
            for quick in waiting:
                with pytest.raises(RedisUnavailable, match="busy"):
                    await quick.ping()
        assert client.state == "closed" and await client.ping()


async def test_listen_receives_and_reports_a_lost_connection(
    aio_loop: None, own_redis: RedisServer
) -> None:
    channel = f"atrium:test:{uuid.uuid4()}"
    received: list[tuple[bytes, bytes]] = []
    subscribed = trio.Event()
    got = trio.Event()

    def on_message(name: bytes, data: bytes) -> None:
        received.append((name, data))
        if len(received) == 3:
            got.set()

    async with open_redis(own_redis.url, BREAKER) as client:

        async def listen() -> None:
            with pytest.raises(RedisUnavailable):
                await client.listen(
                    on_message, patterns=["atrium:test:*"], on_subscribed=subscribed.set
                )

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(listen)
                await subscribed.wait()
                for n in range(3):
                    assert await _publish(client, channel, b"%d" % n) == 1
                await got.wait()
                own_redis.stop(kill=True)  # listen ends with RedisUnavailable
        assert received == [(channel.encode(), b"%d" % n) for n in range(3)]
        # Back on the same port: the pooled connections of before were let go, so the
        # first call reconnects instead of failing on a dead one.
        own_redis.start()
        assert await client.ping()


async def test_listen_notices_a_silent_loss_by_ping(aio_loop: None, own_redis: RedisServer) -> None:
    # A paused server (SIGSTOP) keeps the socket open and answers nothing, as a network
    # partition would: the PINGs notice.
    async with open_redis(own_redis.url, BREAKER) as client:
        subscribed = trio.Event()
        process = own_redis._process
        assert process is not None
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:

                async def listen() -> None:
                    with pytest.raises(RedisUnavailable, match="PING"):
                        await client.listen(
                            lambda *_: None,
                            channels=["atrium:silent"],
                            on_subscribed=subscribed.set,
                            ping_seconds=0.2,
                        )

                nursery.start_soon(listen)
                await subscribed.wait()
                os.kill(process.pid, signal.SIGSTOP)
        os.kill(process.pid, signal.SIGCONT)


async def test_listen_refuses_while_the_breaker_is_open(aio_loop: None) -> None:
    async with open_redis(f"redis://127.0.0.1:{free_port()}/0", BREAKER) as client:
        for _ in range(2):
            with pytest.raises(RedisUnavailable):
                await client.listen(lambda *_: None, channels=["x"])
        with pytest.raises(RedisUnavailable, match="breaker is open"):
            await client.listen(lambda *_: None, channels=["x"])
        with pytest.raises(ValueError):
            await client.listen(lambda *_: None)


def test_replies_are_parsed_by_hiredis() -> None:
    # redis-py falls back to its pure-Python parser without hiredis, silently: 8% of a
    # serving process's CPU in a --workers join storm (docs/BENCHMARKS.md).
    import redis.asyncio.connection

    assert redis.asyncio.connection.DefaultParser.__name__ == "_AsyncHiredisParser"
