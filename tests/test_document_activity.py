"""Live-document edits as workspace activity: DOCUMENT_EDITED events, coalesced per
document (on trio's MockClock), stored in the project's log and delivered to a workspace
WebSocket client, never carrying the document's content."""

from __future__ import annotations

import math
import uuid

import pytest
import trio
import trio.testing
from conftest import Running
from test_document_rest import LiveClient, documents_url, write
from test_document_sockets import doc_url, get_ticket
from test_workspace import make_team
from wsclient import connect

from atrium.core.events import Event, EventType
from atrium.domain.document_activity import DocumentActivity
from atrium.persistence import accounts, projects
from atrium.persistence import events as event_log
from atrium.persistence.database import Database
from atrium.persistence.documents import DocumentRef

WINDOW = 5.0
PAYLOAD_KEYS = {"document_id", "path", "editors", "updates"}


class Recorder:
    """An EventPublisher that keeps what it is handed, in order."""

    def __init__(self) -> None:
        self.send, self.receive = trio.open_memory_channel[Event](math.inf)

    async def publish(self, project_id: uuid.UUID, events: list[Event]) -> None:
        for event in events:
            self.send.send_nowait(event)

    async def next(self) -> Event:
        with trio.fail_after(10):
            return await self.receive.receive()

    async def nothing_yet(self) -> None:
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(trio.WouldBlock):
            self.receive.receive_nowait()


async def make_user(db: Database, name: str) -> uuid.UUID:
    user = await accounts.create_user(db, f"{name}-{uuid.uuid4().hex[:6]}@example.com", "x")
    assert user is not None
    return user.id


async def make_project(db: Database, owner: uuid.UUID) -> uuid.UUID:
    created = await projects.create_project(
        db, owner, name="P", description=None, visibility="private"
    )
    return created.value.id


async def test_a_burst_of_edits_is_one_event_per_window(
    db: Database, mock_clock: trio.testing.MockClock
) -> None:
    ann, bob = await make_user(db, "ann"), await make_user(db, "bob")
    project = await make_project(db, ann)
    app = DocumentRef(uuid.uuid4(), project, "/src/app.py")
    readme = DocumentRef(uuid.uuid4(), project, "/README.md")
    recorder = Recorder()
    activity = DocumentActivity(db, recorder, WINDOW)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(activity.run)
        # The first edit after a quiet spell is logged at once.
        activity.note(ann, app)
        first = await recorder.next()
        assert first.type is EventType.DOCUMENT_EDITED and first.actor_id == ann
        assert first.payload == {
            "document_id": str(app.id),
            "path": "/src/app.py",
            "editors": [str(ann)],
            "updates": 1,
        }
        # A burst inside the window, from two people: nothing until the window ends...
        for second in range(4):
            for _ in range(10):
                activity.note(bob if second % 2 else ann, app)
            mock_clock.jump(1)
            await recorder.nothing_yet()
        activity.note(bob, app)
        # ... while another document's first edit is its own, at once.
        activity.note(ann, readme)
        other = await recorder.next()
        assert other.payload["path"] == "/README.md" and other.payload["updates"] == 1
        await recorder.nothing_yet()
        mock_clock.jump(WINDOW - 4)
        burst = await recorder.next()
        assert burst.actor_id == bob  # the last to edit
        assert burst.payload == {
            "document_id": str(app.id),
            "path": "/src/app.py",
            "editors": [str(ann), str(bob)],  # in the order they first edited
            "updates": 41,
        }
        assert activity.pending() == 0
        # Quiet for a window: the next edit is logged at once again.
        mock_clock.jump(WINDOW * 2)
        activity.note(bob, app)
        again = await recorder.next()
        assert again.payload["editors"] == [str(bob)] and again.payload["updates"] == 1
        nursery.cancel_scope.cancel()
    # Stored in the project's log, in order, with gapless seqs.
    logged = await event_log.events_between(db, project, 1, 100)
    edits = [e for e in logged if e.type is EventType.DOCUMENT_EDITED]
    assert [e.seq for e in edits] == [first.seq, other.seq, burst.seq, again.seq]
    assert all(set(e.payload) == PAYLOAD_KEYS for e in edits)


async def test_activity_of_a_deleted_project_is_dropped_and_the_rest_goes_on(
    db: Database, mock_clock: trio.testing.MockClock
) -> None:
    ann = await make_user(db, "ann")
    gone, kept = await make_project(db, ann), await make_project(db, ann)
    await projects.delete_project(db, gone, ann)
    recorder = Recorder()
    activity = DocumentActivity(db, recorder, WINDOW)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(activity.run)
        activity.note(ann, DocumentRef(uuid.uuid4(), gone, "/a"))
        activity.note(ann, DocumentRef(uuid.uuid4(), kept, "/b"))
        event = await recorder.next()
        assert event.project_id == kept and event.payload["path"] == "/b"
        await recorder.nothing_yet()
        assert activity.pending() == 0
        nursery.cancel_scope.cancel()


async def test_edits_reach_the_workspace_and_the_log_without_content(server: Running) -> None:
    team = await make_team(server, "main")
    secret = "the content stays in the document"
    async with await team.join(team.viewer) as watcher:
        r = await write(team, team.collaborator, "/plan.md", secret)
        assert r.status_code == 201
        document = r.json()
        frame = await watcher.until("DOCUMENT_EDITED")
        assert frame["user_id"] == team.collaborator.user_id
        assert frame["project_id"] == team.project_id
        assert frame["document_id"] == document["id"] and frame["path"] == "/plan.md"
        assert frame["editors"] == [team.collaborator.user_id] and frame["updates"] >= 1
        assert secret not in str(frame)
        # Typing over the y-websocket protocol counts too (after the window, at once).
        issued = await get_ticket(team, team.owner, "/typed.md")
        async with connect(doc_url(team, issued["room"], issued["ticket"])) as raw:
            live = LiveClient(raw)
            await live.sync()
            await live.type(0, "typed live")
            typed = await watcher.until("DOCUMENT_EDITED")
        assert typed["user_id"] == team.owner.user_id and typed["path"] == "/typed.md"
    r = await server.client.get(
        f"/api/v1/projects/{team.project_id}/events", headers=team.viewer.auth
    )
    logged = [e for e in r.json()["events"] if e["type"] == "DOCUMENT_EDITED"]
    assert [e["payload"]["path"] for e in logged] == ["/plan.md", "/typed.md"]
    assert all(set(e["payload"]) == PAYLOAD_KEYS for e in logged)
    assert secret not in r.text and "typed live" not in r.text
    assert (await server.client.get(documents_url(team), headers=team.viewer.auth)).json()[
        "total"
    ] == 2


async def test_edits_gathered_when_the_process_stops_are_logged(
    db: Database, mock_clock: trio.testing.MockClock
) -> None:
    ann = await make_user(db, "ann")
    project = await make_project(db, ann)
    ref = DocumentRef(uuid.uuid4(), project, "/last.md")
    recorder = Recorder()
    activity = DocumentActivity(db, recorder, WINDOW)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(activity.run)
        activity.note(ann, ref)
        await recorder.next()
        for _ in range(3):
            activity.note(ann, ref)  # gathered for the window's end...
        await recorder.nothing_yet()
        nursery.cancel_scope.cancel()  # ... which the process does not live to see
    last = await recorder.next()
    assert last.payload["updates"] == 3 and last.actor_id == ann
    logged = await event_log.events_between(db, project, 1, 100)
    assert [e.payload["updates"] for e in logged if e.type is EventType.DOCUMENT_EDITED] == [1, 3]
