"""Redis commands written and read by hand on one pooled redis-py connection.

Written against redis-py 8.2.0 (``redis.asyncio``). Why: the bridge (``atrium.actors.bridge``)
publishes many small messages, most of them lossy (cursor moves, job progress). Through
redis-py's API each ``PUBLISH`` is a round trip whose answer must be read (a pipeline
still reads every answer); here a batch is packed and written in one write, and the lossy
ones are each preceded by ``CLIENT REPLY SKIP`` so Redis sends nothing back for them, which
redis-py's API cannot express (it would wait for the answer that never comes).

Relies on (checked by tests/test_seams.py): ``client.connection_pool`` with
``async get_connection()`` (no arguments) and ``async release(connection)``; a connection's
``pack_commands(commands)`` (RESP bytes for a list of argument tuples),
``async send_packed_command(data, check_health=...)``, ``async read_response()`` (raising
``redis.exceptions.ResponseError`` for an error reply) and ``async disconnect(nowait=...)``.
Runs on the asyncio side (inside ``Redis.call``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import redis.asyncio
import redis.exceptions

Publish = tuple[str, bytes, bool]  # channel, data, and whether Redis must confirm it
_SKIP_REPLY = ("CLIENT", "REPLY", "SKIP")


async def replies_can_be_skipped(client: redis.asyncio.Redis) -> bool:
    """Whether Redis, for this user, lets a connection skip the reply to a command
    (``CLIENT REPLY SKIP``); managed services and ACLs may refuse CLIENT commands. Runs
    on the asyncio side.

    Sends ``CLIENT REPLY SKIP``, ``PING``, ``PING``: one answer when skipping works (the
    first PING's is skipped, and CLIENT REPLY itself never answers), an error and two
    answers when it is refused.
    """
    async with _pooled(client) as connection:
        await _send_commands(connection, [_SKIP_REPLY, ("PING",), ("PING",)])
        try:
            await connection.read_response()
        except redis.exceptions.ResponseError:
            await connection.read_response()
            await connection.read_response()
            return False
        return True


async def publish_all(
    messages: list[Publish], skip_replies: bool, client: redis.asyncio.Redis
) -> None:
    """Publish in one write, in order, on one connection of the pool (runs on the asyncio
    side); with ``skip_replies``, wait for Redis's answer to the messages to confirm only
    (else to every one).

    The others (cursor moves, job progress: lossy by design, and most of the traffic) are
    each preceded by ``CLIENT REPLY SKIP``, so Redis sends nothing back for them. Reading
    an answer cost a wake-up of the socket poller and of this task: waiting for one per
    cursor move made publishing it cost twice as much CPU. Events and "the log reached
    seq N" still wait: a failure must be known, to announce them later (``_unsent``).
    """
    commands: list[tuple[str | bytes, ...]] = []
    answers = 0
    for channel, data, confirm in messages:
        if confirm or not skip_replies:
            answers += 1
        else:
            commands.append(_SKIP_REPLY)
        commands.append(("PUBLISH", channel, data))
    async with _pooled(client) as connection:
        await _send_commands(connection, commands)
        for _ in range(answers):
            await connection.read_response()


@asynccontextmanager
async def _pooled(client: redis.asyncio.Redis) -> AsyncIterator[Any]:
    """One connection of ``client``'s pool for commands written and answers read by hand
    (on the asyncio side). One left half written or with answers unread (cancelled,
    failed) is closed, never lent out again."""
    pool: Any = client.connection_pool  # redis-py leaves it untyped
    connection = await pool.get_connection()
    try:
        yield connection
    except BaseException:
        await connection.disconnect(nowait=True)
        raise
    finally:
        await pool.release(connection)


async def _send_commands(connection: Any, commands: list[tuple[str | bytes, ...]]) -> None:
    """Write ``commands`` in one write, answers unread."""
    await connection.send_packed_command(connection.pack_commands(commands), check_health=False)
