"""Join storms share round trips: the membership checks and the USER_JOINs of the joins
waiting at one moment go to PostgreSQL together (persistence/batching.py), and each join
still gets its own answer: a removed member alone is refused, a database error closes
each join of its batch with 1013 and leaves nothing hanging.

Real server, real trio-websocket clients on the dedicated listener, real PostgreSQL.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import asyncpg
import trio
import trio_asyncio
from conftest import Running, StartServer
from test_workspace import Member, make_member, project_with
from trio_websocket import ConnectionClosed
from wsclient import connect

from atrium.core.events import EventType, NewEvent
from atrium.core.projects import ProjectNotFound
from atrium.core.roles import Role
from atrium.persistence import events as store
from atrium.persistence import projects
from atrium.persistence.batching import Batcher, BatchUnanswered
from atrium.persistence.database import Database, DatabaseUnavailable


def listener_url(server: Running, project_id: str) -> str:
    return f"ws://127.0.0.1:{server.bound.ws_port}/ws/{project_id}"


def server_db(server: Running) -> Database:
    assert server.bound.services is not None
    db: Database = server.bound.services.value.db
    return db


async def join_outcome(server: Running, project_id: str, member: Member) -> Any:
    """What a join came to: its PRESENCE_STATE, or the close code and reason."""
    async with connect(listener_url(server, project_id), member.token) as client:
        try:
            return await client.recv()
        except ConnectionClosed:
            return await client.closed()


async def test_a_storm_across_projects_joins_everyone_with_gapless_logs(server: Running) -> None:
    """Twenty members of four projects (and one removed member among them) join at once:
    each gets its PRESENCE_STATE, the removed one alone is refused with 4004, and every
    project's log holds one USER_JOIN per member with consecutive seqs. The checks took
    fewer round trips than joins."""
    owners = [await make_member(server, f"owner{i}@example.com") for i in range(4)]
    members = [await make_member(server, f"m{i}@example.com") for i in range(16)]
    removed = await make_member(server, "removed@example.com")
    teams: dict[str, list[Member]] = {}
    for i, owner in enumerate(owners):
        mine = members[i * 4 : (i + 1) * 4]
        teams[await project_with(server.client, owner, *mine, *([removed] if i == 0 else []))] = [
            owner,
            *mine,
        ]
    first = next(iter(teams))
    r = await server.client.delete(
        f"/api/v1/projects/{first}/collaborators/{removed.user_id}", headers=owners[0].auth
    )
    assert r.status_code == 204, r.text
    db = server_db(server)
    checks = db.batcher(projects._session_member_roles)
    before = checks.batches

    outcomes: dict[str, Any] = {}

    async def join(project_id: str, member: Member) -> None:
        outcomes[member.email] = await join_outcome(server, project_id, member)

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            for project_id, team in teams.items():
                for member in team:
                    nursery.start_soon(join, project_id, member)
            nursery.start_soon(join, first, removed)

    assert outcomes.pop(removed.email) == (4004, "project_not_found")
    assert all(o["type"] == "PRESENCE_STATE" for o in outcomes.values()), outcomes
    assert checks.batches - before < 21
    for project_id, team in teams.items():
        r = await server.client.get(f"/api/v1/projects/{project_id}/events", headers=team[0].auth)
        events = r.json()["events"]
        joins = [e["actor_id"] for e in events if e["type"] == "USER_JOIN"]
        assert sorted(joins) == sorted(m.user_id for m in team)
        seqs = [e["seq"] for e in events]
        assert seqs == list(range(1, len(seqs) + 1))


async def terminate_lock_waiters(connection: asyncpg.Connection) -> int:
    """End every backend of this database waiting for a lock; how many there were."""
    ended: int = await trio_asyncio.aio_as_trio(connection.fetchval)(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
        " WHERE wait_event_type = 'Lock' AND datname = current_database()"
    )
    return ended


async def test_a_database_error_closes_the_batchs_joins_with_1013(
    start_server: StartServer, database_url: str
) -> None:
    """The membership checks are stuck behind a lock, and their connections to PostgreSQL
    are then cut: every join waiting in those batches is closed with 1013
    database_unavailable (none hangs), and joins succeed again once the database is
    back."""
    async with start_server() as server:
        owner = await make_member(server, "owner@example.com")
        members = [await make_member(server, f"m{i}@example.com") for i in range(5)]
        project_id = await project_with(server.client, owner, *members)
        lock = await trio_asyncio.aio_as_trio(asyncpg.connect)(database_url)
        outcomes: list[Any] = []
        try:
            await trio_asyncio.aio_as_trio(lock.execute)("BEGIN")
            await trio_asyncio.aio_as_trio(lock.execute)(
                "LOCK TABLE sessions IN ACCESS EXCLUSIVE MODE"
            )

            async def join(member: Member) -> None:
                outcomes.append(await join_outcome(server, project_id, member))

            with trio.fail_after(30):
                async with trio.open_nursery() as nursery:
                    for member in members:
                        nursery.start_soon(join, member)
                    while len(outcomes) < len(members):
                        # A stuck batch; cut it (the joins queued behind it go next).
                        if not await terminate_lock_waiters(lock):
                            await trio.to_thread.run_sync(time.sleep, 0.01)
        finally:
            await trio_asyncio.aio_as_trio(lock.execute)("ROLLBACK")
            await trio_asyncio.aio_as_trio(lock.close)()
        assert outcomes == [(1013, "database_unavailable")] * len(members)
        with trio.fail_after(10):
            state = await join_outcome(server, project_id, members[0])
        assert state["type"] == "PRESENCE_STATE"


# -- the batcher itself, on the real database -----------------------------------------------


async def test_checks_waiting_together_go_in_one_statement(db: Database) -> None:
    """While one check is out, the others wait and then go together; each gets the
    answer for its own (project, user, session), a removed member's among them."""
    owner = uuid.uuid4()
    users = [uuid.uuid4() for _ in range(6)]
    sessions = {u: uuid.uuid4() for u in [owner, *users]}
    project = uuid.uuid4()
    await db.execute(
        "INSERT INTO users (id, email, email_normalised, password_hash)"
        " SELECT u, u::text || '@example.com', u::text || '@example.com', 'x'"
        " FROM unnest($1::uuid[]) u",
        [owner, *users],
    )
    await db.execute(
        "INSERT INTO sessions (id, user_id) SELECT * FROM unnest($1::uuid[], $2::uuid[])",
        list(sessions.values()),
        list(sessions),
    )
    await db.execute(
        "INSERT INTO projects (id, name, owner_id) VALUES ($1, 'p', $2)", project, owner
    )
    await db.execute(
        "INSERT INTO project_members (project_id, user_id, role)"
        " SELECT $1, u, 'viewer' FROM unnest($2::uuid[]) u",
        project,
        users[1:],  # users[0] is not a member
    )
    await db.execute("UPDATE sessions SET revoked_at = now() WHERE id = $1", sessions[users[1]])
    checks = db.batcher(projects._session_member_roles)
    answers: dict[uuid.UUID, Any] = {}

    async def check(user: uuid.UUID) -> None:
        answers[user] = await projects.session_member_role(db, project, user, sessions[user])

    async with trio.open_nursery() as nursery:
        for user in users:
            nursery.start_soon(check, user)
    assert answers[users[0]] == (True, None)
    assert answers[users[1]] == (False, Role.VIEWER)
    assert all(answers[u] == (True, Role.VIEWER) for u in users[2:])
    assert checks.batches < len(users)


async def test_presence_of_several_projects_in_one_statement_keeps_seqs_gapless(
    db: Database,
) -> None:
    """USER_JOINs of several projects stored together: each project's seqs follow its
    own log; a deleted project's join alone fails with ProjectNotFound."""
    owner = uuid.uuid4()
    await db.execute(
        "INSERT INTO users (id, email, email_normalised, password_hash)"
        " VALUES ($1, 'o@example.com', 'o@example.com', 'x')",
        owner,
    )
    live = [uuid.uuid4() for _ in range(3)]
    gone = uuid.uuid4()
    for project in [*live, gone]:
        await db.execute(
            "INSERT INTO projects (id, name, owner_id) VALUES ($1, 'p', $2)", project, owner
        )
    await db.execute("UPDATE projects SET deleted_at = now() WHERE id = $1", gone)

    def joins(n: int) -> list[NewEvent]:
        return [NewEvent(EventType.USER_JOIN, owner, {"n": i}) for i in range(n)]

    await store.append_presence(db, live[0], joins(2), notify=False)  # seqs 1, 2
    results: dict[uuid.UUID, Any] = {}

    async def append(project: uuid.UUID, n: int) -> None:
        try:
            results[project] = await store.append_presence(db, project, joins(n), notify=False)
        except ProjectNotFound as error:
            results[project] = error

    async with trio.open_nursery() as nursery:
        for project, n in ((live[0], 1), (live[1], 3), (gone, 1), (live[2], 2)):
            nursery.start_soon(append, project, n)
    assert [e.seq for e in results[live[0]]] == [3]
    assert [e.seq for e in results[live[1]]] == [1, 2, 3]
    assert [e.payload["n"] for e in results[live[1]]] == [0, 1, 2]
    assert [e.seq for e in results[live[2]]] == [1, 2]
    assert isinstance(results[gone], ProjectNotFound)
    last = await db.fetch("SELECT id, last_seq FROM projects WHERE id = ANY($1)", live)
    assert {r["id"]: r["last_seq"] for r in last} == {live[0]: 3, live[1]: 3, live[2]: 2}


async def test_versioned_presence_of_several_projects_in_one_transaction(
    db: Database,
) -> None:
    """The cluster's versioned USER_JOINs of several projects stored together: a stale
    version (older than the one stored) is dropped for its project alone, the others get
    consecutive seqs, a deleted project's call alone fails, and those that ask are
    announced on the log channel."""
    owner = uuid.uuid4()
    await db.execute(
        "INSERT INTO users (id, email, email_normalised, password_hash)"
        " VALUES ($1, 'o@example.com', 'o@example.com', 'x')",
        owner,
    )
    a, b, gone = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    for project in (a, b, gone):
        await db.execute(
            "INSERT INTO projects (id, name, owner_id) VALUES ($1, 'p', $2)", project, owner
        )
    await db.execute("UPDATE projects SET deleted_at = now() WHERE id = $1", gone)

    def join(version: int) -> list[NewEvent]:
        return [NewEvent(EventType.USER_JOIN, owner, {}, presence_version=version)]

    await store.append_presence(db, a, join(10), notify=False)  # a's seq 1, version 10
    notified: list[str] = []
    heard = trio.Event()

    def hear(payload: str) -> None:
        notified.append(payload)
        heard.set()

    results: dict[uuid.UUID, Any] = {}

    async def append(project: uuid.UUID, version: int) -> None:
        try:
            results[project] = await store.append_presence(db, project, join(version), notify=True)
        except ProjectNotFound as error:
            results[project] = error

    async with db.listening(store.LOG_CHANNEL, hear):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(append, a, 9)  # stale: 10 is stored
            nursery.start_soon(append, b, 3)
            nursery.start_soon(append, gone, 4)
        with trio.fail_after(10):
            await heard.wait()
    assert results[a] == []
    assert [e.seq for e in results[b]] == [1]
    assert isinstance(results[gone], ProjectNotFound)
    assert notified == [f"{b}:1"]
    versions = await db.fetch("SELECT project_id, version FROM presence_versions")
    assert {r["project_id"]: r["version"] for r in versions} == {a: 10, b: 3}


async def test_a_cancelled_sender_still_answers_its_batch() -> None:
    """The caller whose batch is out is cancelled: the batch still returns and answers
    the others in it (it may carry their writes: it is never sent twice), the calls that
    waited go in the next batch, and the cancelled caller raises Cancelled. An error
    fails every call of its batch, each with its own copy."""
    hold = trio.Event()
    seen: list[list[int]] = []

    async def run(keys: Any) -> list[int]:
        seen.append(list(keys))
        if 0 in keys:
            await hold.wait()
        if 99 in keys:
            raise DatabaseUnavailable("gone")
        return [k * 10 for k in keys]

    batcher: Batcher[int, int] = Batcher(run)
    results: dict[int, Any] = {}

    async def call(key: int) -> None:
        try:
            results[key] = await batcher.call(key)
        except DatabaseUnavailable as error:
            results[key] = error

    first = trio.CancelScope()

    async def cancelled_call() -> None:
        with first:
            results[0] = await batcher.call(0)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(cancelled_call)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(call, 2)
        nursery.start_soon(call, 3)
        await trio.testing.wait_all_tasks_blocked()
        first.cancel()
        await trio.testing.wait_all_tasks_blocked()
        assert seen == [[0]]  # still out: shielded from its sender's cancellation
        hold.set()
    assert first.cancelled_caught and 0 not in results
    assert seen[0] == [0] and sorted(seen[1]) == [2, 3]
    assert results == {2: 20, 3: 30}

    hold = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(call, 0)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(call, 99)
        nursery.start_soon(call, 4)
        await trio.testing.wait_all_tasks_blocked()
        hold.set()
    assert results[0] == 0 and sorted(seen[-1]) == [4, 99]
    errors = [results[99], results[4]]
    assert all(isinstance(e, DatabaseUnavailable) for e in errors)
    assert errors[0] is not errors[1]
    assert batcher.batches == 4


async def test_a_batch_that_breaks_its_promise_fails_its_calls() -> None:
    """``run`` answering the wrong number of keys is a bug: its sender gets the
    AssertionError, the other calls of the batch BatchUnanswered, and nothing waits."""

    async def run(keys: Any) -> list[int]:
        await trio.lowlevel.checkpoint()
        return []

    batcher: Batcher[int, int] = Batcher(run)
    outcomes: list[str] = []

    async def call(key: int) -> None:
        try:
            await batcher.call(key)
        except (AssertionError, BatchUnanswered) as error:
            outcomes.append(type(error).__name__)

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            for key in range(3):
                nursery.start_soon(call, key)
    # The first sends alone; the other two wait and go together: each sender gets the
    # AssertionError, the call that went with one of them BatchUnanswered.
    assert sorted(outcomes) == ["AssertionError", "AssertionError", "BatchUnanswered"]
