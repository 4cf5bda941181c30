"""State that every process sharing Redis must agree on: rate-limit windows, failed-login
counts, cache generations and session revocations (keys under ``atrium:``).

Each operation is one Lua script where a read and a write must not be split, run through
one ``Scripts`` per process so that concurrent callers share a round trip; an
authenticated request's session-cache check and rate-limit hit are one script
(``Generations.confirm_then_hit``), so one round trip. Every function raises
``RedisUnavailable`` when Redis cannot be used, and the callers (``ratelimit``,
``cache``, ``admission``, ``sessions``) fall back to this process's own state.
Times are the caller's wall clock (seconds), so every process applies one rule to one
stored window; key TTLs only clean up after them.
"""

from __future__ import annotations

import hashlib
import math
import secrets
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, NoReturn

import outcome
import trio
from redis.exceptions import NoScriptError

from .redis import Redis, RedisUnavailable

REVOKED_CHANNEL = "atrium:revoked"
"""Published with a session id when a login session is revoked."""

# A fixed window anchored at the key's first hit; a refused hit is not counted. ``now`` and
# ``window`` are seconds, ``ttl`` milliseconds. Returns {allowed, count, start}.
_WINDOW = """
local function hit(key, now, window, limit, ttl)
  local raw = redis.call('HGET', key, 's')
  local start = tonumber(raw or '')
  local count = tonumber(redis.call('HGET', key, 'c') or '0')
  if start == nil or tonumber(now) >= start + tonumber(window) then
    raw = now
    count = 0
  end
  local allowed = 0
  if count < tonumber(limit) then
    count = count + 1
    allowed = 1
  end
  redis.call('HSET', key, 's', raw, 'c', count)
  redis.call('PEXPIRE', key, ttl)
  return {allowed, count, raw}
end
"""

# KEYS: the window. ARGV: now, window seconds, limit, ttl (ms).
_HIT = _WINDOW + "return hit(KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4])"

# KEYS: the failures. ARGV: now, forget after (s), ttl (ms). Counts one failed login,
# starting over when the last one is ``forget after`` old. Returns the count.
_FAILED = """
local last = tonumber(redis.call('HGET', KEYS[1], 't') or '')
local count = tonumber(redis.call('HGET', KEYS[1], 'c') or '0')
if last == nil or tonumber(ARGV[1]) - last >= tonumber(ARGV[2]) then count = 0 end
count = count + 1
redis.call('HSET', KEYS[1], 't', ARGV[1], 'c', count)
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return count
"""

# A user's generation: {epoch, generation}. The epoch is set once per Redis dataset
# (to ``new_epoch`` if none is set): a Redis that lost its data (a restart without
# persistence) gets a new one, and nothing cached under the old one is trusted.
_GENERATIONS = """
local function generation(epoch_key, key, new_epoch)
  local epoch = redis.call('GET', epoch_key)
  if not epoch then
    epoch = new_epoch
    redis.call('SET', epoch_key, epoch)
  end
  return epoch, redis.call('GET', key) or '0'
end
"""

# KEYS: the epoch, a user's generation. ARGV: an epoch to use if none is set.
_GENERATION = (
    _GENERATIONS
    + """
local epoch, gen = generation(KEYS[1], KEYS[2], ARGV[1])
return {epoch, gen}
"""
)

# KEYS: the epoch, a user's generation, a window. ARGV: an epoch to use if none is set,
# the epoch and generation expected, then _HIT's. Counts the hit only when the user's
# generation is the one expected: {allowed, count, start}, else {} (nothing counted).
_CONFIRM_THEN_HIT = (
    _GENERATIONS
    + _WINDOW
    + """
local epoch, gen = generation(KEYS[1], KEYS[2], ARGV[1])
if epoch ~= ARGV[2] or gen ~= ARGV[3] then
  return {}
end
return hit(KEYS[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7])
"""
)

_GENERATION_BITS = 40  # a generation is ``epoch << 40 | count``


@dataclass(slots=True)
class _Call:
    source: str
    sha: str
    keys: list[str]
    args: list[object]
    outcome: outcome.Outcome[Any] | None = None


class Scripts:
    """Lua scripts of one ``Redis``, sent by SHA (loaded when Redis lacks them), the calls
    of concurrent callers together in one pipeline: a process serving many requests at
    once makes one round trip (and one crossing into asyncio) for all of their rate-limit
    hits and cache checks, not one each."""

    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self._queue: list[_Call] = []
        self._flushing: trio.Event | None = None

    async def run(self, source: str, keys: Sequence[str], args: Sequence[object]) -> Any:
        """The script's result. Raises RedisUnavailable, or the script's error."""
        sha = hashlib.sha1(source.encode()).hexdigest()
        call = _Call(source, sha, list(keys), list(args))
        self._queue.append(call)
        while call.outcome is None:
            if self._flushing is None:
                await self._flush()
            else:
                await self._flushing.wait()
        return call.outcome.unwrap()

    async def _flush(self) -> None:
        """Send every queued call in one pipeline and hand each its outcome."""
        self._flushing = flushed = trio.Event()
        batch: list[_Call] = []
        try:
            await trio.lowlevel.checkpoint()  # callers running now join this round trip
            batch, self._queue = self._queue, []
            try:
                results = await self.redis.call(partial(_pipelined, batch))
            except RedisUnavailable as error:
                for call in batch:  # an exception of its own for each caller to raise
                    unavailable = RedisUnavailable(str(error))
                    unavailable.__cause__ = error.__cause__
                    call.outcome = outcome.Error(unavailable)
            else:
                for call, result in zip(batch, results, strict=True):
                    failed = isinstance(result, Exception)
                    call.outcome = outcome.Error(result) if failed else outcome.Value(result)
        finally:
            # Cancelled mid-flight: whoever flushes next sends what got no outcome.
            self._queue[:0] = [call for call in batch if call.outcome is None]
            self._flushing = None
            flushed.set()


async def _pipelined(batch: Sequence[_Call], client: Any) -> list[Any]:
    """EVALSHA every call in one pipeline; the scripts Redis lacks (after a restart) are
    loaded and only their calls sent again (a missing script ran nothing)."""
    async with client.pipeline(transaction=False) as pipe:
        for call in batch:
            pipe.evalsha(call.sha, len(call.keys), *call.keys, *call.args)
        results: list[Any] = await pipe.execute(raise_on_error=False)
        missing = [i for i, r in enumerate(results) if isinstance(r, NoScriptError)]
        if missing:
            for source in {batch[i].source for i in missing}:
                await client.script_load(source)
            for i in missing:
                call = batch[i]
                pipe.evalsha(call.sha, len(call.keys), *call.keys, *call.args)
            for i, result in zip(missing, await pipe.execute(raise_on_error=False), strict=True):
                results[i] = result
        return results


@dataclass(frozen=True, slots=True)
class Window:
    """A rate-limit window after one hit: whether it was counted, how many are, and when
    the window began (epoch seconds)."""

    allowed: bool
    count: int
    start: float


@dataclass(frozen=True, slots=True)
class RateHit:
    """One hit of a rate-limit window: ``key`` at ``now``, counted unless ``limit`` hits
    are counted in its window (``window_seconds`` long) already."""

    key: str
    limit: int
    window_seconds: float
    now: float

    def _key(self) -> str:
        return f"atrium:rate:{self.key}"

    def _args(self) -> list[object]:
        ttl_ms = math.ceil(self.window_seconds * 1000) + 1000
        return [repr(self.now), repr(self.window_seconds), self.limit, ttl_ms]


def _window(reply: list[Any]) -> Window:
    allowed, count, start = reply
    return Window(bool(allowed), int(count), float(start))


class RateWindows:
    """Fixed rate-limit windows shared by every process."""

    def __init__(self, scripts: Scripts) -> None:
        self._scripts = scripts

    async def hit(self, key: str, limit: int, window_seconds: float, now: float) -> Window:
        """Count one hit of ``key`` at ``now`` unless ``limit`` hits are counted in its
        window already."""
        hit = RateHit(key, limit, window_seconds, now)
        return _window(await self._scripts.run(_HIT, [hit._key()], hit._args()))


@dataclass(frozen=True, slots=True)
class Failures:
    """Failed logins in a row for a key, and when the latest was (epoch seconds)."""

    count: int
    last_at: float


class LoginFailures:
    """Failed-login counts per key (an email) shared by every process."""

    def __init__(self, scripts: Scripts) -> None:
        self._scripts = scripts
        self._redis = scripts.redis

    @staticmethod
    def _key(key: str) -> str:
        return f"atrium:login-failures:{key}"

    async def get(self, key: str) -> Failures | None:
        """The failures recorded for ``key``, if any."""
        count, last = await self._redis.call(lambda client: client.hmget(self._key(key), "c", "t"))
        if count is None or last is None:
            return None
        return Failures(int(count), float(last))

    async def failed(self, key: str, now: float, forget_after: float) -> int:
        """Record a failure at ``now``; the count in a row (starting over after
        ``forget_after`` quiet seconds, when the key expires too)."""
        ttl_ms = math.ceil(forget_after * 1000)
        count = await self._scripts.run(
            _FAILED, [self._key(key)], [repr(now), repr(forget_after), ttl_ms]
        )
        return int(count)

    async def clear(self, key: str) -> None:
        await self._redis.call(lambda client: client.delete(self._key(key)))


class Generations:
    """Per-user generations of one cache (``name``): a token that changes whenever the
    user's cached values become invalid, on any process."""

    _EPOCH = "atrium:cache:epoch"

    def __init__(self, scripts: Scripts, name: str, ttl_seconds: float) -> None:
        self._scripts = scripts
        self._redis = scripts.redis
        self._prefix = f"atrium:cache:{name}:gen:"
        # A generation outlives every value cached under the one before it (those expire
        # after ttl_seconds) and every fill in flight when it changed.
        self._keep_ms = math.ceil((2 * ttl_seconds + 60) * 1000)

    def _keys(self, user_id: uuid.UUID) -> list[str]:
        return [self._EPOCH, self._prefix + str(user_id)]

    async def current(self, user_id: uuid.UUID) -> int:
        """The user's generation now."""
        epoch, generation = await self._scripts.run(
            _GENERATION, self._keys(user_id), [_new_epoch()]
        )
        return int(epoch) << _GENERATION_BITS | int(generation)

    async def confirm_then_hit(
        self, user_id: uuid.UUID, expected: int, hit: RateHit
    ) -> Window | None:
        """Count ``hit`` if the user's generation is still ``expected``: its window, or
        None when the generation changed (nothing counted). One script, one round trip:
        a cached value and the request's rate limit are checked together."""
        epoch, count = expected >> _GENERATION_BITS, expected & ((1 << _GENERATION_BITS) - 1)
        reply = await self._scripts.run(
            _CONFIRM_THEN_HIT,
            [*self._keys(user_id), hit._key()],
            [_new_epoch(), epoch, count, *hit._args()],
        )
        return _window(reply) if reply else None

    async def bump(self, user_ids: Iterable[uuid.UUID]) -> None:
        """Change the generation of every user in ``user_ids``."""
        keys = [self._prefix + str(user_id) for user_id in user_ids]
        if not keys:
            return

        async def bump_all(client: Any) -> None:
            async with client.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.incr(key)
                    pipe.pexpire(key, self._keep_ms)
                await pipe.execute()

        await self._redis.call(bump_all)


def _new_epoch() -> int:
    return secrets.randbits(31) + 1


async def publish_revoked(redis: Redis, session_id: uuid.UUID) -> None:
    """Tell every process listening (``listen_revoked``) that ``session_id`` was revoked."""
    await redis.call(lambda client: client.publish(REVOKED_CHANNEL, str(session_id)))


async def listen_revoked(
    redis: Redis, revoked: Callable[[uuid.UUID], None], *, on_subscribed: Callable[[], None]
) -> NoReturn:
    """Call ``revoked(session_id)`` for every revocation published, until the
    subscription is lost (``RedisUnavailable``) or cancelled. ``on_subscribed()`` runs
    once listening: revocations published before were missed."""

    def received(_channel: bytes, data: bytes) -> None:
        try:
            session_id = uuid.UUID(data.decode())
        except ValueError:
            return  # not ours
        revoked(session_id)

    await redis.listen(received, channels=[REVOKED_CHANNEL], on_subscribed=on_subscribed)
