"""``/api/v1/jobs`` through the real server (hypercorn on port 0) and its job actors."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import pytest
import trio
from conftest import Running, StartServer
from wsclient import connect

from atrium.core.jobs import JobStatus
from atrium.jobs import JobQueue
from atrium.persistence import job_runs
from atrium.persistence.database import open_database

WAIT = 10.0
CSV = "name,score\nann,3\nbob,5\nann,7\n"


def auth(tokens: dict[str, Any]) -> dict[str, str]:
    return {"Authorization": f"Bearer {tokens['access_token']}"}


@pytest.fixture
async def jobs_server(start_server: StartServer) -> AsyncIterator[Running]:
    async with start_server(WORKER_CONCURRENCY=2, JOB_TASK_MODULES="tests.job_tasks") as running:
        yield running


def queue_of(server: Running) -> JobQueue:
    assert server.bound.services is not None
    return server.bound.services.value.jobs.queue


async def wait_status(server: Running, job_id: str, *statuses: JobStatus) -> None:
    with trio.fail_after(WAIT):
        await queue_of(server).wait_for(uuid.UUID(job_id.removeprefix("job_")), statuses)


async def run(server: Running, headers: dict[str, str], **body: Any) -> Any:
    return await server.client.post("/api/v1/jobs/run", json=body, headers=headers)


async def project_with(
    server: Running, owner: dict[str, str], members: dict[str, tuple[dict[str, Any], str]]
) -> str:
    r = await server.client.post("/api/v1/projects/", json={"name": "P"}, headers=owner)
    assert r.status_code == 201, r.text
    project_id: str = r.json()["id"]
    for tokens, role in members.values():
        r = await server.client.post(
            f"/api/v1/projects/{project_id}/collaborators",
            json={"user_id": tokens["user_id"], "role": role},
            headers=owner,
        )
        assert r.status_code == 201, r.text
    return project_id


async def test_submit_follow_and_fetch_each_builtin(jobs_server: Running) -> None:
    server = jobs_server
    ann = auth(await server.signup_login("ann@example.com"))
    project_id = await project_with(server, ann, {})
    r = await run(server, ann, task_name="data_processing", payload={"csv": CSV})
    assert r.status_code == 202, r.text
    body = r.json()
    assert body["job_id"].startswith("job_") and body["status"] == "queued"
    assert body["position_in_queue"] >= 0 and body["estimated_completion"].endswith("Z")
    export = (await run(server, ann, task_name="project_export", project_id=project_id)).json()
    report = (
        await run(server, ann, task_name="project_activity_report", project_id=project_id)
    ).json()
    for job in (body, export, report):
        await wait_status(server, job["job_id"], JobStatus.COMPLETED)

    r = await server.client.get(f"/api/v1/jobs/{body['job_id']}/status", headers=ann)
    status = r.json()
    assert status["status"] == "completed" and status["task_name"] == "data_processing"
    assert status["result"]["rows"] == 3
    assert status["result"]["stats"]["score"]["mean"] == 5.0
    assert status["result"]["stats"]["name"]["values"] == {"ann": 2, "bob": 1}
    assert status["progress"] == {"percent": 100, "message": "summarised 3 rows"}
    assert status["retry_count"] == 0 and status["priority"] == "normal"
    assert [a["outcome"] for a in status["attempts"]] == ["completed"]
    for key in ("created_at", "started_at", "completed_at"):
        assert status[key].endswith("Z")

    exported = (
        await server.client.get(f"/api/v1/jobs/{export['job_id']}/status", headers=ann)
    ).json()
    assert exported["project_id"] == project_id
    assert exported["result"]["project"]["id"] == project_id
    assert exported["result"]["events"][0]["type"] == "PROJECT_CREATED"
    reported = (
        await server.client.get(f"/api/v1/jobs/{report['job_id']}/status", headers=ann)
    ).json()
    assert reported["result"]["by_type"]["PROJECT_CREATED"] == 1


async def test_idempotency_key_answers_200_with_the_first_job(jobs_server: Running) -> None:
    ann = auth(await jobs_server.signup_login("ann@example.com"))
    body = {"task_name": "data_processing", "payload": {"csv": CSV}, "idempotency_key": "k"}
    first = await run(jobs_server, ann, **body)
    again = await run(jobs_server, ann, **body)
    assert (first.status_code, again.status_code) == (202, 200)
    assert again.json()["job_id"] == first.json()["job_id"]


BAD_SUBMISSIONS: list[tuple[dict[str, Any], str, str]] = [
    ({"task_name": "nope"}, "unknown_task", "task_name: no task named 'nope'"),
    ({"task_name": "data_processing"}, "invalid_payload", "payload.csv: Field required"),
    (
        {"task_name": "data_processing", "payload": {"csv": "a", "extra": 1}},
        "invalid_payload",
        "payload.extra: Extra inputs are not permitted",
    ),
    (
        {"task_name": "data_processing", "payload": {"csv": "a", "columns": "x"}},
        "invalid_payload",
        "payload.columns: Input should be a valid list",
    ),
    (
        {
            "task_name": "project_activity_report",
            "payload": {"since": "2026-01-01T00:00:00", "until": "2030-01-01T00:00:00Z"},
        },
        "invalid_payload",
        "payload.since: Input should have timezone info",
    ),
    (
        {"task_name": "project_export"},
        "invalid_payload",
        "project_id: the task project_export needs a project_id",
    ),
    (
        {"task_name": "data_processing", "payload": {"csv": "a"}, "priority": "urgent"},
        "validation_error",
        "priority:",
    ),
    # What PostgreSQL (or the run) would refuse: before, a 500 or a retried attempt.
    (
        {"task_name": "data_processing", "payload": {"csv": "a\x00b"}},
        "invalid_payload",
        "payload.csv: must not contain NUL characters",
    ),
    (
        {"task_name": "data_processing", "payload": {"csv": "a", "columns": ["a", "\x00"]}},
        "invalid_payload",
        "payload.columns.1: must not contain NUL characters",
    ),
    (
        {"task_name": "data_processing", "payload": {"csv": "a"}, "idempotency_key": "k\x00"},
        "validation_error",
        "idempotency_key: Value error, must not contain NUL characters",
    ),
    (
        {"task_name": "data\x00processing"},
        "validation_error",
        "task_name: Value error, must not contain NUL characters",
    ),
    (
        {
            "task_name": "project_activity_report",
            "payload": {"since": "0001-01-01T00:00:00+14:00"},
            "project_id": str(uuid.uuid4()),
        },
        "invalid_payload",
        "payload.since: is out of range: it has no UTC form",
    ),
    (
        {
            "task_name": "project_activity_report",
            "payload": {"until": "9999-12-31T23:00:00-14:00"},
            "project_id": str(uuid.uuid4()),
        },
        "invalid_payload",
        "payload.until: is out of range: it has no UTC form",
    ),
    (
        {"task_name": "test_block", "payload": {"block_attempts": "1" + "0" * 24}},
        "invalid_payload",
        "payload.block_attempts: is out of range (at most 64 bits)",
    ),
]


async def test_bad_submissions_are_422_naming_the_field(jobs_server: Running) -> None:
    ann = auth(await jobs_server.signup_login("ann@example.com"))
    for body, code, message in BAD_SUBMISSIONS:
        r = await run(jobs_server, ann, **body)
        assert r.status_code == 422, (body, r.text)
        assert r.json()["error"]["code"] == code, body
        assert r.json()["error"]["message"].startswith(message), (body, r.text)
    listed = await jobs_server.client.get("/api/v1/jobs/", headers=ann)
    assert listed.json()["total"] == 0  # nothing was queued


async def test_access_control(jobs_server: Running) -> None:
    server = jobs_server
    owner_tokens = await server.signup_login("owner@example.com")
    colla_tokens = await server.signup_login("colla@example.com")
    viewer_tokens = await server.signup_login("viewer@example.com")
    owner, colla, viewer = auth(owner_tokens), auth(colla_tokens), auth(viewer_tokens)
    stranger = auth(await server.signup_login("stranger@example.com"))
    project_id = await project_with(
        server,
        owner,
        {"c": (colla_tokens, "collaborator"), "v": (viewer_tokens, "viewer")},
    )
    blocked = {"task_name": "test_block", "project_id": project_id}
    r = await run(server, viewer, **blocked)
    assert (r.status_code, r.json()["error"]["code"]) == (403, "forbidden_role")
    r = await run(server, stranger, **blocked)
    assert (r.status_code, r.json()["error"]["code"]) == (404, "project_not_found")
    mine = (await run(server, colla, **blocked)).json()["job_id"]
    owners = (await run(server, owner, **blocked)).json()["job_id"]
    private = (await run(server, colla, task_name="test_block")).json()["job_id"]

    async def status(job_id: str, who: dict[str, str]) -> int:
        r = await server.client.get(f"/api/v1/jobs/{job_id}/status", headers=who)
        return r.status_code

    assert await status(mine, viewer) == 200  # members read a project's jobs
    assert await status(mine, stranger) == 404
    assert await status(private, owner) == 404  # not tied to the project: the creator's
    assert await status(f"job_{uuid.uuid4()}", owner) == 404
    r = await server.client.get("/api/v1/jobs/nonsense/status", headers=owner)
    assert (r.status_code, r.json()["error"]["code"]) == (422, "invalid_id")

    r = await server.client.post(f"/api/v1/jobs/{mine}/cancel", headers=viewer)
    assert (r.status_code, r.json()["error"]["code"]) == (403, "forbidden_role")
    r = await server.client.post(f"/api/v1/jobs/{owners}/cancel", headers=colla)
    assert r.status_code == 403
    r = await server.client.post(f"/api/v1/jobs/{mine}/cancel", headers=stranger)
    assert (r.status_code, r.json()["error"]["code"]) == (404, "job_not_found")
    r = await server.client.post(f"/api/v1/jobs/{mine}/cancel", headers=owner)
    assert r.status_code == 200  # owners cancel every job of their project

    listed = await server.client.get(
        "/api/v1/jobs/", params={"project_id": project_id}, headers=viewer
    )
    assert {j["job_id"] for j in listed.json()["jobs"]} == {mine, owners}
    r = await server.client.get(
        "/api/v1/jobs/", params={"project_id": project_id}, headers=stranger
    )
    assert r.status_code == 404
    own = await server.client.get("/api/v1/jobs/", headers=colla)
    assert [j["job_id"] for j in own.json()["jobs"]] == [private, mine]  # newest first
    for job_id in (owners, private):
        await server.client.post(
            f"/api/v1/jobs/{job_id}/cancel", headers=owner if job_id == owners else colla
        )


async def test_cancel_running_and_queued_then_retry(jobs_server: Running) -> None:
    server = jobs_server
    ann = auth(await server.signup_login("ann@example.com"))
    running = [(await run(server, ann, task_name="test_block")).json()["job_id"] for _ in range(2)]
    for job_id in running:
        await wait_status(server, job_id, JobStatus.RUNNING)
    queued = (await run(server, ann, task_name="test_block", payload={"block_attempts": 0})).json()[
        "job_id"
    ]
    r = await server.client.post(f"/api/v1/jobs/{queued}/cancel", headers=ann)
    assert r.json()["status"] == "cancelled"  # at once
    with trio.fail_after(1.0):
        r = await server.client.post(f"/api/v1/jobs/{running[0]}/cancel", headers=ann)
        assert r.status_code == 200
        await wait_status(server, running[0], JobStatus.CANCELLED)
    r = await server.client.post(f"/api/v1/jobs/{running[0]}/cancel", headers=ann)
    assert (r.status_code, r.json()["error"]["code"]) == (409, "job_state_conflict")

    r = await server.client.get("/api/v1/jobs/", params={"status": "cancelled"}, headers=ann)
    assert {j["job_id"] for j in r.json()["jobs"]} == {queued, running[0]}
    assert r.json()["jobs"][0]["result"] is None  # lists leave results out
    r = await server.client.get("/api/v1/jobs/", params={"limit": 1, "offset": 1}, headers=ann)
    assert r.json()["total"] == 3 and len(r.json()["jobs"]) == 1

    r = await server.client.post(f"/api/v1/jobs/{queued}/retry", headers=ann)
    assert r.json()["status"] == "queued"
    await server.client.post(f"/api/v1/jobs/{running[1]}/cancel", headers=ann)
    await wait_status(server, queued, JobStatus.COMPLETED)
    r = await server.client.get(f"/api/v1/jobs/{queued}/status", headers=ann)
    assert r.json()["result"] == {"attempt": 1}
    r = await server.client.post(f"/api/v1/jobs/{queued}/retry", headers=ann)
    assert r.status_code == 409


async def test_tasks_openapi_and_supervision(jobs_server: Running) -> None:
    server = jobs_server
    ann = auth(await server.signup_login("ann@example.com"))
    r = await server.client.get("/api/v1/jobs/tasks", headers=ann)
    tasks = {t["name"]: t for t in r.json()["tasks"]}
    assert {"data_processing", "project_export", "project_activity_report"} <= set(tasks)
    assert "csv" in tasks["data_processing"]["payload_schema"]["properties"]
    assert tasks["data_processing"]["description"].startswith("Statistics of a CSV")
    assert tasks["project_export"]["needs_project"] is True

    spec = (await server.client.get("/openapi.json")).json()
    documented = {
        (path, method): set(op["responses"])
        for path, ops in spec["paths"].items()
        if path.startswith("/api/v1/jobs")
        for method, op in ops.items()
    }
    assert documented[("/api/v1/jobs/run", "post")] >= {"200", "202", "401", "403", "404", "422"}
    assert documented[("/api/v1/jobs/{job_id}/cancel", "post")] >= {"200", "403", "404", "409"}
    assert documented[("/api/v1/jobs/{job_id}/status", "get")] >= {"200", "404", "422"}

    job_id = (await run(server, ann, task_name="test_block")).json()["job_id"]
    await wait_status(server, job_id, JobStatus.RUNNING)
    assert server.bound.supervisor is not None
    tree = server.bound.supervisor.snapshot().to_dict()
    jobs = next(c for c in tree["children"] if c["name"] == "jobs")["supervisor"]
    held = [c["detail"]["job_id"] for c in jobs["children"] if c["name"] in ("job_1", "job_2")]
    assert job_id in held
    await server.client.post(f"/api/v1/jobs/{job_id}/cancel", headers=ann)


@pytest.mark.parametrize("transport", ["main", "listener"])
async def test_job_events_reach_a_connected_workspace(jobs_server: Running, transport: str) -> None:
    server = jobs_server
    tokens = await server.signup_login("ann@example.com")
    ann = auth(tokens)
    project_id = await project_with(server, ann, {})
    port = server.bound.port if transport == "main" else server.bound.ws_port
    async with connect(f"ws://127.0.0.1:{port}/ws/{project_id}", tokens["access_token"]) as ws:
        assert (await ws.recv())["type"] == "PRESENCE_STATE"
        await ws.until("USER_JOIN")
        body = {"task_name": "data_processing", "payload": {"csv": CSV}, "project_id": project_id}
        job_id = (await run(server, ann, **body)).json()["job_id"]
        seen = []
        while not seen or seen[-1]["type"] != "JOB_COMPLETED":
            message = await ws.recv()
            if message["type"].startswith("JOB_"):
                seen.append(message)
    durable = [m for m in seen if m["type"] != "JOB_PROGRESS"]
    assert [m["type"] for m in durable] == ["JOB_QUEUED", "JOB_STARTED", "JOB_COMPLETED"]
    assert all(m["job_id"] == job_id and m["user_id"] == tokens["user_id"] for m in seen)
    assert [m["seq"] for m in durable] == list(range(durable[0]["seq"], durable[0]["seq"] + 3))
    progress = [m for m in seen if m["type"] == "JOB_PROGRESS"]
    assert progress and all("seq" not in m for m in progress)  # ephemeral
    assert progress[-1]["progress"] <= 100 and progress[-1]["task_name"] == "data_processing"
    log = await server.client.get(f"/api/v1/projects/{project_id}/events", headers=ann)
    stored = [e["type"] for e in log.json()["events"] if e["type"].startswith("JOB_")]
    assert stored == ["JOB_QUEUED", "JOB_STARTED", "JOB_COMPLETED"]  # progress is not stored


@pytest.mark.parametrize("transport", ["main", "listener"])
async def test_events_a_separate_worker_commits_reach_the_workspace_live(
    start_server: StartServer, database_url: str, transport: str
) -> None:
    """An API process that runs no job actors still shows a job's run live: the worker
    (here: another pool, as another process has) commits JOB_STARTED and JOB_COMPLETED,
    and the API's workspace reads them from the log on the NOTIFY."""
    async with start_server(WORKER_CONCURRENCY=0) as server:
        tokens = await server.signup_login("ann@example.com")
        ann = auth(tokens)
        project_id = await project_with(server, ann, {})
        port = server.bound.port if transport == "main" else server.bound.ws_port
        async with (
            connect(f"ws://127.0.0.1:{port}/ws/{project_id}", tokens["access_token"]) as ws,
            open_database(database_url, pool_size=2) as worker_db,
        ):
            await ws.until("USER_JOIN")
            body = {"task_name": "data_processing", "payload": {"csv": CSV}}
            job_id = (await run(server, ann, **body, project_id=project_id)).json()["job_id"]
            assert (await ws.until("JOB_QUEUED"))["job_id"] == job_id
            now = datetime.now(UTC)
            claimed = await job_runs.claim(worker_db, worker="elsewhere", now=now, lease_seconds=30)
            assert claimed is not None
            await job_runs.complete(worker_db, claimed, now=now, result={"rows": 3})
            started = await ws.until("JOB_STARTED")
            completed = await ws.until("JOB_COMPLETED")
        assert started["job_id"] == completed["job_id"] == job_id
        assert completed["seq"] == started["seq"] + 1
