"""Redis (redis-py's asyncio client), reached from trio through the root trio-asyncio loop.

Like ``persistence.database`` for asyncpg: this module (and the bridge actor) is the only
place that imports redis, and everything it offers is a plain trio coroutine. Redis is an
optional, shared service: a Redis that is down is weather. Every call runs under a
trio-side timeout and a circuit breaker (``atrium.core.breaker``): failures open it, and while
it is open calls fail at once with ``RedisUnavailable`` instead of hammering (or hanging
on) a server that is not there. Meanwhile a probe PINGs Redis on a connection of its own,
at least once a second, and closes the breaker at the first answer. ``open_redis`` never
fails because Redis is down: the process starts degraded and calls succeed once Redis
answers.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any, NoReturn, TypeVar

import redis.asyncio
import redis.exceptions
import trio
import trio_asyncio
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import NoBackoff

from ..core.breaker import BreakerSettings, BreakerState, CircuitBreaker
from ..core.config import RedisAddress, RedisTLSFiles

T = TypeVar("T")
log = logging.getLogger("atrium.redis")

_CLOSE_TIMEOUT = 5.0
_FOLLOW_SECONDS = 1.0  # with Sentinel, how often a subscription asks where the master is
# Errors that say "no usable connection" (refused, reset, timed out, server loading or
# shutting down), as opposed to "the command was wrong" (a ResponseError).
_UNAVAILABLE = (
    OSError,
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
)

# Connections of the pool kept for subscriptions (the bridge's, the revocations'), which
# hold theirs for as long as they listen.
_SUBSCRIPTION_CONNECTIONS = 4

OnMessage = Callable[[bytes, bytes], None]
"""Told ``(channel, data)`` of each message a subscription receives."""


class RedisUnavailable(Exception):
    """Redis cannot be used now: unreachable, no answer within the timeout, a connection
    lost, or the circuit breaker is open. Weather, not a bug: the caller degrades (local
    fan-out, in-process state) and Redis is tried again later. The redis-py (or OS) error,
    if any, is kept as ``__cause__``."""


class Redis:
    """A Redis client whose methods are trio-native coroutines, behind a circuit breaker.

    ``call(fn)`` runs ``fn(client)`` on the asyncio side (``client`` is a
    ``redis.asyncio.Redis`` that answers bytes); ``listen`` receives pub/sub messages.

    Calls wait their turn for one of ``slots`` (the pool's connections less those the
    subscriptions hold): redis-py refuses a command outright ("Too many connections")
    when its pool is used up, and a burst of callers on this side (a join storm) is not
    Redis being away. A call that finds no slot within its timeout raises
    RedisUnavailable without counting against the breaker.
    """

    __slots__ = ("_client", "breaker", "timeout", "_slots", "_patient")

    def __init__(
        self,
        client: redis.asyncio.Redis,
        breaker: CircuitBreaker,
        *,
        timeout: float,
        slots: trio.CapacityLimiter | None = None,
        patient: bool = True,
    ) -> None:
        self._client = client
        self.breaker = breaker
        self.timeout = timeout
        self._slots = slots or trio.CapacityLimiter(_call_slots(client))
        # False: ``timeout`` is the caller's patience, shorter than Redis's due (see
        # ``answering_within``), and running out of it says nothing of Redis's health.
        self._patient = patient

    @property
    def state(self) -> str:
        """The breaker's state: ``"closed"`` or ``"open"``."""
        return str(self.breaker.state)

    @property
    def available(self) -> bool:
        """False while the breaker is open (calls would fail at once)."""
        return self.breaker.allow()

    async def call(self, fn: Callable[[redis.asyncio.Redis], Awaitable[T]]) -> T:
        """``fn(client)`` on the asyncio side, within ``timeout`` seconds.

        Raises RedisUnavailable when the breaker is open (without trying), when the
        connection fails, or past the timeout; each of those but the first counts as a
        failure in the breaker, and an answer (even an error reply) as a success. Other
        errors (a ``redis.exceptions.ResponseError``, the caller's own) pass unchanged.
        """
        self._admit()
        deadline = trio.current_time() + self.timeout
        with trio.move_on_at(deadline) as waited:
            await self._slots.acquire()
        if waited.cancelled_caught:
            raise RedisUnavailable(
                f"all {self._slots.total_tokens:g} Redis connections stayed busy for"
                f" {self.timeout:g} s"
            )
        try:
            return await self._timed(fn(self._client), deadline)
        finally:
            self._slots.release()

    async def wait_available(self) -> None:
        """Return once the breaker is closed (at once if it is)."""
        await self.breaker.wait_state(BreakerState.CLOSED)

    async def probe(self) -> bool:
        """PING Redis on a new connection of its own, within ``timeout`` seconds: True
        when it answered. Never raises for want of Redis, and never waits behind the
        pool (whose connections may hang on a frozen server). Before an answer closes
        the breaker, the pool's idle connections (which predate the outage) are closed."""
        pool: Any = self._client.connection_pool  # redis-py leaves it untyped
        connection: Any = pool.make_connection()
        ok = False
        try:
            with trio.move_on_after(self.timeout):
                ok = bool(await _aio(_ping_on(connection)))
        except Exception as error:  # any failure is a failed probe: the prober must not die
            log.debug("redis probe: %s", error)
        finally:
            with trio.move_on_after(_CLOSE_TIMEOUT, shield=True):
                with contextlib.suppress(Exception):
                    await _aio(connection.disconnect())
        if ok and not self.breaker.allow():
            await self._forget_idle_connections()
        return ok

    async def run_probes(self) -> None:
        """Probe Redis whenever the breaker is open, until cancelled (see ``probe``)."""
        await self.breaker.run(self.probe)

    def answering_within(self, timeout: float) -> Redis:
        """This client with calls bounded by ``timeout`` seconds instead (same connections,
        same breaker). A call past it raises RedisUnavailable but does not count against
        the breaker: a busy process (a join storm on a loaded machine) can take longer
        than a short bound to hear an answer from a healthy Redis, and opening the breaker
        for that would cut the whole process off Redis. Whether Redis is there is judged
        by the calls with the full timeout and by the probes; a connection error still
        counts."""
        return Redis(self._client, self.breaker, timeout=timeout, slots=self._slots, patient=False)

    async def ping(self) -> bool:
        """True when Redis answers PING. Raises RedisUnavailable."""
        return bool(await self.call(lambda client: client.ping()))

    async def listen(
        self,
        on_message: OnMessage,
        *,
        channels: Sequence[str] = (),
        patterns: Sequence[str] = (),
        on_subscribed: Callable[[], None] = lambda: None,
        ping_seconds: float = 5.0,
    ) -> NoReturn:
        """Subscribe to ``channels`` and ``patterns`` on a connection of its own and call
        ``on_message(channel, data)`` for each message (on the loop's thread, between trio
        tasks: it must not block), until cancelled or the connection is lost.

        ``on_subscribed()`` runs once Redis has confirmed every subscription (messages
        published before that were not received: the caller catches up then). The
        connection is PINGed every ``ping_seconds``; no answer within another
        ``ping_seconds`` counts as lost (a silent network loss delivers nothing). Raises
        RedisUnavailable when the breaker is open, the subscription fails, or the
        connection is lost; the breaker counts a subscription as a success and a failure
        or loss as a failure.
        """
        if not channels and not patterns:
            raise ValueError("listen needs at least one channel or pattern")
        self._admit()
        pubsub: Any = self._client.pubsub()
        lost: list[Exception] = []
        try:
            await self._timed(_subscribe(pubsub, channels, patterns))
            on_subscribed()
            heard = [trio.current_time()]

            def received(channel: bytes, data: bytes) -> None:
                heard[0] = trio.current_time()
                if channel:
                    on_message(channel, data)

            async def read() -> None:
                await _aio(_read_forever(pubsub, received))

            async def keep_alive() -> None:
                while True:
                    await trio.sleep(ping_seconds)
                    if trio.current_time() - heard[0] > 2 * ping_seconds:
                        raise RedisUnavailable(
                            f"redis did not answer PING within {ping_seconds:g} s"
                        )
                    with trio.move_on_after(ping_seconds) as scope:
                        await _aio(pubsub.ping())
                    if scope.cancelled_caught:
                        raise RedisUnavailable("redis did not take a PING")

            async def follow_master() -> None:
                await _follow_master(self._client.connection_pool, pubsub, self.timeout)

            async with trio.open_nursery() as nursery:
                for task in (read, keep_alive, follow_master):
                    nursery.start_soon(_until_lost, task, lost, nursery.cancel_scope)
        finally:
            with trio.move_on_after(_CLOSE_TIMEOUT, shield=True):
                with contextlib.suppress(Exception):
                    await _aio(pubsub.aclose())
        self.breaker.failure()
        await self._forget_idle_connections()
        error = lost[0]
        if isinstance(error, RedisUnavailable):
            raise error
        raise RedisUnavailable(f"redis subscription lost: {error}") from error

    async def _forget_idle_connections(self) -> None:
        """Close the pool's idle connections: after one connection failed, they are most
        likely dead too (a restarted server), and each would fail its next call, counting
        against the breaker, instead of reconnecting."""
        with trio.move_on_after(_CLOSE_TIMEOUT, shield=True):
            with contextlib.suppress(Exception):
                await _aio(self._client.connection_pool.disconnect(inuse_connections=False))

    def _admit(self) -> None:
        if not self.breaker.allow():
            raise RedisUnavailable("redis circuit breaker is open (probing Redis)")

    async def _timed(self, coroutine: Awaitable[T], deadline: float | None = None) -> T:
        if deadline is None:
            deadline = trio.current_time() + self.timeout
        scope = trio.CancelScope(deadline=deadline)
        try:
            with scope:
                result: T = await _aio(coroutine)
        except _UNAVAILABLE as error:
            self.breaker.failure()
            await self._forget_idle_connections()
            raise RedisUnavailable(f"redis is unavailable: {error}") from error
        except redis.exceptions.ResponseError:
            self.breaker.success()  # it answered: the server is there
            raise
        if scope.cancelled_caught:
            if self._patient:
                self.breaker.failure()
            raise RedisUnavailable(f"redis did not answer within {self.timeout:g} s")
        self.breaker.success()
        return result


def _call_slots(client: redis.asyncio.Redis) -> int:
    """How many calls may hold a connection of ``client``'s pool at once."""
    pool: Any = client.connection_pool  # redis-py leaves it untyped
    return max(1, int(pool.max_connections) - _SUBSCRIPTION_CONNECTIONS)


async def _ping_on(connection: Any) -> bool:
    """Connect ``connection`` and PING on it (on the asyncio side)."""
    await connection.connect()
    await connection.send_command("PING", check_health=False)
    return bool(await connection.read_response())


def _aio(coroutine: Awaitable[T]) -> Awaitable[T]:
    loop = trio_asyncio.current_loop.get()
    awaitable: Awaitable[T] = loop.run_aio_coroutine(coroutine)
    return awaitable


async def _until_lost(
    task: Callable[[], Awaitable[None]], lost: list[Exception], scope: trio.CancelScope
) -> None:
    """Run ``task``; when it fails for want of Redis, note why and cancel ``scope``."""
    try:
        await task()
    except (RedisUnavailable, *_UNAVAILABLE) as error:
        lost.append(error)
        scope.cancel()


async def _subscribe(pubsub: Any, channels: Sequence[str], patterns: Sequence[str]) -> None:
    """Subscribe and read until Redis confirmed each subscription (on the asyncio side)."""
    if channels:
        await pubsub.subscribe(*channels)
    if patterns:
        await pubsub.psubscribe(*patterns)
    count = len(channels) + len(patterns)
    while count:
        message = await pubsub.get_message(timeout=None)
        if message is not None and message["type"] in ("subscribe", "psubscribe"):
            count -= 1


async def _read_forever(pubsub: Any, received: OnMessage) -> NoReturn:
    """Hand every message to ``received``: ``(channel, data)``, or ``(b"", b"")`` for a
    PING's answer. Raises when the connection fails. No timeout per read: an asyncio timer
    per message would pile up in trio-asyncio (see ``persistence.database``); the caller's
    PINGs notice a silent loss instead."""
    get = pubsub.get_message
    while True:
        message = await get(timeout=None)
        if message is None:
            continue
        kind = message["type"]
        if kind in ("message", "pmessage"):
            received(message["channel"], message["data"])
        elif kind == "pong":
            received(b"", b"")


async def _follow_master(pool: Any, pubsub: Any, answer_within: float) -> None:
    """With Sentinel, ask the sentinels every ``_FOLLOW_SECONDS`` where the master is;
    when they name another one than the subscription's, raise RedisUnavailable (and the
    pool's idle connections to the old one are closed, its others as they come back).
    Without Sentinel, return at once. Each look takes at most ``answer_within`` seconds.

    A master the sentinels replaced while it still runs (``SENTINEL FAILOVER``, for
    maintenance) keeps answering, and taking writes that its conversion to a replica
    then throws away, until the sentinels' next look at it: about 10 s after the new
    master was named, measured here. This moves within a second instead.
    """
    if not isinstance(pool, SentinelConnectionPool):
        return
    sentinel_pool: Any = pool  # redis-py leaves its methods untyped
    while True:
        await trio.sleep(_FOLLOW_SECONDS)
        with trio.move_on_after(answer_within):
            try:
                master = await _aio(sentinel_pool.get_master_address())
            except _UNAVAILABLE:
                continue  # no sentinel is sure: keep what works
            connection = pubsub.connection
            if connection is not None and (connection.host, connection.port) != master:
                raise RedisUnavailable(f"redis master moved to {master[0]}:{master[1]}")


def _tls_options(tls: RedisTLSFiles) -> dict[str, Any]:
    """redis-py's options for TLS connections verified against ``tls``'s CA (or the
    system's) and the host's name, that present ``tls``'s client certificate, if any."""
    options: dict[str, Any] = {"ssl_cert_reqs": "required", "ssl_check_hostname": True}
    if tls.ca_file is not None:
        options["ssl_ca_certs"] = tls.ca_file
    if tls.cert_file is not None:
        options["ssl_certfile"] = tls.cert_file
        options["ssl_keyfile"] = tls.key_file
    return options


def _client(
    address: RedisAddress, call_timeout: float, max_connections: int
) -> tuple[redis.asyncio.Redis, Sentinel | None]:
    """The redis-py client for ``address`` (and the Sentinel it asks, to close with it).

    redis-py's own retries are off, for the commands and for the sentinels: the breaker
    decides when to try again. With Sentinel, every new connection asks the sentinels (in
    turn; the first that answers goes first next time) where the master is: after a
    failover, connections to the old master fail or are refused as read-only, the breaker
    counts that, the pool drops its idle connections and the next ones go to the new
    master.
    """
    options: dict[str, Any] = {
        "retry": Retry(NoBackoff(), 0),
        "socket_connect_timeout": call_timeout,
        "max_connections": max_connections,
    }
    if address.sentinel is None:
        url = address.url or ""
        if url.startswith("rediss://"):
            options.update(_tls_options(address.tls))
        # TCP keepalive notices a peer that vanished; redis-py refuses it for unix:// sockets.
        if not url.startswith("unix://"):
            options["socket_keepalive"] = True
        return redis.asyncio.Redis.from_url(url, **options), None
    watched = address.sentinel
    tls = _tls_options(address.tls) if watched.tls else {}
    # Sentinels are asked in turn until one answers, all within one call: a sentinel that
    # hangs (frozen, or its host gone) must leave time to ask the next ones and the master.
    each = call_timeout / (len(watched.addresses) + 1)
    sentinel = Sentinel(
        watched.addresses,
        sentinel_kwargs={
            "retry": Retry(NoBackoff(), 0),
            "socket_connect_timeout": each,
            "socket_timeout": each,
            "socket_keepalive": True,
            "password": watched.sentinel_password,
            "ssl": watched.tls,
            **tls,
        },
    )
    client = sentinel.master_for(
        watched.master,
        username=watched.username,
        password=watched.password,
        socket_keepalive=True,
        ssl=watched.tls,
        **tls,
        **options,
    )
    return client, sentinel


@asynccontextmanager
async def open_redis(
    address: str | RedisAddress,
    breaker: BreakerSettings,
    *,
    call_timeout: float = 2.0,
    clock: Callable[[], float] = trio.current_time,
    max_connections: int = 32,
) -> AsyncIterator[Redis]:
    """A ``Redis`` for ``address`` (a URL, or a ``RedisAddress``: a URL or a master that
    Sentinel watches, and TLS files) for the duration of the block (needs a trio-asyncio loop).

    Connects lazily: a Redis that is down at start is not an error here (calls raise
    RedisUnavailable until it is back). ``call_timeout`` bounds each call, each connection
    attempt and each probe; ``clock`` drives the breaker (trio's clock, so tests can use
    MockClock). redis-py's own retries are off: the breaker decides when to try again,
    and its probes run in the block's background (``Redis.run_probes``).
    """
    if isinstance(address, str):
        address = RedisAddress(url=address)
    client, sentinel = _client(address, call_timeout, max_connections)
    try:
        redis_client = Redis(client, CircuitBreaker(breaker, clock), timeout=call_timeout)
        async with _probing(redis_client):
            yield redis_client
    finally:
        with trio.move_on_after(_CLOSE_TIMEOUT, shield=True):
            with contextlib.suppress(Exception):
                await _aio(client.aclose())
            if sentinel is not None:
                with contextlib.suppress(Exception):
                    await _aio(sentinel.aclose())


@asynccontextmanager
async def _probing(client: Redis) -> AsyncIterator[Redis]:
    """``client`` with its probes running for the block. An error of the block propagates
    unchanged (not wrapped in an exception group by the probes' nursery)."""
    body_error: BaseException | None = None
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.run_probes)
        try:
            yield client
        except BaseException as error:  # re-raised below, once the probes stopped
            body_error = error
        finally:
            nursery.cancel_scope.cancel()
    if body_error is not None:
        raise body_error


__all__ = [
    "BreakerSettings",
    "BreakerState",
    "OnMessage",
    "Redis",
    "RedisUnavailable",
    "open_redis",
]
