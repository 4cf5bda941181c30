"""Event-log retention: old events go (by age or per-project count), the seq counter does
not; resume and the events endpoint say when what a client asks for was pruned."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime, timedelta

import pytest
import trio
import trio.lowlevel
from conftest import FakeClock, Running, StartServer
from test_events import owned_project
from test_workspace import joined, make_team, settle_then_jump
from wsclient import connect

from atrium.core.events import EventType, NewEvent
from atrium.persistence import events as event_log
from atrium.persistence.database import Database
from atrium.persistence.retention import RetentionPolicy, prune_events
from atrium.runtime.retention import EventPruner
from atrium.supervision import NoSuchChild

NOW = datetime.now(UTC)  # events written by the tests are this young


async def project_with_events(db: Database, email: str, count: int) -> uuid.UUID:
    """A project whose log holds seqs 1..count (PROJECT_CREATED, then FILE_CHANGEs)."""
    owner, pid = await owned_project(db, email)
    edits = [
        NewEvent(EventType.FILE_CHANGE, owner, {"file_path": f"/{i}"}) for i in range(count - 1)
    ]
    await event_log.append(db, pid, edits)
    return pid


async def age(db: Database, pid: uuid.UUID, seqs: list[int], days: float) -> None:
    """Back-date the events ``seqs`` of ``pid`` to ``days`` before NOW."""
    await db.execute(
        "UPDATE project_events SET created_at = $3 WHERE project_id = $1 AND seq = ANY($2)",
        pid,
        seqs,
        NOW - timedelta(days=days),
    )


async def seqs(db: Database, pid: uuid.UUID) -> list[int]:
    rows = await db.fetch("SELECT seq FROM project_events WHERE project_id = $1 ORDER BY seq", pid)
    return [int(r["seq"]) for r in rows]


async def test_pruning_by_age_keeps_a_gapless_suffix_and_the_seq_counter(db: Database) -> None:
    pid = await project_with_events(db, "a@example.com", 8)
    untouched = await project_with_events(db, "b@example.com", 3)
    await age(db, untouched, [1, 2, 3], days=5)
    await age(db, pid, [1, 2, 3, 5], days=40)  # seq 5 is old, seq 4 young (clock skew)
    await age(db, pid, [4, 6, 7, 8], days=1)
    policy = RetentionPolicy(max_age=timedelta(days=30))
    assert await prune_events(db, policy, now=NOW, projects_per_query=1, batch=2) == 5
    # Everything up to the newest old event goes, so no hole opens in the retained log.
    assert await seqs(db, pid) == [6, 7, 8]
    assert await seqs(db, untouched) == [1, 2, 3]
    assert await prune_events(db, policy, now=NOW) == 0
    # The counter goes on from where it was: seqs are never reused.
    assert await event_log.last_seq(db, pid) == 8
    owner = await db.fetchval("SELECT owner_id FROM projects WHERE id = $1", pid)
    appended = await event_log.append(db, pid, [NewEvent(EventType.FILE_CHANGE, owner, {})])
    assert appended[0][0].seq == 9


async def test_pruning_by_count_keeps_each_projects_newest_events(db: Database) -> None:
    big = await project_with_events(db, "a@example.com", 7)
    small = await project_with_events(db, "b@example.com", 2)
    policy = RetentionPolicy(max_events=3)
    assert await prune_events(db, policy, now=NOW, batch=3) == 4
    assert await seqs(db, big) == [5, 6, 7]
    assert await seqs(db, small) == [1, 2]
    # Both bounds: the tighter one wins per project.
    await age(db, big, [5, 6], days=100)
    both = RetentionPolicy(max_age=timedelta(days=30), max_events=3)
    assert await prune_events(db, both, now=NOW) == 2
    assert await seqs(db, big) == [7]
    assert await prune_events(db, RetentionPolicy(), now=NOW) == 0


async def test_resume_and_events_past_the_retained_log_say_so(
    server: Running, db: Database
) -> None:
    team = await make_team(server, "main")  # PROJECT_CREATED and two MEMBER_ADDED: 1-3
    owner, pid = team.owner, team.project_id
    for name in ("Four", "Five", "Six"):
        r = await server.client.patch(
            f"/api/v1/projects/{pid}", json={"name": name}, headers=owner.auth
        )
        assert r.status_code == 200
    assert await prune_events(db, RetentionPolicy(max_events=2), now=NOW) == 4

    r = await server.client.get(f"/api/v1/projects/{pid}/events?since_seq=2", headers=owner.auth)
    body = r.json()
    assert [e["seq"] for e in body["events"]] == [5, 6]
    assert (body["oldest_seq"], body["last_seq"], body["truncated"]) == (5, 6, True)
    r = await server.client.get(f"/api/v1/projects/{pid}/events?since_seq=4", headers=owner.auth)
    assert (r.json()["truncated"], r.json()["has_more"]) == (False, False)

    # seq 3 and 4 are gone: nothing is replayed, the client must reload.
    async with connect(team.url("?since_seq=2"), owner.token) as c:
        await joined(c, owner)
        resumed = await c.recv()
        assert resumed == {
            "type": "RESUMED",
            "since_seq": 2,
            "seq": 6,
            "recovered": False,
            "replayed": 0,
        }
    async with connect(team.url("?since_seq=4"), owner.token) as c:
        await joined(c, owner)
        replay = []
        while (message := await c.recv())["type"] != "RESUMED":
            replay.append(message["seq"])
        # The first connection's join and leave came after the prune: 7 and 8.
        assert replay == [5, 6, 7, 8] and message["recovered"] is True


async def passes(pruner: EventPruner, count: int) -> None:
    """Return once the pruner has finished ``count`` passes. A pass is real database I/O,
    which ``wait_all_tasks_blocked`` takes for blocked tasks: so watch the count itself."""
    for _ in range(1_000_000):  # each pass lets the loop run and poll I/O once
        if pruner.statistics().passes >= count:
            return
        await trio.lowlevel.checkpoint()
    raise AssertionError(f"the pruner did not finish {count} passes")


async def test_pruner_runs_at_start_and_every_ten_minutes_as_a_child(
    start_server: StartServer, mock_clock: trio.testing.MockClock, db: Database
) -> None:
    wall = FakeClock(time.time())
    async with start_server(clock=wall, EVENT_LOG_RETENTION_DAYS=30) as server:
        root = server.bound.supervisor
        assert root is not None
        pruner: EventPruner = root.child("event_retention").value
        await passes(pruner, 1)
        team = await make_team(server, "main")
        pid = uuid.UUID(team.project_id)
        wall.advance(31 * 86400)  # the server's "now": a month on
        await settle_then_jump(mock_clock, 599)
        assert pruner.statistics().passes == 1
        await settle_then_jump(mock_clock, 1)
        await passes(pruner, 2)
        assert pruner.statistics().deleted == 3
        assert await seqs(db, pid) == []
        assert await event_log.last_seq(db, pid) == 3


async def test_no_pruner_when_the_log_is_kept_forever(start_server: StartServer) -> None:
    async with start_server(
        EVENT_LOG_RETENTION_DAYS=0, EVENT_LOG_MAX_EVENTS_PER_PROJECT=0
    ) as server:
        root = server.bound.supervisor
        assert root is not None
        with pytest.raises(NoSuchChild):
            root.child("event_retention")


async def test_a_failed_pass_is_counted_and_the_next_one_runs(db: Database) -> None:
    broken = EventPruner(db, RetentionPolicy(max_events=1), clock=lambda: float("nan"))
    assert await broken.prune_once() == 0
    stats = broken.statistics()
    assert (stats.passes, stats.failures) == (1, 1)
