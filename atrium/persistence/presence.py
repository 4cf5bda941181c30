"""Cluster presence in Redis: who is connected to which project, on every process.

Each process (an *instance*, named by a random id per start) writes its own entries: one
per (project, user) it holds connections of, with that count and the user's email. The
keys (all under ``atrium:presence:``)::

    instances              set: every instance that has heartbeated and was not reaped
    alive:{instance}       "1" with a TTL, set again by each heartbeat: the instance lives
    instance:{instance}    hash "{project}:{user}" -> {"p", "u", "n", "e"} (JSON)
    gen:{instance}         how many writes of its entries the instance has made
    changes:{instance}     sorted set: each field of its hash (also one since removed) by
                           the generation that last changed it
    pruned:{instance}      the generation below which ``changes`` no longer tells (older
                           changes dropped, or a rewrite of everything)
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

Redis may lose any of this (a restart without persistence, FLUSHALL, a failover to a
replica that missed the last writes). An instance's *generation* tells: every write of an
instance's entries names the generation it last wrote (and how many writes since it does
not know the outcome of: ``_Written``), and a write that finds a generation the instance
cannot have written changes nothing (``set_counts`` returns None, ``sync`` too unless
``full``): the
instance must re-assert all its entries first (a ``full`` sync), and only then trust the
totals it is given. Other instances keep their own copy of everyone's entries with their
generation (``view``: what changed since the generation they hold, read from ``changes``,
so a heartbeat in a join storm reads the entries that changed, not all of them); one that
finds an instance's generation gone or gone back without
a reap can put that copy back (``restore``) with a TTL, so an instance that died before it
could re-assert is reaped like any other.

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
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import orjson
import redis.exceptions

from .database import DatabaseUnavailable
from .redis import Redis, RedisUnavailable

PREFIX = "atrium:presence:"
_TOMBSTONE_MS = 3_600_000  # how long "reaped" is remembered for a heartbeat to find
# How many generations of an instance's changes Redis keeps for the others' ``view``: they
# read at every heartbeat, many fewer generations apart than this even in a join storm.
_CHANGES_KEPT = 10_000
_FLOOR_KEY = PREFIX + "floor"
_NO_FLOOR = "NOFLOOR"

T = TypeVar("T")

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

# KEYS: instance hash, generation, changes. ARGV: prefix, generation last written, writes
# since whose outcome is unknown, entries (JSON list of {p, u, n, e, t}: project, user,
# count, email, now in ms as a string).
# Sets this instance's count of each entry's user in its project, in order; returns {1,
# the new generation, {{the user's total before, after, the user's new version if it was
# a transition (else 0)}, ...}}, or {0} without changing anything when Redis does not
# hold a generation this instance may have written (Redis lost its writes, or it was
# reaped: re-assert everything).
# One generation for the lot: they are written together or not at all.
_SET_COUNTS = (
    _ADVANCE
    + """
local held = tonumber(redis.call('GET', KEYS[2]) or '0')
local written = tonumber(ARGV[2])
if held < written or held > written + tonumber(ARGV[3]) then return {0} end
local generation = held + 1
redis.call('SET', KEYS[2], generation)
local prefix = ARGV[1]
local answers = {}
for _, w in ipairs(cjson.decode(ARGV[4])) do
  local field = w.p .. ':' .. w.u
  local totals, seen = prefix .. 'project:' .. w.p, prefix .. 'seen:' .. w.p
  local old = 0
  local raw = redis.call('HGET', KEYS[1], field)
  if raw then old = tonumber(cjson.decode(raw).n) end
  local n = tonumber(w.n)
  if n > 0 then
    redis.call('HSET', KEYS[1], field, cjson.encode({p = w.p, u = w.u, n = n, e = w.e}))
  else
    redis.call('HDEL', KEYS[1], field)
  end
  redis.call('ZADD', KEYS[3], generation, field)
  local before = tonumber(redis.call('HGET', totals, w.u) or '0')
  local after = before + n - old
  if after > 0 then
    redis.call('HSET', totals, w.u, after)
    if n > old then redis.call('HSET', seen, w.u, w.t) end
  else
    redis.call('HDEL', totals, w.u)
    redis.call('HDEL', seen, w.u)
  end
  local version = 0
  if (before > 0) ~= (after > 0) then version = advance(prefix .. 'version:' .. w.p, w.u) end
  table.insert(answers, {before, after, version})
end
return {1, generation, answers}
"""
)

# KEYS: instances, alive key, tombstone, generation, changes, pruned. ARGV: instance, ttl
# (ms), how many generations of changes to keep.
# Returns {was alive, had been reaped, generation held}. Drops the changes older than the
# generations kept (a reader that far behind reads all the entries).
_HEARTBEAT = """
local alive = redis.call('EXISTS', KEYS[2])
redis.call('SADD', KEYS[1], ARGV[1])
redis.call('SET', KEYS[2], '1', 'PX', ARGV[2])
local reaped = redis.call('DEL', KEYS[3])
local generation = tonumber(redis.call('GET', KEYS[4]) or '0')
local horizon = generation - tonumber(ARGV[3])
if horizon > tonumber(redis.call('GET', KEYS[6]) or '0') then
  redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', horizon)
  redis.call('SET', KEYS[6], horizon)
end
return {alive, reaped, generation}
"""

# KEYS: instance hash, generation, changes, pruned. ARGV: prefix, entries (JSON list of
# {p, u, n, e, t}), full (0/1), generation last written, writes since whose outcome is
# unknown.
# Sets each entry's count (0 removes it) and raises its user's last-seen time to ``t``;
# with full, entries not listed are removed too. Returns {1, the new generation, the
# users that came online (flat: project, user, email, version, ...)}; those that went
# offline (connections that went without a USER_LEAVE) get a new version too. Not full,
# it changes nothing and returns {0} when Redis does not hold a generation this instance
# may have written.
_SYNC = (
    _ADVANCE
    + """
local held = tonumber(redis.call('GET', KEYS[2]) or '0')
local written = tonumber(ARGV[4])
local full = ARGV[3] == '1'
if not full and (held < written or held > written + tonumber(ARGV[5])) then return {0} end
local generation = math.max(held, written) + 1
redis.call('SET', KEYS[2], generation)
if full then
  -- A rewrite of everything (often after Redis lost them): readers read everything.
  redis.call('DEL', KEYS[3])
  redis.call('SET', KEYS[4], generation)
end
local function changed(field)
  if not full then redis.call('ZADD', KEYS[3], generation, field) end
end
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
    local entry = cjson.encode({p = w.p, u = w.u, n = n, e = w.e})
    if entry ~= raw then
      redis.call('HSET', KEYS[1], field, entry)
      changed(field)
    end
  elseif raw then
    redis.call('HDEL', KEYS[1], field)
    changed(field)
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
if full then
  local stored = redis.call('HGETALL', KEYS[1])
  for i = 1, #stored, 2 do
    if not listed[stored[i]] then
      local entry = cjson.decode(stored[i + 1])
      redis.call('HDEL', KEYS[1], stored[i])
      move(entry.p, entry.u, entry.e, -tonumber(entry.n))
    end
  end
end
return {1, generation, joined}
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
    redis.call('DEL', prefix .. 'gen:' .. instance)
    redis.call('DEL', prefix .. 'changes:' .. instance, prefix .. 'pruned:' .. instance)
    redis.call('SET', prefix .. 'reaped:' .. instance, '1', 'PX', ARGV[2])
  end
end
return left
"""
)


# KEYS: instances. ARGV: prefix, this instance, JSON {instance: generation} of the copies
# the caller holds. Returns {changed, lost, gone}: changed lists {instance, generation,
# whole (0/1), entries (flat: field, raw JSON or nil if it went, ...)} of every other
# registered instance whose generation is not the caller's (newer, or not held): whole,
# all its entries; else those that changed after the caller's generation. lost lists the
# held instances whose generation in Redis went back or is gone without a reap (Redis
# lost their writes); gone those reaped.
_VIEW = """
local prefix, own = ARGV[1], ARGV[2]
local known = cjson.decode(ARGV[3])
local changed, lost, gone, listed = {}, {}, {}, {}
for _, instance in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if instance ~= own then
    listed[instance] = true
    local generation = tonumber(redis.call('GET', prefix .. 'gen:' .. instance) or '0')
    local was = known[instance]
    local key = prefix .. 'instance:' .. instance
    if was == nil or generation > was then
      local pruned = tonumber(redis.call('GET', prefix .. 'pruned:' .. instance) or '0')
      if was ~= nil and was >= pruned then
        local fields = redis.call(
          'ZRANGEBYSCORE', prefix .. 'changes:' .. instance, '(' .. was, '+inf')
        local entries = {}
        for i = 1, #fields, 1000 do
          local last = math.min(i + 999, #fields)
          local values = redis.call('HMGET', key, unpack(fields, i, last))
          for j = i, last do
            table.insert(entries, fields[j]); table.insert(entries, values[j - i + 1])
          end
        end
        table.insert(changed, {instance, generation, 0, entries})
      else
        table.insert(changed, {instance, generation, 1, redis.call('HGETALL', key)})
      end
    elseif generation < was then
      table.insert(lost, instance)
    end
  end
end
for instance, _ in pairs(known) do
  if not listed[instance] then
    if redis.call('EXISTS', prefix .. 'reaped:' .. instance) == 1 then
      table.insert(gone, instance)
    else
      table.insert(lost, instance)
    end
  end
end
return {changed, lost, gone}
"""

# ARGV: prefix, instance, generation, ttl (ms), now (ms), entries (raw JSON, one each).
# Puts back another instance's entries as a survivor last saw them, unless it was reaped
# or Redis holds that generation or a newer one (the instance re-asserted itself): its
# current entries leave the totals, the copy's join them, its generation is the copy's,
# it is registered, and alive for ``ttl`` unless it is already. No transition, no version:
# the log already says these users are online. Returns 1 if it restored.
_RESTORE = """
local prefix, instance, generation = ARGV[1], ARGV[2], tonumber(ARGV[3])
if redis.call('EXISTS', prefix .. 'reaped:' .. instance) == 1 then return 0 end
if tonumber(redis.call('GET', prefix .. 'gen:' .. instance) or '0') >= generation then
  return 0
end
local key = prefix .. 'instance:' .. instance
local function add(entry, sign)
  local totals = prefix .. 'project:' .. entry.p
  local after = tonumber(redis.call('HGET', totals, entry.u) or '0') + sign * tonumber(entry.n)
  if after > 0 then
    redis.call('HSET', totals, entry.u, after)
  else
    redis.call('HDEL', totals, entry.u)
    redis.call('HDEL', prefix .. 'seen:' .. entry.p, entry.u)
  end
end
for _, raw in ipairs(redis.call('HVALS', key)) do add(cjson.decode(raw), -1) end
redis.call('DEL', key)
for i = 6, #ARGV do
  local entry = cjson.decode(ARGV[i])
  redis.call('HSET', key, entry.p .. ':' .. entry.u, ARGV[i])
  add(entry, 1)
  redis.call('HSETNX', prefix .. 'seen:' .. entry.p, entry.u, ARGV[5])
end
redis.call('SET', prefix .. 'gen:' .. instance, generation)
redis.call('DEL', prefix .. 'changes:' .. instance)
redis.call('SET', prefix .. 'pruned:' .. instance, generation)
redis.call('SADD', prefix .. 'instances', instance)
redis.call('SET', prefix .. 'alive:' .. instance, '1', 'PX', ARGV[4], 'NX')
return 1
"""


# ARGV: prefix, JSON {instance: generation} of the copies the caller holds, projects.
# Returns {{{totals (flat), seen (flat)}, ...}, lost}: for each project, its users on every
# instance together and when each was last seen; and the held instances whose generation
# Redis lost (gone back, or gone without a reap) and nobody has put back.
_ROSTERS = """
local prefix = ARGV[1]
local lost = {}
for instance, generation in pairs(cjson.decode(ARGV[2])) do
  local held = tonumber(redis.call('GET', prefix .. 'gen:' .. instance) or '0')
  if held < generation and redis.call('EXISTS', prefix .. 'reaped:' .. instance) == 0 then
    table.insert(lost, instance)
  end
end
local rosters = {}
for i = 3, #ARGV do
  table.insert(rosters, {redis.call('HGETALL', prefix .. 'project:' .. ARGV[i]),
    redis.call('HGETALL', prefix .. 'seen:' .. ARGV[i])})
end
return {rosters, lost}
"""


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
    """What a heartbeat found: whether the instance was still alive, whether another
    process had reaped it meanwhile, and whether Redis holds the generation it last wrote
    (``current``: its entries are in Redis as it left them)."""

    was_alive: bool
    was_reaped: bool
    current: bool = True


@dataclass(frozen=True, slots=True)
class Copy:
    """Another instance's entries (raw JSON, as Redis holds them) at a generation."""

    generation: int
    entries: Mapping[str, bytes]  # its hash: "{project}:{user}" -> raw JSON


@dataclass(frozen=True, slots=True)
class Roster:
    """A project's users as Redis holds them, and the instances whose entries Redis lost
    (of those the caller holds a copy of; see ``_ROSTERS``)."""

    members: list[Member]
    lost: list[str]


@dataclass(frozen=True, slots=True)
class View:
    """What ``view`` found of the other instances (see ``_VIEW``)."""

    changed: dict[str, Copy]
    lost: list[str]
    gone: list[str]


def _key(*parts: object) -> str:
    return PREFIX + ":".join(str(p) for p in parts)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _people(flat: Sequence[Any]) -> list[Someone]:
    """``[project, user, email, version, ...]`` from a script as ``Someone``s."""
    values = [v.decode() if isinstance(v, bytes) else str(v) for v in flat]
    return [
        Someone(uuid.UUID(values[i]), uuid.UUID(values[i + 1]), values[i + 2], int(values[i + 3]))
        for i in range(0, len(values) - 3, 4)
    ]


class _Written:
    """The generation an instance last wrote (shared by its stores), and how many writes
    it made since whose outcome it does not know (a call that timed out or lost its
    connection may or may not have run): Redis may hold any generation from
    ``generation`` to ``generation + unsure``, as only the instance itself writes its
    generation forward. Trusting that range, rather than rewriting everything after
    every such call, keeps a loaded process (whose short calls time out now and then)
    from rewriting tens of thousands of entries, which every other process then reads
    whole."""

    __slots__ = ("generation", "unsure")

    def __init__(self) -> None:
        self.generation = 0
        self.unsure = 0

    def holds(self, generation: int) -> bool:
        """Redis's ``generation`` is one this instance may have written last."""
        return self.generation <= generation <= self.generation + self.unsure

    def wrote(self, generation: int) -> None:
        self.generation, self.unsure = generation, 0

    async def outcome(self, write: Awaitable[T]) -> T:
        """``write``'s answer; counted as unsure if it raises RedisUnavailable."""
        try:
            return await write
        except RedisUnavailable:
            self.unsure += 1
            raise


class PresenceStore:
    """The presence keys of one instance (``instance``) in ``redis``.

    Every method raises ``RedisUnavailable`` when Redis cannot be used.
    """

    def __init__(
        self,
        redis: Redis,
        instance: str,
        *,
        floor: FloorSource = _no_floor,
        _written: _Written | None = None,
    ) -> None:
        """``floor``: the newest version stored for good, read when Redis has no floor
        for its run (see the module)."""
        self.redis = redis
        self.instance = instance
        self._floor = floor
        self._written = _Written() if _written is None else _written
        self._hash = _key("instance", instance)
        self._generation = _key("gen", instance)
        self._changes = _key("changes", instance)
        self._pruned = _key("pruned", instance)
        self._scripts: dict[str, Any] = {}

    def answering_within(self, timeout: float) -> PresenceStore:
        """The same instance's store (same generation) with calls bounded by ``timeout``."""
        return PresenceStore(
            self.redis.answering_within(timeout),
            self.instance,
            floor=self._floor,
            _written=self._written,
        )

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

    async def set_counts(self, entries: Sequence[Entry]) -> list[Totals] | None:
        """Set this instance's count of each entry's user in its project (0 removes it),
        in order, in one step; each user's totals before and after, decided atomically,
        with the version of the transition if it was one. None, changing nothing, when
        Redis does not hold what this instance last wrote (its totals cannot be trusted):
        ``sync`` everything (``full``) first."""
        written = self._written
        wanted = [
            {
                "p": str(e.project_id),
                "u": str(e.user_id),
                "n": e.count,
                "e": e.email,
                "t": str(e.seen_ms),
            }
            for e in entries
        ]
        answer = await written.outcome(
            self._run(
                _SET_COUNTS,
                [self._hash, self._generation, self._changes],
                [PREFIX, written.generation, written.unsure, orjson.dumps(wanted).decode()],
            )
        )
        if not int(answer[0]):
            return None
        written.wrote(int(answer[1]))
        return [
            Totals(int(before), int(after), int(version)) for before, after, version in answer[2]
        ]

    async def heartbeat(self, ttl_ms: int) -> Heartbeat:
        """Mark the instance alive for ``ttl_ms`` more (registering it if needed)."""
        alive, reaped, generation = await self._run(
            _HEARTBEAT,
            [
                _key("instances"),
                _key("alive", self.instance),
                _key("reaped", self.instance),
                self._generation,
                self._changes,
                self._pruned,
            ],
            [self.instance, ttl_ms, _CHANGES_KEPT],
        )
        return Heartbeat(bool(alive), bool(reaped), self._written.holds(int(generation)))

    async def sync(self, entries: Sequence[Entry], *, full: bool) -> list[Someone] | None:
        """Write ``entries`` as this instance's counts (and raise their last-seen times);
        with ``full``, they are all of them (any other entry is removed). Returns the
        users that came online through it; not ``full``, None (changing nothing) when
        Redis does not hold what this instance last wrote."""
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
        written = self._written
        answer = await written.outcome(
            self._run(
                _SYNC,
                [self._hash, self._generation, self._changes, self._pruned],
                [
                    PREFIX,
                    orjson.dumps(wanted).decode(),
                    "1" if full else "0",
                    written.generation,
                    written.unsure,
                ],
            )
        )
        if not int(answer[0]):
            return None
        written.wrote(int(answer[1]))
        return _people(answer[2])

    async def view(self, held: Mapping[str, Copy]) -> View:
        """The other instances' entries whose generation is not in ``held`` (the caller's
        copies, by instance): each ``held`` one brought up to date with what changed since
        its generation, the others read whole; and which held ones Redis lost or reaped."""
        generations = {instance: copy.generation for instance, copy in held.items()}
        changed, lost, gone = await self._run(
            _VIEW,
            [_key("instances")],
            [PREFIX, self.instance, orjson.dumps(generations).decode() if generations else "{}"],
        )
        copies = {}
        for raw_instance, generation, whole, flat in changed:
            instance = _text(raw_instance)
            entries = {} if int(whole) else dict(held[instance].entries)
            for i in range(0, len(flat) - 1, 2):
                field, entry = _text(flat[i]), flat[i + 1]
                if entry is None:
                    entries.pop(field, None)
                else:
                    entries[field] = entry
            copies[instance] = Copy(int(generation), entries)
        return View(copies, [_text(i) for i in lost], [_text(i) for i in gone])

    async def restore(self, instance: str, copy: Copy, *, ttl_ms: int, now_ms: int) -> bool:
        """Put ``copy`` back as ``instance``'s entries, alive for ``ttl_ms`` unless it is,
        if it was not reaped and Redis holds an older generation of it (see
        ``_RESTORE``). True if it did."""
        restored = await self._run(
            _RESTORE,
            [],
            [PREFIX, instance, copy.generation, ttl_ms, now_ms, *copy.entries.values()],
        )
        return bool(restored)

    async def reap(self) -> list[Someone]:
        """Claim every instance whose heartbeat stopped (its TTL ran out): its entries
        leave the totals, and the users online nowhere any more are returned, to this
        caller alone."""
        flat = await self._run(_REAP, [_key("instances")], [PREFIX, _TOMBSTONE_MS])
        return _people(flat)

    async def members(self, project_id: uuid.UUID) -> list[Member]:
        """Who is connected to ``project_id`` on any instance, with their connections
        and when they were last seen."""
        return (await self.rosters([project_id], {}))[0].members

    async def rosters(
        self, project_ids: Sequence[uuid.UUID], held: Mapping[str, int]
    ) -> list[Roster]:
        """For each of ``project_ids``, in one step: its ``members`` and which of the
        instances in ``held`` (instance -> generation of the caller's copy) Redis lost the
        entries of without anyone putting them back: their users are missing from the
        members until those instances re-assert or a copy is restored."""
        rosters, lost = await self._run(
            _ROSTERS,
            [],
            [PREFIX, orjson.dumps(held).decode() if held else "{}", *map(str, project_ids)],
        )
        missing = [_text(instance) for instance in lost]
        return [_roster(totals, seen, missing) for totals, seen in rosters]


def _roster(totals: Sequence[Any], seen: Sequence[Any], lost: list[str]) -> Roster:
    """A ``Roster`` from a project's totals and last-seen hashes (flat, as HGETALL gives)."""
    last_seen = {_text(seen[i]): int(seen[i + 1]) for i in range(0, len(seen) - 1, 2)}
    members = []
    for i in range(0, len(totals) - 1, 2):
        user, count = _text(totals[i]), int(totals[i + 1])
        if count > 0:
            members.append(Member(uuid.UUID(user), count, last_seen.get(user, 0)))
    return Roster(members, lost)
