"""Listings cost the same whatever the jobs hold; payloads and results have limits.

The memory test runs ``python run.py`` as a subprocess and reads its memory from outside
(``/proc/<pid>/status``): the peak resident size while it lists 100 jobs with 1 MB
payloads and results, against its size just before (the peak is reset through
``/proc/<pid>/clear_refs`` first).
"""

from __future__ import annotations

import subprocess
import uuid
from datetime import UTC, datetime
from pathlib import Path

import httpx
import orjson
import pytest
import trio
from conftest import CLIENT_TLS, StartServer
from served import run_py_env, start_serving
from test_jobs_api import auth, run, wait_status
from test_jobs_queue import make_user

from atrium.core.jobs import JobStatus, Priority
from atrium.core.timestamps import utc_iso
from atrium.persistence import job_runs
from atrium.persistence import jobs as store
from atrium.persistence.database import Database

MB = 1_000_000


async def _kib(pid: int, field: str) -> int:
    for line in (await trio.Path(f"/proc/{pid}/status").read_text()).splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


@pytest.mark.long
async def test_listing_100_jobs_of_1_mb_each_stays_within_20_mb(
    tmp_path: Path, database_url: str, db: Database
) -> None:
    env = run_py_env(
        tmp_path / "data",
        database_url,
        WORKER_CONCURRENCY="0",
        ENVIRONMENT="development",  # /ops/jobs without an operator token
    )
    async with trio.open_nursery() as nursery:
        served = await start_serving(nursery, env, stderr=subprocess.DEVNULL)
        pid = served.process.pid
        async with httpx.AsyncClient(base_url=served.url, timeout=30, verify=CLIENT_TLS) as client:
            login = {"email": "ann@example.com", "password": "correct horse"}
            assert (await client.post("/api/v1/auth/signup", json=login)).status_code == 201
            tokens = (await client.post("/api/v1/auth/login", json=login)).json()
            # Dead jobs with 1 MB payloads and results, written as the API never would.
            await db.execute(
                "INSERT INTO jobs (id, user_id, task_name, payload, priority, status,"
                " timeout_seconds, max_retries, result, error, created_at, next_attempt_at,"
                " completed_at) SELECT gen_random_uuid(), $1, 'data_processing',"
                " jsonb_build_object('csv', repeat('x', $2)), 1, 'dead', 60, 0,"
                " jsonb_build_object('blob', repeat('y', $2)), 'boom', now(), now(), now()"
                " FROM generate_series(1, 100)",
                uuid.UUID(tokens["user_id"]),
                MB,
            )
            headers = auth(tokens)
            lists = [("/api/v1/jobs/", headers), ("/ops/jobs", {})]
            for path, who in lists:  # warm: the first answer of each route, then measure
                assert (await client.get(path, params={"limit": 1}, headers=who)).status_code == 200
            await trio.Path(f"/proc/{pid}/clear_refs").write_text(
                "5"
            )  # the peak is now the size now
            before = await _kib(pid, "VmRSS")
            for path, who in lists * 2:
                r = await client.get(path, params={"limit": 100}, headers=who)
                assert r.status_code == 200, r.text
            peak = await _kib(pid, "VmHWM")
        served.process.terminate()
    jobs = r.json()["dead"]
    assert len(jobs) == 100 and all(j["result"] is None for j in jobs)
    assert all(MB < j["payload_bytes"] < MB + 100 for j in jobs)
    assert all(MB < j["result_bytes"] < MB + 100 for j in jobs)
    assert (peak - before) < 20 * 1024, f"RSS grew {(peak - before) / 1024:.1f} MB"


async def test_payload_and_result_limits(start_server: StartServer) -> None:
    """A payload over JOB_MAX_PAYLOAD_BYTES is refused at submission (413, naming it); a
    result over JOB_MAX_RESULT_BYTES ends its job dead, not stored, never retried. Lists
    show both sizes and no body; the status shows the result."""
    limits = {"JOB_MAX_PAYLOAD_BYTES": 2048, "JOB_MAX_RESULT_BYTES": 4096}
    async with start_server(
        WORKER_CONCURRENCY=1, JOB_TASK_MODULES="tests.job_tasks", **limits
    ) as server:
        ann = auth(await server.signup_login("ann@example.com"))
        r = await run(server, ann, task_name="data_processing", payload={"csv": "x" * 2100})
        assert (r.status_code, r.json()["error"]["code"]) == (413, "job_payload_too_large")
        assert r.json()["error"]["message"] == (
            "payload: 2,125 bytes as JSON, over JOB_MAX_PAYLOAD_BYTES (2,048)"
        )
        fits = await run(server, ann, task_name="test_sized_result", payload={"chars": 4000})
        over = await run(server, ann, task_name="test_sized_result", payload={"chars": 4100})
        fits_id, over_id = fits.json()["job_id"], over.json()["job_id"]
        await wait_status(server, fits_id, JobStatus.COMPLETED)
        await wait_status(server, over_id, JobStatus.DEAD)

        dead = (await server.client.get(f"/api/v1/jobs/{over_id}/status", headers=ann)).json()
        assert dead["error"] == (
            "result too large: 4,111 bytes as JSON, over JOB_MAX_RESULT_BYTES (4,096);"
            " it was not stored"
        )
        assert [a["outcome"] for a in dead["attempts"]] == ["dead"]
        assert (dead["result"], dead["result_bytes"]) == (None, None)
        done = (await server.client.get(f"/api/v1/jobs/{fits_id}/status", headers=ann)).json()
        assert done["result"] == {"blob": "x" * 4000}
        listed = (await server.client.get("/api/v1/jobs/", headers=ann)).json()["jobs"]
        sizes = {j["job_id"]: (j["result"], j["payload_bytes"], j["result_bytes"]) for j in listed}
        # Stored JSON text: PostgreSQL writes a space after each colon.
        assert sizes == {fits_id: (None, 15, 4012), over_id: (None, 15, None)}


async def test_a_listing_shows_the_last_attempts_and_errors_are_cut(db: Database) -> None:
    """A job retried by hand again and again, or a task whose error quotes its input,
    does not make a listing heavy: lists show the last ``LISTED_ATTEMPTS`` attempts, and
    an error is stored cut to ``MAX_ERROR_CHARS``."""
    user = await make_user(db, "ann")
    now = datetime.now(UTC)
    submitted = await store.submit(
        db,
        user_id=user,
        task_name="t",
        payload={},
        priority=Priority.NORMAL,
        timeout_seconds=60,
        max_retries=0,
        now=now,
    )
    attempts = [{"n": n, "started_at": utc_iso(now)} for n in range(1, 13)]
    await db.execute(
        "UPDATE jobs SET attempts = $2::jsonb WHERE id = $1",
        submitted.job.id,
        orjson.dumps(attempts).decode(),
    )
    claimed = await job_runs.claim(db, worker="w", now=now, lease_seconds=30)
    assert claimed is not None
    await job_runs.fail(db, claimed, now=now, error="e" * 10_000, retry_at=None)

    (listed,) = (await store.list_jobs(db, user)).jobs
    assert [a["n"] for a in listed.attempts] == list(range(4, 14))
    assert len(listed.attempts) == store.LISTED_ATTEMPTS
    job = await store.get_job(db, submitted.job.id, user)
    assert [a["n"] for a in job.attempts] == list(range(1, 14))
    assert job.error is not None and len(job.error) <= job_runs.MAX_ERROR_CHARS
    assert job.error.endswith("... (10,000 characters, cut)")
    assert job.attempts[-1]["error"] == job.error
