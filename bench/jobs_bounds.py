"""Issue 19's table rows on CPU and progress, against ``python run.py`` (a real server).

    python bench/jobs_bounds.py

Starts a pgserver PostgreSQL and ``run.py serve`` (default settings: 4 job actors,
JOB_WORKER_MEMORY_MB=1024), then:

- ``data_processing`` with a 20,000-column ``columns`` list and ``timeout=1``, three times:
  its outcome and time, and the CPU of the server and all its child processes
  (``/proc``) during the job, in the next second and in the two after;
- six of them at once: ``/ready`` latency meanwhile, and the CPU after;
- four 3,000-column CSV jobs in a project with a workspace connected: the
  ``JOB_PROGRESS`` frames each sends and the row writes each makes (an ``AFTER UPDATE``
  trigger on ``jobs`` counts them: claim, heartbeats, progress, completion).
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[0] = str(ROOT)
sys.path.insert(1, str(ROOT / "tests"))

import httpx  # noqa: E402
import pgserver  # noqa: E402
import trio  # noqa: E402

from tests.served import run_py_env, start_serving  # noqa: E402
from tests.test_jobs_worker import cpu_seconds  # noqa: E402
from tests.wsclient import connect  # noqa: E402

TRIGGER = """
CREATE TABLE job_updates (job_id uuid, at timestamptz DEFAULT clock_timestamp());
CREATE FUNCTION note_job_update() RETURNS trigger AS $$
BEGIN INSERT INTO job_updates(job_id) VALUES (NEW.id); RETURN NEW; END $$ LANGUAGE plpgsql;
CREATE TRIGGER note_job_update AFTER UPDATE ON jobs
FOR EACH ROW EXECUTE FUNCTION note_job_update();
"""
PASSWORD = "correct horse"


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * p / 100))]


async def ready_latencies(client: httpx.AsyncClient, seconds: float) -> list[float]:
    out = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        began = time.perf_counter()
        assert (await client.get("/ready")).status_code == 200
        out.append((time.perf_counter() - began) * 1000)
        await trio.sleep(0.02)
    return out


async def finished(client: httpx.AsyncClient, auth: dict[str, str], job_id: str) -> Any:
    with trio.fail_after(120):
        while True:
            body = (await client.get(f"/api/v1/jobs/{job_id}/status", headers=auth)).json()
            if body["status"] in ("completed", "dead", "cancelled", "failed"):
                return body
            await trio.sleep(0.05)


async def wide_columns(client: httpx.AsyncClient, auth: dict[str, str], pid: int) -> None:
    names = [f"c{i}" for i in range(20_000)]
    csv = ",".join(names) + "\n" + ",".join("1" for _ in names) + "\n"
    body = {
        "task_name": "data_processing",
        "payload": {"csv": csv, "columns": names},
        "timeout": 1,
        "max_retries": 0,
    }
    for run in ("first", "second", "third"):
        before = cpu_seconds(pid)
        began = time.perf_counter()
        r = await client.post("/api/v1/jobs/run", json=body, headers=auth)
        job = await finished(client, auth, r.json()["job_id"])
        took = time.perf_counter() - began
        during = cpu_seconds(pid)
        await trio.sleep(1.0)
        next_second = cpu_seconds(pid)
        await trio.sleep(2.0)
        print(
            f"20,000 columns, timeout=1, {run}: {job['status']} at {took:.2f} s"
            f" {job['error'] or ''}; CPU (server and children) during {during - before:.2f} s,"
            f" the next second {next_second - during:.2f} s,"
            f" the 2 s after {cpu_seconds(pid) - next_second:.2f} s"
        )
    jobs = [
        (await client.post("/api/v1/jobs/run", json=body, headers=auth)).json()["job_id"]
        for _ in range(6)
    ]
    meanwhile = await ready_latencies(client, 2.0)
    outcomes = [(await finished(client, auth, j))["status"] for j in jobs]
    await trio.sleep(1.0)
    after = cpu_seconds(pid)
    await trio.sleep(2.0)
    print(
        f"six at once: {outcomes}; /ready meanwhile p50 {statistics.median(meanwhile):.1f} ms,"
        f" p99 {percentile(meanwhile, 99):.1f} ms; CPU in the 2 s from 1 s after the last"
        f" {cpu_seconds(pid) - after:.2f} s"
    )


async def wide_progress(
    client: httpx.AsyncClient, auth: dict[str, str], token: str, host: str
) -> None:
    project = (await client.post("/api/v1/projects/", json={"name": "P"}, headers=auth)).json()
    names = [f"column_{i}" for i in range(3000)]
    rows = (",".join(f"v{j}_{i % 7}" for i in range(3000)) for j in range(5))
    csv = ",".join(names) + "\n" + "\n".join(rows) + "\n"
    print(f"wide CSV: {len(csv) / 1000:.0f} KB, 3,000 columns, four jobs")
    frames: dict[str, int] = {}
    body = {"task_name": "data_processing", "payload": {"csv": csv}, "project_id": project["id"]}
    async with connect(f"ws://{host}/ws/{project['id']}", token) as ws:
        await ws.until("USER_JOIN")
        jobs = [
            (await client.post("/api/v1/jobs/run", json=body, headers=auth)).json()["job_id"]
            for _ in range(4)
        ]
        done: set[str] = set()
        with trio.fail_after(120):
            while len(done) < len(jobs):
                message = await ws.recv()
                if message["type"] == "JOB_PROGRESS":
                    frames[message["job_id"]] = frames.get(message["job_id"], 0) + 1
                elif message["type"] in ("JOB_COMPLETED", "JOB_DEAD", "JOB_FAILED"):
                    done.add(message["job_id"])
    for job_id in jobs:
        job = await finished(client, auth, job_id)
        print(
            f"  {job_id}: {job['status']}, {frames.get(job_id, 0)} progress frames,"
            f" started {job['started_at']}, completed {job['completed_at']}"
        )


async def bench(url: str, server: Any, data_dir: str) -> None:
    env = run_py_env(Path(data_dir), url, RATE_LIMIT_PER_MINUTE="100000", ENVIRONMENT="development")
    async with trio.open_nursery() as nursery:
        served = await start_serving(nursery, env, stderr=sys.stderr.buffer)
        server.psql(TRIGGER)
        pid = served.process.pid
        async with httpx.AsyncClient(base_url=served.url, timeout=60) as client:
            account = {"email": "x@example.com", "password": PASSWORD}
            await client.post("/api/v1/auth/signup", json=account)
            tokens = (await client.post("/api/v1/auth/login", json=account)).json()
            auth = {"Authorization": f"Bearer {tokens['access_token']}"}
            idle = await ready_latencies(client, 2.0)
            print(
                f"/ready idle: p50 {statistics.median(idle):.1f} ms,"
                f" p99 {percentile(idle, 99):.1f} ms"
            )
            began = time.perf_counter()
            one_line = {"task_name": "data_processing", "payload": {"csv": "a\n1\n"}}
            r = await client.post("/api/v1/jobs/run", json=one_line, headers=auth)
            first = await finished(client, auth, r.json()["job_id"])
            print(
                f"a one-line CSV first on the fresh server (the forkserver and a worker start):"
                f" {first['status']} in {time.perf_counter() - began:.2f} s"
            )
            await wide_columns(client, auth, pid)
            host = served.url.split("//")[1]
            await wide_progress(client, auth, tokens["access_token"], host)
        served.process.terminate()


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="atrium-bench-") as tmp:
        server = pgserver.get_server(Path(tmp) / "pg", cleanup_mode="stop")
        trio.run(bench, server.get_uri(), server, str(Path(tmp) / "data"))
        print("row writes per wide-CSV job (claim, heartbeats, progress, completion):")
        print(
            server.psql(
                "SELECT 'job_' || u.job_id AS job, count(*) AS row_writes FROM job_updates u"
                " JOIN jobs j ON j.id = u.job_id WHERE j.project_id IS NOT NULL"
                " GROUP BY u.job_id ORDER BY 1;"
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
