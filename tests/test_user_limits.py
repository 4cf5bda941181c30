"""Per-user bounds on live workspaces: open connections per user (4011 at join) and edits
per second across all of a user's connections (ERROR rate_limited, nothing stored)."""

from __future__ import annotations

import uuid
from dataclasses import replace
from pathlib import Path

import pytest
import trio
from conftest import StartServer
from test_workspace import edit, joined, make_team, session, settle_then_jump
from wsclient import Client, connect

from atrium.core.config import ConfigError, load_settings
from atrium.persistence.database import Database
from atrium.realtime.connections import ConnectionIndex
from atrium.realtime.outbox import Outbox

USER, OTHER = uuid.uuid4(), uuid.uuid4()
S1, S2 = uuid.uuid4(), uuid.uuid4()


def test_index_caps_connections_per_user_and_frees_a_place_on_release() -> None:
    index = ConnectionIndex(max_per_user=2, edits_per_second=1, edit_burst=2)
    a, b, c, d = Outbox(8), Outbox(8), Outbox(8), Outbox(8)
    assert index.admit(a, USER, S1, 0.0) and index.admit(b, USER, S2, 0.0)
    assert not index.admit(c, USER, S1, 0.0)
    assert index.admit(d, OTHER, uuid.uuid4(), 0.0)
    index.release(c)  # never admitted: nothing to forget
    index.release(a)
    assert index.admit(c, USER, S1, 0.0)
    assert len(index) == 3


def test_index_revokes_a_session_by_the_current_token_of_each_connection() -> None:
    index = ConnectionIndex(max_per_user=5, edits_per_second=1, edit_burst=2)
    a, b, renewed = Outbox(8), Outbox(8), Outbox(8)
    for outbox in (a, b, renewed):
        index.admit(outbox, USER, S1, 0.0)
    index.renew(renewed, S2)
    assert index.revoke_session(S1) == 2
    assert (a.close_code, a.close_reason) == (4001, "session_revoked")
    assert b.close_code == 4001 and renewed.close_code is None
    assert index.revoke_session(S2) == 1 and renewed.close_code == 4001
    for outbox in (a, b, renewed):
        index.release(outbox)
    assert len(index) == 0 and index.revoke_session(S1) == 0


def test_index_edit_budget_is_shared_and_refills_at_the_rate() -> None:
    index = ConnectionIndex(max_per_user=5, edits_per_second=2, edit_burst=4)
    index.admit(Outbox(8), USER, S1, 10.0)
    index.admit(Outbox(8), USER, S2, 10.0)
    assert [index.allow_edit(USER, 10.0) for _ in range(5)] == [True] * 4 + [False]
    assert index.allow_edit(USER, 10.5) and not index.allow_edit(USER, 10.5)
    assert [index.allow_edit(USER, 100.0) for _ in range(5)] == [True] * 4 + [False]
    assert not index.allow_edit(OTHER, 100.0)  # no connection, no edits


def test_limit_settings_have_defaults_and_are_validated(tmp_path: Path) -> None:
    settings = load_settings({"DATA_DIR": str(tmp_path)})
    assert (settings.ws_max_connections_per_user, settings.ws_user_edits_per_second) == (20, 20)
    assert settings.event_log_retention_days == 30
    assert settings.event_log_max_events_per_project == 100_000
    kept = load_settings(
        {
            "DATA_DIR": str(tmp_path),
            "EVENT_LOG_RETENTION_DAYS": "0",
            "EVENT_LOG_MAX_EVENTS_PER_PROJECT": "0",
        }
    )
    assert (kept.event_log_retention_days, kept.event_log_max_events_per_project) == (0, 0)
    for variable, value in (
        ("WS_MAX_CONNECTIONS_PER_USER", "0"),
        ("WS_USER_EDITS_PER_SECOND", "many"),
        ("EVENT_LOG_RETENTION_DAYS", "-1"),
        ("EVENT_LOG_MAX_EVENTS_PER_PROJECT", "1e5"),
    ):
        with pytest.raises(ConfigError) as caught:
            load_settings({"DATA_DIR": str(tmp_path), variable: value})
        assert caught.value.variable == variable


async def test_a_users_connections_are_capped_across_both_transports(
    start_server: StartServer,
) -> None:
    async with start_server(WS_MAX_CONNECTIONS_PER_USER=2) as server:
        main = await make_team(server, "main")
        listener = replace(main, transport="listener")  # the same project on WS_PORT
        owner = main.owner
        async with session(main, main.collaborator) as watcher:
            async with session(main, owner), connect(listener.url(), owner.token) as second:
                await joined(second, owner)
                for team in (main, listener):
                    async with connect(team.url(), owner.token) as refused:
                        assert await refused.closed() == (4011, "too_many_connections")
                # Other users are not affected.
                async with connect(main.url(), main.viewer.token) as viewer:
                    await joined(viewer, main.viewer)
            while (await watcher.until("USER_LEAVE"))["user_id"] != owner.user_id:
                pass  # the viewer's
            # Both closed: the owner may connect again.
            async with connect(listener.url(), owner.token) as again:
                await joined(again, owner)


async def reply_to(client: Client, client_id: str) -> dict[str, object]:
    """The ACK or ERROR for the edit sent with ``client_id``."""
    while True:
        message = await client.recv()
        if message["type"] in ("ACK", "ERROR") and message.get("id") == client_id:
            return message


async def test_edits_per_user_are_limited_across_connections(
    start_server: StartServer, mock_clock: trio.testing.MockClock, db: Database
) -> None:
    async with start_server(WS_USER_EDITS_PER_SECOND=2, WS_RATE_LIMIT_PER_SECOND=1000) as server:
        team = await make_team(server, "main")
        owner = team.owner
        async with session(team, owner) as tab1, connect(team.url(), owner.token) as tab2:
            await joined(tab2, owner)
            for i in range(4):  # the burst: twice the rate
                await tab1.send(edit(f"/a{i}", client_id=f"a{i}"))
                assert (await reply_to(tab1, f"a{i}"))["type"] == "ACK"
            await tab2.send(edit("/b0", client_id="b0"))
            refused = await reply_to(tab2, "b0")
            assert (refused["type"], refused["code"]) == ("ERROR", "rate_limited")
            await tab2.send({"type": "PING"})  # still open
            assert (await tab2.until("PONG"))["type"] == "PONG"
            await settle_then_jump(mock_clock, 1.0)  # two more edits' worth
            replies = []
            for name in ("b1", "b2", "b3"):
                await tab2.send(edit(f"/{name}", client_id=name))
                replies.append((await reply_to(tab2, name))["type"])
            assert replies == ["ACK", "ACK", "ERROR"]
    rows = await db.fetch(
        "SELECT payload->>'file_path' AS path FROM project_events"
        " WHERE type = 'FILE_CHANGE' ORDER BY seq"
    )
    assert [r["path"] for r in rows] == ["/a0", "/a1", "/a2", "/a3", "/b1", "/b2"]
