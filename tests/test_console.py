"""The operator console: its JSON endpoints (``/ops/...``) on the real server, and the
``/console`` page in a real browser (headless Chromium, as in test_browser.py)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import Running, StartServer
from docclient import DocClient, settle
from playwright.sync_api import Browser, Request, expect
from test_browser import Chromium as Chromium
from test_browser import RunPy, chromium, need_chromium, new_tab, screenshot, signup
from test_browser import auth as user_auth
from test_jobs_api import auth, run, wait_status
from test_workspace import joined, make_team, session
from wsclient import connect

from atrium.core.jobs import JobStatus

TOKEN = "operator-token-0123456789"
__all__ = ["chromium"]  # the module's browser (a fixture of test_browser)
OPERATOR = {"Authorization": f"Bearer {TOKEN}"}
ENDPOINTS = [
    ("GET", "/ops/workspaces"),
    ("GET", "/ops/documents"),
    ("GET", "/ops/jobs"),
    ("GET", "/ops/metrics"),
    ("POST", "/ops/jobs/job_00000000-0000-0000-0000-000000000000/retry"),
    ("GET", "/health/supervisor"),
]


@pytest.fixture
async def ops_server(start_server: StartServer) -> Any:
    async with start_server(
        ADMIN_TOKEN=TOKEN, WORKER_CONCURRENCY=1, JOB_TASK_MODULES="tests.job_tasks"
    ) as running:
        yield running


async def test_the_console_endpoints_need_the_operator_token(ops_server: Running) -> None:
    client = ops_server.client
    for method, path in ENDPOINTS:
        for headers in (
            {},
            {"Authorization": "Bearer wrong-token-0123456789"},
            {"Authorization": TOKEN},
        ):
            r = await client.request(method, path, headers=headers)
            assert r.status_code == 401, (method, path, headers)
            assert r.json()["error"]["code"] == "operator_token_required"
            assert r.headers["www-authenticate"] == "Bearer"
        r = await client.request(method, path, headers=OPERATOR)
        assert r.status_code in (200, 404), (method, path)
        assert r.headers["cache-control"] == "no-store"
    # The page itself holds no data: it loads without a token, under a CSP of 'self'.
    r = await client.get("/console")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in r.headers["content-security-policy"]
    for asset in ("console.js", "console.css"):
        assert (await client.get(f"/static/{asset}")).status_code == 200


async def test_without_an_admin_token_the_console_endpoints_are_off(server: Running) -> None:
    for method, path in ENDPOINTS:
        r = await server.client.request(method, path, headers=OPERATOR)
        assert r.status_code == 403 and r.json()["error"]["code"] == "operator_disabled"


async def test_workspaces_list_their_connections_and_users(ops_server: Running) -> None:
    team = await make_team(ops_server, "main")
    client = ops_server.client
    r = await client.get("/ops/workspaces", headers=OPERATOR)
    assert r.json() == {"total": 0, "connections": 0, "workspaces": []}
    async with (
        session(team, team.owner),
        session(team, team.viewer),
        connect(team.url(), team.viewer.token) as second_tab,
    ):
        await joined(second_tab, team.viewer)
        r = await client.get("/ops/workspaces", headers=OPERATOR)
        assert r.status_code == 200
        body = r.json()
        assert (body["total"], body["connections"]) == (1, 3)
        [workspace] = body["workspaces"]
        assert workspace["project_id"] == team.project_id and workspace["connections"] == 3
        assert workspace["seq"] >= 3 and workspace["mailbox_depth"] == 0
        users = {u["email"]: u for u in workspace["users"]}
        assert set(users) == {"owner@example.com", "viewer@example.com"}
        assert users["owner@example.com"]["role"] == "owner"
        assert users["viewer@example.com"]["connections"] == 2
        assert users["viewer@example.com"]["user_id"] == team.viewer.user_id
    r = await client.get("/ops/workspaces?limit=0", headers=OPERATOR)
    assert r.status_code == 422


async def test_documents_list_their_peers_and_show_in_the_tree(ops_server: Running) -> None:
    team = await make_team(ops_server, "main")
    client = ops_server.client
    r = await client.get("/ops/documents", headers=OPERATOR)
    assert r.json() == {"total": 0, "peers": 0, "documents": []}
    assert ops_server.bound.services is not None
    documents = ops_server.bound.services.value.documents
    ref = await documents.open(uuid.UUID(team.project_id), "/notes.md")
    owner, viewer = uuid.UUID(team.owner.user_id), uuid.UUID(team.viewer.user_id)
    a = DocClient(await documents.get(ref.id), owner, team.owner.email)
    b = DocClient(await documents.get(ref.id), viewer, team.viewer.email, can_edit=False)
    second_tab = DocClient(await documents.get(ref.id), viewer, team.viewer.email)
    for peer in (a, b, second_tab):
        await peer.connect()
    a.type(0, "hello")
    await settle(a, b, second_tab)
    r = await client.get("/ops/documents", headers=OPERATOR)
    assert r.status_code == 200
    body = r.json()
    assert (body["total"], body["peers"]) == (1, 3)
    [document] = body["documents"]
    assert document["document_id"] == str(ref.id) and document["path"] == "/notes.md"
    assert document["project_id"] == team.project_id
    assert (document["users"], document["seq"], document["updates_applied"]) == (2, 1, 1)
    assert document["stored_bytes"] > 0 and document["mailbox_depth"] == 0
    r = await client.get("/health/supervisor", headers=OPERATOR)
    tree = {c["name"]: c for c in r.json()["supervisor"]["children"]}
    live = tree["documents"]["supervisor"]["children"]
    assert [(c["name"], c["state"]) for c in live] == [(f"document:{ref.id}", "running")]
    r = await client.get("/ops/documents?limit=0", headers=OPERATOR)
    assert r.status_code == 422


async def test_the_operator_retries_any_users_dead_job(ops_server: Running) -> None:
    server = ops_server
    ann = auth(await server.signup_login("ann@example.com"))
    r = await run(server, ann, task_name="test_dead_first", payload={"dead_attempts": 1})
    job_id = r.json()["job_id"]
    await wait_status(server, job_id, JobStatus.DEAD)

    r = await server.client.get("/ops/jobs", headers=OPERATOR)
    assert r.status_code == 200
    body = r.json()
    assert body["by_state"] == {"queued": 0, "running": 0, "failed": 0, "dead": 1, "cancelled": 0}
    [dead] = body["dead"]
    assert (dead["job_id"], dead["status"], dead["error"]) == (job_id, "dead", "attempt 1 refused")

    # Not the operator's job, and no member of anything: the operator retries it all the same.
    r = await server.client.post(f"/ops/jobs/{job_id}/retry", headers=OPERATOR)
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "queued"
    await wait_status(server, job_id, JobStatus.COMPLETED)
    r = await server.client.get(f"/api/v1/jobs/{job_id}/status", headers=ann)
    assert r.json()["result"] == {"attempt": 2}
    assert [a["outcome"] for a in r.json()["attempts"]] == ["dead", "completed"]
    body = (await server.client.get("/ops/jobs", headers=OPERATOR)).json()
    assert body["dead"] == [] and body["by_state"]["dead"] == 0
    assert body["completed_recent"] == 1

    r = await server.client.post(f"/ops/jobs/{job_id}/retry", headers=OPERATOR)
    assert r.status_code == 409 and r.json()["error"]["code"] == "job_state_conflict"
    r = await server.client.post("/ops/jobs/not-a-job/retry", headers=OPERATOR)
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_id"
    r = await server.client.post(
        f"/ops/jobs/job_{'0' * 8}-0000-0000-0000-{'0' * 12}/retry", headers=OPERATOR
    )
    assert r.status_code == 404 and r.json()["error"]["code"] == "job_not_found"


async def test_the_metrics_summary_after_traffic(ops_server: Running) -> None:
    client = ops_server.client
    await ops_server.signup_login("ann@example.com")
    assert (await client.get("/nowhere")).status_code == 404
    r = await client.get("/ops/metrics", headers=OPERATOR)
    assert r.status_code == 200
    body = r.json()
    http = body["http"]
    assert http["requests"] >= 3 and http["client_errors"] >= 1 and http["server_errors"] == 0
    latency = http["latency_seconds"]
    assert 0 < latency["p50"] <= latency["p95"] <= latency["p99"] <= 10
    assert body["websockets"]["open"] == {"main": 0, "listener": 0}
    assert body["workspaces"] == {"running": 0, "mailbox_depth": 0}
    assert body["documents"] == {"running": 0, "mailbox_depth": 0}
    database = body["database"]
    assert database["pool_connections"] >= 1 and database["pool_in_use"] >= 0
    assert database["query_latency_seconds"]["p50"] > 0
    assert body["project_cache"] == {"hits": 0, "misses": 0, "hit_ratio": None}
    assert body["jobs"] == {
        "by_state": {"queued": 0, "running": 0, "failed": 0, "dead": 0, "cancelled": 0},
        "completed_recent": 0,
    }
    assert body["supervision"] == {"restarts": 0, "escalations": 0}


@pytest.fixture
def console_server(tmp_path: Path, database_url: str) -> Iterator[RunPy]:
    """``run.py serve`` with an operator token and the test tasks (and chromium present)."""
    need_chromium()
    server = RunPy(tmp_path, database_url)
    server.env.update(ADMIN_TOKEN=TOKEN, WORKER_CONCURRENCY="1", JOB_TASK_MODULES="tests.job_tasks")
    server.start()
    try:
        yield server
    finally:
        server.stop()


def test_the_console_shows_a_joining_client_and_retries_a_dead_job(
    console_server: RunPy, chromium: Chromium
) -> None:
    chromium.run(console_live, console_server)


# Runs in a page of the server: an atrium.js client joins the project and stays.
JOIN = """
async ({ projectId, token }) => {
  const { AtriumClient } = await import("/static/atrium.js");
  const client = new AtriumClient({ projectId, getToken: () => token });
  const open = new Promise((resolve) => client.on("state", (s) => s.state === "open" && resolve()));
  client.connect();
  await open;
  window.atriumClient = client;
}
"""


def console_live(browser: Browser, server: RunPy) -> None:
    with httpx.Client(base_url=server.url) as http:
        ann = signup(http, "ann@example.com")
        r = http.post("/api/v1/projects/", json={"name": "Watched"}, headers=user_auth(ann))
        project_id = r.json()["id"]
        body = {"task_name": "test_dead_first", "payload": {"dead_attempts": 1}}
        r = http.post("/api/v1/jobs/run", json=body, headers=user_auth(ann))
        job_id = r.json()["job_id"]

    tab = new_tab(browser, server)
    page = tab.page
    requests: list[Request] = []
    page.on("request", lambda request: requests.append(request))
    page.goto(f"{server.url}/console")
    # No token yet: the endpoints refuse, and the page asks for one.
    expect(page.locator("#token-view")).to_be_visible()
    page.fill("#token", "not-the-token-0123456789")
    page.click("#save-token")
    expect(page.locator("#token-message")).to_contain_text("refused")
    page.fill("#token", TOKEN)
    page.click("#save-token")
    expect(page.locator("#status")).to_have_attribute("data-state", "live")
    expect(page.locator("#tree li[data-child='workspaces']")).to_contain_text("running")
    expect(page.locator("#workspaces-empty")).to_be_visible()
    expect(page.locator("#tree li[data-child='documents']")).to_contain_text("running")
    expect(page.locator("#documents-empty")).to_be_visible()

    # A client joins the project: its workspace appears, with who is connected.
    client_page = new_tab(browser, server).page
    client_page.goto(f"{server.url}/demo")
    client_page.evaluate(JOIN, {"projectId": project_id, "token": ann.token})
    workspace = page.locator(f"#workspaces tr[data-project-id='{project_id}']")
    expect(workspace).to_contain_text(f"{ann.email} (owner, 1 connection)")
    expect(page.locator("[data-figure='websockets'] dd")).to_have_text("1")

    # The dead job is listed; its Retry button queues it again, and it completes.
    dead = page.locator(f"#dead-jobs tr[data-job-id='{job_id}']")
    expect(dead).to_contain_text("attempt 1 refused")
    screenshot(page, "console")
    dead.locator("button.retry").click()
    expect(dead).to_have_count(0)
    expect(page.locator("#dead-empty")).to_be_visible()
    expect(page.locator("[data-figure='jobs-completed-recent'] dd")).to_have_text("1")
    with httpx.Client(base_url=server.url) as http:
        r = http.get(f"/api/v1/jobs/{job_id}/status", headers=user_auth(ann))
    assert (r.json()["status"], r.json()["result"]) == ("completed", {"attempt": 2})

    # The token stays in the tab (a reload asks for nothing) and never goes into a URL.
    page.reload()
    expect(page.locator("#status")).to_have_attribute("data-state", "live")
    assert page.evaluate("sessionStorage.getItem('atrium.operatorToken')") == TOKEN
    operator_calls = [r for r in requests if "/ops/" in r.url or "/health/" in r.url]
    assert operator_calls and all(TOKEN not in r.url for r in requests)
    assert operator_calls[-1].headers["authorization"] == f"Bearer {TOKEN}"
    assert tab.csp_violations == [] and tab.blocked == []
