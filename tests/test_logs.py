"""Log lines as an operator reads them: JSON, correlated by request, connection and job
id, and free of secrets. Captured from a real server (hypercorn on port 0) through the
handler ``run.py`` installs (``atrium.core.logs.make_handler``)."""

from __future__ import annotations

import io
import logging
import uuid
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
import trio
from conftest import Running, StartServer
from trio.testing import wait_all_tasks_blocked
from wsclient import connect

from atrium.core.jobs import JobStatus
from atrium.core.logs import REDACTED, TextFormatter, log_context, make_handler
from atrium.supervision import ChildSpec, open_supervisor

WAIT = 10.0


class Captured:
    """Every line the root logger wrote while the test ran, parsed."""

    def __init__(self, stream: io.StringIO) -> None:
        self.stream = stream

    @property
    def text(self) -> str:
        return self.stream.getvalue()

    def lines(self, **match: Any) -> list[dict[str, Any]]:
        parsed = [orjson.loads(line) for line in self.text.splitlines()]
        return [line for line in parsed if all(line.get(k) == v for k, v in match.items())]

    async def access_line(self, request_id: str) -> dict[str, Any]:
        """The request's access line (written once its response is sent: the client may
        read the response first)."""
        for _ in range(1000):
            if found := self.lines(request_id=request_id, logger="atrium.access"):
                (line,) = found
                return line
            await trio.sleep(0.005)
        raise AssertionError(f"no access line for {request_id}")


@pytest.fixture
def logs() -> Iterator[Captured]:
    root = logging.getLogger()
    stream = io.StringIO()
    handler = make_handler("json", stream)
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)  # every line, not only what production shows
    try:
        yield Captured(stream)
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def auth(tokens: dict[str, Any]) -> dict[str, str]:
    return {"Authorization": f"Bearer {tokens['access_token']}"}


async def test_each_request_has_one_json_access_line_with_its_echoed_id(
    server: Running, logs: Captured
) -> None:
    tokens = await server.signup_login("ann@example.com")
    r = await server.client.get(
        "/api/v1/projects/", headers={**auth(tokens), "X-Request-ID": "req-42.A_b"}
    )
    assert r.status_code == 200
    assert r.headers["x-request-id"] == "req-42.A_b"

    for line in logs.lines():
        assert {"time", "level", "logger", "message"} <= line.keys()
    access = await logs.access_line("req-42.A_b")
    assert access["level"] == "INFO"
    assert access["method"] == "GET" and access["status"] == 200
    assert access["route"] == "/api/v1/projects/"
    assert access["user_id"] == tokens["user_id"]
    assert isinstance(access["duration_ms"], float) and access["duration_ms"] >= 0


async def test_responses_the_edge_answers_itself_are_logged_with_an_id(
    server: Running, logs: Captured
) -> None:
    r = await server.client.get("/health")  # a probe: answered before the app
    assert r.status_code == 200
    request_id = r.headers["x-request-id"]
    access = await logs.access_line(request_id)
    assert access["status"] == 200 and access["path"] == "/health"


@pytest.mark.parametrize("sent", ["has space", "x" * 129, "semi;colon", ""])
async def test_a_malformed_request_id_is_replaced(
    server: Running, logs: Captured, sent: str
) -> None:
    r = await server.client.get("/api/v1/projects/", headers={"X-Request-ID": sent})
    assert r.status_code == 401
    made = r.headers["x-request-id"]
    assert made != sent and uuid.UUID(hex=made).hex == made
    access = await logs.access_line(made)
    assert access["status"] == 401
    assert sent not in {line.get("request_id") for line in logs.lines()}


async def wait_no_connections(server: Running) -> None:
    assert server.bound.services is not None
    realtime = server.bound.services.value.realtime
    with trio.fail_after(WAIT):
        await realtime.wait_drained()


@pytest.mark.parametrize("transport", ["main", "listener"])
async def test_websocket_lines_carry_the_connection_id_and_project(
    server: Running, logs: Captured, transport: str
) -> None:
    tokens = await server.signup_login("ann@example.com")
    r = await server.client.post("/api/v1/projects/", json={"name": "P"}, headers=auth(tokens))
    project_id = r.json()["id"]
    port = server.bound.port if transport == "main" else server.bound.ws_port
    url = f"ws://127.0.0.1:{port}/ws/{project_id}"
    for _ in range(2):
        async with connect(url, tokens["access_token"]) as client:
            await client.recv()
        await wait_no_connections(server)

    lines = logs.lines(logger="atrium.realtime", project_id=project_id)
    joined = [line for line in lines if line["message"].startswith("joined the workspace")]
    assert len(joined) == 2
    assert {line["transport"] for line in joined} == {transport}
    assert all(line["user_id"] == tokens["user_id"] for line in joined)
    # One id per connection, on every line of that connection.
    ids = [line["connection_id"] for line in joined]
    assert len(set(ids)) == 2
    ended = [line for line in lines if line["message"] == "workspace connection ended"]
    assert sorted(line["connection_id"] for line in ended) == sorted(ids)


async def test_job_lines_carry_the_job_id_and_attempt(
    start_server: StartServer, logs: Captured
) -> None:
    async with start_server(WORKER_CONCURRENCY=1) as server:
        tokens = await server.signup_login("ann@example.com")
        r = await server.client.post(
            "/api/v1/jobs/run",
            json={"task_name": "data_processing", "payload": {"csv": "a,b\n1,2\n"}},
            headers=auth(tokens),
        )
        assert r.status_code == 202, r.text
        job_id = r.json()["job_id"]
        assert server.bound.services is not None
        queue = server.bound.services.value.jobs.queue
        with trio.fail_after(WAIT):
            await queue.wait_for(uuid.UUID(job_id.removeprefix("job_")), (JobStatus.COMPLETED,))
    lines = logs.lines(logger="atrium.jobs", job_id=job_id)
    assert any("started job" in line["message"] for line in lines)
    assert any(line["message"].endswith("completed") for line in lines)
    assert all(line["attempt"] == 1 and line["task"] == "data_processing" for line in lines)


async def test_no_secret_reaches_a_log_line(server: Running, logs: Captured) -> None:
    password = "correct horse battery staple"
    c = server.client
    r = await c.post("/api/v1/auth/signup", json={"email": "ann@example.com", "password": password})
    assert r.status_code == 201
    r = await c.post("/api/v1/auth/login", json={"email": "ann@example.com", "password": password})
    first = r.json()
    await c.post("/api/v1/auth/login", json={"email": "ann@example.com", "password": password[:-1]})
    r = await c.post("/api/v1/auth/refresh", json={"refresh_token": first["refresh_token"]})
    second = r.json()
    r = await c.post("/api/v1/projects/", json={"name": "P"}, headers=auth(second))
    project_id = r.json()["id"]
    await c.get("/api/v1/projects/", headers={"Authorization": "Bearer not-a-token"})
    for port in (server.bound.port, server.bound.ws_port):
        url = f"ws://127.0.0.1:{port}/ws/{project_id}"
        async with connect(url, second["access_token"]) as client:  # Authorization header
            await client.recv()
        async with connect(url) as client:  # the browser's AUTH frame
            await client.send({"type": "AUTH", "token": second["access_token"]})
            await client.recv()
        async with connect(url, "not-a-token") as client:
            assert (await client.closed())[0] == 4001
        await wait_no_connections(server)

    text = logs.text
    assert "atrium.access" in text and "atrium.realtime" in text  # lines were captured
    secrets = [
        password,
        "Bearer ",
        "not-a-token",
        *(tokens[k] for tokens in (first, second) for k in ("access_token", "refresh_token")),
    ]
    for secret in secrets:
        assert secret not in text


def test_jwt_shaped_strings_and_bearer_credentials_are_redacted() -> None:
    # The safety net for a line that should never have been written.
    token = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.c2lnbmF0dXJl"
    stream = io.StringIO()
    log = logging.getLogger("atrium.test_redaction")
    log.addHandler(make_handler("json", stream))
    log.propagate = False
    try:
        log.warning("token %s", token, extra={"header": f"Bearer {token}"})
        try:
            raise ValueError(f"bad Authorization: bearer {token[:20]}x")
        except ValueError:
            log.exception("failed")
    finally:
        log.handlers.clear()
        log.propagate = True
    text = stream.getvalue()
    assert token not in text and "eyJ" not in text and "earer " not in text
    first, second = (orjson.loads(line) for line in text.splitlines())
    assert first["message"] == f"token {REDACTED}" and first["header"] == REDACTED
    assert "ValueError" in second["exception"]


def test_text_lines_end_with_the_context_fields() -> None:
    stream = io.StringIO()
    handler = make_handler("text", stream)
    assert isinstance(handler.formatter, TextFormatter)
    log = logging.getLogger("atrium.test_text")
    log.addHandler(handler)
    log.propagate = False
    try:
        with log_context(request_id="r1", user_id="u1"):
            log.warning("hello %s", "world")
        log.warning("outside")
    finally:
        log.handlers.clear()
        log.propagate = True
    inside, outside = stream.getvalue().splitlines()
    assert inside.endswith("WARNING atrium.test_text: hello world request_id=r1 user_id=u1")
    assert outside.endswith("WARNING atrium.test_text: outside")


async def test_spawned_tasks_share_the_context_and_what_is_bound_later(
    logs: Captured,
) -> None:
    log = logging.getLogger("atrium.test_tasks")

    async def child(bound: trio.Event) -> None:
        await bound.wait()
        log.info("from a child task")

    async def unit() -> None:
        with log_context(connection_id="c1") as context:
            bound = trio.Event()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(child, bound)
                context.set(user_id="u1")
                bound.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(unit)
    (line,) = logs.lines(logger="atrium.test_tasks")
    assert line["connection_id"] == "c1" and line["user_id"] == "u1"


async def test_a_child_started_during_a_request_does_not_carry_its_ids(
    logs: Captured,
) -> None:
    log = logging.getLogger("atrium.test_child")

    async def child(*, task_status: trio.TaskStatus[None]) -> None:
        task_status.started()
        log.info("the child runs on")
        await trio.sleep_forever()

    async with open_supervisor(name="sup") as sup:
        with log_context(request_id="r1"):
            await sup.start_child(ChildSpec("child", child))
        await wait_all_tasks_blocked()
    (line,) = logs.lines(logger="atrium.test_child")
    assert "request_id" not in line
