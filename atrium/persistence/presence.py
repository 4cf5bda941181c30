"""Cluster presence in Redis: who is connected to which project, on every process.

Each process (an *instance*, named by a random id per start) writes its own entries: one
per (project, user) it holds connections of, with that count and the user's email. The
keys (all under ``atrium:presence:``)::

    instances              set: every instance that has heartbeated and was not reaped
    alive:{instance}       "1" with a TTL, set again by each heartbeat: the instance lives
    instance:{instance}    hash "{project}:{user}" -> {"p", "u", "n", "e"} (JSON)
    project:{project}      hash user -> connections on every instance together
    seen:{project}         hash user -> when the user was last seen anywhere (epoch ms)
    reaped:{instance}      set for an hour when another process reaped the instance
    version:{project}      hash user -> the version of the user's latest transition (for
                           a day after the project's latest one)
    floor                  hash: "run" (the server's run_id) and "version": no version
                           this server gives out is at or below it

Every change is a Lua script, so an instance's entries and the project totals never
disagree, and each script reports the transitions of the totals it made (a user online
nowhere before, or nowhere any more): the first join and the last leave of a user across
the cluster are decided once, in Redis. Each transition also raises the user's
*version* in the project, in the same script: the order in which Redis decided a user's
transitions, which the event log follows (``persistence.events.append_presence`` stores a
USER_JOIN or USER_LEAVE only if its version is newer than the last stored). A version is
the Redis clock in microseconds, or one more than the previous version if that is not
less: it only grows, and also across a Redis restart that lost the keys, as a lost
version was at most the clock when it was taken (a user's transitions never come more
than one a microsecond) unless Redis's clock stepped back. ``reap`` claims an instance
whose ``alive`` key expired in one script, so exactly one live process gets its users.

A failover can step a version back: the new master's clock may be behind the old one's,
and the replica may have missed the last versions. So every version is also above a
*floor*: the newest version PostgreSQL stored, read once for each run of a server (its
``run_id``, new with every start and every server, so a restart, a FLUSHALL and a
failover all lose it). A script that would decide a transition first checks that the
floor was set for this run; if not, it changes nothing and answers ``NOFLOOR``, and the
caller sets it (``raise_floor``) and runs it again.

The scripts name keys they derive from an entry (a project's totals), so they need one
Redis, not a Redis Cluster.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
import redis.exceptions

from .database import DatabaseUnavailable
from .redis import Redis, RedisUnavailable

PREFIX = "atrium:presence:"
_TOMBSTONE_MS = 3_600_000  # how long "reaped" is remembered for a heartbeat to find
_FLOOR_KEY = PREFIX + "floor"
_NO_FLOOR = "NOFLOOR"

FloorSource = Callable[[], Awaitable[int]]
"""The newest presence version stored for good (PostgreSQL's): versions go above it."""


async def _no_floor() -> int:
    return 0


# ``floor_of_this_run()``: the floor set for this server's run, or nil. Every script that
# may decide a transition starts with ``floor = floor_of_this_run()`` and answers NOFLOOR,
# having changed nothing, when it is nil.
_FLOOR = f"""
local function floor_of_this_run()
  local run = string.match(redis.call('INFO', 'server'), 'run_id:(%x+)')
  local stored = redis.call('HMGET', '{_FLOOR_KEY}', 'run', 'version')
  if stored[1] ~= run then return nil end
  return tonumber(stored[2])
end
local floor = floor_of_this_run()
if not floor then return redis.error_reply('{_NO_FLOOR} presence versions need their floor') end
"""

# ARGV: a floor (the newest version stored for good). Sets it as this run's floor, or
# keeps this run's floor if that is higher; returns the floor in force.
_SET_FLOOR = f"""
local run = string.match(redis.call('INFO', 'server'), 'run_id:(%x+)')
local stored = redis.call('HMGET', '{_FLOOR_KEY}', 'run', 'version')
local floor = tonumber(ARGV[1])
if stored[1] == run and tonumber(stored[2]) > floor then floor = tonumber(stored[2]) end
redis.call('HSET', '{_FLOOR_KEY}', 'run', run, 'version', string.format('%.0f', floor))
return string.format('%.0f', floor)
"""

# ``advance(key, user)``: raise the user's version in the hash ``key`` (a transition) and
# return it. Numbers are formatted by hand: Lua writes 1.7e+15 for a plain tostring. The
# hash goes a day after the project's last transition: the clock then gives newer
# versions than those it held, as after a Redis restart. Never at or below the floor.
_ADVANCE = (
    _FLOOR
    + """
local function advance(key, user)
  local t = redis.call('TIME')
  local now = math.max(tonumber(t[1]) * 1000000 + tonumber(t[2]), floor + 1)
  local step = now - tonumber(redis.call('HGET', key, user) or '0')
  if step < 1 then step = 1 end
  local version = redis.call('HINCRBY', key, user, string.format('%.0f', step))
  redis.call('PEXPIRE', key, 86400000)
  return version
end
"""
)

# KEYS: instance hash, project totals, project seen, instances, alive key, tombstone,
# project versions. ARGV: field, user, count, email, project, now (ms), instance, ttl
# (ms). Sets this instance's count of the user's connections to the project; returns the
# user's total before and after, and the user's new version if it was a transition (else
# 0). An instance that was reaped and writes before its next heartbeat is
# alive again (registered, with its TTL): else what it writes now would never be reaped
# if it died before that heartbeat. The tombstone stays for the heartbeat to find.
_SET_COUNT = (
    _ADVANCE
    + """
if redis.call('EXISTS', KEYS[6]) == 1 and redis.call('EXISTS', KEYS[5]) == 0 then
  redis.call('SADD', KEYS[4], ARGV[7])
  redis.call('SET', KEYS[5], '1', 'PX', ARGV[8])
end
local old = 0
local raw = redis.call('HGET', KEYS[1], ARGV[1])
if raw then old = tonumber(cjson.decode(raw).n) end
local n = tonumber(ARGV[3])
if n > 0 then
  redis.call('HSET', KEYS[1], ARGV[1],
    cjson.encode({p = ARGV[5], u = ARGV[2], n = n, e = ARGV[4]}))
else
  redis.call('HDEL', KEYS[1], ARGV[1])
end
local before = tonumber(redis.call('HGET', KEYS[2], ARGV[2]) or '0')
local after = before + n - old
if after > 0 then
  redis.call('HSET', KEYS[2], ARGV[2], after)
  if n > old then redis.call('HSET', KEYS[3], ARGV[2], ARGV[6]) end
else
  redis.call('HDEL', KEYS[2], ARGV[2])
  redis.call('HDEL', KEYS[3], ARGV[2])
end
local version = 0
if (before > 0) ~= (after > 0) then version = advance(KEYS[7], ARGV[2]) end
return {before, after, version}
"""
)

# KEYS: instances, alive key, tombstone. ARGV: instance, ttl (ms).
# Returns {was alive, had been reaped}.
_HEARTBEAT = """
local alive = redis.call('EXISTS', KEYS[2])
redis.call('SADD', KEYS[1], ARGV[1])
redis.call('SET', KEYS[2], '1', 'PX', ARGV[2])
local reaped = redis.call('DEL', KEYS[3])
return {alive, reaped}
"""

# KEYS: instance hash. ARGV: prefix, entries (JSON list of {p, u, n, e, t}), full (0/1).
# Sets each entry's count (0 removes it) and raises its user's last-seen time to ``t``;
# with full, entries not listed are removed too. Returns the users that came online
# (flat: project, user, email, version, ...); those that went offline (connections that
# went without a USER_LEAVE) get a new version too.
_SYNC = (
    _ADVANCE
    + """
local prefix = ARGV[1]
local wanted = cjson.decode(ARGV[2])
local joined = {}
local function move(p, u, e, delta)
  local totals = prefix .. 'project:' .. p
  local before = tonumber(redis.call('HGET', totals, u) or '0')
  local after = before + delta
  if after > 0 then
    redis.call('HSET', totals, u, after)
    if before <= 0 then
      local version = advance(prefix .. 'version:' .. p, u)
      table.insert(joined, p); table.insert(joined, u); table.insert(joined, e)
      table.insert(joined, version)
    end
  else
    redis.call('HDEL', totals, u)
    redis.call('HDEL', prefix .. 'seen:' .. p, u)
    if before > 0 then advance(prefix .. 'version:' .. p, u) end
  end
end
local listed = {}
for _, w in ipairs(wanted) do
  local field = w.p .. ':' .. w.u
  listed[field] = true
  local old = 0
  local raw = redis.call('HGET', KEYS[1], field)
  if raw then old = tonumber(cjson.decode(raw).n) end
  local n = tonumber(w.n)
  if n > 0 then
    redis.call('HSET', KEYS[1], field, cjson.encode({p = w.p, u = w.u, n = n, e = w.e}))
  else
    redis.call('HDEL', KEYS[1], field)
  end
  if n ~= old then move(w.p, w.u, w.e, n - old) end
  if n > 0 then
    local seen = prefix .. 'seen:' .. w.p
    local t = tonumber(w.t)
    if t > tonumber(redis.call('HGET', seen, w.u) or '0') then
      redis.call('HSET', seen, w.u, t)
    end
  end
end
if ARGV[3] == '1' then
  local stored = redis.call('HGETALL', KEYS[1])
  for i = 1, #stored, 2 do
    if not listed[stored[i]] then
      local entry = cjson.decode(stored[i + 1])
      redis.call('HDEL', KEYS[1], stored[i])
      move(entry.p, entry.u, entry.e, -tonumber(entry.n))
    end
  end
end
return joined
"""
)

# KEYS: instances. ARGV: prefix, tombstone ttl (ms).
# Claims every instance whose alive key is gone: takes its entries off the totals, and
# returns the users now online nowhere (flat: project, user, email, version, ...).
_REAP = (
    _ADVANCE
    + """
local prefix = ARGV[1]
local left = {}
for _, instance in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if redis.call('EXISTS', prefix .. 'alive:' .. instance) == 0 then
    redis.call('SREM', KEYS[1], instance)
    local key = prefix .. 'instance:' .. instance
    local stored = redis.call('HGETALL', key)
    for i = 2, #stored, 2 do
      local entry = cjson.decode(stored[i])
      local totals = prefix .. 'project:' .. entry.p
      local after = tonumber(redis.call('HGET', totals, entry.u) or '0') - tonumber(entry.n)
      if after > 0 then
        redis.call('HSET', totals, entry.u, after)
      else
        redis.call('HDEL', totals, entry.u)
        redis.call('HDEL', prefix .. 'seen:' .. entry.p, entry.u)
        local version = advance(prefix .. 'version:' .. entry.p, entry.u)
        table.insert(left, entry.p); table.insert(left, entry.u); table.insert(left, entry.e)
        table.insert(left, version)
      end
    end
    redis.call('DEL', key)
    redis.call('SET', prefix .. 'reaped:' .. instance, '1', 'PX', ARGV[2])
  end
end
return left
"""
)


@dataclass(frozen=True, slots=True)
class Totals:
    """A user's connections on every instance together, before and after a change, and
    the user's version after it if it was a transition (else 0)."""

    before: int
    after: int
    version: int = 0

    @property
    def came_online(self) -> bool:
        return self.before <= 0 < self.after

    @property
    def went_offline(self) -> bool:
        return self.before > 0 >= self.after


@dataclass(frozen=True, slots=True)
class Entry:
    """One instance's connections of a user to a project (``count`` 0: none any more);
    ``seen_ms`` is when the user was last active there (epoch ms)."""

    project_id: uuid.UUID
    user_id: uuid.UUID
    count: int
    email: str
    seen_ms: int


@dataclass(frozen=True, slots=True)
class Member:
    """A user of a project as the cluster sees it."""

    user_id: uuid.UUID
    connections: int
    seen_ms: int


@dataclass(frozen=True, slots=True)
class Someone:
    """A user that came online or went offline in a project (for its USER_JOIN/LEAVE),
    and the version of that transition."""

    project_id: uuid.UUID
    user_id: uuid.UUID
    email: str
    version: int


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """What a heartbeat found: whether the instance was still alive (its entries are in
    Redis as it left them) and whether another process had reaped it meanwhile."""

    was_alive: bool
    was_reaped: bool


def _key(*parts: object) -> str:
    return PREFIX + ":".join(str(p) for p in parts)


def _people(flat: Sequence[Any]) -> list[Someone]:
    """``[project, user, email, version, ...]`` from a script as ``Someone``s."""
    values = [v.decode() if isinstance(v, bytes) else str(v) for v in flat]
    return [
        Someone(uuid.UUID(values[i]), uuid.UUID(values[i + 1]), values[i + 2], int(values[i + 3]))
        for i in range(0, len(values) - 3, 4)
    ]


class PresenceStore:
    """The presence keys of one instance (``instance``) in ``redis``.

    Every method raises ``RedisUnavailable`` when Redis cannot be used.
    """

    def __init__(
        self,
        redis: Redis,
        instance: str,
        *,
        ttl_ms: int = 8000,
        floor: FloorSource = _no_floor,
    ) -> None:
        """``ttl_ms``: how long the instance lives without a heartbeat, when a write
        revives it after it was reaped (``set_count``). ``floor``: the newest version
        stored for good, read when Redis has no floor for its run (see the module)."""
        self.redis = redis
        self.instance = instance
        self._ttl_ms = ttl_ms
        self._floor = floor
        self._hash = _key("instance", instance)
        self._scripts: dict[str, Any] = {}

    def _script(self, client: Any, source: str) -> Any:
        # A Script object sends EVALSHA and loads the source when Redis lacks it (after a
        # restart); one per source and client.
        script = self._scripts.get(source)
        if script is None or script.registered_client is not client:
            script = self._scripts[source] = client.register_script(source)
        return script

    async def _run(self, source: str, keys: Sequence[str], args: Sequence[object]) -> Any:
        async def run() -> Any:
            return await self.redis.call(
                lambda client: self._script(client, source)(keys=list(keys), args=list(args))
            )

        try:
            return await run()
        except redis.exceptions.ResponseError as error:
            if not str(error).startswith(_NO_FLOOR):
                raise
        await self.raise_floor()
        try:
            return await run()
        except redis.exceptions.ResponseError as error:
            if not str(error).startswith(_NO_FLOOR):
                raise
            # Lost again at once (another failover): try later, as for any outage.
            raise RedisUnavailable("redis lost the presence versions' floor again") from error

    async def raise_floor(self) -> int:
        """Set Redis's floor for its current run from ``floor`` (kept if Redis's is
        higher); the floor in force. Raises RedisUnavailable (also when ``floor`` raises
        DatabaseUnavailable)."""
        try:
            lowest = await self._floor()
        except DatabaseUnavailable as error:  # presence waits for both, as for Redis alone
            raise RedisUnavailable(f"no floor for presence versions: {error}") from error
        return int(await self._run(_SET_FLOOR, [], [lowest]))

    async def set_count(self, entry: Entry) -> Totals:
        """Set this instance's count of ``entry``'s user in its project (0 removes it);
        the user's totals before and after, decided atomically, with the version of the
        transition if it was one."""
        project, user = entry.project_id, entry.user_id
        before, after, version = await self._run(
            _SET_COUNT,
            [
                self._hash,
                _key("project", project),
                _key("seen", project),
                _key("instances"),
                _key("alive", self.instance),
                _key("reaped", self.instance),
                _key("version", project),
            ],
            [
                f"{project}:{user}",
                str(user),
                entry.count,
                entry.email,
                str(project),
                entry.seen_ms,
                self.instance,
                self._ttl_ms,
            ],
        )
        return Totals(int(before), int(after), int(version))

    async def heartbeat(self, ttl_ms: int) -> Heartbeat:
        """Mark the instance alive for ``ttl_ms`` more (registering it if needed)."""
        alive, reaped = await self._run(
            _HEARTBEAT,
            [_key("instances"), _key("alive", self.instance), _key("reaped", self.instance)],
            [self.instance, ttl_ms],
        )
        return Heartbeat(bool(alive), bool(reaped))

    async def sync(self, entries: Sequence[Entry], *, full: bool) -> list[Someone]:
        """Write ``entries`` as this instance's counts (and raise their last-seen times);
        with ``full``, they are all of them (any other entry is removed). Returns the
        users that came online through it."""
        wanted = [
            {
                "p": str(e.project_id),
                "u": str(e.user_id),
                "n": e.count,
                "e": e.email,
                "t": e.seen_ms,
            }
            for e in entries
        ]
        flat = await self._run(
            _SYNC,
            [self._hash],
            [PREFIX, orjson.dumps(wanted).decode(), "1" if full else "0"],
        )
        return _people(flat)

    async def reap(self) -> list[Someone]:
        """Claim every instance whose heartbeat stopped (its TTL ran out): its entries
        leave the totals, and the users online nowhere any more are returned, to this
        caller alone."""
        flat = await self._run(_REAP, [_key("instances")], [PREFIX, _TOMBSTONE_MS])
        return _people(flat)

    async def members(self, project_id: uuid.UUID) -> list[Member]:
        """Who is connected to ``project_id`` on any instance, with their connections
        and when they were last seen."""

        async def read(client: Any) -> tuple[dict[bytes, bytes], dict[bytes, bytes]]:
            async with client.pipeline(transaction=True) as pipe:
                pipe.hgetall(_key("project", project_id))
                pipe.hgetall(_key("seen", project_id))
                totals, seen = await pipe.execute()
            return totals, seen

        totals, seen = await self.redis.call(read)
        return [
            Member(uuid.UUID(user.decode()), int(count), int(seen.get(user, b"0")))
            for user, count in totals.items()
            if int(count) > 0
        ]
