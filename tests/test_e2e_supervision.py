"""The supervision tree inside a running server: crash, escalate, recover, as operators see it.

Time is trio's MockClock: it moves only when the test jumps it, so backoff windows are
held open while the test looks at /ready and /health/supervisor.
"""

from __future__ import annotations

import trio
import trio.lowlevel
import trio.testing
from conftest import Running, StartServer, crash_workspace

from atrium.supervision import ChildState

ADMIN = {"Authorization": "Bearer operator-token-0123456789"}


def child(tree: dict, name: str) -> dict:  # type: ignore[type-arg]
    return next(c for c in tree["children"] if c["name"] == name)


async def project_of(server: Running) -> str:
    owner = await server.signup_login("ops@example.com")
    r = await server.client.post(
        "/api/v1/projects/",
        json={"name": "Ops"},
        headers={"Authorization": f"Bearer {owner['access_token']}"},
    )
    return str(r.json()["id"])


async def taken_down(server: Running, name: str) -> None:
    """Wait until the root has seen its child ``name`` end. A subtree that gives up
    unwinds partly through asyncio I/O (its database connections), which
    ``wait_all_tasks_blocked`` takes for blocked tasks: so wait for the state itself."""
    assert server.bound.supervisor is not None
    handle = server.bound.supervisor.child(name)
    for _ in range(1_000_000):  # each pass lets the loop run and poll I/O once
        if handle.state is not ChildState.RUNNING:
            break
        await trio.lowlevel.checkpoint()
    assert handle.state is not ChildState.RUNNING
    await trio.testing.wait_all_tasks_blocked()


async def settle_then_jump(clock: trio.testing.MockClock, seconds: float) -> None:
    await trio.testing.wait_all_tasks_blocked()
    clock.jump(seconds)


async def test_supervisor_tree_is_served_to_operators(start_server: StartServer) -> None:
    async with start_server(ADMIN_TOKEN=ADMIN["Authorization"][7:]) as server:
        r = await server.client.get("/health/supervisor")
        assert r.status_code == 401
        assert r.json()["error"]["code"] == "operator_token_required"
        r = await server.client.get("/health/supervisor", headers=ADMIN)
        assert r.status_code == 200
        tree = r.json()["supervisor"]
        assert tree["name"] == "root" and tree["strategy"] == "rest_for_one"
        assert [c["name"] for c in tree["children"]] == [
            "database",
            "event_retention",
            "http",
            "ws_listener",
            "jobs",
            "workspaces",
            "documents",
            "metrics",
        ]
        assert all(c["state"] == "running" for c in tree["children"])
        jobs = [c["name"] for c in child(tree, "jobs")["supervisor"]["children"]]
        assert jobs == [
            "job_workers",
            "job_1",
            "job_2",
            "job_3",
            "job_4",
            "job_reaper",
            "job_listener",
            "job_retention",
        ]
        assert child(tree, "workspaces")["kind"] == "supervisor"
        assert child(tree, "workspaces")["supervisor"]["children"] == []
        assert child(tree, "documents")["kind"] == "supervisor"
        assert child(tree, "documents")["supervisor"]["children"] == []


async def test_operator_endpoint_is_closed_without_a_configured_token(
    start_server: StartServer,
) -> None:
    async with start_server() as server:
        r = await server.client.get("/health/supervisor", headers=ADMIN)
        assert r.status_code == 403
        assert r.json()["error"]["code"] == "operator_disabled"


async def test_crash_loop_escalates_and_the_tree_recovers(
    start_server: StartServer, mock_clock: trio.testing.MockClock
) -> None:
    async with start_server(ADMIN_TOKEN=ADMIN["Authorization"][7:]) as server:
        project_id = await project_of(server)
        c = server.client

        actor = await server.workspace_actor(project_id)
        await crash_workspace(actor)
        await trio.testing.wait_all_tasks_blocked()
        tree = (await c.get("/health/supervisor", headers=ADMIN)).json()["supervisor"]
        workspace = child(child(tree, "workspaces")["supervisor"], f"workspace:{project_id}")
        assert workspace["state"] == "restarting"
        assert workspace["restart_count"] == 1
        assert workspace["last_failure"]["type"] == "InjectedFault"
        # A transient workspace restarting is not a reason to stop taking traffic.
        assert (await c.get("/ready")).status_code == 200

        # Four more crashes, each after its backoff (0.1, 0.2, 0.4, 0.8 s): still within
        # the intensity of 5 restarts in 30 s.
        for delay in (0.1, 0.2, 0.4, 0.8):
            await settle_then_jump(mock_clock, delay)
            actor = await server.workspace_actor(project_id)
            await crash_workspace(actor)
        await settle_then_jump(mock_clock, 1.6)
        actor = await server.workspace_actor(project_id)
        tree = (await c.get("/health/supervisor", headers=ADMIN)).json()["supervisor"]
        workspace = child(child(tree, "workspaces")["supervisor"], f"workspace:{project_id}")
        assert workspace["state"] == "running" and workspace["restart_count"] == 5

        # The sixth crash within the period exceeds the intensity: the workspace
        # supervisor gives up and fails to the root, which restarts it after a backoff.
        await crash_workspace(actor)
        await taken_down(server, "workspaces")
        r = await c.get("/ready")
        assert r.status_code == 503
        assert r.json()["checks"] == {
            "database": {"ok": True},
            # rest_for_one: the documents and the metrics listener, started after the
            # workspaces, restart too; the jobs subtree, started before them, keeps
            # running its jobs.
            "supervision": {"ok": False, "down": ["workspaces", "documents", "metrics"]},
        }
        tree = (await c.get("/health/supervisor", headers=ADMIN)).json()["supervisor"]
        assert tree["healthy"] is False
        workspaces = child(tree, "workspaces")
        assert workspaces["state"] == "restarting"
        assert workspaces["restart_count"] == 1
        assert workspaces["last_failure"]["type"] == "SupervisorEscalation"
        assert child(tree, "http")["state"] == "running"  # rest_for_one: only what follows

        await settle_then_jump(mock_clock, 0.1)
        await trio.testing.wait_all_tasks_blocked()
        r = await c.get("/ready")
        assert r.status_code == 200
        tree = (await c.get("/health/supervisor", headers=ADMIN)).json()["supervisor"]
        assert tree["healthy"] is True
        assert child(tree, "workspaces")["state"] == "running"
        assert child(tree, "workspaces")["supervisor"]["children"] == []
        # And the project's workspace starts afresh on next use.
        assert (await server.workspace_actor(project_id)).alive
