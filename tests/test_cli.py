"""run.py as an operator uses it: help, configuration errors, migrate, serve and stop."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import orjson
import trio
from conftest import CLIENT_TLS
from served import start_serving
from wsclient import connect

ROOT = Path(__file__).resolve().parent.parent


def run_py(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "run.py"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def base_env(tmp_path: Path, database_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("ENVIRONMENT", "SECRET_KEY")}
    env.update(DATA_DIR=str(tmp_path / "data"), DATABASE_URL=database_url, METRICS_PORT="0")
    return env


def test_help_explains_the_commands(tmp_path: Path, database_url: str) -> None:
    result = run_py("--help", env=base_env(tmp_path, database_url))
    assert result.returncode == 0
    assert "serve" in result.stdout and "migrate" in result.stdout


def test_bad_configuration_stops_with_one_line(tmp_path: Path, database_url: str) -> None:
    env = base_env(tmp_path, database_url)
    env["ENVIRONMENT"] = "production"
    result = run_py("migrate", env=env)
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        == "atrium: configuration error: SECRET_KEY: is required in production"
    )


def test_migrate_is_idempotent(tmp_path: Path, database_url: str) -> None:
    # The per-test database is already migrated from the template.
    result = run_py("migrate", env=base_env(tmp_path, database_url))
    assert result.returncode == 0, result.stderr
    assert "schema is up to date" in result.stdout


async def test_serve_answers_then_stops_cleanly_on_sigterm(
    tmp_path: Path, database_url: str
) -> None:
    env = base_env(tmp_path, database_url)
    env["PORT"] = "0"
    env["WS_PORT"] = "0"
    async with trio.open_nursery() as nursery:
        served = await start_serving(nursery, env, stderr=subprocess.DEVNULL)
        process, url = served.process, served.url
        assert process.stdout is not None
        async with httpx.AsyncClient(base_url=url, verify=CLIENT_TLS) as client:
            assert (await client.get("/health")).json() == {"status": "ok"}
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(30):
            rest = b""
            while chunk := await process.stdout.receive_some():
                rest += chunk
            assert await process.wait() == 0
        assert b"atrium: stopped" in rest


async def test_sigterm_drains_then_closes_websockets_and_finishes_requests(
    tmp_path: Path, database_url: str
) -> None:
    env = base_env(tmp_path, database_url)
    env.update(PORT="0", WS_PORT="0", DRAIN_SECONDS="1", LOG_FORMAT="json")
    log_path = tmp_path / "stderr.log"
    with open(log_path, "wb") as stderr:  # noqa: ASYNC230 - a local file, opened once
        async with trio.open_nursery() as nursery:
            served = await start_serving(nursery, env, stderr=stderr)
            process, url = served.process, served.url
            host, port = url.removeprefix("http://").rsplit(":", 1)
            with trio.fail_after(60):
                rest = await _drain_while_a_client_waits(process, url, host, int(port))
                assert await process.wait() == 0
    assert b"atrium: stopped" in rest
    # The subprocess logged JSON, its access lines with the request ids it echoed.
    lines = [orjson.loads(line) for line in log_path.read_bytes().splitlines() if line[:1] == b"{"]
    access = [line for line in lines if line["logger"] == "atrium.access"]
    assert any(line.get("request_id") == "drain-ready" and line["status"] == 503 for line in access)


async def _drain_while_a_client_waits(
    process: trio.Process, url: str, host: str, port: int
) -> bytes:
    """SIGTERM the server while a WebSocket is open and a request waits for the rest of
    its body; check each step of the drain; return what the server printed after."""
    assert process.stdout is not None
    credentials = {"email": "ann@example.com", "password": "correct horse"}
    async with httpx.AsyncClient(base_url=url, verify=CLIENT_TLS) as client:
        assert (await client.post("/api/v1/auth/signup", json=credentials)).status_code == 201
        tokens = (await client.post("/api/v1/auth/login", json=credentials)).json()
        auth = {"Authorization": f"Bearer {tokens['access_token']}"}
        r = await client.post("/api/v1/projects/", json={"name": "P"}, headers=auth)
        project_id = r.json()["id"]
        assert (await client.get("/ready")).status_code == 200

        body = orjson.dumps(credentials)
        slow = await trio.open_tcp_stream(host, port)
        await slow.send_all(
            b"POST /api/v1/auth/login HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body[:5])
        )
        async with connect(f"ws://{host}:{port}/ws/{project_id}", tokens["access_token"]) as ws:
            await ws.recv()
            process.send_signal(signal.SIGTERM)
            # At once: not ready (the load balancer stops sending), yet alive and serving.
            for _ in range(100):  # the signal is handled within milliseconds
                ready = await client.get("/ready", headers={"X-Request-ID": "drain-ready"})
                if ready.status_code != 200:
                    break
                await trio.sleep(0.005)
            assert ready.status_code == 503
            assert ready.json()["checks"]["draining"] is True
            assert (await client.get("/health")).status_code == 200
            # After DRAIN_SECONDS: WebSockets are told to resume elsewhere.
            assert await ws.closed() == (1001, "server_shutdown")

    # The request in flight all along still completes.
    await slow.send_all(body[5:])
    response = b""
    while chunk := await slow.receive_some():
        response += chunk
    await slow.aclose()
    assert response.startswith(b"HTTP/1.1 200")
    assert b'"access_token"' in response
    printed = b""
    while chunk := await process.stdout.receive_some():
        printed += chunk
    return printed
