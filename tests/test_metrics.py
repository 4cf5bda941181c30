"""Prometheus metrics after real traffic: the real server, scraped on its METRICS_PORT and
parsed with prometheus-client's own text parser."""

from __future__ import annotations

import math
import uuid
from typing import Any

import httpx
import pytest
import trio
from conftest import CLIENT_TLS, Running, StartServer, crash_workspace
from prometheus_client.parser import text_string_to_metric_families
from test_document_actor import CrashingDocumentActor, InjectedFault
from test_jobs_api import CSV, auth, run, wait_status
from test_workspace import edit, make_team, session
from trio.testing import MockClock
from wsclient import connect, open_sending_ahead

from atrium.actors.document import ReadText
from atrium.core.jobs import COUNTED_STATES, JobStatus
from atrium.core.metrics import Metrics
from atrium.runtime.metrics_server import LiveState
from atrium.supervision import Backoff, ChildSpec, open_supervisor, supervisor_spec

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
WAIT = 10.0
COUNTED = [str(state) for state in COUNTED_STATES]


def parse(text: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


async def scrape(server: Running) -> Samples:
    port = server.bound.metrics_port
    assert port is not None
    async with httpx.AsyncClient(verify=CLIENT_TLS) as client:
        r = await client.get(f"http://127.0.0.1:{port}/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    return parse(r.text)


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def moved(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


async def drained(server: Running) -> None:
    """Wait until the server has finished with every WebSocket connection."""
    assert server.bound.services is not None
    with trio.fail_after(WAIT):
        await server.bound.services.value.realtime.wait_drained()


async def test_http_requests_by_route_template_method_and_status(server: Running) -> None:
    owner = (await server.signup_login("ann@example.com"))["access_token"]
    headers = {"Authorization": f"Bearer {owner}"}
    r = await server.client.post("/api/v1/projects/", json={"name": "M"}, headers=headers)
    project_id = r.json()["id"]
    before = await scrape(server)

    assert (await server.client.get(f"/no/such/{uuid.uuid4()}")).status_code == 404
    r = await server.client.get(f"/api/v1/projects/{project_id}", headers=headers)
    assert r.status_code == 200
    for _ in range(2):  # a miss fills the project-list cache, then a hit
        assert (await server.client.get("/api/v1/projects/", headers=headers)).status_code == 200
    after = await scrape(server)

    requests = "atrium_http_requests_total"
    assert moved(before, after, requests, route="unmatched", method="GET", status="404") == 1
    route = "/api/v1/projects/<project_id>"
    assert moved(before, after, requests, route=route, method="GET", status="200") == 1
    # One series per template, never per id.
    assert not any(project_id in dict(labels).get("route", "") for _, labels in after)
    timed = "atrium_http_request_duration_seconds_count"
    assert moved(before, after, timed, route=route, method="GET") == 1
    assert moved(before, after, timed, route="unmatched", method="GET") == 1
    lookups = "atrium_project_cache_lookups_total"
    assert moved(before, after, lookups, result="miss") == 1
    assert moved(before, after, lookups, result="hit") == 1
    # Database round trips are timed, and the pool is read at scrape time.
    assert moved(before, after, "atrium_db_query_duration_seconds_count") >= 2
    assert 1 <= value(after, "atrium_db_pool_connections") <= server.settings.db_pool_size
    assert value(after, "atrium_db_pool_in_use") >= 0


@pytest.mark.parametrize("transport", ["main", "listener"])
async def test_websocket_join_and_leave(server: Running, transport: str) -> None:
    team = await make_team(server, transport)
    before = await scrape(server)
    async with session(team, team.owner) as client:
        await client.send(edit("/a.py"))
        while (await client.recv())["type"] != "FILE_CHANGE":
            pass
        during = await scrape(server)
        assert value(during, "atrium_ws_connections_open", transport=transport) == 1
        assert value(during, "atrium_workspaces_running") == 1
    await drained(server)
    after = await scrape(server)

    assert value(after, "atrium_ws_connections_open", transport=transport) == 0
    # The client closed first: counted as a peer close, not under a server close code.
    assert moved(before, after, "atrium_ws_closes_total", code="peer") == 1
    assert moved(before, after, "atrium_ws_frames_in_total") == 1  # the edit
    # USER_JOIN and FILE_CHANGE reached the one connection, with the greeting and the ACK-
    # less edit's echo: every frame out was a delivery or the greeting.
    assert moved(before, after, "atrium_ws_deliveries_total") == 2
    assert moved(before, after, "atrium_ws_frames_out_total") == 3  # + PRESENCE_STATE


async def test_refusals_and_resumes_are_counted(server: Running) -> None:
    team = await make_team(server, "main")
    before = await scrape(server)
    async with connect(team.url(), "not-a-token") as refused:
        assert (await refused.closed())[0] == 4001
    async with session(team, team.owner, "?since_seq=0") as client:
        assert client is not None
    await drained(server)
    after = await scrape(server)
    assert moved(before, after, "atrium_ws_closes_total", code="4001") == 1
    assert moved(before, after, "atrium_ws_resumes_total") == 1
    # The project's log held its creation and two member additions.
    assert moved(before, after, "atrium_ws_resume_replayed_events_total") == 3


async def test_slow_consumer_close_is_counted(start_server: StartServer) -> None:
    async with start_server(WS_SEND_QUEUE=16, WS_RATE_LIMIT_PER_SECOND=100_000) as server:
        team = await make_team(server, "main")
        before = await scrape(server)
        big = "y" * 15_000
        async with (
            session(team, team.owner) as fast,
            connect(team.url(), team.viewer.token, queue=1) as slow,
            session(team, team.collaborator) as sender,
        ):
            # At most 8 edits ahead of the fast client (its queue holds 16).
            edits = (edit(f"/f{i}", blob=big) for i in range(300))
            async with open_sending_ahead(sender, edits, ahead=8) as read_one:
                left = False
                while not left:
                    message = await fast.recv()
                    left = message["type"] == "USER_LEAVE"
                    if message["type"] == "FILE_CHANGE":
                        read_one()
            assert (await slow.closed())[0] == 4008
        await drained(server)
        after = await scrape(server)
    assert moved(before, after, "atrium_ws_slow_consumer_closes_total") == 1
    assert moved(before, after, "atrium_ws_closes_total", code="4008") == 1


async def test_a_workspace_crash_counts_as_a_supervised_restart(server: Running) -> None:
    team = await make_team(server, "main")
    before = await scrape(server)
    async with session(team, team.owner) as client:
        await crash_workspace(await server.workspace_actor(team.project_id))
        assert (await client.closed())[0] == 1012
    await drained(server)
    after = await scrape(server)
    restarts = "atrium_supervisor_restarts_total"
    assert moved(before, after, restarts, supervisor="root/workspaces", child="workspace:*") == 1
    assert value(after, restarts, supervisor="root", child="http") == 0


async def test_live_documents_are_one_series_however_many_run(server: Running) -> None:
    team = await make_team(server, "main")
    assert server.bound.services is not None
    documents = server.bound.services.value.documents
    before = await scrape(server)
    refs = [await documents.open(uuid.UUID(team.project_id), f"/{n}.md") for n in range(3)]
    actors = [await documents.get(ref.id) for ref in refs]
    during = await scrape(server)
    assert value(during, "atrium_documents_running") == 3
    assert value(during, "atrium_document_mailbox_depth") == 0
    actors[0].__class__ = CrashingDocumentActor
    with pytest.raises(InjectedFault):
        await actors[0].ask(ReadText())
    restarted = await documents.get(refs[0].id)  # waits for the restart
    assert restarted is not actors[0]
    after = await scrape(server)
    restarts = "atrium_supervisor_restarts_total"
    assert moved(before, after, restarts, supervisor="root/documents", child="document:*") == 1
    assert not any(
        str(ref.id) in dict(labels).get("child", "") for ref in refs for _, labels in after
    )


async def test_job_runs_and_queue_depth(start_server: StartServer) -> None:
    async with start_server(WORKER_CONCURRENCY=1, JOB_TASK_MODULES="tests.job_tasks") as server:
        ann = auth(await server.signup_login("ann@example.com"))
        before = await scrape(server)
        r = await run(server, ann, task_name="data_processing", payload={"csv": CSV})
        assert r.status_code == 202, r.text
        await wait_status(server, r.json()["job_id"], JobStatus.COMPLETED)
        r = await run(server, ann, task_name="test_dead_first", payload={"dead_attempts": 1})
        await wait_status(server, r.json()["job_id"], JobStatus.DEAD)
        after = await scrape(server)
    attempts = "atrium_job_attempts_total"
    assert moved(before, after, attempts, task="data_processing", outcome="completed") == 1
    assert moved(before, after, attempts, task="test_dead_first", outcome="dead") == 1
    timed = "atrium_job_run_duration_seconds_count"
    assert moved(before, after, timed, task="data_processing") == 1
    # Every state but completed is counted whole; completed jobs within the last 5 minutes.
    depth = {state: value(after, "atrium_jobs", state=state) for state in COUNTED}
    assert depth == {"queued": 0, "running": 0, "failed": 0, "dead": 1, "cancelled": 0}
    assert value(after, "atrium_jobs_completed_recent") == 1


async def test_escalations_are_counted_by_the_supervisor_that_escalated(
    autojump_clock: MockClock,
) -> None:
    starts: list[float] = []

    async def crashes_twice(*, task_status: trio.TaskStatus[None]) -> None:
        starts.append(trio.current_time())
        task_status.started()
        if len(starts) <= 2:
            await trio.sleep(1)
            raise RuntimeError("boom")
        await trio.sleep_forever()

    # "sub" gives up at its worker's first crash; the root restarts it (twice, within its
    # own allowance), and the third worker lives.
    sub = supervisor_spec(
        "sub", ChildSpec("worker", crashes_twice), max_restarts=0, backoff=Backoff(base=0.0)
    )
    metrics = Metrics()
    async with open_supervisor(
        name="root", max_restarts=5, period=60, backoff=Backoff(base=0.0)
    ) as root:
        metrics.watch(LiveState(lambda: root, lambda: None))
        await root.start_child(sub)
        await trio.sleep(10)
        samples = parse((await metrics.exposition()).decode())
        summary = await metrics.summary()
    assert len(starts) == 3
    escalations = "atrium_supervisor_escalations_total"
    assert value(samples, escalations, supervisor="root/sub") == 2
    # An escalation is also a restart of the supervisor child, by its parent.
    restarts = "atrium_supervisor_restarts_total"
    assert value(samples, restarts, supervisor="root", child="sub") == 2
    assert value(samples, restarts, supervisor="root/sub", child="worker") == 0
    assert summary["supervision"] == {"restarts": 2, "escalations": 2}
    assert root.child("sub").escalation_count == 2


async def test_disabled_metrics_have_no_listener(start_server: StartServer) -> None:
    async with start_server(ENABLE_METRICS="false") as server:
        assert server.bound.metrics_port is None
        assert server.bound.supervisor is not None
        names = [child.name for child in server.bound.supervisor.snapshot().children]
        assert "metrics" not in names and "http" in names
        assert (await server.client.get("/metrics")).status_code == 404


async def test_development_serves_metrics_on_the_main_port_too(
    start_server: StartServer,
) -> None:
    async with start_server(ENVIRONMENT="development") as server:
        await server.client.get("/nowhere")
        r = await server.client.get("/metrics")
        assert r.status_code == 200
        samples: dict[Any, float] = parse(r.text)
        key = "atrium_http_requests_total"
        assert value(samples, key, route="unmatched", method="GET", status="404") == 1


async def test_console_percentiles_cover_the_last_five_minutes(
    autojump_clock: MockClock,
) -> None:
    metrics = Metrics(clock=trio.current_time)
    for _ in range(100):
        metrics.observe_query(2.0)  # in the 1-2.5 s bucket
    await trio.sleep(200)
    for _ in range(100):
        metrics.observe_query(0.002)  # in the 1-2.5 ms bucket
    both = (await metrics.summary())["database"]["query_latency_seconds"]
    assert both["p50"] == pytest.approx(0.0025)
    assert both["p99"] == pytest.approx(1.0 + 1.5 * 98 / 100)

    await trio.sleep(150)  # the slow queries are 350 s old, the fast ones 150 s
    recent = (await metrics.summary())["database"]["query_latency_seconds"]
    assert recent["p99"] == pytest.approx(0.001 + 0.0015 * 99 / 100)

    await trio.sleep(300)
    assert (await metrics.summary())["database"]["query_latency_seconds"] is None
    # The Prometheus histogram still counts every query since the start.
    registry = metrics.registry
    assert registry.get_sample_value("atrium_db_query_duration_seconds_count") == 200


def test_recent_latencies_keep_one_count_per_bucket_per_step() -> None:
    now = [0.0]
    recent = Metrics(clock=lambda: now[0]).recent_requests
    for second in range(1000):  # one request a second for 1000 s
        now[0] = second
        recent.observe(0.01)
    # Kept: the current 30 s step (990-999 s) and the nine before it, nothing older.
    assert len(recent._slots) == 10
    assert recent.cumulative()[-1] == (math.inf, 9 * 30 + 10)


async def test_garbage_collections_are_timed_while_the_server_runs(
    start_server: StartServer,
) -> None:
    # A collection stops every task of the process; its time is what an operator looks at
    # when every latency jumps at once.
    import gc

    async with start_server() as server:
        before = await scrape(server)
        gc.collect()  # a full one
        after = await scrape(server)
        pauses = "atrium_gc_pause_seconds_count"
        assert moved(before, after, pauses, generation="2") >= 1
        assert moved(before, after, "atrium_gc_pause_seconds_sum", generation="2") > 0


def test_collections_are_timed_only_within_the_block() -> None:
    import gc

    metrics = Metrics()

    def full_collections() -> float | None:
        name, labels = "atrium_gc_pause_seconds_count", {"generation": "2"}
        return metrics.registry.get_sample_value(name, labels)

    with metrics.timing_gc():
        gc.collect()
    assert full_collections() == 1
    gc.collect()
    assert full_collections() == 1
