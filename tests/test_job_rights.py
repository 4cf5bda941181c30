"""A job acts with the rights its creator holds when the work runs (docs/JOBS.md, "Rights").

Every path that touches a project job (submit, status and lists, cancel, retry, and the
job actor's claim) is tried after the creator was removed from the project or demoted to
viewer, between submitting and that step.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from conftest import Running, StartServer
from test_jobs_api import auth, project_with, run
from test_jobs_queue import Rig, make_user, running_jobs, wait

from atrium.core.jobs import JobStatus
from atrium.core.roles import Role
from atrium.persistence import projects
from atrium.persistence.database import Database

CSV = "a,b\n1,2\n"


async def _project(db: Database, owner: uuid.UUID, member: uuid.UUID) -> uuid.UUID:
    created = await projects.create_project(
        db, owner, name="P", description=None, visibility="private"
    )
    project_id = created.value.id
    await projects.add_member(
        db, project_id, owner, role=Role.COLLABORATOR, user_id=member, email=None
    )
    return project_id


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ("removed", "not run: the job's creator is no longer a member of its project"),
        (
            "viewer",
            "not run: the job's creator is now a viewer of its project,"
            " and a viewer cannot run jobs there",
        ),
        ("project deleted", "not run: the job's project no longer exists"),
    ],
)
async def test_the_claim_ends_a_job_whose_creator_lost_the_right_to_run_it(
    db: Database, change: str, reason: str
) -> None:
    """Removed or demoted between submit and claim: the job ends dead with the reason,
    and its task never runs (it reads nothing). An owner's job of the same project still
    runs; an owner's retry of the refused job is refused again at the claim."""
    rig = Rig()
    owner, member = await make_user(db, "owner"), await make_user(db, "member")
    project_id = await _project(db, owner, member)
    async with running_jobs(db, rig.registry, concurrency=0) as (_, service, _):
        theirs = await service.submit(member, task_name="record", payload={}, project_id=project_id)
        if change == "removed":
            await projects.remove_member(db, project_id, owner, member)
        elif change == "viewer":
            await projects.change_role(db, project_id, owner, member, Role.VIEWER)
        ours = await service.submit(owner, task_name="record", payload={}, project_id=project_id)
        if change == "project deleted":
            await projects.delete_project(db, project_id, owner)
    async with running_jobs(db, rig.registry, concurrency=1) as (queue, service, _):
        dead = await wait(queue, theirs.job.id, JobStatus.DEAD)
        assert dead.error == reason
        assert [a["outcome"] for a in dead.attempts] == ["dead"]
        assert dead.attempts[0]["error"] == reason
        assert dead.result is None
        if change != "project deleted":
            await wait(queue, ours.job.id, JobStatus.COMPLETED)
            again = await service.retry(theirs.job.id, owner)  # owners retry every job
            assert again.status is JobStatus.QUEUED
            dead = await wait(queue, theirs.job.id, JobStatus.DEAD)
            assert dead.error == reason and len(dead.attempts) == 2
    assert theirs.job.id not in rig.ran
    assert rig.ran == ([] if change == "project deleted" else [ours.job.id])


async def call(server: Running, method: str, path: str, who: dict[str, str], **kw: Any) -> Any:
    r = await server.client.request(method, f"/api/v1{path}", headers=who, **kw)
    return r.status_code, r.json()


async def code(server: Running, method: str, path: str, who: dict[str, str], **kw: Any) -> Any:
    status, body = await call(server, method, path, who, **kw)
    return status, body["error"]["code"] if status >= 400 else body.get("status")


async def test_every_api_path_uses_the_role_held_now(start_server: StartServer) -> None:
    """Submit, look, list, cancel and retry, by the creator after a demotion to viewer
    and after a removal, by another collaborator, and by an owner; then who may ask for
    ``priority: high``. No job actor runs: each job stays where the test puts it."""
    async with start_server(WORKER_CONCURRENCY=0) as server:
        tokens = {n: await server.signup_login(f"{n}@example.com") for n in ("o", "b", "c")}
        o, b, c = (auth(tokens[n]) for n in ("o", "b", "c"))
        project_id = await project_with(
            server, o, {n: (tokens[n], "collaborator") for n in ("b", "c")}
        )
        body = {"task_name": "data_processing", "payload": {"csv": CSV}, "project_id": project_id}
        first, second, third = [(await run(server, b, **body)).json()["job_id"] for _ in range(3)]
        assert await code(server, "POST", f"/jobs/{first}/cancel", b) == (200, "cancelled")
        assert await code(server, "POST", f"/jobs/{first}/retry", c) == (403, "forbidden_role")

        # B demoted to viewer, between submit and retry.
        member = f"/projects/{project_id}/collaborators/{tokens['b']['user_id']}"
        r = await server.client.patch(f"/api/v1{member}", json={"role": "viewer"}, headers=o)
        assert r.status_code == 200, r.text
        assert (await run(server, b, **body)).status_code == 403
        assert await code(server, "GET", f"/jobs/{first}/status", b) == (200, "cancelled")
        assert await code(server, "POST", f"/jobs/{first}/retry", b) == (403, "forbidden_role")
        assert await code(server, "POST", f"/jobs/{second}/cancel", b) == (200, "cancelled")
        assert await code(server, "POST", f"/jobs/{first}/retry", o) == (200, "queued")
        assert await code(server, "POST", f"/jobs/{first}/cancel", o) == (200, "cancelled")

        # B removed, between submit and every later step.
        r = await server.client.delete(f"/api/v1{member}", headers=o)
        assert r.status_code == 204, r.text
        assert await code(server, "POST", "/jobs/run", b, json=body) == (404, "project_not_found")
        for job_id in (first, third):
            for method, path in (
                ("GET", "status"),
                ("POST", "cancel"),
                ("POST", "retry"),
            ):
                got = await code(server, method, f"/jobs/{job_id}/{path}", b)
                assert got == (404, "job_not_found"), (job_id, path)
        status, own = await call(server, "GET", "/jobs/", b)
        assert (status, own["total"], own["jobs"]) == (200, 0, [])
        listed = await code(server, "GET", "/jobs/", b, params={"project_id": project_id})
        assert listed == (404, "project_not_found")
        status, theirs = await call(server, "GET", "/jobs/", o, params={"project_id": project_id})
        assert {j["job_id"] for j in theirs["jobs"]} == {first, second, third}
        assert await code(server, "POST", f"/jobs/{third}/cancel", o) == (200, "cancelled")

        # High priority: an owner's, for the project's jobs.
        high = {**body, "priority": "high"}
        assert (await run(server, o, **high)).status_code == 202
        for who, job in (
            (c, high),
            (o, {**high, "project_id": None}),
            (c, {**high, "project_id": None}),
        ):
            r = await run(server, who, **job)
            assert (r.status_code, r.json()["error"]["code"]) == (403, "priority_forbidden")
            assert r.json()["error"]["message"].startswith("priority: high is for an owner")
        # A high job retried by someone who is no longer an owner runs at normal.
        member = f"/api/v1/projects/{project_id}/collaborators/{tokens['c']['user_id']}"
        await server.client.patch(member, json={"role": "owner"}, headers=o)
        job_id = (await run(server, c, **high)).json()["job_id"]
        await server.client.post(f"/api/v1/jobs/{job_id}/cancel", headers=c)
        await server.client.patch(member, json={"role": "collaborator"}, headers=o)
        r = await server.client.post(f"/api/v1/jobs/{job_id}/retry", headers=c)
        assert (r.status_code, r.json()["priority"]) == (200, "normal")
