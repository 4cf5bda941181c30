"""Two real ``run.py serve`` processes, one PostgreSQL, one Redis (restarted mid-stream):
clients on either process, on either transport, see the same events in the same order,
with no gap and no duplicate, and each other's cursors."""

from __future__ import annotations

import subprocess
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from conftest import CLIENT_TLS
from redis_server import RedisServer
from served import Served, run_py_env, start_serving
from test_workspace import edit
from wsclient import Client, connect

WAIT = 30.0


def process_env(tmp_path: Path, name: str, database_url: str, redis_url: str) -> dict[str, str]:
    return run_py_env(
        tmp_path / name,
        database_url,
        REDIS_URL=redis_url,
        REDIS_BREAKER_RESET_SECONDS="0.3",
        REDIS_BREAKER_FAILURES="2",
        WS_USER_EDITS_PER_SECOND="10000",
        DB_POOL_SIZE="4",
        WORKER_CONCURRENCY="0",
    )


async def wait_bridged(url: str) -> None:
    """Wait until the process's bridge is subscribed (its /ready says so)."""
    async with httpx.AsyncClient(base_url=url, verify=CLIENT_TLS) as http:
        with trio.fail_after(WAIT):
            # Another process: its /ready is what can be observed of it.
            while (await http.get("/ready")).json().get("status") != "ready":  # noqa: ASYNC110
                await trio.sleep(0.05)


async def signup(http: httpx.AsyncClient, email: str) -> dict[str, Any]:
    body = {"email": email, "password": "correct horse"}
    assert (await http.post("/api/v1/auth/signup", json=body)).status_code == 201
    r = await http.post("/api/v1/auth/login", json=body)
    assert r.status_code == 200, r.text
    tokens: dict[str, Any] = r.json()
    return tokens


def cursor(line: int) -> dict[str, Any]:
    return {"type": "CURSOR_UPDATE", "position": {"file": "/a.py", "line": line, "column": 0}}


def ws_url(served: Served, transport: str, project_id: str) -> str:
    port = int(served.url.rsplit(":", 1)[1]) if transport == "main" else served.ws_port
    return f"ws://127.0.0.1:{port}/ws/{project_id}"


async def read_changes(client: Client, total: int) -> list[dict[str, Any]]:
    """Durable events from now until ``total`` FILE_CHANGEs arrived (cursors skipped)."""
    durable: list[dict[str, Any]] = []
    with trio.fail_after(WAIT):
        while sum(m["type"] == "FILE_CHANGE" for m in durable) < total:
            message = await client.recv()
            if "seq" in message and message["type"] not in ("ACK", "PRESENCE_STATE"):
                durable.append(message)
    return durable


async def cursor_crosses(sender: Client, receiver: Client, user_id: str) -> None:
    with trio.fail_after(WAIT):
        while True:
            await sender.send(cursor(9))
            with trio.move_on_after(0.25):
                while True:
                    message = await receiver.until("CURSOR_UPDATE")
                    if message["user_id"] == user_id:
                        return


@pytest.mark.long
async def test_two_processes_one_order_across_a_redis_restart(
    tmp_path: Path, database_url: str, own_redis: RedisServer
) -> None:
    async with trio.open_nursery() as nursery:
        started: dict[str, Served] = {}

        async def serve(name: str) -> None:
            env = process_env(tmp_path, name, database_url, own_redis.url)
            started[name] = await start_serving(nursery, env, stderr=subprocess.DEVNULL)

        async with trio.open_nursery() as starting:  # both start at once
            starting.start_soon(serve, "a")
            starting.start_soon(serve, "b")
        a, b = started["a"], started["b"]
        try:
            await wait_bridged(a.url)
            await wait_bridged(b.url)
            async with httpx.AsyncClient(base_url=a.url, verify=CLIENT_TLS) as http:
                owner = await signup(http, "owner@example.com")
                collaborator = await signup(http, "collab@example.com")
                viewer = await signup(http, "viewer@example.com")
                auth = {"Authorization": f"Bearer {owner['access_token']}"}
                r = await http.post("/api/v1/projects/", json={"name": "Both"}, headers=auth)
                project_id = r.json()["id"]
                for member, role in ((collaborator, "collaborator"), (viewer, "viewer")):
                    r = await http.post(
                        f"/api/v1/projects/{project_id}/collaborators",
                        json={"user_id": member["user_id"], "role": role},
                        headers=auth,
                    )
                    assert r.status_code == 201, r.text
            async with AsyncExitStack() as stack:
                # One at a time: each join reaches every client already in, across the
                # processes, before the next client connects (so the joins' order is known).
                clients: list[Client] = []
                for served, transport, member in (
                    (a, "main", owner),
                    (b, "listener", collaborator),
                    (b, "main", viewer),
                ):
                    url = ws_url(served, transport, project_id)
                    clients.append(
                        await stack.enter_async_context(connect(url, member["access_token"]))
                    )
                    for client in clients:
                        with trio.fail_after(WAIT):
                            while (await client.until("USER_JOIN"))["user_id"] != member["user_id"]:
                                pass
                on_a, on_b, viewer_b = clients
                await cursor_crosses(on_a, viewer_b, owner["user_id"])
                await cursor_crosses(on_b, on_a, collaborator["user_id"])
                total = 60
                for n in range(total):
                    if n == 20:
                        own_redis.stop(kill=True)
                    if n == 40:
                        own_redis.start()
                    await (on_a if n % 2 else on_b).send(edit(f"/e{n}", f"e{n}"))
                    await trio.sleep(0.01)
                seen = [await read_changes(c, total) for c in (on_a, on_b, viewer_b)]
                await wait_bridged(a.url)
                await wait_bridged(b.url)
                await cursor_crosses(on_a, on_b, owner["user_id"])
            for durable in seen:
                seqs = [m["seq"] for m in durable]
                assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
                paths = [m["file_path"] for m in durable if m["type"] == "FILE_CHANGE"]
                assert sorted(paths) == sorted(f"/e{n}" for n in range(total))
            orders = [[m["seq"] for m in d if m["type"] == "FILE_CHANGE"] for d in seen]
            changes = [[m for m in d if m["type"] == "FILE_CHANGE"] for d in seen]
            assert orders[0] == orders[1] == orders[2]
            assert changes[0] == changes[1] == changes[2]
        finally:
            for served in (a, b):
                served.process.terminate()
